"""Data key rotation: add a key for new writes, seal what is stored with it, retire the old one.

The key file changes first, so that no value is ever sealed with a key it does not
hold. A running engine takes the new key up by itself (engine.KEY_FILE_POLL), and
until it has, what it writes is found by the next pass. The rows are the progress:
an interrupted rotation is finished by running it again with `--resume`.
"""

from __future__ import annotations

import time
from typing import Callable

from . import keys as key_file
from .audit import FAILURE, SUCCESS, cli_actor, open_trail
from .engine import KEY_FILE_POLL
from .store.cipher import Cipher
from .store.rekey import CLEAR, Tally, reseal, usage

#: Passes over the store before giving up on values an engine keeps writing with an older key.
RESEAL_PASSES = 3
PROGRESS_EVERY = 1.0


class RotationError(Exception):
    """The rotation could not be finished; the text says what to do."""


def listing(config) -> list[str]:
    """`keys list`: each data key, when it was made, what it is for, how many stored values it seals."""
    found = key_file.load(config.keys_file)
    made = key_file.created_at(config.keys_file)
    store, _ = open_trail(config)
    try:
        counts = usage(store)
    finally:
        store.close()
    lines = [f"{'KEY':<10} {'CREATED':<21} {'VALUES':>10}  USE"]
    for key_id in found.data:
        use = "seals new writes" if key_id == found.active else (
            "can be retired" if not counts.get(key_id) else "older: `keys rotate --resume` moves its values")
        lines.append(f"{key_id:<10} {made.get(key_id, ''):<21} {counts.pop(key_id, 0):>10}  {use}")
    for key_id, n in sorted(counts.items()):
        note = ("stored before contents were encrypted: `keys rotate --resume` seals them"
                if key_id == CLEAR else "NOT IN THE KEY FILE: restore the key file that has it")
        lines.append(f"{key_id:<10} {'':<21} {n:>10}  {note}")
    return lines


def rotate(config, *, resume: bool, batch: int, say: Callable[[str], None]) -> Tally:
    """`keys rotate`: returns what was sealed; raises RotationError if anything is left behind."""
    store, trail = open_trail(config)
    actor, source = cli_actor()
    try:
        if not resume:
            previous = store.cipher.active if store.cipher else None
            found, key_id = key_file.add_data_key(config.keys_file)
            trail.record("keys.rotated", actor=actor, object_type="key", object_id=key_id,
                         source=source, detail={"previous": previous})
            say(f"data key {key_id} added to {config.keys_file}; new writes use it (a running "
                f"engine takes it up within {KEY_FILE_POLL:g} s)")
        elif store.cipher is None:
            raise RotationError(f"{config.keys_file} has no data key yet: run `interface-engine keys "
                                "rotate` without --resume")
        else:
            found = key_file.load(config.keys_file)
        store.cipher = Cipher(found, reload=lambda: key_file.load(config.keys_file))
        tally, left = _reseal_until_done(store, batch, say)
        trail.record("keys.resealed", actor=actor, object_type="key", object_id=found.active,
                     source=source, outcome=SUCCESS if not left else FAILURE,
                     detail={"sealed": tally.resealed, "unreadable": tally.unreadable_count,
                             "left": left})
    finally:
        store.close()
    say(f"sealed {tally.resealed} stored values with data key {found.active}")
    if tally.unreadable_count:
        raise RotationError(f"{tally.unreadable_count} stored values could not be opened and keep "
                            f"their key, e.g. {tally.unreadable[0]}")
    if left:
        raise RotationError(f"{left} stored values are still sealed with older keys: an engine on this "
                            "store still writes with an older key file; give it the new one and run "
                            "`interface-engine keys rotate --resume`")
    return tally


def _reseal_until_done(store, batch: int, say) -> tuple[Tally, int]:
    total, shown = Tally(), {}

    def progress(place: str, count: int):
        done = shown.setdefault(place, [0, 0.0])
        done[0] += count
        now = time.monotonic()
        if now - done[1] >= PROGRESS_EVERY:
            done[1] = now
            say(f"{place}: {done[0]} sealed")

    left = 0
    for n in range(RESEAL_PASSES):
        if n:
            time.sleep(KEY_FILE_POLL + 0.5)  # an engine not yet on the new key: let it take it up
        tally = reseal(store, batch=batch, progress=progress)
        total.resealed += tally.resealed
        total.unreadable = tally.unreadable
        total.unreadable_count = tally.unreadable_count
        counts = usage(store)
        left = sum(v for k, v in counts.items() if k != store.cipher.active) - tally.unreadable_count
        if left <= 0:
            return total, 0
    return total, left


def retire(config, key_id: str) -> str:
    """`keys retire`: forget a data key that no stored value needs; returns what to tell the user."""
    found = key_file.load(config.keys_file)
    if key_id == found.active:
        raise RotationError(f"data key {key_id} is the one new writes use: rotate first "
                            "(`interface-engine keys rotate`), then retire it")
    store, trail = open_trail(config)
    try:
        still = usage(store).get(key_id, 0)
        if still:
            raise RotationError(f"data key {key_id} still seals {still} stored values: run "
                                "`interface-engine keys rotate --resume` first")
        key_file.remove_data_key(config.keys_file, key_id)
        actor, source = cli_actor()
        trail.record("keys.retired", actor=actor, object_type="key", object_id=key_id, source=source)
    finally:
        store.close()
    return (f"data key {key_id} removed from {config.keys_file}; backups of the store taken while it "
            "was in use still need it: keep the old key file with those backups")
