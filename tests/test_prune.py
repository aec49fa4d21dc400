"""Retention: `db prune` and the engine's schedule remove what the policy says and nothing else."""

import threading
import time
from datetime import timedelta

import pytest
import sqlalchemy as sa

from interface_engine import hl7, keys
from interface_engine.mllp import MLLPClient
from interface_engine.store import (Attempt, Incoming, NewDelivery, Processed, QUEUED, RECEIVED, Store,
                                    utcnow)
from interface_engine.store.retention import prune
from interface_engine.store.schema import attempts, deliveries, metadata
from tests.messages import adt_a01
from tests.test_cli import cli

POLICY = """
[retention]
batch = 1
[[retention.rules]]
channel = "*"
states = ["sent", "filtered"]
content_after = "7d"
delete_after = "30d"
[[retention.rules]]
channel = "lab"
states = ["sent"]
delete_after = "1d"
[[retention.rules]]
states = ["error", "dead"]
delete_after = "90d"
"""


def stored(store, channel, state, days, control_id, *, also_queued=False) -> int:
    """A message `days` old that reached `state`, with a delivery, an attempt and a response."""
    at = utcnow() - timedelta(days=days)
    (outcome,) = store.write([Incoming(raw=adt_a01(control_id), listener="l", peer="p", state=RECEIVED,
                                       ack=b"ACK", control_id=control_id, channel=channel)], now=at)
    mid = outcome.message_id
    if state == "filtered":
        store.save_processing([Processed(mid, channel, "channel filter: test")], now=at)
    elif state != RECEIVED:
        shares = [NewDelivery("out", QUEUED, output=b"OUT")] + [NewDelivery("other", QUEUED, output=b"O")] * also_queued
        store.save_processing([Processed(mid, channel, None, tuple(shares))], now=at)
        if state != QUEUED:
            first = store.deliveries_of(mid)[0]
            store.record_attempts([Attempt(first["id"], mid, at, 1.0, state == "sent", state,
                                           error=None if state == "sent" else "down", response=b"RESP")],
                                  now=at)
    assert store.get_message(mid)["state"] == state
    return mid


@pytest.fixture
def populated(store_url, tmp_path):
    store = Store(store_url)
    store.check_schema()
    plan = {  # name: (channel, state, age in days, what the policy does to it)
        "adt-sent-2": ("adt", "sent", 2, "kept"),
        "adt-sent-10": ("adt", "sent", 10, "emptied"),
        "adt-sent-40": ("adt", "sent", 40, "deleted"),
        "adt-filtered-10": ("adt", "filtered", 10, "emptied"),
        "adt-filtered-40": ("adt", "filtered", 40, "deleted"),
        "lab-sent-2": ("lab", "sent", 2, "deleted"),          # lab's own rule: a day
        "lab-sent-10": ("lab", "sent", 10, "deleted"),
        "lab-filtered-10": ("lab", "filtered", 10, "emptied"),  # lab's rule names sent only
        "adt-error-40": ("adt", "error", 40, "kept"),
        "adt-error-100": ("adt", "error", 100, "deleted"),
        "adt-queued-100": ("adt", "queued", 100, "kept"),       # no rule names queued
        "none-received-100": (None, "received", 100, "kept"),
    }
    ids = {name: (stored(store, channel, state, days, name), fate)
           for name, (channel, state, days, fate) in plan.items()}
    # dead, but another delivery is still queued: a rule naming dead alone must keep it
    ids["adt-dead-100-pending"] = (stored(store, "adt", "dead", 100, "DP", also_queued=True), "kept")
    config = tmp_path / "engine.toml"
    config.write_text(f'[store]\nurl = "{store_url}"\n[keys]\nfile = "{keys.create(tmp_path / "keys.json").path}"\n' + POLICY)
    yield store, ids, config
    store.close()


EXPECTED = ["channel\tstate\tcontents {0}removed\tmessages {0}deleted",
            "adt\terror\t0\t1", "adt\tfiltered\t1\t1", "adt\tsent\t1\t1", "lab\tfiltered\t1\t0", "lab\tsent\t0\t2"]


def snapshot(store, ids):
    return {name: (store.get_message(mid), store.deliveries_of(mid)) for name, (mid, _) in ids.items()}


def test_prune_removes_what_the_policy_says_and_nothing_else(populated):
    store, ids, config = populated
    before = snapshot(store, ids)

    dry = cli("db", "prune", "--dry-run", "--config", config)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [EXPECTED[0].format("would be ")] + EXPECTED[1:] + \
        ["total: 8 message(s) (dry run: nothing was changed)"]
    assert snapshot(store, ids) == before

    result = cli("db", "prune", "--config", config)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [EXPECTED[0].format("")] + EXPECTED[1:] + ["total: 8 message(s)"]
    for name, (mid, fate) in ids.items():
        row, dels = store.get_message(mid), store.deliveries_of(mid)
        if fate == "deleted":
            assert row is None and dels == [], name
        elif fate == "kept":
            assert (row, dels) == before[name], name
        else:
            old_row, old_dels = before[name]
            assert row["raw"] == b"" and row["content_removed_at"] is not None, name
            assert {k: v for k, v in row.items() if k not in ("raw", "content_removed_at")} == \
                {k: v for k, v in old_row.items() if k not in ("raw", "content_removed_at")}, name
            assert all(d["output"] is None and d["response"] is None for d in dels), name
            assert [a["outcome"] for d in dels for a in d["attempt_log"]] == \
                [a["outcome"] for d in old_dels for a in d["attempt_log"]], name
            assert all(a["response"] is None for d in dels for a in d["attempt_log"]), name
    with store.engine.connect() as conn:  # nothing left behind that pointed at deleted rows
        assert conn.execute(sa.select(sa.func.count()).select_from(deliveries)).scalar_one() == \
            sum(len(store.deliveries_of(mid)) for mid, _ in ids.values())
        orphans = sa.select(sa.func.count()).select_from(attempts).where(
            ~attempts.c.delivery_id.in_(sa.select(deliveries.c.id)))
        assert conn.execute(orphans).scalar_one() == 0

    again = cli("db", "prune", "--config", config)
    assert again.stdout.strip() == "nothing to prune: no message matches a rule yet"


def test_rows_of_any_table_referencing_a_message_go_with_it(sqlite_url):
    store = Store(sqlite_url)
    store.check_schema()
    notes = sa.Table("test_notes", metadata, sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("message_id", sa.Integer, sa.ForeignKey("messages.id"), nullable=False))
    try:
        notes.create(store.engine)
        old = stored(store, "adt", "sent", 40, "OLD")
        young = stored(store, "adt", "sent", 1, "YOUNG")
        with store.engine.begin() as conn:
            conn.execute(sa.insert(notes), [{"message_id": old}, {"message_id": young}])
        from interface_engine.config import RetentionRule

        counts = prune(store, [RetentionRule("*", ("sent",), None, 30 * 86400.0)])
        assert dict(counts) == {("adt", "sent", "delete"): 1}
        with store.engine.connect() as conn:
            assert conn.execute(sa.select(notes.c.message_id)).scalars().all() == [young]
        assert store.get_message(old) is None and store.get_message(young) is not None
    finally:
        metadata.remove(notes)
        store.close()


def test_the_config_names_what_is_wrong(tmp_path):
    from tests.test_cli import assert_one_line_error

    config = tmp_path / "engine.toml"
    config.write_text('[retention]\n[[retention.rules]]\nstates = ["sent", "gone"]\ndelete_after = "1d"\n')
    assert_one_line_error(cli("db", "prune", "--config", config),
                          "engine.toml: retention.rules[0].states: expected states among", "'gone'")
    config.write_text('[retention]\nbatch = 10\n')
    assert_one_line_error(cli("db", "prune", "--config", config), "no [[retention.rules]]")
    config.write_text('[retention]\nschedule = "1h"\n')
    assert_one_line_error(cli("db", "prune", "--config", config), "retention.schedule: a schedule needs")


def test_scheduled_prune_while_ingest_goes_on(store_url, engine_factory):
    store = Store(store_url)
    store.check_schema()
    at = utcnow() - timedelta(days=40)
    old = 4000
    for start in range(0, old, 500):
        outcomes = store.write([Incoming(raw=adt_a01(f"OLD{i}"), listener="l", peer="p", state=RECEIVED,
                                         ack=b"ACK", control_id=f"OLD{i}", channel="adt")
                                for i in range(start, start + 500)], now=at)
        store.save_processing([Processed(o.message_id, "adt", "channel filter: test") for o in outcomes], now=at)
    engine = engine_factory(store_url=store_url, extra=(
        '[retention]\nschedule = "1s"\nbatch = 100\n[[retention.rules]]\n'
        'states = ["filtered", "received"]\ndelete_after = "30d"\n'))
    acked, latencies, stop = [], [], threading.Event()

    def sender():
        with MLLPClient("127.0.0.1", engine.port, timeout=10) as client:
            i = 0
            while not stop.is_set():
                started = time.perf_counter()
                answer = hl7.parse(client.send(adt_a01(f"NEW{i}")))
                latencies.append(time.perf_counter() - started)
                assert answer["MSA-1"] == "AA"
                acked.append(f"NEW{i}")
                i += 1

    thread = threading.Thread(target=sender)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while store.count_messages(state="filtered") and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join(30)
    assert store.count_messages(state="filtered") == 0, engine.log()[-2000:]
    assert len(acked) > 100
    stored_ids = {m["control_id"] for m in store.list_messages(limit=10_000)}
    assert stored_ids == set(acked)   # every ACKed message is there; none of the old ones is
    latencies.sort()
    assert latencies[-1] < 1.0, f"slowest ACK {latencies[-1]:.3f}s"
    assert "retention: channel adt, filtered: deleted" in engine.log()
    print(f"\n{len(acked)} ACKs during the prune of {old}: p50 {latencies[len(latencies) // 2] * 1000:.1f} ms, "
          f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms")
    store.close()
