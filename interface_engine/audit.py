"""The tamper-evident audit trail: who did what to which object, when, from where, and how it went.

Events are rows of `audit_events`, append-only, one chain per engine node. Each
row's mac is HMAC-SHA256 (the key file's audit key) over the previous row's mac and
this row's fields, so a row cannot be edited, removed, added or moved without the
key and go unnoticed by `verify`. Rows cut off the end of a chain leave no such
trace; the engine therefore writes a signed checkpoint of every chain head to a file
outside the database (`Checkpointer`), and `verify` checks the chain still reaches it.

Message events are written by the store inside the transaction of the change they
describe (`stored`, `processed`, `attempted`), so the trail never disagrees with the
store. Everything else goes through `AuditTrail.record`, in a transaction of its own.
Events never hold message content: ids, names, states and reasons only.
"""

from __future__ import annotations

import getpass
import hmac
import json
import os
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite

from .private_files import replace_private
from .store.schema import DEAD, REJECTED, SENT, audit_events, audit_heads, deliveries, messages
from .store.store import CONFLICT, DUPLICATE, driver, placeholders, utcnow

SUCCESS, FAILURE = "success", "failure"

#: The fields a row's mac covers, in this order, after the previous row's mac.
SEALED = ("chain", "seq", "at", "actor", "action", "object_type", "object_id", "source",
          "outcome", "correlation_id", "detail")
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
if json.encoder.c_make_encoder is not None:  # the same text, without encode()'s per-call set-up
    _c_encoder = json.encoder.c_make_encoder(None, json.JSONEncoder().default, json.encoder.encode_basestring,
                                             None, ":", ",", False, False, True)

    def _encode(value) -> str:  # noqa: F811
        return "".join(_c_encoder(value, 0))
_LIMITS = {c.name: c.type.length for c in audit_events.c if getattr(c.type, "length", None)}

_CORRELATION = (select(messages.c.id, messages.c.correlation_id)
                .where(messages.c.id.in_(sa.bindparam("ids", expanding=True))))
_DELIVERY = (select(deliveries.c.id, deliveries.c.channel, deliveries.c.destination,
                    deliveries.c.attempts, messages.c.correlation_id)
             .join(messages, messages.c.id == deliveries.c.message_id)
             .where(deliveries.c.id.in_(sa.bindparam("ids", expanding=True))))

_SQLITE_LOOKUPS = {
    _CORRELATION: "SELECT id, correlation_id FROM messages WHERE id IN ({ids})",
    _DELIVERY: ("SELECT deliveries.id, deliveries.channel, deliveries.destination, deliveries.attempts, "
                "messages.correlation_id FROM deliveries JOIN messages ON messages.id = deliveries.message_id "
                "WHERE deliveries.id IN ({ids})"),
}


def stamp(at: datetime | str) -> str:
    """An event time as the mac sees it: microseconds, as SQLite stores it and PostgreSQL keeps it."""
    return at if isinstance(at, str) else at.isoformat(" ", "microseconds")


def keyed(key: bytes):
    """HMAC-SHA256 with the key set up once: each mac starts from a copy of it."""
    return hmac.new(key, digestmod="sha256")


def seal(key: bytes, previous: str, fields: tuple) -> str:
    """The mac of one row: `fields` are its SEALED values, `at` already stamped."""
    h = keyed(key)
    h.update((previous + _encode(fields)).encode())
    return h.hexdigest()


def cli_actor() -> tuple[str, str]:
    """(actor, source) for a command run by hand: the OS user, on this host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid:{os.getuid()}"
    return user, f"cli@{socket.gethostname()}"


class AuditTrail:
    """Appends events to one chain (`chain`: the engine node) with the audit key.

    The store calls the hooks `stored`, `processed` and `attempted` inside its own
    transactions; the rest of the engine and the CLI call `record`.
    """

    def __init__(self, key: bytes, chain: str):
        self.key = key
        self.chain = chain
        self.actor = f"engine:{chain}"
        self.source = socket.gethostname()
        self.db: sa.Engine | None = None
        self._keyed = keyed(key)

    def bind(self, db: sa.Engine):
        """The store's database, for `record` and the reads of verify and export."""
        self.db = db
        self._sqlite = db.dialect.name == "sqlite"
        dialect_insert = sqlite.insert if self._sqlite else postgresql.insert
        self._new_head = dialect_insert(audit_heads).values(
            chain=sa.bindparam("chain"), seq=0, mac="").on_conflict_do_nothing()
        # The driver's executemany: SQLite takes the stored time text, psycopg a datetime.
        marker = "?" if self._sqlite else "%s"
        self._insert = (f"INSERT INTO audit_events ({', '.join(SEALED)}, mac) "
                        f"VALUES ({', '.join([marker] * (len(SEALED) + 1))})")
        self._advance = f"UPDATE audit_heads SET seq = seq + {marker} WHERE chain = {marker} RETURNING seq, mac"
        self._set_mac = f"UPDATE audit_heads SET mac = {marker} WHERE chain = {marker}"

    # -- writing ------------------------------------------------------------------

    def record(self, action: str, *, actor: str, object_type: str, object_id: str, source: str,
               outcome: str = SUCCESS, correlation_id: str | None = None,
               detail: dict | None = None) -> None:
        """Append one event in a transaction of its own (blocking: from a thread or the CLI).

        For what happens outside the message path. Actions so far: `engine.started`,
        `engine.stopped`, `config.loaded`, `config.reloaded` (outcome `failure` when
        refused), `audit.exported`; by the same call, `content.viewed` (the user who
        saw a message, object the message id, with its correlation id), `message.replayed`
        and `auth.failed` (actor: the name given, source: the peer address). `actor`
        is a user or a service (`engine:<node>`); `source` where it came from (a peer
        address, `cli@host`); `detail` a small JSON-able dict that never holds message
        content. Values longer than their column are cut, before the mac is computed.
        """
        values = (actor, action, object_type, str(object_id), source, outcome, correlation_id,
                  _encode(detail) if detail else None)
        event = tuple(v[:_LIMITS[name]] if isinstance(v, str) and name in _LIMITS else v
                      for name, v in zip(SEALED[3:], values))
        with self.db.begin() as conn:
            self.append(conn, utcnow(), [event])

    def append(self, conn: sa.Connection, at: datetime, events: list[tuple]) -> None:
        """Chain `events` (SEALED values from `actor` on) at time `at`, in the caller's transaction.

        Advancing the head first locks its row, so writers of one chain (the engine,
        the CLI, several processes) take turns until their transaction ends.
        """
        chain, n = self.chain, len(events)
        run = driver(conn).execute if self._sqlite else conn.exec_driver_sql
        head = run(self._advance, (n, chain)).fetchone()
        if head is None:
            conn.execute(self._new_head, {"chain": chain})
            head = run(self._advance, (n, chain)).fetchone()
        seq, mac = head[0] - n, head[1]
        at = at.replace(tzinfo=None)
        when = stamp(at)
        start, rows = self._keyed, []
        for event in events:
            seq += 1
            h = start.copy()
            h.update((mac + _encode((chain, seq, when, *event))).encode())
            mac = h.hexdigest()
            rows.append((chain, seq, when, *event, mac))
        if not self._sqlite:
            rows = [(*r[:2], at, *r[3:]) for r in rows]
        if self._sqlite:
            driver(conn).executemany(self._insert, rows)
        else:
            conn.exec_driver_sql(self._insert, rows)
        run(self._set_mac, (mac, chain))

    def stored(self, conn, batch, outcomes, now: datetime):
        """Store.write's events: received, rejected, or a duplicate answered from an earlier row."""
        actor, events, duplicates = self.actor, [], []
        for item, outcome in zip(batch, outcomes):
            if outcome.kind == DUPLICATE:
                duplicates.append((item, outcome))
                continue
            detail = {"listener": item.listener, "type": f"{item.message_type}^{item.trigger_event}",
                      "channel": item.channel}
            if outcome.kind == CONFLICT or outcome.state == REJECTED:
                detail["reason"] = item.error
                events.append((actor, "message.rejected", "message", str(outcome.message_id), item.peer,
                               FAILURE, item.correlation_id, _encode(detail)))
            else:
                events.append((actor, "message.received", "message", str(outcome.message_id), item.peer,
                               SUCCESS, item.correlation_id, _encode(detail)))
        if duplicates:
            known = dict(self._lookup(conn, _CORRELATION, list({o.message_id for _, o in duplicates})))
            for item, outcome in duplicates:
                events.append((actor, "message.duplicate", "message", str(outcome.message_id), item.peer,
                               SUCCESS, known.get(outcome.message_id),
                               _encode({"listener": item.listener, "answered_from": outcome.message_id})))
        if events:
            self.append(conn, now, events)

    def processed(self, conn, moving, now: datetime):
        """Store.save_processing's events: each message filtered, or queued to its destinations."""
        known = dict(self._lookup(conn, _CORRELATION, [p.message_id for p in moving]))
        events = []
        for p in moving:
            if p.filter_reason:
                action, detail = "message.filtered", {"channel": p.channel, "rule": p.filter_reason}
            else:
                action = "message.queued"
                detail = {"channel": p.channel,
                          "destinations": {d.destination: d.state for d in p.deliveries}}
            events.append((self.actor, action, "message", str(p.message_id), self.chain, SUCCESS,
                           known.get(p.message_id), _encode(detail)))
        self.append(conn, now, events)

    def attempted(self, conn, batch, now: datetime):
        """Store.record_attempts's events: sent, failed (will retry) or dead-lettered."""
        known = {row[0]: row[1:] for row in self._lookup(conn, _DELIVERY, list({a.delivery_id for a in batch}))}
        events = []
        for a in batch:
            channel, destination, attempts, correlation_id = known[a.delivery_id]
            if a.ok and a.new_state == SENT:
                action, outcome = "delivery.sent", SUCCESS
            elif a.new_state == DEAD:
                action, outcome = "delivery.dead_lettered", FAILURE
            else:
                action, outcome = "delivery.failed", FAILURE
            detail = {"message_id": a.message_id, "channel": channel, "destination": destination,
                      "attempts": attempts}
            events.append((self.actor, action, "delivery", str(a.delivery_id), self.chain, outcome,
                           correlation_id, _encode(detail)))
        self.append(conn, now, events)

    def _lookup(self, conn, query, ids: list[int]):
        """The rows of `query` (one of the ``ids`` lookups above) for `ids`; on SQLite from the driver."""
        if not self._sqlite:
            return conn.execute(query, {"ids": ids}).all()
        return driver(conn).execute(_SQLITE_LOOKUPS[query].format(ids=placeholders(len(ids))), ids)

    # -- reading ------------------------------------------------------------------

    def heads(self) -> dict[str, tuple[int, str]]:
        with self.db.connect() as conn:
            return {chain: (seq, mac) for chain, seq, mac in conn.execute(select(audit_heads))}

    def events(self, since: datetime | None = None) -> Iterator[dict]:
        """Every event in the order written (by id), streamed."""
        query = select(audit_events).order_by(audit_events.c.id)
        if since is not None:
            query = query.where(audit_events.c.at >= since)
        with self.db.connect() as conn, conn.begin():
            for row in conn.execution_options(stream_results=True, yield_per=2000).execute(query):
                yield row._asdict()

    def page(self, *, since: datetime | None = None, action: str | None = None,
             before: int | None = None, limit: int = 100) -> list[dict]:
        """Events newest first, for the admin API: one page, `before` the last id of the previous one."""
        query = select(audit_events).order_by(audit_events.c.id.desc()).limit(limit)
        if since is not None:
            query = query.where(audit_events.c.at >= since)
        if action:
            query = query.where(audit_events.c.action == action)
        if before is not None:
            query = query.where(audit_events.c.id < before)
        with self.db.connect() as conn:
            return [row._asdict() for row in conn.execute(query)]


class RefusalAudit:
    """`auth.failed` events for peers refused at the door (TLS handshake, allow-list).

    One event per (listener, peer, reason) per `window` seconds, carrying how many
    refusals it stands for: a flood of bad handshakes must not become a flood of
    database writes. Called in the reactor; the write goes to a thread.
    """

    def __init__(self, trail: AuditTrail, reactor, window: float = 60.0):
        self.trail, self.reactor, self.window = trail, reactor, window
        self._open: dict[tuple[str, str, str], int] = {}

    def __call__(self, listener: str, peer: str, why: str):
        key = (listener, peer, why)
        if key in self._open:
            self._open[key] += 1
            return
        self._open[key] = 0
        self._write(key, 1)
        self.reactor.callLater(self.window, self._close, key)

    def _close(self, key):
        more = self._open.pop(key, 0)
        if more:
            self._write(key, more)

    def _write(self, key, count: int):
        from twisted.internet import threads
        from twisted.logger import Logger

        listener, peer, why = key
        d = threads.deferToThread(
            self.trail.record, "auth.failed",
            actor="unknown", object_type="listener", object_id=listener, source=peer,
            outcome=FAILURE, detail={"reason": why, "count": count})
        d.addErrback(lambda f: Logger().error("could not audit a refused connection: {error}",
                                              error=f.getErrorMessage()))


# -- checkpoint -------------------------------------------------------------------------

class CheckpointError(Exception):
    """The checkpoint file is missing, unreadable or its signature does not match."""


def _checkpoint_key(key: bytes) -> bytes:
    return hmac.digest(key, b"interface-engine audit checkpoint", "sha256")


def _signature(key: bytes, body: dict) -> str:
    return hmac.digest(_checkpoint_key(key), json.dumps(body, sort_keys=True).encode(), "sha256").hex()


def write_checkpoint(path: str | os.PathLike, key: bytes, heads: dict[str, tuple[int, str]],
                     now: datetime | None = None) -> None:
    """Write the signed heads atomically: a reader sees the old file or the new one, never half."""
    body = {"version": 1, "written_at": stamp(now or utcnow()),
            "heads": {chain: {"seq": seq, "mac": mac} for chain, (seq, mac) in sorted(heads.items())}}
    text = json.dumps(body | {"signature": _signature(key, body)}, indent=2, sort_keys=True) + "\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    replace_private(path, text)


def read_checkpoint(path: str | os.PathLike, key: bytes) -> dict[str, tuple[int, str]] | None:
    """The checkpointed heads; None when there is no checkpoint file."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the audit checkpoint: {e.strerror}") from None
    except ValueError:
        raise CheckpointError(f"{path}: the audit checkpoint is not valid JSON") from None
    try:
        signature = data.pop("signature")
        valid = hmac.compare_digest(signature, _signature(key, data))
        heads = {chain: (int(h["seq"]), str(h["mac"])) for chain, h in data["heads"].items()}
    except (AttributeError, KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: the audit checkpoint is damaged") from None
    if not valid:
        raise CheckpointError(f"{path}: the audit checkpoint's signature does not match "
                              "(edited, or signed with another key)")
    return heads


class Checkpointer:
    """Writes the checkpoint every `interval` seconds while the engine runs, and at stop."""

    def __init__(self, trail: AuditTrail, path: str, interval: float, reactor):
        from twisted.internet import task

        self.trail, self.path, self.reactor = trail, path, reactor
        self.loop = task.LoopingCall(self.write)
        self.loop.clock = reactor
        self.interval = interval

    def start(self):
        self.loop.start(self.interval, now=True).addErrback(self._failed)

    def write(self):
        from twisted.internet import threads

        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self.write_now)

    def write_now(self):
        """Blocking: read the heads and write the file."""
        write_checkpoint(self.path, self.trail.key, self.trail.heads())

    def stop(self):
        if self.loop.running:
            self.loop.stop()
        return self.write()

    def _failed(self, failure):
        from twisted.logger import Logger

        Logger().error("audit checkpoint {path} could not be written: {error}; checkpoints stop "
                       "until the engine restarts", path=self.path, error=failure.getErrorMessage())


# -- verify -----------------------------------------------------------------------------

EDITED, DELETED, INSERTED, REORDERED, TRUNCATED = "edited", "deleted", "inserted", "reordered", "truncated"
#: The chain of a problem with the checkpoint itself.
ANY_CHAIN = "*"
#: How far ahead verify looks, at a broken link, for the row that belongs there.
WINDOW = 1000


@dataclass(frozen=True)
class Problem:
    chain: str
    kind: str
    seq: int                  # where the chain goes wrong (for deleted/truncated: the first missing seq)
    row_id: int | None        # the row found there (deleted: the row after the gap; truncated: the last row)
    text: str

    def __str__(self):
        if self.chain == ANY_CHAIN:
            return f"{self.kind}: {self.text}"
        return f"chain {self.chain}: {self.kind} at seq {self.seq}: {self.text}"


@dataclass
class Report:
    chains: dict[str, int]    # chain -> rows checked
    problems: list[Problem]
    checkpoint: dict | None

    @property
    def ok(self) -> bool:
        return not self.problems


def _fields(row) -> tuple:
    return (row.chain, row.seq, stamp(row.at), row.actor, row.action, row.object_type, row.object_id,
            row.source, row.outcome, row.correlation_id, row.detail)


def _links(key: bytes, row, previous: str, seq: int | None = None) -> bool:
    """Whether `row`, placed at `seq` (default its own), follows a row whose mac is `previous`."""
    fields = _fields(row)
    if seq is not None:
        fields = (fields[0], seq, *fields[2:])
    return hmac.compare_digest(seal(key, previous, fields), row.mac)


def verify(trail: AuditTrail, checkpoint_path: str | os.PathLike) -> Report:
    """Recompute every chain and hold it against its head and the checkpoint; the first problem per chain.

    The checkpoint is read first, then the heads, then the rows: each later read sees
    at least what the earlier one did, so a running engine cannot cause a false alarm.
    """
    key = trail.key
    try:
        checkpoint = read_checkpoint(checkpoint_path, key)
    except CheckpointError as e:
        return Report({}, [Problem(ANY_CHAIN, EDITED, 0, None, str(e))], None)
    heads = trail.heads()
    checked: dict[str, int] = {}
    problems: list[Problem] = []
    start, encode = keyed(key), _encode
    with trail.db.connect() as conn, conn.begin():
        # The driver's own rows, and SQLite's stored time text as it is: this loop is verify's cost.
        cursor = conn.execution_options(stream_results=True).exec_driver_sql(_ALL_ROWS)
        state = _ChainState("", None, None)
        state.broken = True
        while batch := cursor.fetchmany(5000):
            for row in batch:
                row_id, chain, seq, at, *sealed, mac = row
                if chain != state.chain:
                    _finish(state, problems)
                    state = _ChainState(chain, heads.get(chain), (checkpoint or {}).get(chain))
                    checked[chain] = 0
                if state.broken:
                    continue
                checked[chain] += 1
                h = start.copy()
                h.update((state.mac + encode(
                    (chain, seq, at if at.__class__ is str else stamp(at), *sealed))).encode())
                if seq == state.expected and mac == h.hexdigest():
                    state.expected, state.mac, state.last_id = seq + 1, mac, row_id
                    if seq in state.marks:
                        state.check_marks(row_id, seq, mac, problems)
                    continue
                state.broken = True
                problems.append(_classify(trail, conn, state, _Row(row), key))
        _finish(state, problems)
    for chain in sorted(set(checkpoint or {}) | set(heads)):
        if chain not in checked:
            seq = max((checkpoint or {}).get(chain, (0, ""))[0], heads.get(chain, (0, ""))[0])
            checked[chain] = 0
            if seq > 0:
                problems.append(Problem(chain, TRUNCATED, 1, None,
                                        f"no rows left; the chain had reached seq {seq}"))
    if checkpoint is None and any(checked.values()):
        problems.append(Problem(ANY_CHAIN, TRUNCATED, 0, None,
                                f"no audit checkpoint at {checkpoint_path}: rows cut off the end of a "
                                "chain cannot be ruled out (the engine writes it while it runs)"))
    return Report(checked, problems, checkpoint)


_ALL_ROWS = (f"SELECT id, {', '.join(SEALED)}, mac FROM audit_events ORDER BY chain, seq")


class _Row:
    """A driver row with the names _classify reads."""

    def __init__(self, row):
        self.id, self.chain, self.seq, self.at, self.actor, self.action, self.object_type, \
            self.object_id, self.source, self.outcome, self.correlation_id, self.detail, self.mac = row


class _ChainState:
    def __init__(self, chain: str, head: tuple[int, str] | None, checkpoint: tuple[int, str] | None):
        self.chain, self.head, self.checkpoint = chain, head, checkpoint
        self.expected, self.mac, self.last_id = 1, "", 0
        self.broken = False
        self.marks = {mark[0] for mark in (head, checkpoint) if mark}

    def check_marks(self, row_id: int, seq: int, mac: str, problems: list[Problem]):
        """The row at a seq the head or the checkpoint recorded must be the row they recorded."""
        for name, mark in (("head", self.head), ("checkpoint", self.checkpoint)):
            if mark and mark[0] == seq and mark[1] != mac and not self.broken:
                problems.append(Problem(self.chain, EDITED, seq, row_id,
                                        f"row id {row_id} is not the row the {name} recorded there "
                                        "(the chain was rewritten)"))
                self.broken = True


def _finish(state: _ChainState, problems: list[Problem]):
    if state.broken or not state.chain:
        return
    last = state.expected - 1
    for name, mark in (("checkpoint", state.checkpoint), ("head", state.head)):
        if mark and mark[0] > last:
            problems.append(Problem(state.chain, TRUNCATED, last + 1, state.last_id or None,
                                    f"the chain ends at seq {last} (row id {state.last_id}) but its "
                                    f"{name} recorded seq {mark[0]}"))
            return


def _classify(trail: AuditTrail, conn, state: _ChainState, row, key: bytes) -> Problem:
    """Name what happened at the first row that does not follow: see docs/operations.md."""
    chain, e, p = state.chain, state.expected, state.mac

    def problem(kind, seq, row_id, text):
        return Problem(chain, kind, seq, row_id, text)

    if row.seq != e:
        return problem(DELETED, e, row.id, f"seq {e}..{row.seq - 1} missing: the chain jumps from "
                                            f"seq {e - 1} to row id {row.id} seq {row.seq}")
    window = list(conn.execute(select(audit_events).where(audit_events.c.chain == chain,
                                                          audit_events.c.seq >= e)
                               .order_by(audit_events.c.seq).limit(WINDOW)))
    after = window[1] if len(window) > 1 else None
    head_seq = state.head[0] if state.head else 0
    here = f"row id {row.id} seq {e}"
    if row.id < state.last_id:
        return problem(REORDERED, e, row.id, f"{here} was written before the row it follows")
    if after is not None and _links(key, after, row.mac):
        return problem(EDITED, e, row.id, f"{here} does not match its mac (its fields were changed)")
    if row.seq > head_seq:
        return problem(INSERTED, e, row.id, f"{here} lies beyond the chain's head (seq {head_seq}) "
                                             "and was not written by the engine")
    for j, moved in enumerate(window[1:], 1):
        if _links(key, moved, p, e):
            following = window[j + 1] if j + 1 < len(window) else None
            shifted = (_links(key, following, moved.mac, following.seq - j) if following is not None
                       else moved.seq - j == head_seq)
            if shifted:
                return problem(INSERTED, e, row.id, f"{here} was added: the chain goes on from "
                                                     f"row id {moved.id} once {j} row(s) are taken out")
            return problem(REORDERED, e, row.id, f"{here} is out of place: the row that belongs "
                                                  f"here is row id {moved.id} at seq {moved.seq}")
    if after is not None:
        for d in range(1, 65):
            if _links(key, after, row.mac, after.seq + d):
                return problem(DELETED, e, row.id, f"{d} row(s) before {here} were deleted and the "
                                                   "later rows renumbered")
    return problem(EDITED, e, row.id, f"{here} does not match its mac (changed, or its mac replaced)")


def open_trail(config):
    """The store, able to open contents, and this node's trail for a CLI command.

    Raises StoreError / KeyFileError. A key file without a data key (from before
    contents were encrypted) can still read contents stored in clear.
    """
    from . import keys
    from .store import Store

    from .store.cipher import Cipher

    found = keys.load(config.keys_file)
    trail = AuditTrail(found.audit, config.node)
    cipher = Cipher(found, reload=lambda: keys.load(config.keys_file)) if found.active else None
    store = Store(config.store.url, duplicate_window=config.store.duplicate_window, audit=trail,
                  cipher=cipher)
    store.check_schema(upgrade_empty=False)
    return store, trail


# -- export -----------------------------------------------------------------------------

#: RFC 5424: facility 13 (log audit); notice for a success, warning for anything else.
_FACILITY = 13
_SD_ID = "audit@32473"  # 32473: the private enterprise number RFC 5612 reserves for examples
_SD_NAMES = {"id": "id", "chain": "chain", "seq": "seq", "actor": "actor", "action": "action",
             "object_type": "objectType", "object_id": "objectId", "source": "source",
             "outcome": "outcome", "correlation_id": "correlationId", "detail": "detail", "mac": "mac"}


def as_json(event: dict) -> str:
    out = dict(event)
    out["at"] = event["at"].replace(tzinfo=timezone.utc).isoformat().replace("+00:00", "Z")
    return json.dumps(out, ensure_ascii=False)


def _sd_value(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def as_syslog(event: dict) -> str:
    """One RFC 5424 record: <PRI>1 TIMESTAMP HOST APP PROCID MSGID [SD] MSG."""
    severity = 5 if event["outcome"] == SUCCESS else 4
    timestamp = f"{event['at']:%Y-%m-%dT%H:%M:%S.%f}Z"
    params = " ".join(f'{name}="{_sd_value(event[column])}"' for column, name in _SD_NAMES.items()
                      if event[column] is not None)
    message = f"{event['actor']} {event['action']} {event['object_type']} {event['object_id']}: {event['outcome']}"
    return (f"<{_FACILITY * 8 + severity}>1 {timestamp} {_printable(event['chain'])} interface-engine - "
            f"{_printable(event['action'])[:32]} [{_SD_ID} {params}] {message}")


def _printable(text: str) -> str:
    """A header field: printable US-ASCII without spaces, or the nil value."""
    cleaned = "".join(c if 33 <= ord(c) <= 126 else "_" for c in text)[:255]
    return cleaned or "-"
