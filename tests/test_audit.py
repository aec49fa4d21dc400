"""The audit trail on SQLite and PostgreSQL: chained rows, tampering found at the right row, events in the store's transactions."""

import json
import os
import threading
from datetime import timedelta

import pytest
import sqlalchemy as sa

from interface_engine.audit import (DELETED, EDITED, INSERTED, REORDERED, TRUNCATED, AuditTrail,
                                    read_checkpoint, verify, write_checkpoint)
from interface_engine.store import (RECEIVED, REJECTED, Attempt, Incoming, NewDelivery, Processed,
                                    Store)
from interface_engine.store.schema import audit_events, audit_heads
from interface_engine.store.store import utcnow

KEY = bytes(range(32))
ROWS = 60


@pytest.fixture
def trail(store_url):
    trail = AuditTrail(KEY, "node-a")
    store = Store(store_url, duplicate_window=3600, audit=trail)
    store.check_schema()
    trail.store = store
    yield trail
    store.close()


def fill(trail, n, batch=7):
    """n events, appended in batches as the store's hooks do."""
    at = utcnow()
    for start in range(0, n, batch):
        with trail.db.begin() as conn:
            trail.append(conn, at + timedelta(seconds=start), [
                ("engine:node-a", "message.received", "message", str(i), "127.0.0.1:5000", "success",
                 f"{i:032x}", json.dumps({"listener": "l"})) for i in range(start, min(n, start + batch))])


def rows(trail):
    with trail.db.connect() as conn:
        return [r._asdict() for r in conn.execute(sa.select(audit_events).order_by(audit_events.c.id))]


def restore(trail, snapshot, heads):
    with trail.db.begin() as conn:
        conn.execute(audit_events.delete())
        conn.execute(audit_heads.delete())
        conn.execute(audit_events.insert(), snapshot)
        conn.execute(audit_heads.insert(), heads)


def run(trail, *statements):
    with trail.db.begin() as conn:
        for sql, params in statements:
            conn.execute(sa.text(sql), params)


def renumber(trail, where: str, delta: int, **params):
    """Shift seqs in two steps, so the unique (chain, seq) index never sees a clash midway."""
    run(trail, (f"UPDATE audit_events SET seq = -(seq + :d) WHERE {where}", params | {"d": delta}),
        ("UPDATE audit_events SET seq = -seq WHERE seq < 0", {}))


def edit(trail, k):
    run(trail, ("UPDATE audit_events SET outcome = 'failure' WHERE seq = :k", {"k": k}))
    return EDITED, k


def delete(trail, k):
    run(trail, ("DELETE FROM audit_events WHERE seq = :k", {"k": k}))
    return DELETED, k


def insert(trail, k):
    forged = next(r for r in rows(trail) if r["seq"] == min(k, ROWS))
    renumber(trail, "seq >= :k", 1, k=k)
    forged = {c: v for c, v in forged.items() if c != "id"} | {
        "seq": k, "actor": "intruder", "mac": "0" * 64}
    with trail.db.begin() as conn:
        conn.execute(audit_events.insert(), forged)
    return INSERTED, k


def reorder(trail, k, distance):
    run(trail, ("UPDATE audit_events SET seq = -1 WHERE seq = :k", {"k": k}),
        ("UPDATE audit_events SET seq = :k WHERE seq = :j", {"k": k, "j": k + distance}),
        ("UPDATE audit_events SET seq = :j WHERE seq = -1", {"j": k + distance}))
    return REORDERED, k


def truncate(trail, k):
    """Cut the chain from seq k and make the head agree: only the checkpoint can tell."""
    previous = next((r["mac"] for r in rows(trail) if r["seq"] == k - 1), "")
    run(trail, ("DELETE FROM audit_events WHERE seq >= :k", {"k": k}),
        ("UPDATE audit_heads SET seq = :s, mac = :m", {"s": k - 1, "m": previous}))
    return TRUNCATED, k


TAMPERING = {
    "edited": [(edit, k) for k in (1, 2, 9, 30, 59, ROWS)],
    "deleted": [(delete, k) for k in (1, 2, 15, 31, 58, ROWS - 1)],
    "inserted": [(insert, k) for k in (1, 2, 14, 33, ROWS, ROWS + 1)],
    "reordered": [(lambda t, k, d=d: reorder(t, k, d), k)
                  for k, d in ((1, 1), (1, 5), (2, 40), (20, 1), (25, 30), (ROWS - 1, 1), (50, 10))],
    "truncated": [(truncate, k) for k in (1, 2, 30, ROWS - 1, ROWS)],
}


@pytest.mark.parametrize("kind", TAMPERING)
def test_tampering_is_reported_at_the_right_row(trail, tmp_path, kind):
    fill(trail, ROWS)
    checkpoint = tmp_path / "checkpoint.json"
    write_checkpoint(checkpoint, KEY, trail.heads())
    snapshot, heads = rows(trail), [{"chain": c, "seq": s, "mac": m} for c, (s, m) in trail.heads().items()]
    clean = verify(trail, checkpoint)
    assert clean.ok and clean.chains == {"node-a": ROWS}
    for tamper, k in TAMPERING[kind]:
        expected = tamper(trail, k)
        report = verify(trail, checkpoint)
        assert [(p.kind, p.seq) for p in report.problems] == [expected], (kind, k, report.problems)
        problem = report.problems[0]
        assert problem.chain == "node-a" and f"seq {expected[1]}" in str(problem)
        if kind in ("edited", "inserted", "reordered"):
            found = next(r for r in rows(trail) if r["seq"] == k)
            assert problem.row_id == found["id"], (kind, k)
        restore(trail, snapshot, heads)
        assert verify(trail, checkpoint).ok


def test_a_chain_appended_by_several_writers_at_once_stays_whole(trail, tmp_path):
    def writer(n):
        for i in range(25):
            trail.record("content.viewed", actor=f"user{n}", object_type="message", object_id=str(i),
                         source="cli@host")

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    write_checkpoint(tmp_path / "c.json", KEY, trail.heads())
    report = verify(trail, tmp_path / "c.json")
    assert report.ok, report.problems
    assert report.chains == {"node-a": 100} and trail.heads()["node-a"][0] == 100


def test_each_chain_reports_its_own_first_problem(trail, tmp_path):
    other = AuditTrail(KEY, "node-b")
    other.bind(trail.db)
    fill(trail, 10)
    for i in range(5):
        other.record("engine.started", actor="engine:node-b", object_type="engine", object_id="node-b",
                     source="host")
    write_checkpoint(tmp_path / "c.json", KEY, trail.heads())
    run(trail, ("UPDATE audit_events SET actor = 'x' WHERE chain = 'node-a' AND seq IN (3, 6)", {}),
        ("DELETE FROM audit_events WHERE chain = 'node-b' AND seq = 2", {}))
    report = verify(trail, tmp_path / "c.json")
    assert [(p.chain, p.kind, p.seq) for p in report.problems] == [("node-a", EDITED, 3), ("node-b", DELETED, 2)]


def test_the_checkpoint_is_signed_and_a_missing_one_is_a_problem(trail, tmp_path):
    fill(trail, 5)
    path = tmp_path / "c.json"
    assert verify(trail, path).problems[0].text.startswith(f"no audit checkpoint at {path}")
    write_checkpoint(path, KEY, trail.heads())
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert read_checkpoint(path, KEY) == trail.heads()
    data = json.loads(path.read_text())
    data["heads"]["node-a"]["seq"] = 3
    path.write_text(json.dumps(data))
    problems = verify(trail, path).problems
    assert len(problems) == 1 and "signature does not match" in problems[0].text
    write_checkpoint(path, KEY, trail.heads())
    assert verify(trail, path).ok
    other_key = AuditTrail(bytes(32), "node-a")
    other_key.bind(trail.db)
    assert "signature does not match" in verify(other_key, path).problems[0].text


def test_rows_appended_after_the_checkpoint_can_be_cut_off_unnoticed(trail, tmp_path):
    """The documented limit: the checkpoint protects the chain up to the seq it recorded."""
    fill(trail, 10)
    write_checkpoint(tmp_path / "c.json", KEY, trail.heads())
    fill(trail, 5)
    truncate(trail, 12)
    assert verify(trail, tmp_path / "c.json").ok
    truncate(trail, 10)
    assert [(p.kind, p.seq) for p in verify(trail, tmp_path / "c.json").problems] == [(TRUNCATED, 10)]


def test_a_chain_rewritten_with_the_key_differs_from_the_checkpoint(trail, tmp_path):
    fill(trail, 6)
    write_checkpoint(tmp_path / "c.json", KEY, trail.heads())
    run(trail, ("DELETE FROM audit_events", {}), ("DELETE FROM audit_heads", {}))
    fill(trail, 6)   # the same number of rows, sealed anew: different times, different macs
    problems = verify(trail, tmp_path / "c.json").problems
    assert [(p.kind, p.seq) for p in problems] == [(EDITED, 6)] and "checkpoint" in problems[0].text


def incoming(control_id, raw=b"MSH|^~\\&|APP|FAC|||20260101||ADT^A01|X|P|2.5\rPID|1||SECRET-MRN\r",
             state=RECEIVED, **kw):
    return Incoming(raw=raw, listener="l", peer="10.0.0.9:4000", state=state, ack=b"ACK",
                    sending_application="APP", sending_facility="FAC", control_id=control_id,
                    message_type="ADT", trigger_event="A01", channel="adt",
                    conflict_ack=lambda: b"AE", **kw)


def test_store_writes_message_events_in_the_same_transaction(trail, tmp_path):
    store = trail.store
    first = incoming("C1")
    outcomes = store.write([first, incoming("C1"), incoming("C1", raw=b"MSH|other"),
                            incoming("C2", state=REJECTED, error="MSH-9 is empty")])
    message_id = outcomes[0].message_id
    assert store.get_message(message_id)["correlation_id"] == first.correlation_id
    store.write([incoming("C1")])   # a copy of a row stored earlier
    second = store.write([incoming("C3")])[0].message_id
    store.save_processing([
        Processed(message_id, "adt", deliveries=(NewDelivery("out", "queued", output=b"x"),
                                                 NewDelivery("audit", "filtered", error="rule"))),
        Processed(second, "adt", filter_reason="channel filter: msg['PV1-2'] == 'I'")])
    delivery = store.deliveries_of(message_id)[0]["id"]
    now = utcnow()
    store.record_attempts([Attempt(delivery, message_id, now, 1.0, False, "error", error="refused")])
    store.record_attempts([Attempt(delivery, message_id, now, 1.0, False, "dead", error="refused")])
    store.record_attempts([Attempt(delivery, message_id, now, 1.0, True, "sent")])
    events = rows(trail)
    assert [(e["action"], e["outcome"], e["object_id"]) for e in events] == [
        ("message.received", "success", str(message_id)),
        ("message.rejected", "failure", str(outcomes[2].message_id)),
        ("message.rejected", "failure", str(outcomes[3].message_id)),
        ("message.duplicate", "success", str(message_id)),
        ("message.duplicate", "success", str(message_id)),
        ("message.received", "success", str(second)),
        ("message.queued", "success", str(message_id)),
        ("message.filtered", "success", str(second)),
        ("delivery.failed", "failure", str(delivery)),
        ("delivery.dead_lettered", "failure", str(delivery)),
        ("delivery.sent", "success", str(delivery)),
    ]
    mine = [e for e in events if e["object_id"] == str(message_id) or e["object_type"] == "delivery"]
    assert {e["correlation_id"] for e in mine} == {first.correlation_id}
    assert json.loads(events[6]["detail"]) == {"channel": "adt",
                                               "destinations": {"out": "queued", "audit": "filtered"}}
    assert json.loads(events[1]["detail"])["reason"] == "duplicate control id with different content"
    assert json.loads(events[2]["detail"])["reason"] == "MSH-9 is empty"
    assert all("SECRET" not in json.dumps(e, default=str) for e in events)
    assert events[0]["source"] == "10.0.0.9:4000" and events[0]["actor"] == "engine:node-a"
    write_checkpoint(tmp_path / "c.json", KEY, trail.heads())
    assert verify(trail, tmp_path / "c.json").ok

