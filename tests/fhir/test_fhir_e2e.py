"""HL7 v2 in over MLLP, FHIR out to the real FHIR test server: one Patient however often it is sent."""

import time
import uuid
from pathlib import Path

import pytest

from interface_engine import hl7
from interface_engine.mllp import MLLPClient
from tests.fhir_server import request
from tests.messages import adt_a01, oru_r01

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fhir_engine(tmp_path, engine_factory, fhir_server):
    channels = tmp_path / "channels"
    channels.mkdir()
    (channels / "fhir.toml").write_text(f"""
name = "to-fhir"
timezone = "America/New_York"
[source]
type = "mllp"
listener = "test"
message_types = ["ADT", "ORU", "VXU"]
[[destinations]]
name = "fhir"
type = "fhir"
url = "{fhir_server}"
template = "fhir/v2-to-fhir.fhir.json.j2"
timeout = "10s"
[destinations.retry]
backoff = "200ms"
max_backoff = "1s"
on_failure = "skip"
attempts = 2
""")
    extra = f'[channels]\ndirectory = "{channels}"\nmappings = "{ROOT / "mappings"}"\n'
    engine = engine_factory(extra=extra)
    engine.fhir = fhir_server
    engine.store = engine.open_store()
    return engine


def send(engine, *messages):
    with MLLPClient("127.0.0.1", engine.port, timeout=10) as c:
        for m in messages:
            assert hl7.parse(c.send(m))["MSA-1"] == "AA"


def settled(engine, count, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = engine.store.count_deliveries(state="sent") + engine.store.count_deliveries(state="dead")
        if done >= count:
            assert engine.store.count_deliveries(state="dead") == 0, engine_errors(engine)
            return
        time.sleep(0.1)
    raise AssertionError(f"deliveries did not settle: {engine_errors(engine)}\n{engine.log()[-2000:]}")


def engine_errors(engine):
    return [(d["destination"], d["last_error"]) for m in engine.store.list_messages()
            for d in engine.store.deliveries_of(m["id"]) if d["state"] != "sent"]


def search(engine, query):
    return request("GET", f"{engine.fhir}/{query}")[1]


def patients(engine, mrn):
    return [e["resource"] for e in search(engine, f"Patient?identifier={mrn}").get("entry", [])]


def test_adt_then_oru_give_one_patient_and_sending_again_changes_nothing(fhir_engine):
    mrn = f"MRN{uuid.uuid4().hex[:10].upper()}"
    order = f"ORD{uuid.uuid4().hex[:8].upper()}"
    send(fhir_engine, adt_a01("F1", mrn=mrn), oru_r01("F2", mrn=mrn, order=order))
    settled(fhir_engine, 2)
    found = patients(fhir_engine, mrn)
    assert len(found) == 1
    patient_id = found[0]["id"]
    observations = search(fhir_engine, f"Observation?subject=Patient/{patient_id}").get("entry", [])
    reports = search(fhir_engine, f"DiagnosticReport?subject=Patient/{patient_id}").get("entry", [])
    assert len(observations) == 2 and len(reports) == 1
    values = sorted(e["resource"]["valueQuantity"]["value"] for e in observations)
    assert values == [95, 182.0417]
    first_ids = {e["resource"]["id"] for e in observations}

    # The same messages again (a resend under new control ids): the same resources, nothing more.
    send(fhir_engine, adt_a01("F3", mrn=mrn), oru_r01("F4", mrn=mrn, order=order))
    settled(fhir_engine, 4)
    assert [p["id"] for p in patients(fhir_engine, mrn)] == [patient_id]
    again = search(fhir_engine, f"Observation?subject=Patient/{patient_id}").get("entry", [])
    assert {e["resource"]["id"] for e in again} == first_ids


def test_an_a08_updates_the_patient(fhir_engine):
    mrn = f"MRN{uuid.uuid4().hex[:10].upper()}"
    send(fhir_engine, adt_a01("U1", mrn=mrn, family="DOE"))
    settled(fhir_engine, 1)
    a08 = adt_a01("U2", mrn=mrn, family="DOE-SMITH").replace(b"ADT^A01^ADT_A01", b"ADT^A08^ADT_A01")
    send(fhir_engine, a08)
    settled(fhir_engine, 2)
    found = patients(fhir_engine, mrn)
    assert len(found) == 1 and found[0]["name"][0]["family"] == "DOE-SMITH"


def test_an_a40_merge_leaves_one_active_patient(fhir_engine):
    survivor = f"MRN{uuid.uuid4().hex[:10].upper()}"
    merged = f"MRN{uuid.uuid4().hex[:10].upper()}"
    send(fhir_engine, adt_a01("M1", mrn=survivor), adt_a01("M2", mrn=merged))
    settled(fhir_engine, 2)
    a40 = (f"MSH|^~\\&|ADT_APP|GENERAL_HOSP|ENGINE|HUB|20260105120000||ADT^A40^ADT_A39|M3|P|2.5.1\r"
           f"EVN|A40|20260105120000\rPID|1||{survivor}^^^GEN^MR||DOE^JANE||19800101|F\r"
           f"MRG|{merged}^^^GEN^MR\r").encode()
    send(fhir_engine, a40)
    settled(fhir_engine, 3)
    kept, gone = patients(fhir_engine, survivor), patients(fhir_engine, merged)
    assert len(kept) == 1 and kept[0].get("active", True) is True
    assert len(gone) == 1 and gone[0]["active"] is False
    assert {"type": "replaced-by", "other": {"reference": f"Patient/{kept[0]['id']}"}} in \
        [{"type": link["type"], "other": {"reference": link["other"]["reference"]}} for link in gone[0]["link"]]
