"""`status` and `messages show`: read from the store by another process, so true across processes."""

import json
from datetime import timedelta

import pytest

from interface_engine import keys

from interface_engine.store import Attempt, Incoming, NewDelivery, Processed, Store
from interface_engine.store.store import utcnow
from tests.messages import adt_a01
from tests.test_cli import cli


def stored(store, control_id, channel="adt", now=None):
    raw = adt_a01(control_id)
    return store.write([Incoming(raw=raw, listener="l", peer="p", state="received", ack=b"MSA|AA|" + control_id.encode(),
                                 message_type="ADT", trigger_event="A01", control_id=control_id,
                                 channel=channel)], now=now)[0].message_id


@pytest.fixture
def busy(store_url, tmp_path):
    """adt: one sent, one failing, one filtered; lab: one waiting; one stored without a channel."""
    store = Store(store_url)
    store.check_schema()
    now = utcnow()
    sent, failing, filtered = (stored(store, c, now=now - timedelta(minutes=10)) for c in ("S1", "E1", "F1"))
    waiting = stored(store, "W1", channel="lab", now=now - timedelta(minutes=5))
    stored(store, "N1", channel=None)
    store.save_processing([
        Processed(sent, "adt", deliveries=(NewDelivery("archive", "queued", b"OUT-S1", target="/out/s1"),)),
        Processed(failing, "adt", deliveries=(NewDelivery("archive", "queued", b"OUT-E1"),)),
        Processed(filtered, "adt", filter_reason="PV1-2 is not I"),
        Processed(waiting, "lab", deliveries=(NewDelivery("csv", "queued", b"OUT-W1"),)),
    ], now=now - timedelta(minutes=5))
    deliveries = {d["message_id"]: d["id"] for m in (sent, failing) for d in store.deliveries_of(m)}
    store.record_attempts([
        Attempt(deliveries[sent], sent, now, 12.5, True, "sent", response=b"MSA|AA|S1"),
        Attempt(deliveries[failing], failing, now, 3.0, False, "error", error="connection refused",
                next_attempt_at=now + timedelta(minutes=1)),
    ])
    config = tmp_path / "engine.toml"
    config.write_text(f'[store]\nurl = "{store_url}"\n[keys]\nfile = "{keys.create(tmp_path / "keys.json").path}"\n')
    yield store, config, {"sent": sent, "filtered": filtered}
    store.close()


def test_status_counts_channels_destinations_and_queues(busy):
    _, config, _ = busy
    result = cli("status", "--config", config, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    channels = {c["channel"]: c for c in data["channels"]}
    assert (channels["adt"]["sent"], channels["adt"]["error"], channels["adt"]["filtered"]) == (1, 1, 1)
    assert channels["lab"]["queued"] == 1 and channels[None]["received"] == 1
    dest = {(d["channel"], d["destination"]): d for d in data["destinations"]}
    archive, csv = dest[("adt", "archive")], dest[("lab", "csv")]
    assert (archive["sent"], archive["error"], archive["queue_depth"]) == (1, 1, 1)
    assert (csv["queued"], csv["queue_depth"]) == (1, 1)
    assert 290 <= csv["oldest_queued_age_s"] <= 600
    table = cli("status", "--config", config).stdout
    assert "archive" in table and "queue" in table and "(none)" in table


@pytest.mark.parametrize("name", ["CHANNEL_COUNTS", "DESTINATION_COUNTS", "QUEUES"])
def test_status_reads_indexes_only(sqlite_url, name):
    from interface_engine.store import search

    store = Store(sqlite_url)
    store.check_schema()
    with store.engine.connect() as conn:
        plan = [row[-1] for row in conn.exec_driver_sql(
            "EXPLAIN QUERY PLAN " + str(getattr(search, name).compile(
                store.engine, compile_kwargs={"literal_binds": True})))]
    assert all(step.startswith("USE TEMP") or "COVERING INDEX" in step or "ix_deliveries_queue" in step
               for step in plan), plan


def test_show_names_fields_and_gives_the_decision_and_attempts(busy):
    _, config, ids = busy
    text = cli("messages", "show", ids["sent"], "--config", config).stdout
    assert "PID-3    Patient identifier list" in text and "MRN100001^^^GEN^MR" in text
    assert "MSH-10   Message control id" in text
    assert "decision               passed to 1 destination(s): archive" in text
    assert "12.5 ms  sent" in text and "MSA|AA|S1" in text and "OUT-S1" in text
    filtered = cli("messages", "show", ids["filtered"], "--config", config).stdout
    assert "filtered out: PV1-2 is not I" in filtered
    data = json.loads(cli("messages", "show", ids["sent"], "--config", config, "--json").stdout)
    assert data["message"]["control_id"] == "S1" and data["channel"] == "adt"
    pid = next(s for s in data["segments"] if s["segment"] == "PID")
    assert {"field": "PID-5", "name": "Patient name", "value": "DOE^JANE^Q"} in pid["fields"]
    al1 = [s for s in data["segments"] if s["segment"] == "AL1"][0]["fields"][0]
    assert al1["name"] == "Set id"
    delivery = data["deliveries"][0]
    assert delivery["output"] == "OUT-S1" and delivery["target"] == "/out/s1"
    assert delivery["attempts"][0]["duration_ms"] == 12.5 and delivery["attempts"][0]["response"] == "MSA|AA|S1"


def test_show_unknown_segment_gives_numbers_only():
    from interface_engine.inspection import segments

    shown = segments(adt_a01(extra_segments="ZXY|1|custom"))
    assert shown[-1] == {"segment": "ZXY", "fields": [{"field": "ZXY-1", "name": "", "value": "1"},
                                                      {"field": "ZXY-2", "name": "", "value": "custom"}]}
