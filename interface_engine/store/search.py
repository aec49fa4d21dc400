"""Finding stored messages and counting them: what `messages search` and `status` ask the store.

Every criterion is answered by an index (see schema.py); none reads message bodies.
Pages run newest first by id: `before` is the last id of the previous page.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import sqlalchemy as sa
from sqlalchemy import func, select

from .schema import (DEAD, ERROR, FILTERED, PENDING_STATES, QUEUED, RECEIVED, REJECTED, SENT,
                     deliveries, message_patients, messages)

MESSAGE_STATES = (RECEIVED, FILTERED, QUEUED, SENT, ERROR, DEAD, REJECTED)
DELIVERY_STATES = (QUEUED, SENT, ERROR, DEAD, FILTERED)
#: What a search row holds: metadata only, never the message or its answer.
COLUMNS = ("id", "received_at", "state", "channel", "listener", "peer", "message_type",
           "trigger_event", "control_id", "sending_application", "sending_facility")

_RELATIVE = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class SearchError(ValueError):
    """A criterion that cannot be searched for; the text names the option to fix."""


@dataclass(frozen=True)
class Criteria:
    channel: str | None = None
    state: str | None = None
    since: datetime | None = None          # UTC, naive like the store's columns
    until: datetime | None = None
    message_type: str | None = None
    trigger_event: str | None = None
    control_id: str | None = None
    sending_application: str | None = None
    sending_facility: str | None = None
    destination: str | None = None
    destination_state: str | None = None
    patient_hash: str | None = None
    before: int | None = None
    limit: int = 50

    def __post_init__(self):
        if self.state is not None and self.state not in MESSAGE_STATES:
            raise SearchError(f"--state: unknown state {self.state!r} (one of {', '.join(MESSAGE_STATES)})")
        if self.destination_state is not None:
            if self.destination_state not in DELIVERY_STATES:
                raise SearchError(f"--destination-state: unknown state {self.destination_state!r} "
                                  f"(one of {', '.join(DELIVERY_STATES)})")
            if self.destination is None:
                raise SearchError("--destination-state needs --destination NAME")
        if not 1 <= self.limit <= 10_000:
            raise SearchError(f"--limit: {self.limit} is not between 1 and 10000")


def parse_time(text: str, option: str, now: datetime | None = None) -> datetime:
    """ISO 8601 (UTC unless it says otherwise) or an age like `90m`, `2h`, `7d`: naive UTC."""
    now = now or datetime.now(timezone.utc).replace(tzinfo=None)
    value = text.strip()
    if m := _RELATIVE.fullmatch(value):
        try:
            return now - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
        except OverflowError:
            raise SearchError(f"{option}: {text!r} reaches before the year 1") from None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise SearchError(f"{option}: {text!r} is neither an ISO 8601 time (2026-11-21T09:30Z) "
                          "nor an age like 30m, 2h, 7d") from None
    if when.tzinfo is not None:
        when = when.astimezone(timezone.utc).replace(tzinfo=None)
    return when


def split_pair(text: str, sep: str) -> tuple[str, str | None]:
    """`ADT^A01` -> ('ADT', 'A01'); `ADT` -> ('ADT', None)."""
    first, _, second = text.partition(sep)
    return first, (second if second else None)


def query(c: Criteria) -> sa.Select:
    """The statement for one page of a search: newest first, metadata columns only."""
    m = messages.c
    q = select(*[m[name] for name in COLUMNS]).order_by(m.id.desc()).limit(c.limit)
    where = []
    if c.channel is not None:
        where.append(m.channel == c.channel)
    if c.state is not None:
        where.append(m.state == c.state)
    if c.message_type is not None:
        where.append(m.message_type == c.message_type)
    if c.trigger_event is not None:
        where.append(m.trigger_event == c.trigger_event)
    if c.control_id is not None:
        where.append(m.control_id == c.control_id)
    if c.sending_application is not None:
        where.append(m.sending_application == c.sending_application)
    if c.sending_facility is not None:
        where.append(m.sending_facility == c.sending_facility)
    if c.destination is not None:
        d = select(deliveries.c.message_id).where(deliveries.c.destination == c.destination)
        if c.destination_state is not None:
            d = d.where(deliveries.c.state == c.destination_state)
        where.append(m.id.in_(d))
    if c.patient_hash is not None:
        where.append(m.id.in_(select(message_patients.c.message_id)
                              .where(message_patients.c.patient_hash == c.patient_hash)))
    if c.before is not None:
        where.append(m.id < c.before)
    if (c.since or c.until) and len(where) == (c.before is not None):
        # Alone, a time range would have SQLite walk every newer message by id instead
        # of the range in its index.
        t = messages.alias("t").c
        where.append(m.id.in_(select(t.id).where(*_span(t, c))))
    else:
        where.extend(_span(m, c))
    return q.where(*where)


def _span(columns, c: Criteria) -> list:
    span = []
    if c.since is not None:
        span.append(columns.received_at >= c.since)
    if c.until is not None:
        span.append(columns.received_at < c.until)
    return span


def search(conn: sa.Connection, c: Criteria) -> list[dict]:
    return [dict(r._mapping) for r in conn.execute(query(c))]


@dataclass(frozen=True)
class Status:
    """Counts per channel (message states) and per destination (delivery states and its queue)."""

    channels: dict[str | None, dict[str, int]]
    destinations: dict[tuple[str, str], dict]


def status(conn: sa.Connection, now: datetime) -> Status:
    """Read from the store, so true whichever process did the work."""
    channels: dict[str | None, dict[str, int]] = {}
    for channel, state, n in conn.execute(CHANNEL_COUNTS):
        channels.setdefault(channel, {})[state] = n
    destinations: dict[tuple[str, str], dict] = {}
    for destination, state, channel, n in conn.execute(DESTINATION_COUNTS):
        entry = destinations.setdefault((channel, destination), _empty_destination())
        entry[state] = n
    for channel, destination, depth, first in conn.execute(QUEUES):
        created = conn.execute(select(deliveries.c.created_at).where(deliveries.c.id == first)).scalar_one()
        entry = destinations.setdefault((channel, destination), _empty_destination())
        entry["queue_depth"] = depth
        entry["oldest_queued_age_s"] = round(max(0.0, (now - created).total_seconds()), 1)
    return Status(channels, destinations)


# Each read from an index alone (covering, or the queue's partial index).
CHANNEL_COUNTS = (select(messages.c.channel, messages.c.state, func.count())
                  .group_by(messages.c.channel, messages.c.state))
_d = deliveries.c
DESTINATION_COUNTS = (select(_d.destination, _d.state, _d.channel, func.count())
                      .group_by(_d.destination, _d.state, _d.channel))
# The oldest waiting delivery is the first in its queue's FIFO (id) order.
QUEUES = (select(_d.channel, _d.destination, func.count(), func.min(_d.id))
          .where(_d.state.in_(PENDING_STATES)).group_by(_d.channel, _d.destination))


def last_received(conn: sa.Connection, channels) -> dict[str, datetime | None]:
    """When each channel last stored a message (None: never), from index seeks only.

    The newest id of a channel is the largest of its newest per state, each one seek in
    ix_messages_channel_state (channel, state, id); a plain MAX over the channel would
    read all of its entries.
    """
    m = messages.c
    found: dict[str, datetime | None] = {}
    for channel in channels:
        newest = None
        for state in MESSAGE_STATES:
            top = conn.execute(select(func.max(m.id)).where(m.channel == channel, m.state == state)).scalar()
            if top is not None and (newest is None or top > newest):
                newest = top
        found[channel] = None if newest is None else conn.execute(
            select(m.received_at).where(m.id == newest)).scalar_one()
    return found


def _empty_destination() -> dict:
    return {state: 0 for state in DELIVERY_STATES} | {"queue_depth": 0, "oldest_queued_age_s": None}
