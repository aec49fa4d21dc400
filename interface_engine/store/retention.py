"""Retention: remove old contents or whole messages, per channel and state, in short batches.

Each batch is its own transaction of at most `batch` messages, so the ingest writer
waits for one small batch at most (SQLite has one writer) and never for a whole prune.
A message's dependent rows are found through the schema's foreign keys, so a table
that references messages (or deliveries) is cleaned with them without changes here.
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable

import sqlalchemy as sa
from sqlalchemy import or_, select, update

from .schema import PENDING_STATES, attempts, deliveries, messages, metadata
from .store import write_transaction

CONTENT, DELETE = "content", "delete"
#: Between two batches on SQLite the write lock is left free this long. A writer that
#: found it taken polls again at most 100 ms later (SQLite's busy handler); without a gap
#: the next batch could take the lock first, again and again, and starve ingest.
SQLITE_PAUSE = 0.1


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
            where, after_id = _selected(rule, kind, now), 0
            while not stopping():
                after_id, taken = _batch(store, rule, where, kind, batch, now, after_id, dry_run)
                for channel in taken:
                    counts[(channel, rule.state, kind)] += 1
                if after_id is None:
                    break
                if store._sqlite and not dry_run:
                    time.sleep(SQLITE_PAUSE)
    return counts


def _selected(rule: Rule, kind: str, now: datetime):
    m = messages.c
    after = rule.delete_after if kind == DELETE else rule.content_after
    conditions = [m.state == rule.state, m.received_at < now - timedelta(seconds=after)]
    if rule.channel != "*":
        conditions.append(m.channel == rule.channel)
    elif rule.others:
        conditions.append(or_(m.channel.is_(None), m.channel.not_in(rule.others)))
    if kind == CONTENT:
        conditions.append(m.content_removed_at.is_(None))
        if rule.delete_after is not None:  # those are deleted instead
            conditions.append(m.received_at >= now - timedelta(seconds=rule.delete_after))
    return sa.and_(*conditions)


def _batch(store, rule: Rule, where, kind: str, size: int, now: datetime, after_id: int,
           dry_run: bool) -> tuple[int | None, list[str | None]]:
    """One transaction: the next `size` selected messages by id, those without a delivery
    still to be made (unless the rule names its state) deleted or emptied.

    Returns the last id looked at (None: no more) and the channels of those taken. The
    pending check is one query per batch rather than a probe per message, whose plan
    degrades badly while the queue index is full of rows that just left it.
    """
    with store._connect() as conn, (nullcontext() if dry_run else write_transaction(conn)):
        query = (select(messages.c.id, messages.c.channel).where(where, messages.c.id > after_id)
                 .order_by(messages.c.id).limit(size))
        if conn.dialect.name != "sqlite" and not dry_run:
            # Rows the ingest writer holds are left for the next run rather than waited for;
            # a replay cannot add a delivery to a locked message until this commits.
            query = query.with_for_update(of=messages, skip_locked=True)
        rows = conn.execute(query).all()
        if not rows:
            return None, []
        protecting = [s for s in PENDING_STATES if s not in rule.named_states]
        kept = set()
        if protecting:
            kept = set(conn.execute(select(deliveries.c.message_id).where(
                deliveries.c.message_id.in_([r[0] for r in rows]),
                deliveries.c.state.in_(protecting))).scalars())
        taken = [r for r in rows if r[0] not in kept]
        ids = [r[0] for r in taken]
        if ids and not dry_run:
            if kind == DELETE:
                _delete(conn, messages, messages.c.id.in_(ids))
            else:
                _remove_contents(conn, ids, now)
    return (rows[-1][0] if len(rows) == size else None), [r[1] for r in taken]


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
                 .values(raw=b"", raw_key=None, content_removed_at=now))
    conn.execute(update(deliveries).where(deliveries.c.message_id.in_(ids))
                 .values(output=None, output_key=None, response=None, response_key=None))
    conn.execute(update(attempts)
                 .where(attempts.c.delivery_id.in_(select(deliveries.c.id)
                                                   .where(deliveries.c.message_id.in_(ids))))
                 .values(response=None, response_key=None))
