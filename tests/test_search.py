"""`messages search`: every criterion on SQLite and PostgreSQL, through indexes, and the patient index."""

import json
from datetime import timedelta

import pytest
import sqlalchemy as sa

from interface_engine import hl7
from interface_engine.hl7.patients import patient_ids
from interface_engine.keys import Keys
from interface_engine.keys import create as create_keys
from interface_engine.keys import load as load_keys
from interface_engine.store import Incoming, NewDelivery, Processed, Store
from interface_engine.store.search import Criteria, SearchError, parse_time, query
from interface_engine.store.store import utcnow
from tests.messages import adt_a01, oru_r01
from tests.test_cli import assert_one_line_error, cli

KEYS = Keys("test", b"i" * 32, b"a" * 32)


def incoming(raw: bytes, channel=None) -> Incoming:
    h = hl7.peek(raw)
    return Incoming(raw=raw, listener="l", peer="127.0.0.1", state="received", ack=b"ACK",
                    sending_application=h.sending_application, sending_facility=h.sending_facility,
                    message_type=h.message_type, trigger_event=h.trigger_event,
                    control_id=h.control_id, channel=channel,
                    patients=tuple(KEYS.patient_hash(i, a) for i, a in patient_ids(raw, h)))


@pytest.fixture
def filled(store_url):
    store = Store(store_url)
    yield store, fill(store)
    store.close()


def fill(store: Store) -> list[int]:
    """Four messages: an admit, a lab result, an admit of another patient, one filtered out."""
    store.check_schema()
    early = utcnow() - timedelta(days=3)
    a, = store.write([incoming(adt_a01("ADM1", mrn="MRN1"), channel="adt")], now=early)
    rest = store.write([incoming(oru_r01("LAB1", mrn="MRN1"), channel="lab"),
                        incoming(adt_a01("ADM2", mrn="MRN2", sender="OTHER_APP"), channel="adt"),
                        incoming(adt_a01("ADM3", mrn="MRN3", facility="EAST"), channel="adt")])
    ids = [a.message_id] + [o.message_id for o in rest]
    store.save_processing([
        Processed(ids[0], "adt", deliveries=(NewDelivery("archive", "queued", b"x"),
                                             NewDelivery("fhir", "queued", b"y"))),
        Processed(ids[1], "lab", deliveries=(NewDelivery("archive", "queued", b"z"),)),
        Processed(ids[2], "adt", deliveries=(NewDelivery("fhir", "error", error="no template"),)),
        Processed(ids[3], "adt", filter_reason="not for us"),
    ])
    return ids


def found(store, **kw) -> list[int]:
    return [r["id"] for r in store.search(Criteria(**kw))]


def test_each_criterion_finds_its_messages(filled):
    store, (adm1, lab1, adm2, adm3) = filled
    assert found(store) == [adm3, adm2, lab1, adm1]
    assert found(store, channel="lab") == [lab1]
    assert found(store, state="filtered") == [adm3]
    assert found(store, state="error") == [adm2]
    assert found(store, since=utcnow() - timedelta(hours=1)) == [adm3, adm2, lab1]
    assert found(store, until=utcnow() - timedelta(days=1)) == [adm1]
    assert found(store, message_type="ADT") == [adm3, adm2, adm1]
    assert found(store, message_type="ORU", trigger_event="R01") == [lab1]
    assert found(store, message_type="ADT", trigger_event="A08") == []
    assert found(store, control_id="ADM2") == [adm2]
    assert found(store, sending_application="ADT_APP") == [adm3, adm1]
    assert found(store, sending_application="ADT_APP", sending_facility="EAST") == [adm3]
    assert found(store, destination="archive") == [lab1, adm1]
    assert found(store, destination="fhir", destination_state="error") == [adm2]
    assert found(store, patient_hash=KEYS.patient_hash("MRN1", "GEN")) == [lab1, adm1]
    assert found(store, patient_hash=KEYS.patient_hash("MRN1", "OTHER")) == []
    assert found(store, channel="adt", state="queued", patient_hash=KEYS.patient_hash("MRN1", "GEN")) == [adm1]


def test_a_patient_named_twice_in_a_message_is_indexed_once(sqlite_url):
    store = Store(sqlite_url)
    store.check_schema()
    twice = incoming(adt_a01("T1", mrn="MRN5") + b"PID|2||MRN5^^^GEN\r")
    assert len(twice.patients) == 2
    store.write([twice])
    assert found(store, patient_hash=KEYS.patient_hash("MRN5", "GEN")) == [1]


def test_pages_newest_first_by_id(filled):
    store, (adm1, lab1, adm2, adm3) = filled
    assert found(store, limit=2) == [adm3, adm2]
    assert found(store, limit=2, before=adm2) == [lab1, adm1]
    assert found(store, since=utcnow() - timedelta(hours=1), before=adm2) == [lab1]


CRITERIA = {
    "channel": Criteria(channel="adt"), "state": Criteria(state="sent"),
    "since": Criteria(since=utcnow()), "until": Criteria(until=utcnow()),
    "type": Criteria(message_type="ADT"), "type and trigger": Criteria(message_type="ADT", trigger_event="A01"),
    "control id": Criteria(control_id="X"), "sender": Criteria(sending_application="A"),
    "sender and facility": Criteria(sending_application="A", sending_facility="F"),
    "destination": Criteria(destination="d"), "destination state": Criteria(destination="d", destination_state="sent"),
    "patient": Criteria(patient_hash="0" * 64), "page": Criteria(before=10),
}


@pytest.mark.parametrize("name", CRITERIA)
def test_each_criterion_is_answered_by_an_index(sqlite_url, name):
    store = Store(sqlite_url)
    store.check_schema()
    sql = str(query(CRITERIA[name]).compile(store.engine, compile_kwargs={"literal_binds": True}))
    with store.engine.connect() as conn:
        plan = [row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)]
    assert not any(step.startswith("SCAN") for step in plan), plan
    assert any("INDEX" in step or "PRIMARY KEY" in step for step in plan), plan


def test_patient_ids_follow_the_messages_own_separators():
    raw = (b"MSH#:*!@#ADT#FAC#E#H#20260101##ADT:A01#C1#P#2.5\r"
           b"PID#1##A!S!1:::HOSP@1.2@ISO:MR*B2:::LAB##DOE:JANE\r"
           b"PV1#1#I\r")
    assert patient_ids(raw, hl7.peek(raw)) == [("A:1", "HOSP"), ("B2", "LAB")]


def test_patient_ids_of_every_pid_and_none_without():
    raw = adt_a01(mrn="M1") + b"PID|2||M2^^^GEN~\"\"^^^X\r"
    assert patient_ids(raw, hl7.peek(raw)) == [("M1", "GEN"), ("M2", "GEN")]
    assert patient_ids(b"MSH|^~\\&|A|B\rXPID|1||NOT\r", hl7.peek(b"MSH|^~\\&|A|B\r")) == []


def test_times_iso_or_relative():
    now = utcnow()
    assert parse_time("2h", "--since", now) == now - timedelta(hours=2)
    assert parse_time("7d", "--since", now) == now - timedelta(days=7)
    assert parse_time("2026-11-21T10:00+01:00", "--since").isoformat() == "2026-11-21T09:00:00"
    with pytest.raises(SearchError, match="--until: 'yesterday'"):
        parse_time("yesterday", "--until")
    with pytest.raises(SearchError, match="unknown state 'done'"):
        Criteria(state="done")


def test_engine_indexes_patients_by_keyed_hash_only(engine_factory, store_url, tmp_path):
    key_path = tmp_path / "keys.json"
    engine = engine_factory(store_url, extra=f'[keys]\nfile = "{key_path}"')
    f = tmp_path / "m.hl7"
    f.write_bytes(adt_a01("P1", mrn="MRN7001") + oru_r01("P2", mrn="MRN7002"))
    assert cli("send", f, "--port", engine.port).returncode == 0
    keys = load_keys(key_path)
    store = Store(store_url)
    with store.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT message_id, patient_hash FROM message_patients")).all()
    store.close()
    assert sorted(h for _, h in rows) == sorted([keys.patient_hash("MRN7001", "GEN"),
                                                 keys.patient_hash("MRN7002", "GEN")])
    assert not any("MRN700" in h for _, h in rows)
    config = engine.config_path
    result = cli("messages", "search", "--config", config, "--patient", "MRN7002", "--authority", "gen", "--json")
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["control_id"] for line in result.stdout.splitlines()] == ["P2"]
    assert cli("messages", "search", "--config", config, "--patient", "MRN7002", "--json").stdout == ""
    table = cli("messages", "search", "--config", config, "--type", "ADT^A01", "--sender", "ADT_APP|GENERAL_HOSP")
    assert "P1" in table.stdout and "ADT^A01" in table.stdout and "P2" not in table.stdout


def test_cli_pages_and_tells_how_to_go_on(tmp_path, sqlite_url):
    store = Store(sqlite_url)
    adm1, lab1, adm2, adm3 = fill(store)
    store.close()
    config = tmp_path / "engine.toml"
    config.write_text(f'[store]\nurl = "{sqlite_url}"\n')
    first = cli("messages", "search", "--config", config, "--limit", 2, "--json")
    assert [json.loads(line)["id"] for line in first.stdout.splitlines()] == [adm3, adm2]
    table = cli("messages", "search", "--config", config, "--limit", 2)
    assert f"--before {adm2}" in table.stderr
    second = cli("messages", "search", "--config", config, "--limit", 2, "--before", adm2,
                 "--destination", "archive")
    assert "LAB1" in second.stdout and "ADM1" in second.stdout and "ADM2" not in second.stdout


@pytest.mark.parametrize("args, fragment", [
    (["--since", "last week"], "--since: 'last week' is neither"),
    (["--until", "9999999999d"], "--until: '9999999999d' reaches before the year 1"),
    (["--state", "done"], "--state: unknown state 'done'"),
    (["--destination-state", "sent"], "--destination-state needs --destination"),
    (["--destination", "d", "--destination-state", "gone"], "--destination-state: unknown state 'gone'"),
    (["--limit", "0"], "--limit: 0 is not between 1 and 10000"),
    (["--before", "x"], "--before: 'x' is not a whole number"),
    (["--authority", "GEN"], "--authority needs --patient"),
    (["--patient", "MRN1"], "no key file"),
])
def test_cli_errors_are_one_line(tmp_path, args, fragment):
    config = tmp_path / "engine.toml"
    config.write_text(f'[store]\nurl = "sqlite:///{tmp_path / "s.db"}"\n[keys]\nfile = "{tmp_path / "none.json"}"\n')
    Store(f"sqlite:///{tmp_path / 's.db'}").check_schema()
    assert_one_line_error(cli("messages", "search", "--config", config, *args), fragment)


def test_cli_patient_search_with_the_configured_key_file(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    keys = create_keys(tmp_path / "keys.json")
    store = Store(url)
    store.check_schema()
    raw = adt_a01("K1", mrn="MRN9")
    store.write([Incoming(raw=raw, listener="l", peer="p", state="received", ack=b"A", control_id="K1",
                          patients=(keys.patient_hash("MRN9", "GEN"),))])
    config = tmp_path / "engine.toml"
    config.write_text(f'[store]\nurl = "{url}"\n[keys]\nfile = "{tmp_path / "keys.json"}"\n')
    result = cli("messages", "search", "--config", config, "--patient", "MRN9", "--authority", "GEN")
    assert "K1" in result.stdout, result.stderr
