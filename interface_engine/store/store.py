"""The message store: the only code that speaks SQL.

Blocking by design: the reactor never calls it directly. Ingest reaches it through
the group committer's single writer thread; the CLI calls it straight away.
"""

from __future__ import annotations

import hashlib
import operator
import sqlite3
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import sqlalchemy as sa
from sqlalchemy import event, func, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from .cipher import Cipher, SealError
from .schema import (DEAD, ERROR, FILTERED, PENDING_STATES, QUEUED, RECEIVED, REJECTED, SENT,
                     attempts, deliveries, message_patients, messages)

MIGRATIONS = Path(__file__).with_name("migrations")


class StoreError(Exception):
    """The store could not be opened, read or written; the text says what to do."""


def by_fields(cls):
    """Pickle instances of dataclass `cls` as a call of `cls` with their fields' values.

    Batches travel to the store writer and channel processor processes by pickle, and
    dataclasses' own way looks the fields up again for every object: that cost more
    than the rest of a batch's trip.
    """
    get = operator.attrgetter(*(f.name for f in fields(cls) if f.init))

    def __reduce__(self):
        return cls, get(self)
    cls.__reduce__ = __reduce__
    return cls


@by_fields
@dataclass(slots=True)
class Incoming:
    """A message as ingest hands it over: raw bytes, routing metadata and its answer."""

    raw: bytes
    listener: str
    peer: str
    state: str
    ack: bytes
    sending_application: str = ""
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    message_type: str = ""
    trigger_event: str = ""
    control_id: str = ""
    version: str = ""
    channel: str | None = None
    error: str | None = None
    #: builds the AE for a message whose control id is already stored with other content
    conflict_ack: Callable[[], bytes] | None = None
    #: follows the message through the audit trail, across channels and destinations
    correlation_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    #: keyed hashes of the patient identifiers in PID-3, for the patient index
    patients: tuple[str, ...] = ()
    #: a correction made by hand of this stored message (see store/corrections.py)
    edited_from: int | None = None
    sha256: str = field(init=False)

    def __post_init__(self):
        self.sha256 = hashlib.sha256(self.raw).hexdigest()

    def key(self) -> tuple[str, str, str]:
        """What makes two messages the same message: MSH-3, MSH-4 and MSH-10."""
        return (self.sending_application[:227], self.sending_facility[:227], self.control_id[:199])


STORED, DUPLICATE, CONFLICT = "stored", "duplicate", "conflict"


@by_fields
@dataclass(frozen=True, slots=True)
class NewDelivery:
    """One destination's share of a processed message."""

    destination: str
    state: str                    # queued, filtered, or error when rendering failed
    output: bytes | None = None
    target: str | None = None
    error: str | None = None


@by_fields
@dataclass(frozen=True, slots=True)
class Processed:
    """What the channel made of a received message: filtered out, or deliveries to queue."""

    message_id: int
    channel: str
    filter_reason: str | None = None
    deliveries: tuple[NewDelivery, ...] = ()


@by_fields
@dataclass(frozen=True, slots=True)
class QueuedDelivery:
    id: int
    message_id: int
    state: str
    attempts: int
    next_attempt_at: datetime | None
    target: str | None
    output: bytes | None


@by_fields
@dataclass(frozen=True, slots=True)
class Attempt:
    """One try at a delivery and the state it leaves the delivery in."""

    delivery_id: int
    message_id: int
    started_at: datetime
    duration_ms: float
    ok: bool
    new_state: str                # sent, error (will retry / queue blocked) or dead
    error: str | None = None
    response: bytes | None = None
    next_attempt_at: datetime | None = None
    output: bytes | None = None   # set when the payload was rendered at this attempt
    rerender: bool = False        # forget the payload: the next attempt renders it again


@by_fields
@dataclass(frozen=True, slots=True)
class Outcome:
    """What the store did with one Incoming: the answer to send is always `ack`."""

    kind: str
    message_id: int
    ack: bytes
    state: str = RECEIVED   # the stored row's state: received, or rejected


@dataclass(frozen=True, slots=True)
class _Original:
    message_id: int
    sha256: str
    ack: bytes


_JOINED = "interface_engine.joined"


@contextmanager
def write_transaction(conn):
    """A write transaction; on SQLite it takes the write lock at once.

    Its reads and writes then see one state, and ids reserved in it (see
    Store.reserve_ids) cannot be taken by another writer before it commits.
    """
    if conn.info.get(_JOINED):   # inside Store.joined: its transaction
        yield
        return
    with conn.begin():
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        yield


def driver(conn) -> "_Driver":
    """SQLite's own connection under `conn`, in its transaction.

    The write path's statements go straight to it on SQLite: SQLAlchemy's set-up of
    each statement costs more than SQLite's own work on these small rows.
    """
    return _Driver(conn.connection.driver_connection)


class _Driver:
    """A SQLite connection whose errors are SQLAlchemy's, as every other statement's are
    (without the parameters: they can hold message content)."""

    __slots__ = ("_conn",)

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn

    def execute(self, sql: str, params=()) -> sqlite3.Cursor:
        try:
            return self._conn.execute(sql, params)
        except sqlite3.Error as e:
            raise _translated(sql, e) from None

    def executemany(self, sql: str, rows) -> sqlite3.Cursor:
        try:
            return self._conn.executemany(sql, rows)
        except sqlite3.Error as e:
            raise _translated(sql, e) from None


def _translated(sql: str, error: sqlite3.Error) -> sa.exc.DBAPIError:
    return sa.exc.DBAPIError.instance(sql, None, error, sqlite3.Error, hide_parameters=True)


def placeholders(n: int) -> str:
    """`?, ?, ...` for an IN list of `n` values sent straight to SQLite."""
    return ", ".join("?" * n)


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def create_engine(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 30}, hide_parameters=True)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # Named, so that an operator can tell the engine's sessions apart in pg_stat_activity.
    return sa.create_engine(url, pool_pre_ping=True, hide_parameters=True,
                            connect_args={"application_name": "interface-engine"})


def _sqlite_pragmas(dbapi_connection, _record):
    # WAL lets readers (the CLI) run beside the writer; FULL syncs the WAL on every
    # commit, because NORMAL can lose acknowledged commits on power loss.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class Store:
    def __init__(self, url: str, *, duplicate_window: float = 86400.0, audit=None,
                 node: str | None = None, cipher: Cipher | None = None):
        self.url = url
        #: seals contents on write and opens them on read; without one, contents are written in
        #: clear and a sealed one cannot be read (tools that only need metadata go without)
        self.cipher = cipher
        #: an audit.AuditTrail: each write method records its events in the transaction of its change
        self.audit = audit
        #: the engine that writes through this store, recorded on each message it stores
        self.node = node
        self.duplicate_window = timedelta(seconds=duplicate_window)
        try:
            self.engine = create_engine(url)
        except (SQLAlchemyError, ImportError, ValueError) as e:
            raise StoreError(f"cannot use store URL {_safe_url(url)}: {e}") from None
        self._sqlite = self.engine.dialect.name == "sqlite"
        self._columns = [c.name for c in messages.c]
        self._sqlite_insert = (f"INSERT INTO messages ({', '.join(self._columns)}) "
                               f"VALUES ({', '.join('?' * len(self._columns))})")
        dialect = self.engine.dialect
        stored_time = messages.c.received_at.type.dialect_impl(dialect)
        self._datetime = _stored_time(stored_time.bind_processor(dialect))
        self._read_datetime = stored_time.result_processor(dialect, None)
        self._write_conn: sa.Connection | None = None
        self._plans: dict = {}   # see _execute_many
        if audit is not None:
            audit.bind(self.engine)

    def close(self):
        if self._write_conn is not None:
            self._write_conn.close()
            self._write_conn = None
        self.engine.dispose()

    # -- schema ---------------------------------------------------------------

    def _alembic(self, connection):
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.attributes["connection"] = connection
        return cfg

    def revisions(self) -> tuple[str | None, str]:
        """(revision the database is at, newest revision this code knows)."""
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        with self._connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
            head = ScriptDirectory.from_config(self._alembic(conn)).get_current_head()
        return current, head

    def upgrade(self) -> tuple[str | None, str]:
        """Bring the schema to the newest revision; returns (before, after)."""
        from alembic import command

        before, head = self.revisions()
        if before != head:
            with self._connect() as conn, conn.begin():
                command.upgrade(self._alembic(conn), "head")
        return before, head

    def check_schema(self, *, upgrade_empty: bool = True):
        """Upgrade an empty database; refuse to run on one that is behind."""
        current, head = self.revisions()
        if current == head:
            return
        if current is None and upgrade_empty and not self._has_tables():
            self.upgrade()
            return
        raise StoreError(f"the store is at schema revision {current or 'none'}, this engine needs "
                         f"{head}: run `interface-engine db upgrade` first")

    def _has_tables(self) -> bool:
        with self._connect() as conn:
            return bool(sa.inspect(conn).get_table_names())

    def _connect(self):
        try:
            return self.engine.connect()
        except SQLAlchemyError as e:
            raise StoreError(f"cannot connect to the store {_safe_url(self.url)}: "
                             f"{_first_line(e)}") from None

    # -- ingest -----------------------------------------------------------------

    def write(self, batch: list[Incoming], now: datetime | None = None) -> list[Outcome]:
        """Store a batch in ONE transaction and say what became of each message.

        Duplicates are decided here, inside the transaction, so that a copy earlier in
        the same batch counts as well as one stored before.
        """
        now = now or utcnow()
        conn = self._writer()
        with write_transaction(conn):
            earlier = self._earlier_copies(conn, batch, now)
            first_in_batch: dict[tuple, int] = {}
            copies: dict[int, _Original | int] = {}
            rows, slots, conflicts = [], [], set()
            for i, item in enumerate(batch):
                if item.state == RECEIVED and item.control_id:  # no id, no way to recognise a copy
                    key = item.key()
                    original = earlier.get(key)
                    if original is None:
                        original = first_in_batch.get(key)
                    if original is None:
                        first_in_batch[key] = i
                    else:
                        sha = original.sha256 if isinstance(original, _Original) else batch[original].sha256
                        if sha == item.sha256:
                            copies[i] = original
                            continue
                        item.state, item.error = REJECTED, "duplicate control id with different content"
                        conflicts.add(i)
                        if item.conflict_ack:
                            item.ack = item.conflict_ack()
                rows.append(_row(item, now, self.node))
                slots.append(i)
            outcomes: list[Outcome | None] = [None] * len(batch)
            ids = self.reserve_ids(conn, messages, len(rows))
            for row, message_id in zip(rows, ids):
                row["id"] = message_id
                row["raw"], row["raw_key"] = self.seal(row["raw"], "messages.raw", message_id)
            if rows:
                self._insert_rows(conn, rows)
            for i, message_id in zip(slots, ids):
                outcomes[i] = Outcome(CONFLICT if i in conflicts else STORED, message_id, batch[i].ack,
                                      batch[i].state)
            patients = [(message_id, h) for i, message_id in zip(slots, ids)
                        for h in dict.fromkeys(batch[i].patients)]
            if patients:
                self._insert_patients(conn, patients)
            counts: dict[int, int] = {}
            for i, original in copies.items():
                if isinstance(original, int):
                    original = _Original(outcomes[original].message_id, "", outcomes[original].ack)
                outcomes[i] = Outcome(DUPLICATE, original.message_id, original.ack)
                counts[original.message_id] = counts.get(original.message_id, 0) + 1
            if counts:
                conn.execute(
                    update(messages).where(messages.c.id == sa.bindparam("mid"))
                    .values(duplicates=messages.c.duplicates + sa.bindparam("n")),
                    [{"mid": k, "n": v} for k, v in counts.items()])
            if self.audit:
                self.audit.stored(conn, batch, outcomes, now)
        return outcomes

    #: write methods that can share a transaction (see joined)
    JOINABLE = frozenset({"save_processing", "record_attempts", "record_journaled"})

    @property
    def joins(self) -> bool:
        """Whether the writer joins JOINABLE calls: on SQLite, where this engine is the only writer.

        On PostgreSQL several engines may share the store. A longer transaction there
        would hold message rows another engine's processing waits for, and let deliveries
        become visible out of id order (queue order) for longer; each call keeps its own.
        """
        return self._sqlite

    @contextmanager
    def joined(self):
        """One transaction for several calls of JOINABLE methods, committed when the block ends.

        A page that several of them change (a message's row, its deliveries', the audit
        chain's head) then goes to the log once instead of once per call, and the log
        is synced once. If one call fails, all of the block is undone: the caller runs
        them again each in its own transaction (see run_joined), so that only that one fails.
        """
        conn = self._writer()
        with write_transaction(conn):
            conn.info[_JOINED] = True
            try:
                yield
            finally:
                conn.info.pop(_JOINED, None)

    def run_joined(self, calls: list[tuple]) -> list:
        """[(JOINABLE method, items)] in one transaction; their results, or None if any failed
        (then nothing of them was written)."""
        try:
            with self.joined():
                return [method(items) for method, items in calls]
        except Exception:
            return None

    def _writer(self) -> sa.Connection:
        """The write path's own connection: no pool round trip per batch.

        Used only from the thread that writes (the group committer's). A connection
        that broke is replaced on the next batch; that batch has already failed.
        """
        conn = self._write_conn
        if conn is not None and conn.invalidated:
            conn.close()
            conn = None
        if conn is None:
            conn = self._write_conn = self._connect()
        return conn

    def _insert_rows(self, conn, rows: list[dict]):
        if not self._sqlite:
            conn.execute(_INSERT_MESSAGES, rows)
            return
        # One executemany through the driver costs a third of SQLAlchemy's own.
        stamp = self._datetime
        driver(conn).executemany(self._sqlite_insert, [
            tuple(stamp(row[c]) if c == "received_at" else row[c] for c in self._columns)
            for row in rows])

    def _execute_many(self, conn, statement, rows: list[dict]):
        """One statement over many rows; on SQLite straight through the driver.

        SQLAlchemy's per-row parameter handling costs more than SQLite's work on
        these small rows, so the statement is compiled once per set of keys and
        the rows are handed over as tuples, bound as SQLAlchemy would bind them.
        """
        if not self._sqlite:
            conn.execute(statement, rows)
            return
        keys = tuple(rows[0])
        plan = self._plans.get((statement, keys))
        if plan is None:
            plan = self._plans[(statement, keys)] = self._plan(statement, keys)
        sql, values, processed = plan
        params = [values(row) for row in rows]
        if processed:
            for i, processor in processed:
                for n, row in enumerate(params):
                    if row[i] is not None:
                        params[n] = (*row[:i], processor(row[i]), *row[i + 1:])
        driver(conn).executemany(sql, params)

    def _plan(self, statement, keys: tuple[str, ...]):
        """(SQL, row dict -> parameter tuple, [(position, bind processor)]) for _execute_many."""
        dialect = self.engine.dialect
        compiled = statement.compile(dialect=dialect, column_keys=list(keys))
        names, processed = compiled.positiontup, []
        for i, name in enumerate(names):
            bind = compiled.binds[name]
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if isinstance(bind.type, sa.DateTime):
                processor = self._datetime
            if processor is not None:
                processed.append((i, processor))
        literals = {name: compiled.binds[name].value for name in names if name not in keys}
        if literals:   # a name not in the rows is a literal, e.g. the 1 of attempts + 1
            def values(row, names=names, literals=literals):
                return tuple(row[name] if name not in literals else literals[name] for name in names)
        elif len(names) == 1:
            def values(row, name=names[0]):
                return (row[name],)
        else:
            values = operator.itemgetter(*names)
        return compiled.string, values, processed

    # -- sealed contents ----------------------------------------------------------

    def reserve_ids(self, conn, table: sa.Table, count: int) -> list[int]:
        """Ids for rows about to be inserted in `table`, in order, inside a write_transaction.

        Contents are sealed with their row's id, so the id must be known first.
        """
        if not count:
            return []
        if self._sqlite:
            top = driver(conn).execute(f"SELECT COALESCE(MAX(id), 0) FROM {table.name}").fetchone()[0]
            return list(range(top + 1, top + count + 1))
        return sorted(conn.execute(_NEXT_IDS, {"table": table.name, "count": count}).scalars())

    def seal(self, value: bytes | None, place: str, row_id: int) -> tuple[bytes | None, str | None]:
        """(value to store, its key id): sealed when the store has a cipher."""
        if value is None or self.cipher is None:
            return value, None
        return self.cipher.seal(value, place, row_id)

    def open(self, value: bytes | None, key_id: str | None, place: str, row_id: int) -> bytes | None:
        """A stored content as it was written; every reader of contents comes through here."""
        if value is None or key_id is None:
            return value
        if self.cipher is None:
            raise StoreError(f"{place} of row {row_id} is encrypted: this command needs the key file")
        try:
            return self.cipher.open(value, key_id, place, row_id)
        except SealError as e:
            raise StoreError(str(e)) from None

    def _insert_patients(self, conn, rows: list[tuple[int, str]]):
        if self._sqlite:  # straight to the driver, as for the messages themselves
            driver(conn).executemany(_SQLITE_INSERT_PATIENTS, rows)
        else:
            conn.execute(_INSERT_PATIENTS, [{"message_id": m, "patient_hash": h} for m, h in rows])

    def _earlier_copies(self, conn, batch, now) -> dict[tuple, _Original]:
        ids = {item.control_id for item in batch if item.state == RECEIVED and item.control_id}
        if not ids:
            return {}
        since = now - self.duplicate_window
        if self._sqlite:
            rows = driver(conn).execute(_SQLITE_EARLIER_COPIES.format(ids=placeholders(len(ids))),
                                        (*ids, self._datetime(since)))
        else:
            rows = conn.execute(_EARLIER_COPIES, {"ids": list(ids), "since": since})
        found: dict[tuple, _Original] = {}
        for mid, app, fac, cid, sha, ack in rows:
            found.setdefault((app, fac, cid), _Original(mid, sha, ack))
        return found

    # -- channels ---------------------------------------------------------------

    def save_processing(self, batch: list[Processed], now: datetime | None = None) -> list[bool]:
        """Record what channels made of messages, in one transaction of a few batched statements.

        A message leaves `received` exactly once: if it already has (a second
        runtime raced this one), its result is dropped and False returned for it.
        """
        now = now or utcnow()
        conn = self._writer()
        with write_transaction(conn):
            ids = [p.message_id for p in batch]
            if self._sqlite:
                found = driver(conn).execute(_SQLITE_STILL_RECEIVED.format(ids=placeholders(len(ids))), ids)
            else:
                for channel in sorted({p.channel for p in batch}):
                    conn.execute(_QUEUE_ORDER_LOCK, {"channel": channel})
                found = conn.execute(_STILL_RECEIVED, {"ids": ids})
            waiting = {row[0] for row in found}
            done = []
            for p in batch:   # a message handed over twice in one batch moves once
                done.append(p.message_id in waiting)
                waiting.discard(p.message_id)
            moving = [p for p, ok in zip(batch, done) if ok]
            if moving:
                self._execute_many(conn, _LEAVE_RECEIVED, [
                    {"mid": p.message_id, "new_state": FILTERED if p.filter_reason else QUEUED,
                     "reason": p.filter_reason} for p in moving])
            rows = [{"message_id": p.message_id, "channel": p.channel, "destination": d.destination,
                     "state": d.state, "attempts": 0, "next_attempt_at": None, "target": d.target,
                     "output": d.output, "last_error": d.error, "response": None,
                     "response_key": None, "created_at": now, "updated_at": now}
                    for p in moving if not p.filter_reason for d in p.deliveries]
            for row, delivery_id in zip(rows, self.reserve_ids(conn, deliveries, len(rows))):
                row["id"] = delivery_id
                row["output"], row["output_key"] = self.seal(row["output"], "deliveries.output",
                                                             delivery_id)
            if rows:
                self._execute_many(conn, _INSERT_DELIVERIES, rows)
            self._settle(conn, [p.message_id for p in moving if not p.filter_reason])
            if self.audit and moving:
                self.audit.processed(conn, moving, now)
        return done

    def queue(self, requests: list[tuple[str, str, int]]) -> list[list[QueuedDelivery]]:
        """The head of each (channel, destination) queue: waiting deliveries in FIFO order."""
        conn = self._writer()
        result = []
        with conn.begin():
            for channel, destination, limit in requests:
                if self._sqlite:
                    rows = driver(conn).execute(_SQLITE_QUEUE_HEAD, (channel, destination, limit))
                else:
                    rows = conn.execute(_QUEUE_HEAD, {"channel": channel, "destination": destination,
                                                      "limit": limit})
                result.append([self._queued(*row) for row in rows])
        return result

    def _queued(self, did, message_id, state, attempts, next_at, target, output, output_key) -> QueuedDelivery:
        if type(next_at) is str:   # SQLite's text, read past SQLAlchemy
            next_at = self._read_datetime(next_at)
        return QueuedDelivery(did, message_id, state, attempts, next_at, target,
                              self.open(output, output_key, "deliveries.output", did))

    def record_attempts(self, batch: list[Attempt], now: datetime | None = None) -> list[None]:
        """Each attempt, its delivery's new state and its message's state, in one transaction."""
        now = now or utcnow()
        conn = self._writer()
        with write_transaction(conn):
            self._record_attempts(conn, batch, now)
        return [None] * len(batch)

    def record_journaled(self, batch: list[tuple[int, ...]], now: datetime | None = None) -> list[int]:
        """Deliveries a sent-journal (store/journal.py) holds as confirmed: recorded sent, if still waiting.

        Returns, per list of ids, how many were not recorded yet. Their attempt has no
        duration and no response: the engine stopped before it could record them.
        """
        now = now or utcnow()
        conn = self._writer()
        with write_transaction(conn):
            ids = sorted({i for group in batch for i in group})
            waiting = {row.id: row.message_id for start in range(0, len(ids), 10_000)
                       for row in conn.execute(_STILL_WAITING, {"ids": ids[start:start + 10_000]})}
            found = [Attempt(delivery_id=i, message_id=waiting[i], started_at=now, duration_ms=0.0,
                             ok=True, new_state=SENT) for i in ids if i in waiting]
            if found:
                self._record_attempts(conn, found, now)
        return [sum(1 for i in set(group) if i in waiting) for group in batch]

    def _record_attempts(self, conn, batch: list[Attempt], now: datetime):
        rows = []
        for a, attempt_id in zip(batch, self.reserve_ids(conn, attempts, len(batch))):
            response, key = self.seal(a.response, "attempts.response", attempt_id)
            rows.append({"id": attempt_id, "delivery_id": a.delivery_id, "started_at": a.started_at,
                         "duration_ms": a.duration_ms, "outcome": a.new_state if a.ok else ERROR,
                         "error": a.error, "response": response, "response_key": key})
        self._execute_many(conn, _INSERT_ATTEMPTS, rows)
        keep, replace = [], []
        for a in batch:
            response, key = self.seal(a.response, "deliveries.response", a.delivery_id)
            values = {"did": a.delivery_id, "new_state": a.new_state, "next_at": a.next_attempt_at,
                      "last_error": a.error, "response": response, "response_key": key, "now": now}
            if a.rerender or a.output is not None:
                output, key = self.seal(None if a.rerender else a.output, "deliveries.output",
                                        a.delivery_id)
                replace.append(values | {"output": output, "output_key": key})
            else:
                keep.append(values)
        if keep:
            self._execute_many(conn, _RECORD_ATTEMPT, keep)
        if replace:
            self._execute_many(conn, _RECORD_ATTEMPT_OUTPUT, replace)
        self._settle(conn, sorted({a.message_id for a in batch}))
        if self.audit:
            self.audit.attempted(conn, batch, now)

    def _settle(self, conn, message_ids: list[int]):
        """A message's state follows its deliveries: dead > error > queued > sent > filtered."""
        if message_ids:
            self._execute_many(conn, _SETTLE, [{"mid": mid} for mid in message_ids])

    def deliveries_of(self, message_id: int) -> list[dict]:
        with self._connect() as conn:
            rows = conn.execute(select(deliveries).where(deliveries.c.message_id == message_id)
                                .order_by(deliveries.c.id))
            result = [dict(r._mapping) for r in rows]
            for d in result:
                d["attempt_log"] = [dict(r._mapping) for r in conn.execute(
                    select(attempts).where(attempts.c.delivery_id == d["id"]).order_by(attempts.c.id))]
        for d in result:
            d["output"] = self.open(d["output"], d["output_key"], "deliveries.output", d["id"])
            d["response"] = self.open(d["response"], d["response_key"], "deliveries.response", d["id"])
            for a in d["attempt_log"]:
                a["response"] = self.open(a["response"], a["response_key"], "attempts.response", a["id"])
        return result

    def count_deliveries(self, **where) -> int:
        query = select(func.count()).select_from(deliveries)
        for column, value in where.items():
            query = query.where(deliveries.c[column] == value)
        with self._connect() as conn:
            return conn.execute(query).scalar_one()

    # -- reading ----------------------------------------------------------------

    def list_messages(self, *, limit: int = 50, before_id: int | None = None,
                      state: str | None = None, listener: str | None = None) -> list[dict]:
        query = (select(*[c for c in messages.c if c.name not in ("raw", "raw_key", "ack")])
                 .order_by(messages.c.id.desc()).limit(limit))
        if before_id is not None:
            query = query.where(messages.c.id < before_id)
        if state:
            query = query.where(messages.c.state == state)
        if listener:
            query = query.where(messages.c.listener == listener)
        with self._connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def get_message(self, message_id: int) -> dict | None:
        with self._connect() as conn:
            row = conn.execute(select(messages).where(messages.c.id == message_id)).first()
        if row is None:
            return None
        found = dict(row._mapping)
        found["raw"] = self.open(found["raw"], found["raw_key"], "messages.raw", message_id)
        return found

    def search(self, criteria) -> list[dict]:
        """One page of messages matching a search.Criteria, newest first (metadata only)."""
        from .search import search

        with self._connect() as conn:
            return search(conn, criteria)

    def status(self, now: datetime | None = None):
        """Counts per channel and destination, queue depths and ages: a search.Status."""
        from .search import status

        with self._connect() as conn:
            return status(conn, now or utcnow())

    def last_received(self, channels) -> dict:
        """Per channel name, the receipt time (naive UTC) of its newest stored message, or None."""
        from .search import last_received

        with self._connect() as conn:
            return last_received(conn, channels)

    def count_messages(self, **where) -> int:
        query = select(func.count()).select_from(messages)
        for column, value in where.items():
            query = query.where(messages.c[column] == value)
        with self._connect() as conn:
            return conn.execute(query).scalar_one()


# Prepared once: building a statement per row cost more than running it.
_INSERT_MESSAGES = insert(messages)
_INSERT_PATIENTS = insert(message_patients)
# PostgreSQL, shared by several engines: deliveries take their ids (their queue order) and
# become visible in one order only if the transactions that queue them for a channel do not
# overlap. Without this lock, one engine's deliveries could commit after another's with
# higher ids, and be sent after them. Taken first, in channel order; held until commit.
_QUEUE_ORDER_LOCK = sa.text("SELECT pg_advisory_xact_lock(7001, hashtext(:channel))")
_NEXT_IDS = sa.text("SELECT nextval(pg_get_serial_sequence(:table, 'id')) FROM generate_series(1, :count)")
_SQLITE_INSERT_PATIENTS = "INSERT INTO message_patients (message_id, patient_hash) VALUES (?, ?)"
# FOR UPDATE (PostgreSQL; SQLite has one writer): when two engines race for a message,
# the second waits for the first's commit and then no longer sees it `received`.
# Rows are locked in id order, so two such transactions cannot deadlock.
_STILL_RECEIVED = (select(messages.c.id)
                   .where(messages.c.id.in_(sa.bindparam("ids", expanding=True)),
                          messages.c.state == RECEIVED)
                   .order_by(messages.c.id).with_for_update())
_SQLITE_STILL_RECEIVED = f"SELECT id FROM messages WHERE id IN ({{ids}}) AND state = '{RECEIVED}'"
_INSERT_DELIVERIES = insert(deliveries)
_INSERT_ATTEMPTS = insert(attempts)
_STILL_WAITING = (select(deliveries.c.id, deliveries.c.message_id)
                  .where(deliveries.c.id.in_(sa.bindparam("ids", expanding=True)),
                         deliveries.c.state.in_(PENDING_STATES)))
_LEAVE_RECEIVED = (update(messages).where(messages.c.id == sa.bindparam("mid"))
                   .values(state=sa.bindparam("new_state"), filter_reason=sa.bindparam("reason")))
_RECORD_ATTEMPT = (update(deliveries).where(deliveries.c.id == sa.bindparam("did"))
                   .values(state=sa.bindparam("new_state"), attempts=deliveries.c.attempts + 1,
                           next_attempt_at=sa.bindparam("next_at"), last_error=sa.bindparam("last_error"),
                           response=sa.bindparam("response"), response_key=sa.bindparam("response_key"),
                           updated_at=sa.bindparam("now")))
_RECORD_ATTEMPT_OUTPUT = _RECORD_ATTEMPT.values(output=sa.bindparam("output"),
                                                output_key=sa.bindparam("output_key"))

_QUEUE_HEAD = (
    select(deliveries.c.id, deliveries.c.message_id, deliveries.c.state, deliveries.c.attempts,
           deliveries.c.next_attempt_at, deliveries.c.target, deliveries.c.output,
           deliveries.c.output_key)
    .where(deliveries.c.channel == sa.bindparam("channel"),
           deliveries.c.destination == sa.bindparam("destination"),
           deliveries.c.state.in_(PENDING_STATES))
    .order_by(deliveries.c.id).limit(sa.bindparam("limit")))
_SQLITE_QUEUE_HEAD = ("SELECT id, message_id, state, attempts, next_attempt_at, target, output, output_key "
                      "FROM deliveries WHERE channel = ? AND destination = ? "
                      f"AND state IN ({', '.join(repr(state) for state in PENDING_STATES)}) ORDER BY id LIMIT ?")

#: A message's state from its deliveries; NULL when it has none (it keeps its own).
_SETTLED_STATE = f"""(
        SELECT CASE
            WHEN COUNT(*) = 0 THEN NULL
            WHEN SUM(CASE WHEN d.state = '{DEAD}' THEN 1 ELSE 0 END) > 0 THEN '{DEAD}'
            WHEN SUM(CASE WHEN d.state = '{ERROR}' THEN 1 ELSE 0 END) > 0 THEN '{ERROR}'
            WHEN SUM(CASE WHEN d.state = '{QUEUED}' THEN 1 ELSE 0 END) > 0 THEN '{QUEUED}'
            WHEN SUM(CASE WHEN d.state = '{SENT}' THEN 1 ELSE 0 END) > 0 THEN '{SENT}'
            ELSE '{FILTERED}' END
        FROM deliveries d WHERE d.message_id = messages.id)"""
# Only a change is written: most settles leave the state as it was (the first of two
# destinations sent, the other still queued), and an unchanged row then costs no write
# of its page, its two state indexes or their share of the commit.
_SETTLE = sa.text(f"UPDATE messages SET state = {_SETTLED_STATE} WHERE id = :mid AND state <> {_SETTLED_STATE}")

_EARLIER_COPIES = (
    select(messages.c.id, messages.c.sending_application, messages.c.sending_facility,
           messages.c.control_id, messages.c.sha256, messages.c.ack)
    .where(messages.c.control_id.in_(sa.bindparam("ids", expanding=True)),
           messages.c.received_at >= sa.bindparam("since"),
           messages.c.state != REJECTED)
    .order_by(messages.c.id))

_SQLITE_EARLIER_COPIES = ("SELECT id, sending_application, sending_facility, control_id, sha256, ack "
                          "FROM messages WHERE control_id IN ({ids}) AND received_at >= ? "
                          f"AND state != '{REJECTED}' ORDER BY id")


def _stored_time(processor):
    """SQLite's DateTime bind `processor`, with the engine's own naive UTC datetimes written at
    once in the same text (SQLAlchemy's formatting is several times slower)."""
    if processor is None:   # PostgreSQL: the driver takes datetimes
        return lambda value: value

    def stored(value):
        if type(value) is datetime and value.tzinfo is None:
            return value.isoformat(" ", "microseconds")
        return processor(value)
    return stored


def _row(item: Incoming, now: datetime, node: str | None) -> dict:
    return {
        "received_at": now, "listener": item.listener, "peer": item.peer, "state": item.state,
        "error": item.error, "sending_application": item.sending_application[:227],
        "sending_facility": item.sending_facility[:227],
        "receiving_application": item.receiving_application[:227],
        "receiving_facility": item.receiving_facility[:227],
        "message_type": item.message_type[:16], "trigger_event": item.trigger_event[:16],
        "control_id": item.control_id[:199], "version": item.version[:16],
        "size": len(item.raw), "sha256": item.sha256, "raw": item.raw, "ack": item.ack,
        "duplicates": 0, "channel": item.channel, "filter_reason": None,
        "correlation_id": item.correlation_id, "content_removed_at": None, "node": node,
        "edited_from": item.edited_from,
    }


def _safe_url(url: str) -> str:
    """The URL without its password, fit for an error message."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparseable URL is reported by the caller's own message
        return url.split("@")[-1]


def _first_line(error: Exception) -> str:
    text = str(getattr(error, "orig", None) or error)
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__
