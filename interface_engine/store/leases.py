"""Node heartbeats and destination queue leases: the SQL of several engines on one store.

A destination queue is delivered by one engine at a time, the one holding its row in
`queue_leases`. An engine writes its heartbeat to `nodes` and takes or renews all its
leases in one short transaction every few seconds.

On PostgreSQL `renew`, `release` and `leave` run on a thread and a connection of their
own (see channels.ownership): queued behind the group committer's batches, a renewal
can wait seconds under load, and a renewal that comes late is a lease that lapses.
On SQLite they go through the group committer's writer thread like every other write:
the file must have one writing connection (a second one would make the writer's
read-then-write transactions fail with a busy snapshot), and a lone engine loses
nothing to a late renewal but a pause. Lease times are the database's clock, so that
engines on machines whose clocks differ agree on when a lease ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import time
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from .schema import RECEIVED, messages, nodes, queue_leases
from .store import Store, StoreError, utcnow

Queue = tuple[str, str]   # (channel, destination)


@dataclass(frozen=True, slots=True)
class Node:
    """One engine process: its name, and this run of it (a restart is another run)."""

    name: str
    token: str
    pid: int
    host: str
    started_at: datetime


@dataclass(frozen=True, slots=True)
class Claim:
    """One renewal: the queues this node wants, how long a lease lasts, who counts as gone."""

    node: Node
    queues: tuple[Queue, ...]
    duration: float
    stale_after: float
    channels: tuple[str, ...]   # for `absent_waiting`: the channels this node processes


@dataclass(frozen=True, slots=True)
class Renewal:
    #: time.monotonic() as the transaction began: the leases held last at least `duration` from it
    began: float
    held: frozenset[Queue]
    #: rows another engine had locked at that moment: neither taken nor lost, ask again
    skipped: frozenset[Queue]
    #: how many queues this node should deliver: its wanted queues shared among live nodes
    share: int
    #: messages stored by a node that is gone are waiting for one of our channels
    absent_waiting: bool


class Leases:
    def __init__(self, store: Store):
        self.store = store
        self._postgres = store.engine.dialect.name == "postgresql"
        self._insert = postgresql.insert if self._postgres else sqlite.insert
        #: on the group committer's writer thread (SQLite) or on a thread of their own
        self.through_committer = not self._postgres

    @contextmanager
    def _transaction(self):
        if self.through_committer:
            conn = self.store._writer()
            with conn.begin():
                yield conn
        else:
            with self.store._connect() as conn, conn.begin():
                yield conn

    def _now(self, conn) -> datetime:
        if self._postgres:
            return conn.execute(sa.text("SELECT timezone('utc', now())")).scalar_one()
        return utcnow()   # SQLite: one engine per file, its own clock is the only one

    # -- writes: the group committer's thread (SQLite) or the lease thread (PostgreSQL) ----

    def renew(self, batch: list[Claim]) -> list[Renewal]:
        """Heartbeat, then take or extend leases: free, expired or ours; never a live one of another.

        Every wanted row is created if missing, then locked with FOR UPDATE SKIP LOCKED
        on PostgreSQL (a row another engine is deciding about right now is simply not
        ours this time); on SQLite the single writer serialises. Rows are locked in key
        order, so two engines cannot deadlock.
        """
        results = []
        with self._transaction() as conn:
            for claim in batch:
                began = time.monotonic()
                now = self._now(conn)
                node = claim.node
                # A write first: on SQLite it takes the write lock before any read.
                conn.execute(self._insert(nodes).values(
                    name=node.name, pid=node.pid, host=node.host, started_at=node.started_at,
                    seen_at=now).on_conflict_do_update(
                    index_elements=["name"],
                    set_={"pid": node.pid, "host": node.host, "started_at": node.started_at,
                          "seen_at": now}))
                live = conn.execute(select(func.count()).select_from(nodes).where(
                    nodes.c.seen_at > now - timedelta(seconds=claim.duration))).scalar_one()
                queues = sorted(set(claim.queues))
                share = -(-len(queues) // max(live, 1))
                held, skipped = (self._take(conn, node, queues, share, now, claim.duration)
                                 if queues else (set(), set()))
                absent = conn.execute(
                    self._waiting(node.name, claim.channels, now - timedelta(seconds=claim.stale_after),
                                  own=False).with_only_columns(messages.c.id).limit(1)).first()
                results.append(Renewal(began, frozenset(held), frozenset(skipped), share,
                                       absent is not None))
        return results

    def _take(self, conn, node: Node, queues: list[Queue], share: int, now: datetime,
              duration: float) -> tuple[set[Queue], set[Queue]]:
        conn.execute(self._insert(queue_leases).on_conflict_do_nothing(),
                     [{"channel": c, "destination": d} for c, d in queues])
        rows = conn.execute(
            select(queue_leases.c.channel, queue_leases.c.destination, queue_leases.c.owner,
                   queue_leases.c.token, queue_leases.c.expires_at)
            .where(sa.tuple_(queue_leases.c.channel, queue_leases.c.destination).in_(queues))
            .order_by(queue_leases.c.channel, queue_leases.c.destination)
            .with_for_update(skip_locked=True))
        ours, free, seen = [], [], set()
        for channel, destination, owner, token, expires_at in rows:
            seen.add((channel, destination))
            if expires_at is None or expires_at <= now:
                free.append((channel, destination))
            elif owner == node.name and (token == node.token or not self._postgres):
                # SQLite has one engine per file: a lease under our name is our previous
                # run's, dead since, and a restart after a crash need not wait for it.
                ours.append((channel, destination))
        # Ours are all renewed, even beyond the share: the runtime gives the excess back
        # once each worker's delivery in flight is over.
        taking = ours + free[:max(0, share - len(ours))]
        if taking:
            conn.execute(
                update(queue_leases).where(queue_leases.c.channel == sa.bindparam("c"),
                                           queue_leases.c.destination == sa.bindparam("d"))
                .values(owner=node.name, token=node.token,
                        expires_at=now + timedelta(seconds=duration)),
                [{"c": c, "d": d} for c, d in taking])
        return set(taking), set(queues) - seen

    def release(self, batch: list[tuple[Node, tuple[Queue, ...]]]) -> list[None]:
        """Give queues back at once (their workers are idle): another engine may take them now."""
        with self._transaction() as conn:
            for node, queues in batch:
                if queues:
                    conn.execute(
                        update(queue_leases)
                        .where(queue_leases.c.channel == sa.bindparam("c"),
                               queue_leases.c.destination == sa.bindparam("d"),
                               queue_leases.c.owner == node.name, queue_leases.c.token == node.token)
                        .values(owner=None, token=None, expires_at=None),
                        [{"c": c, "d": d} for c, d in queues])
        return [None] * len(batch)

    def leave(self, batch: list[Node]) -> list[None]:
        """A node that stops cleanly: its leases are free and its row gone, so nobody waits for it."""
        with self._transaction() as conn:
            for node in batch:
                conn.execute(update(queue_leases)
                             .where(queue_leases.c.owner == node.name, queue_leases.c.token == node.token)
                             .values(owner=None, token=None, expires_at=None))
                conn.execute(delete(nodes).where(nodes.c.name == node.name,
                                                 nodes.c.started_at == node.started_at,
                                                 nodes.c.pid == node.pid))
        return [None] * len(batch)

    # -- reads, on a connection of their own ------------------------------------------------

    def waiting(self, node: str, channels: tuple[str, ...], stale_after: float, after_id: int = 0,
                *, own: bool, limit: int = 500) -> list[tuple[int, str, bytes | None, str | None]]:
        """Messages stored for our channels but not through them yet, in id order.

        Those of nodes not seen for `stale_after` seconds (or never named), and with
        `own` ours too (left by this node's previous run). Another live node's are its
        own business: its processor has them in hand. Each is (id, channel, raw,
        None), or (id, channel, None, why) for one whose raw cannot be opened.
        """
        with self.store._connect() as conn:
            live_since = self._now(conn) - timedelta(seconds=stale_after)
            query = (self._waiting(node, channels, live_since, own=own)
                     .where(messages.c.id > after_id).order_by(messages.c.id).limit(limit))
            rows = conn.execute(query).all()
        found = []
        for message_id, channel, raw, key_id in rows:
            try:
                found.append((message_id, channel, self.store.open(raw, key_id, "messages.raw",
                                                                   message_id), None))
            except StoreError as e:
                found.append((message_id, channel, None, str(e)))
        return found

    @staticmethod
    def _waiting(node: str, channels, live_since: datetime, *, own: bool):
        live = select(nodes.c.name).where(nodes.c.seen_at >= live_since)
        gone = sa.or_(messages.c.node.is_(None), messages.c.node.not_in(live))
        return (select(messages.c.id, messages.c.channel, messages.c.raw, messages.c.raw_key)
                .where(messages.c.state == RECEIVED,
                       messages.c.channel.in_(list(channels)),
                       sa.or_(gone, messages.c.node == node) if own
                       else sa.and_(gone, messages.c.node != node)))
