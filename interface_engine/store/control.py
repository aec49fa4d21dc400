"""What operators change by hand: paused channels and destinations, dead letters, corrected messages.

A correction never rewrites what was received: the edited message is a new row
that names the one it corrects (`edited_from`), stored `queued` with a single
delivery, to the destination whose delivery died, linked to that delivery
(`replay_of`). It never passes through its channel again, so no other
destination sees it.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa

from .schema import DEAD, QUEUED, deliveries, message_patients, messages, pauses
from .store import Incoming, Store, _row, write_transaction

#: The destination column of a pause on a whole channel (its processing).
CHANNEL = ""


def paused(store: Store) -> set[tuple[str, str]]:
    """(channel, destination) pairs paused; destination CHANNEL: the channel's processing."""
    with store._connect() as conn:
        return {(c, d) for c, d in conn.execute(sa.select(pauses.c.channel, pauses.c.destination))}


def set_paused(store: Store, channel: str, destination: str, pause: bool, actor: str, now: datetime) -> bool:
    """Pause or resume; False if it already was as asked."""
    where = sa.and_(pauses.c.channel == channel, pauses.c.destination == destination)
    with store._connect() as conn, write_transaction(conn):
        there = conn.execute(sa.select(pauses.c.channel).where(where)).first() is not None
        if there == pause:
            return False
        if pause:
            conn.execute(sa.insert(pauses).values(channel=channel, destination=destination, paused_at=now,
                                                  actor=actor[:128]))
        else:
            conn.execute(sa.delete(pauses).where(where))
    return True


def dead_letters(store: Store, queues: list[tuple[str, str]], *, limit: int = 100,
                 before: int | None = None) -> list[dict]:
    """Dead deliveries of these (channel, destination) queues, newest first, with their message's metadata."""
    found = []
    with store._connect() as conn:
        for channel, destination in queues:
            query = (sa.select(deliveries.c.id, deliveries.c.message_id, deliveries.c.channel,
                               deliveries.c.destination, deliveries.c.attempts, deliveries.c.updated_at,
                               messages.c.message_type, messages.c.trigger_event, messages.c.control_id,
                               messages.c.received_at)
                     .join(messages, messages.c.id == deliveries.c.message_id)
                     .where(deliveries.c.destination == destination, deliveries.c.state == DEAD,
                            deliveries.c.channel == channel)
                     .order_by(deliveries.c.id.desc()).limit(limit))
            if before is not None:
                query = query.where(deliveries.c.id < before)
            found.extend(dict(r._mapping) for r in conn.execute(query))
    return sorted(found, key=lambda d: d["id"], reverse=True)[:limit]


def delivery(store: Store, delivery_id: int) -> dict | None:
    with store._connect() as conn:
        row = conn.execute(sa.select(deliveries.c.id, deliveries.c.message_id, deliveries.c.channel,
                                     deliveries.c.destination, deliveries.c.state)
                           .where(deliveries.c.id == delivery_id)).first()
    return dict(row._mapping) if row else None


def store_correction(store: Store, item: Incoming, destination: str, output: bytes, target: str | None,
                     replay_of: int, now: datetime) -> tuple[int, int]:
    """The edited message and its one delivery, in one transaction; returns (message id, delivery id)."""
    with store._connect() as conn, write_transaction(conn):
        (message_id,) = store.reserve_ids(conn, messages, 1)
        row = _row(item, now, store.node) | {"id": message_id}
        row["raw"], row["raw_key"] = store.seal(item.raw, "messages.raw", message_id)
        conn.execute(sa.insert(messages).values(row))
        if item.patients:
            conn.execute(sa.insert(message_patients), [{"message_id": message_id, "patient_hash": h}
                                                       for h in dict.fromkeys(item.patients)])
        (delivery_id,) = store.reserve_ids(conn, deliveries, 1)
        sealed, key = store.seal(output, "deliveries.output", delivery_id)
        conn.execute(sa.insert(deliveries).values(
            id=delivery_id, message_id=message_id, channel=item.channel, destination=destination, state=QUEUED,
            attempts=0, target=target, output=sealed, output_key=key, created_at=now, updated_at=now,
            replay_of=replay_of))
    return message_id, delivery_id
