"""Retention: remove old contents or whole messages, per channel and state, in short batches.

Each batch is its own transaction of at most `batch` messages, so the ingest writer
waits for one small batch at most (SQLite has one writer) and never for a whole prune.
A message's dependent rows are found through the schema's foreign keys, so a table
that references messages (or deliveries) is cleaned with them without changes here.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable

import sqlalchemy as sa
from sqlalchemy import exists, func, or_, select, update

from .schema import PENDING_STATES, attempts, deliveries, messages, metadata

CONTENT, DELETE = "content", "delete"


@dataclass(frozen=True, slots=True)
class Rule:
    """What one rule says for one state: `channel` is a name or "*" (every other channel)."""

    channel: str
    state: str
    content_after: float | None     # seconds after receipt; None: keep contents
    delete_after: float | None      # seconds after receipt; None: keep the rows
    named_states: tuple[str, ...]   # the rule's states: pending deliveries in these do not protect
    others: tuple[str, ...] = ()    # for "*": channels with a rule of their own for this state


def effective(rules) -> list[Rule]:
    """One Rule per (channel, state) a config rule names; a channel's own rule beats "*"."""
    own = {(r.channel, s) for r in rules if r.channel != "*" for s in r.states}
    result = []
    for r in rules:
        for state in r.states:
            others = tuple(sorted(c for c, s in own if s == state)) if r.channel == "*" else ()
            result.append(Rule(r.channel, state, r.content_after, r.delete_after, tuple(r.states), others))
    return result


def prune(store, rules, *, batch: int = 500, now: datetime | None = None, dry_run: bool = False,
          stopping: Callable[[], bool] = lambda: False) -> Counter:
    """Apply `rules` (config RetentionRule); returns {(channel, state, CONTENT|DELETE): count}.

    Deleting comes first, and contents are removed only from messages not old enough
    to be deleted, so the counts say what each message became.
    """
    from .store import utcnow

    now = now or utcnow()
    counts: Counter = Counter()
    for rule in effective(rules):
        for kind, after in ((DELETE, rule.delete_after), (CONTENT, rule.content_after)):
            if after is None:
                continue
            where = _selected(rule, kind, now)
            if dry_run:
                with store._connect() as conn:
                    for channel, n in conn.execute(select(messages.c.channel, func.count())
                                                   .where(where).group_by(messages.c.channel)):
                        counts[(channel, rule.state, kind)] += n
                continue
            while not stopping():
                done = _batch(store, where, kind, batch, now)
                for channel in done:
                    counts[(channel, rule.state, kind)] += 1
                if len(done) < batch:
                    break
    return counts


def _selected(rule: Rule, kind: str, now: datetime):
    m = messages.c
    after = rule.delete_after if kind == DELETE else rule.content_after
    conditions = [m.state == rule.state, m.received_at < now - timedelta(seconds=after)]
    if rule.channel != "*":
        conditions.append(m.channel == rule.channel)
    elif rule.others:
        conditions.append(or_(m.channel.is_(None), m.channel.not_in(rule.others)))
    protecting = [s for s in PENDING_STATES if s not in rule.named_states]
    if protecting:  # a delivery still to be made keeps its message, unless the rule names its state
        conditions.append(~exists().where(deliveries.c.message_id == m.id,
                                          deliveries.c.state.in_(protecting)))
    if kind == CONTENT:
        conditions.append(m.content_removed_at.is_(None))
        if rule.delete_after is not None:  # those are deleted instead
            conditions.append(m.received_at >= now - timedelta(seconds=rule.delete_after))
    return sa.and_(*conditions)


def _batch(store, where, kind: str, size: int, now: datetime) -> list[str | None]:
    """One transaction: up to `size` selected messages deleted or emptied; returns their channels."""
    with store._connect() as conn, _writing(conn):
        query = select(messages.c.id, messages.c.channel).where(where).order_by(messages.c.id).limit(size)
        if conn.dialect.name != "sqlite":
            # Rows the ingest writer holds are left for the next run rather than waited for.
            query = query.with_for_update(of=messages, skip_locked=True)
        rows = conn.execute(query).all()
        ids = [r[0] for r in rows]
        if ids:
            if kind == DELETE:
                _delete(conn, messages, messages.c.id.in_(ids))
            else:
                _remove_contents(conn, ids, now)
    return [r[1] for r in rows]


@contextmanager
def _writing(conn):
    """A write transaction that takes SQLite's write lock at once: its reads and writes see one state."""
    with conn.begin():
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        yield


def _delete(conn, table: sa.Table, where):
    """Delete rows of `table` and, first, every row that references them, found by foreign key."""
    for child, fk in _referencing(table):
        _delete(conn, child, fk.parent.in_(select(fk.column).where(where)))
    conn.execute(sa.delete(table).where(where))


def _referencing(table: sa.Table):
    # A table referencing itself (a replayed delivery's link) loses those rows in the same statement.
    return [(other, fk) for other in metadata.sorted_tables if other is not table
            for fk in other.foreign_keys if fk.column.table is table]


def _remove_contents(conn, ids: list[int], now: datetime):
    """Raw bytes, rendered outputs and far-side responses go; metadata, states and errors stay."""
    conn.execute(update(messages).where(messages.c.id.in_(ids))
                 .values(raw=b"", content_removed_at=now))
    conn.execute(update(deliveries).where(deliveries.c.message_id.in_(ids))
                 .values(output=None, response=None))
    conn.execute(update(attempts)
                 .where(attempts.c.delivery_id.in_(select(deliveries.c.id)
                                                   .where(deliveries.c.message_id.in_(ids))))
                 .values(response=None))
