"""The store on SQLite and PostgreSQL: schema, one-transaction batches, duplicates."""

from datetime import timedelta

import pytest
import sqlalchemy as sa

from interface_engine.store import (CONFLICT, DUPLICATE, RECEIVED, REJECTED, STORED, Incoming,
                                    Store, StoreError)
from interface_engine.store.store import utcnow
from tests.conftest import SCHEMA_HEAD


def item(control_id="C1", raw=b"MSH|one", state=RECEIVED, app="APP", fac="FAC", **kw):
    return Incoming(raw=raw, listener="l", peer="127.0.0.1", state=state, ack=b"ACK-" + raw,
                    sending_application=app, sending_facility=fac, control_id=control_id,
                    conflict_ack=lambda: b"AE-conflict", **kw)


@pytest.fixture
def store(store_url):
    s = Store(store_url, duplicate_window=3600)
    s.check_schema()
    yield s
    s.close()


def test_empty_database_is_upgraded_and_then_current(store):
    current, head = store.revisions()
    assert current == head == SCHEMA_HEAD


def test_upgrade_from_0001_keeps_the_messages(store_url):
    from alembic import command

    s = Store(store_url)
    with s.engine.begin() as conn:
        command.upgrade(s._alembic(conn), "0001")
    with s.engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO messages (received_at, listener, peer, state, sending_application, "
            "sending_facility, receiving_application, receiving_facility, message_type, trigger_event, "
            "control_id, version, size, sha256, raw) VALUES (:t, 'l', 'p', 'received', 'A', 'F', '', '', "
            "'ADT', 'A01', 'OLD1', '2.5', 3, 'x', :raw)"), {"t": utcnow(), "raw": b"MSH"})
    with pytest.raises(StoreError, match="db upgrade"):
        s.check_schema()
    assert s.upgrade() == ("0001", SCHEMA_HEAD)
    row = s.list_messages(limit=1)[0]
    assert row["control_id"] == "OLD1" and row["channel"] is None


def test_outdated_database_is_refused_with_what_to_do(store_url):
    s = Store(store_url)
    with s.engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE unrelated (x INTEGER)"))
    with pytest.raises(StoreError, match="interface-engine db upgrade"):
        s.check_schema()
    s.upgrade()
    s.check_schema()


def test_sqlite_is_wal_with_full_sync(sqlite_url):
    s = Store(sqlite_url)
    with s.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def test_batch_is_stored_with_raw_bytes_and_metadata(store):
    raw = "MSH|^~\\&|é".encode("utf-8") + b"\x00\xff"
    outcomes = store.write([item("A", raw, message_type="ADT", trigger_event="A01"),
                            item("B", b"MSH|two")])
    assert [o.kind for o in outcomes] == [STORED, STORED]
    row = store.get_message(outcomes[0].message_id)
    assert row["raw"] == raw and row["ack"] == b"ACK-" + raw
    assert row["control_id"] == "A" and row["message_type"] == "ADT" and row["state"] == RECEIVED
    assert row["size"] == len(raw) and len(row["sha256"]) == 64


def test_identical_copy_is_answered_with_the_stored_ack_and_counted(store):
    first = store.write([item("A", b"MSH|same")])[0]
    copy = item("A", b"MSH|same")
    copy.ack = b"a different answer"
    again = store.write([copy])[0]
    assert again.kind == DUPLICATE and again.message_id == first.message_id
    assert again.ack == b"ACK-MSH|same"
    assert store.count_messages() == 1
    assert store.get_message(first.message_id)["duplicates"] == 1


def test_copies_within_one_batch(store):
    outcomes = store.write([item("A", b"MSH|x"), item("A", b"MSH|x"), item("A", b"MSH|y")])
    assert [o.kind for o in outcomes] == [STORED, DUPLICATE, CONFLICT]
    assert outcomes[1].message_id == outcomes[0].message_id
    assert store.count_messages() == 2
    assert store.get_message(outcomes[0].message_id)["duplicates"] == 1


def test_same_control_id_other_content_is_recorded_as_rejected(store):
    store.write([item("A", b"MSH|one")])
    conflict = store.write([item("A", b"MSH|other")])[0]
    assert conflict.kind == CONFLICT and conflict.ack == b"AE-conflict"
    row = store.get_message(conflict.message_id)
    assert row["state"] == REJECTED and "different content" in row["error"]
    assert row["raw"] == b"MSH|other"


def test_same_control_id_from_another_sender_is_not_a_duplicate(store):
    store.write([item("A", b"MSH|one", app="LAB")])
    other = store.write([item("A", b"MSH|one", app="ADT")])[0]
    assert other.kind == STORED


def test_duplicate_window(store):
    old = utcnow() - timedelta(hours=2)
    store.write([item("A", b"MSH|one")], now=old)
    assert store.write([item("A", b"MSH|one")])[0].kind == STORED


def test_rejected_messages_are_kept_and_never_duplicates(store):
    a = store.write([item("", b"garbage", state=REJECTED, error="no MSH segment")])[0]
    b = store.write([item("", b"garbage", state=REJECTED, error="no MSH segment")])[0]
    assert a.kind == b.kind == STORED and a.message_id != b.message_id
    assert store.count_messages(state=REJECTED) == 2


def test_failed_transaction_stores_nothing_of_the_batch(store):
    bad = item("B", b"MSH|two")
    bad.listener = None  # NOT NULL violation: the whole batch must roll back
    with pytest.raises(sa.exc.IntegrityError) as raised:
        store.write([item("A", b"MSH|one"), bad])
    assert store.count_messages() == 0
    assert "MSH|" not in str(raised.value), "errors must not carry message content"


def test_list_pages_newest_first(store):
    ids = [o.message_id for o in store.write([item(f"C{i}", b"MSH|%d" % i) for i in range(5)])]
    page = store.list_messages(limit=2)
    assert [r["id"] for r in page] == ids[::-1][:2]
    assert "raw" not in page[0]
    assert [r["id"] for r in store.list_messages(limit=10, before_id=page[-1]["id"])] == ids[::-1][2:]


def test_messages_without_control_id_are_never_duplicates(store):
    outcomes = store.write([item("", b"MSH|x"), item("", b"MSH|x")])
    assert [o.kind for o in outcomes] == [STORED, STORED]
    assert store.write([item("", b"MSH|x")])[0].kind == STORED


def test_a_message_processed_twice_in_one_batch_leaves_received_once(store):
    from interface_engine.store import NewDelivery, Processed

    (stored,) = store.write([item("TWICE", channel="adt")])
    result = Processed(stored.message_id, "adt", deliveries=(NewDelivery("out", "queued", b"x"),))
    assert store.save_processing([result, result]) == [True, False]
    assert store.count_deliveries(message_id=stored.message_id) == 1
    assert store.save_processing([result]) == [False]



def test_joined_calls_commit_together_or_not_at_all(store):
    from interface_engine.store import Attempt, NewDelivery, Processed

    (stored,) = store.write([item("JOIN1", channel="adt")])
    result = Processed(stored.message_id, "adt", deliveries=(NewDelivery("out", "queued", b"x"),))
    stray = Attempt(delivery_id=999_999, message_id=stored.message_id, started_at=utcnow(), duration_ms=1.0,
                    ok=True, new_state="sent")   # no such delivery: the foreign key refuses it
    reader = Store(store.url)
    try:
        assert store.run_joined([(store.save_processing, [result]), (store.record_attempts, [stray])]) is None
        assert reader.count_deliveries(message_id=stored.message_id) == 0
        assert reader.get_message(stored.message_id)["state"] == RECEIVED
        with store.joined():
            assert store.save_processing([result]) == [True]
            assert reader.count_deliveries(message_id=stored.message_id) == 0   # nothing committed yet
        assert reader.count_deliveries(message_id=stored.message_id) == 1
        assert reader.get_message(stored.message_id)["state"] == "queued"
    finally:
        reader.close()


def test_settling_writes_a_message_only_when_its_state_changes(store):
    from interface_engine.store import NewDelivery, Processed
    from interface_engine.store.store import _SETTLE

    (stored,) = store.write([item("SETTLE1", channel="adt")])
    store.save_processing([Processed(stored.message_id, "adt", deliveries=(
        NewDelivery("a", "queued", b"x"), NewDelivery("b", "queued", b"y")))])
    (bare,) = store.write([item("SETTLE2", channel="adt")])   # no deliveries: keeps its own state
    with store.engine.begin() as conn:
        assert conn.execute(_SETTLE, {"mid": stored.message_id}).rowcount == 0
        assert conn.execute(_SETTLE, {"mid": bare.message_id}).rowcount == 0
        conn.execute(sa.text("UPDATE deliveries SET state = 'sent' WHERE message_id = :m AND destination = 'a'"),
                     {"m": stored.message_id})
        assert conn.execute(_SETTLE, {"mid": stored.message_id}).rowcount == 0   # b still queued
        conn.execute(sa.text("UPDATE deliveries SET state = 'sent' WHERE message_id = :m"), {"m": stored.message_id})
        assert conn.execute(_SETTLE, {"mid": stored.message_id}).rowcount == 1
    assert store.get_message(stored.message_id)["state"] == "sent"
    assert store.get_message(bare.message_id)["state"] == RECEIVED


def test_only_a_sqlite_store_joins_the_writers_calls(store):
    # PostgreSQL may be shared by several engines: see Store.joins.
    assert store.joins is (store.engine.dialect.name == "sqlite")


@pytest.mark.postgres
def test_on_postgresql_deliveries_of_a_channel_are_queued_by_one_transaction_at_a_time(postgres_url):
    """Two engines: the second's deliveries wait for the first's commit, so ids are queue order."""
    import threading

    from interface_engine.store import NewDelivery, Processed

    first, second = Store(postgres_url), Store(postgres_url)
    first.check_schema()
    try:
        (one,) = first.write([item("ORDER1", channel="adt")])
        (two,) = second.write([item("ORDER2", channel="adt")])
        done = threading.Event()

        def queue_second():
            second.save_processing([Processed(two.message_id, "adt", deliveries=(NewDelivery("out", "queued", b"y"),))])
            done.set()
        with first.joined():   # first's transaction stays open until the block ends
            first.save_processing([Processed(one.message_id, "adt", deliveries=(NewDelivery("out", "queued", b"x"),))])
            worker = threading.Thread(target=queue_second)
            worker.start()
            assert not done.wait(1.0), "the second transaction queued deliveries beside the first"
        worker.join(10)
        assert done.is_set()
        ids = {d["message_id"]: d["id"] for m in (one, two) for d in first.deliveries_of(m.message_id)}
        assert ids[one.message_id] < ids[two.message_id]
    finally:
        first.close()
        second.close()
