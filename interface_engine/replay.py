"""Replay: send stored messages again, as new deliveries linked to the ones they repeat.

A message is replayed to every destination of its channel, or only to the ones
named, rendered with the channel's current config and mapping (default) or with the
output stored on its earlier delivery. Nothing is delivered here: the new deliveries
join their destinations' queues and the engine's workers send them. A dry run
computes the same and writes nothing.
"""

from __future__ import annotations

import difflib
import getpass
import json
import re
import socket
from dataclasses import dataclass, field

from . import hl7
from .channels.config import ChannelConfig
from .channels.pipeline import prepare_again
from .channels.templating import Mappings
from .store import ERROR, FILTERED, SENT, utcnow
from .store.replay import (ReplayDelivery, ReplayRecord, begin_replay, message_channels,
                           queue_replayed)

CURRENT, ORIGINAL = "current", "original"


class ReplayError(Exception):
    """A selection that cannot be replayed as given; the text says what to fix."""


def read_ids(arguments: tuple[int, ...], lines, source: str | None) -> tuple[list[int], str]:
    """The message ids given (arguments, then one per line: an id or a JSON object with "id"),
    without repeats, and a description of the selection for the replay's record."""
    ids = list(arguments)
    for number, line in enumerate(lines or (), 1):
        text = line.strip()
        if not text:
            continue
        try:
            value = json.loads(text)
            value = value["id"] if isinstance(value, dict) else value
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError
        except (ValueError, KeyError):
            raise ReplayError(f"{source} line {number}: expected a message id or a JSON object "
                              f"with an \"id\" (as `messages search --json` writes)") from None
        ids.append(value)
    ids = list(dict.fromkeys(ids))
    if not ids:
        raise ReplayError("no message ids given (pass ids, or --ids-from FILE, - for stdin)")
    described = f"{len(ids)} message(s): {ranges(ids)}"
    return ids, described + (f" (from {source})" if source else "")


def ranges(ids: list[int]) -> str:
    """1, 2, 3, 7 -> "1-3, 7": a long selection stays readable in the record."""
    parts, ordered = [], sorted(ids)
    start = prev = ordered[0]
    for i in ordered[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(parts)


@dataclass
class Share:
    """One destination's part of a replayed message: what would be sent, or why not."""

    destination: str
    output: bytes | None = None
    target: str | None = None
    previous: dict | None = None     # the delivery it repeats, if the destination had one
    filtered: str | None = None
    error: str | None = None


@dataclass
class Tally:
    messages: int = 0
    queued: int = 0
    filtered: int = 0
    errors: list[str] = field(default_factory=list)


class Replay:
    def __init__(self, store, channels: list[ChannelConfig], mappings: Mappings, charsets: dict,
                 mapping: str = CURRENT, destinations: tuple[str, ...] = ()):
        self.store = store
        self.channels = {c.name: c for c in channels if c.enabled}
        self.mappings = mappings
        self.charsets = charsets
        self.mapping = mapping
        self.destinations = tuple(dict.fromkeys(destinations))
        self.tally = Tally()

    def select(self, ids: list[int]) -> list[tuple[int, ChannelConfig]]:
        """Each message with its channel; refuses the whole selection if any of it cannot be replayed."""
        found = message_channels(self.store, ids)
        selected = []
        for message_id in ids:
            if message_id not in found:
                raise ReplayError(f"no message with id {message_id} (see `interface-engine messages list`)")
            name = found[message_id]
            if name is None:
                raise ReplayError(f"message {message_id} was stored without a channel: it has no "
                                  "destinations to be replayed to")
            channel = self.channels.get(name)
            if channel is None:
                raise ReplayError(f"message {message_id} came through channel {name!r}, which is not "
                                  "in the current channel set (or is disabled)")
            for wanted in self.destinations:
                if channel.destination(wanted) is None:
                    names = ", ".join(d.name for d in channel.destinations)
                    raise ReplayError(f"channel {name!r} has no destination {wanted!r} "
                                      f"(its destinations: {names})")
            selected.append((message_id, channel))
        return selected

    def shares(self, message_id: int, channel: ChannelConfig) -> list[Share]:
        """What each destination asked for would get now; never writes."""
        row = self.store.get_message(message_id)
        if row is None:  # deleted by retention since it was selected
            return [Share(self.destinations[0] if self.destinations else channel.destinations[0].name,
                          error="it was deleted (by retention) since the replay began")]
        earlier = self.store.deliveries_of(message_id)
        wanted = [d for d in channel.destinations if not self.destinations or d.name in self.destinations]
        msg, problem = None, None
        if self.mapping == CURRENT:
            if row["content_removed_at"] is not None:
                problem = (f"its content was removed by retention at "
                           f"{row['content_removed_at']:%Y-%m-%d %H:%M:%S}Z; only --mapping original "
                           "could resend an output, and those went with it")
            else:
                try:
                    msg = hl7.parse(row["raw"], **self.charsets)
                except (hl7.HL7Error, ValueError) as e:
                    problem = f"its stored bytes do not parse: {e}"
        result = []
        for destination in wanted:
            own = [d for d in earlier if d["destination"] == destination.name]
            share = Share(destination.name, previous=_last_sent(own))
            if problem:
                share.error = problem
            elif self.mapping == ORIGINAL:
                rendered = [d for d in own if d["output"] is not None]
                source = _last_sent(rendered)
                if source is None:
                    share.error = (f"no earlier output for {destination.name}: "
                                   + ("removed by retention" if row["content_removed_at"] else
                                      "it was never rendered for this destination"))
                else:
                    share.previous, share.output, share.target = source, source["output"], source["target"]
            else:
                made = prepare_again(channel, destination, self.mappings, msg, row["raw"])
                if made.state == FILTERED:
                    share.filtered = made.error
                elif made.state == ERROR:
                    share.error = f"{destination.name}: {made.error}"
                else:
                    share.output, share.target = made.output, made.target
            result.append(share)
        return result

    # -- doing it -------------------------------------------------------------------

    def begin(self, selection: str) -> ReplayRecord:
        self.record = ReplayRecord(at=utcnow(), actor=_actor()[:64], source=socket.gethostname()[:255],
                                   selection=selection, mapping=self.mapping,
                                   destinations=self.destinations or None)
        self.replay_id = begin_replay(self.store, self.record)
        return self.record

    def replay(self, message_id: int, channel: ChannelConfig) -> list[Share]:
        """Queue one message's new deliveries (all or none of them) and count them."""
        shares = self.shares(message_id, channel)
        self._count(message_id, shares)
        items = [ReplayDelivery(s.destination, s.output, s.target, s.previous and s.previous["id"])
                 for s in shares if s.output is not None]
        if items and not any(s.error for s in shares):
            queue_replayed(self.store, self.replay_id, message_id, channel.name, items, utcnow())
            self.record.messages += 1
            self.record.deliveries += len(items)
        return shares

    def preview(self, message_id: int, channel: ChannelConfig) -> list[str]:
        """The dry run's lines for one message: per destination what would go, and how it differs."""
        shares = self.shares(message_id, channel)
        self._count(message_id, shares)
        lines = []
        for s in shares:
            head = f"message {message_id} -> {s.destination}: "
            if s.error:
                lines.append(head + f"error: {s.error}")
            elif s.filtered:
                lines.append(head + f"filtered ({s.filtered})")
            elif self.mapping == ORIGINAL:
                lines.append(head + f"would send the output of delivery {s.previous['id']} again")
            else:
                repeats = f" (repeats delivery {s.previous['id']})" if s.previous else ""
                lines.append(head + f"would send{repeats}")
                lines.extend(diff(s.previous, s.output))
        return lines

    def _count(self, message_id: int, shares: list[Share]):
        errors = [s.error for s in shares if s.error]
        if errors:
            self.tally.errors.append(f"message {message_id}: {errors[0]}")
            return
        self.tally.messages += 1
        self.tally.queued += sum(s.output is not None for s in shares)
        self.tally.filtered += sum(s.filtered is not None for s in shares)


def diff(previous: dict | None, output: bytes) -> list[str]:
    """A unified diff of what was sent then against what would be sent now, or "unchanged"."""
    before = previous["output"] if previous else None
    if before == output:
        return ["  unchanged"]
    if before is None:
        label = "nothing stored" if previous is None else f"delivery {previous['id']}: no output stored"
    else:
        label = f"delivery {previous['id']} ({previous['state']})"
    lines = difflib.unified_diff(_lines(before or b""), _lines(output), label, "now", lineterm="")
    return ["  " + line for line in lines]


def _lines(data: bytes) -> list[str]:
    """Segments on lines of their own; JSON (a FHIR Bundle) indented, so a diff shows the change."""
    text = data.decode("utf-8", errors="replace")
    try:
        return json.dumps(json.loads(text), indent=1, sort_keys=True).splitlines()
    except ValueError:
        return [line for line in re.split(r"\r\n|\r|\n", text) if line]


def _last_sent(rows: list[dict]) -> dict | None:
    """The most recent of `rows` that was sent, else the most recent at all."""
    sent = [d for d in rows if d["state"] == SENT]
    return (sent or rows)[-1] if rows else None


def _actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container): say which uid it was
        import os
        return f"uid {os.getuid()}"
