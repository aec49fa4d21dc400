"""Encryption at rest: message bodies, rendered outputs and responses sealed with AES-GCM.

Each value is bound to its place, table, column and row id, through the associated
data: a ciphertext copied into another row or column does not open. The id of the
data key that sealed a value is stored beside it (NULL: stored in clear, before the
store was encrypted). A value is the 12-byte nonce followed by AES-GCM's output.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..keys import KeyFileError, Keys

NONCE_BYTES = 12


class SealError(Exception):
    """A stored value cannot be opened: its key is missing, or it is not the value sealed there."""


class _State(NamedTuple):
    path: str
    active: str
    aead: dict[str, AESGCM]


def _state(keys: Keys) -> _State:
    if keys.active is None:
        raise KeyFileError(f"{keys.path}: the key file has no data key; start the engine once or run "
                           "`interface-engine keys rotate` to add one")
    return _State(keys.path, keys.active, {key_id: AESGCM(key) for key_id, key in keys.data.items()})


def _place(place: str, row_id: int) -> bytes:
    return f"{place}:{row_id}".encode()


class Cipher:
    """Seals with the active data key; opens with whichever key a value names.

    `reload` re-reads the key file: a value sealed with a key this process has not
    seen yet (another process rotated) is opened after one reload, not refused.
    """

    def __init__(self, keys: Keys, reload: Callable[[], Keys] | None = None):
        self._state = _state(keys)
        self._reload = reload
        self._reloading = threading.Lock()

    @property
    def active(self) -> str:
        return self._state.active

    def use(self, keys: Keys):
        """Take up a re-read key file; the swap is one assignment, so any thread sees old or new."""
        self._state = _state(keys)

    def known(self) -> tuple[str, ...]:
        return tuple(self._state.aead)

    def seal(self, value: bytes, place: str, row_id: int) -> tuple[bytes, str]:
        """(sealed value, key id) for `value` stored at `place` ("table.column") of row `row_id`."""
        state = self._state
        nonce = os.urandom(NONCE_BYTES)
        return nonce + state.aead[state.active].encrypt(nonce, value, _place(place, row_id)), state.active

    def open(self, value: bytes, key_id: str, place: str, row_id: int) -> bytes:
        state = self._state
        aead = state.aead.get(key_id)
        if aead is None and self._reload is not None:
            with self._reloading:
                if key_id not in self._state.aead:
                    self.use(self._reload())
            state = self._state
            aead = state.aead.get(key_id)
        if aead is None:
            raise SealError(f"{place} of row {row_id} was sealed with data key {key_id}, which the key "
                            f"file {state.path} does not hold: restore the key file that has it")
        try:
            return aead.decrypt(value[:NONCE_BYTES], value[NONCE_BYTES:], _place(place, row_id))
        except InvalidTag:
            raise SealError(f"{place} of row {row_id} does not open with data key {key_id}: the key "
                            f"file {state.path} holds a different key under that id, or the value was "
                            "altered or moved from another row") from None
