"""The store's side of a replay: the replays record and the new deliveries linked to the old ones.

A replay never updates a delivery or an attempt: it inserts new `queued` deliveries
that point to the delivery they repeat and to the replay that queued them, and then
the message's state follows its deliveries as always.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime

from sqlalchemy import insert, select, update

from .schema import QUEUED, deliveries, messages, replays
from .store import write_transaction


@dataclass(slots=True)
class ReplayRecord:
    """Who replayed which selection, how, and how many: the replay's audit facts in one place."""

    at: datetime
    actor: str
    source: str
    selection: str
    mapping: str
    destinations: tuple[str, ...] | None
    messages: int = 0
    deliveries: int = 0

    def row(self) -> dict:
        values = asdict(self)
        values["destinations"] = ", ".join(self.destinations) if self.destinations else None
        return values


@dataclass(frozen=True, slots=True)
class ReplayDelivery:
    destination: str
    output: bytes
    target: str | None
    replay_of: int | None


def message_channels(store, ids: list[int]) -> dict[int, str | None]:
    """The channel of each stored message among `ids`; ids not stored are absent."""
    found = {}
    with store._connect() as conn:
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            found.update(conn.execute(select(messages.c.id, messages.c.channel)
                                      .where(messages.c.id.in_(chunk))).all())
    return found


def begin_replay(store, record: ReplayRecord) -> int:
    """Write the replay's record before any delivery; returns its id."""
    with store._connect() as conn, conn.begin():
        return conn.execute(insert(replays).values(record.row()).returning(replays.c.id)).scalar_one()


def queue_replayed(store, replay_id: int, message_id: int, channel: str,
                   items: list[ReplayDelivery], now: datetime):
    """One message's new deliveries, the replay's counts and the message's state: one short transaction."""
    rows = [{"message_id": message_id, "channel": channel, "destination": item.destination,
             "state": QUEUED, "attempts": 0, "next_attempt_at": None, "target": item.target,
             "output": item.output, "last_error": None, "response": None, "response_key": None,
             "created_at": now, "updated_at": now, "replay_of": item.replay_of, "replay_id": replay_id}
            for item in items]
    with store._connect() as conn, write_transaction(conn):
        for row, delivery_id in zip(rows, store.reserve_ids(conn, deliveries, len(rows))):
            row["id"] = delivery_id
            row["output"], row["output_key"] = store.seal(row["output"], "deliveries.output", delivery_id)
        conn.execute(insert(deliveries), rows)
        conn.execute(update(replays).where(replays.c.id == replay_id)
                     .values(messages=replays.c.messages + 1,
                             deliveries=replays.c.deliveries + len(rows)))
        store._settle(conn, [message_id])


def get_replay(store, replay_id: int) -> dict | None:
    with store._connect() as conn:
        row = conn.execute(select(replays).where(replays.c.id == replay_id)).first()
    return dict(row._mapping) if row else None
