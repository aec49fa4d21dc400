"""The HL7 v2 -> FHIR R4 templates in mappings/fhir/: every corpus message of the mapped types, and
synthetic messages (invented people, tests/fhir/fixtures/) for each trigger event and OBX value type.

Every render must be JSON of the contract the bundle builder reads (``{"resources": [...]}``, each
resource with a resourceType and a deterministic id), each resource must validate as FHIR (the
fhir.resources R4B models, after the empty values the bundle builder drops are dropped here too;
R4B is R4 for every resource these templates make), its codes with required bindings must be in
their R4 value sets, and every reference must point to a resource of the same output.
"""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path

import pytest

from interface_engine import hl7
from interface_engine.channels.helpers import uuid5
from interface_engine.channels.templating import Mappings
from interface_engine.fhir.bundle import build, prune

REPO = Path(__file__).resolve().parents[2]
MAPPINGS = REPO / "mappings"
CORPUS = Path(__file__).resolve().parents[2] / ".." / "shared" / "corpus" / "hl7v2"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
ZONE = "America/New_York"
CI = os.environ.get("CI") == "true"

#: MSH-9.1 -> template (mappings/fhir/<name>.fhir.json.j2)
TEMPLATES = {"ADT": "adt", "ORU": "oru", "OUL": "oru", "ORM": "orm", "OML": "orm", "OMG": "orm",
             "VXU": "vxu", "SIU": "siu", "MDM": "mdm"}
CORPUS_FOLDERS = ("adt", "oru", "orm", "vxu", "siu", "mdm")
ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
REFERENCE = re.compile(r"^([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})$")

try:
    from fhir.resources.R4B import get_fhir_model_class
except ImportError:  # pragma: no cover - the test extra installs it
    get_fhir_model_class = None

#: Codes with a required binding in R4, by resource type and element path ('a.b' reads through lists).
REQUIRED_CODES = {
    "Patient": {"gender": {"male", "female", "other", "unknown"},
                "link.type": {"replaced-by", "replaces", "refer", "seealso"},
                "contact.gender": {"male", "female", "other", "unknown"}},
    "RelatedPerson": {"gender": {"male", "female", "other", "unknown"}},
    "Encounter": {"status": {"planned", "arrived", "triaged", "in-progress", "onleave", "finished", "cancelled",
                             "entered-in-error", "unknown"},
                  "location.status": {"planned", "active", "reserved", "completed"}},
    "Observation": {"status": {"registered", "preliminary", "final", "amended", "corrected", "cancelled",
                               "entered-in-error", "unknown"}},
    "DiagnosticReport": {"status": {"registered", "partial", "preliminary", "final", "amended", "corrected",
                                    "appended", "cancelled", "entered-in-error", "unknown"}},
    "ServiceRequest": {"status": {"draft", "active", "on-hold", "revoked", "completed", "entered-in-error", "unknown"},
                       "intent": {"proposal", "plan", "directive", "order", "original-order", "reflex-order",
                                  "filler-order", "instance-order", "option"},
                       "priority": {"routine", "urgent", "asap", "stat"}},
    "Immunization": {"status": {"completed", "entered-in-error", "not-done"}},
    "Appointment": {"status": {"proposed", "pending", "booked", "arrived", "fulfilled", "cancelled", "noshow",
                               "entered-in-error", "checked-in", "waitlist"},
                    "participant.status": {"accepted", "declined", "tentative", "needs-action"}},
    "DocumentReference": {"status": {"current", "superseded", "entered-in-error"},
                          "docStatus": {"preliminary", "final", "amended", "entered-in-error"}},
    "AllergyIntolerance": {"type": {"allergy", "intolerance"},
                           "category": {"food", "medication", "environment", "biologic"},
                           "criticality": {"low", "high", "unable-to-assess"},
                           "reaction.severity": {"mild", "moderate", "severe"}},
    "Coverage": {"status": {"active", "cancelled", "draft", "entered-in-error"}},
    "Procedure": {"status": {"preparation", "in-progress", "not-done", "on-hold", "stopped", "completed",
                             "entered-in-error", "unknown"}},
}

_mappings = Mappings(MAPPINGS)


# helpers

def render(raw: bytes | str, template: str | None = None) -> dict:
    msg = hl7.parse(raw)
    name = template or TEMPLATES[msg["MSH-9.1"]]
    return json.loads(_mappings.render(f"fhir/{name}.fhir.json.j2", msg, kind="json", timezone=ZONE))


def references(value, found=None) -> list[str]:
    found = [] if found is None else found
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "reference" and isinstance(item, str):
                found.append(item)
            else:
                references(item, found)
    elif isinstance(value, list):
        for item in value:
            references(item, found)
    return found


def values_at(resource, path: str) -> list:
    current = [resource]
    for key in path.split("."):
        nxt = []
        for item in current:
            item = item.get(key) if isinstance(item, dict) else None
            if isinstance(item, list):
                nxt.extend(item)
            elif item is not None:
                nxt.append(item)
        current = nxt
    return current


def check(output: dict) -> list[dict]:
    """The contract, FHIR validity, required codes and references of one render; the pruned resources."""
    assert isinstance(output, dict) and list(output) == ["resources"], "the output is {\"resources\": [...]}"
    assert isinstance(output["resources"], list)
    resources = []
    for resource in output["resources"]:
        assert isinstance(resource, dict)
        assert isinstance(resource.get("resourceType"), str) and resource["resourceType"], resource
        assert isinstance(resource.get("id"), str) and ID.match(resource["id"]), resource.get("resourceType")
        resources.append(prune(resource))
    present = {(r["resourceType"], r["id"]) for r in resources}
    for resource in resources:
        kind = resource["resourceType"]
        if get_fhir_model_class is not None:
            get_fhir_model_class(kind).model_validate(resource)
        elif CI:
            pytest.fail("fhir.resources is not installed: it belongs to the test dependencies")
        for path, allowed in REQUIRED_CODES.get(kind, {}).items():
            for code in values_at(resource, path):
                assert code in allowed, f"{kind}.{path} = {code!r}"
        for ref in references(resource):
            m = REFERENCE.match(ref)
            assert m, f"{kind} has a malformed reference {ref!r}"
            assert (m.group(1), m.group(2)) in present, f"{kind} refers to {ref}, which the output does not hold"
    return resources


def check_bundle(output: dict) -> None:
    """Resources of one type and id are merged into one by the bundle builder: the merged ones must be valid too."""
    bundle = build(output, {"application": "TEST", "facility": "TEST", "control_id": "1", "type": "TEST",
                            "recorded": "2024-01-01T00:00:00+00:00"})
    if get_fhir_model_class is not None:
        for entry in bundle["entry"]:
            get_fhir_model_class(entry["resource"]["resourceType"]).model_validate(entry["resource"])


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def only(resources: list[dict], kind: str, **match) -> dict:
    found = [r for r in resources if r["resourceType"] == kind
             and all(r.get(k) == v for k, v in match.items())]
    ids = {r["id"] for r in found}
    assert len(ids) == 1, f"expected one {kind} {match}, found {len(ids)}"
    return found[0]


def by_code(resources: list[dict], code: str) -> list[dict]:
    return [r for r in resources if r["resourceType"] == "Observation"
            and any(c.get("code") == code for c in r["code"].get("coding", []))]


def ref(resource: dict) -> str:
    return f"{resource['resourceType']}/{resource['id']}"


MRN_SYSTEM = "urn:oid:2.16.840.1.113883.3.999.1"
PATIENT_ID = uuid5("Patient", MRN_SYSTEM, "MRN1001")


# the corpus

def corpus_files() -> list[Path]:
    if not CORPUS.is_dir():
        return []
    return sorted(p for folder in CORPUS_FOLDERS for p in (CORPUS / folder).glob("*.hl7"))


def test_corpus_is_there():
    if not CORPUS.is_dir():
        if CI:
            pytest.fail(f"the shared corpus is missing ({CORPUS})")
        pytest.skip("the shared corpus (../shared/corpus/hl7v2) is not beside this checkout")
    assert corpus_files()


def test_fhir_resources_available():
    if get_fhir_model_class is None:
        if CI:
            pytest.fail("fhir.resources is not installed: FHIR output cannot be validated")
        pytest.skip("fhir.resources is not installed: resources are checked for the contract only")


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_corpus_message(path: Path):
    raw = path.read_bytes()
    msg = hl7.parse(raw)
    template = TEMPLATES.get(msg["MSH-9.1"])
    assert template, f"no FHIR template for {msg['MSH-9.1']}"
    first = render(raw)
    resources = check(first)
    if resources:
        check_bundle(first)
    assert render(raw) == first, "two renders of one message differ"
    if msg.segment("PID") is not None and (template != "orm" or msg["PID-3.1"] or msg["PID-5.1"]):
        assert any(r["resourceType"] == "Patient" for r in resources)


# ADT

def test_adt_a01():
    resources = check(render(fixture("adt_a01.hl7")))
    patient = only(resources, "Patient", id=PATIENT_ID)
    mrn = [i for i in patient["identifier"] if i["value"] == "MRN1001"]
    assert mrn and mrn[0]["system"] == MRN_SYSTEM and mrn[0]["type"]["coding"][0]["code"] == "MR"
    assert {"system": "http://hl7.org/fhir/sid/us-ssn", "value": "123-45-6789",
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "SS"}]}} \
        in patient["identifier"]
    assert patient["name"][0]["family"] == "Quillfeather"
    assert patient["name"][0]["given"] == ["Marigold", "June"]
    assert patient["birthDate"] == "1985-04-12"
    assert patient["gender"] == "female"
    assert patient["deceasedBoolean"] is False
    assert patient["address"][0]["city"] == "Brookhaven"
    telecom = {(t["system"], t.get("use"), t["value"]) for t in patient["telecom"]}
    assert ("email", "home", "marigold@example.test") in telecom
    assert any(s == "phone" and u == "work" for s, u, v in telecom)
    assert patient["maritalStatus"]["coding"][0]["code"] == "M"
    assert patient["contact"][0]["name"]["family"] == "Quillfeather"
    gp = only(resources, "Practitioner", id=patient["generalPractitioner"][0]["reference"].split("/")[1])
    assert gp["name"][0]["family"] == "Ashgrove"

    related = only(resources, "RelatedPerson")
    assert related["patient"]["reference"] == f"Patient/{PATIENT_ID}"
    assert related["name"][0]["given"] == ["Rowan"]
    codes = {c["code"] for c in related["relationship"][0]["coding"]}
    assert {"SPO", "SPS"} <= codes

    encounter = only(resources, "Encounter")
    assert encounter["id"] == uuid5("Encounter", "urn:oid:2.16.840.1.113883.3.999.3", "V5001")
    assert encounter["status"] == "in-progress"
    assert encounter["class"]["code"] == "IMP"
    assert encounter["identifier"][0]["value"] == "V5001"
    assert encounter["period"] == {"start": "2024-03-05T09:00:00-05:00"}
    assert encounter["subject"]["reference"] == f"Patient/{PATIENT_ID}"
    roles = {p["type"][0]["coding"][0]["code"]: p["individual"]["reference"] for p in encounter["participant"]}
    assert set(roles) == {"ATND", "REF", "ADM"}
    attending = only(resources, "Practitioner", id=roles["ATND"].split("/")[1])
    assert attending["identifier"][0] == {"value": "ATT1", "system": "urn:oid:2.16.840.1.113883.3.999.2"}
    assert encounter["location"][0]["status"] == "active"
    assert encounter["reasonCode"][0]["coding"][0]["code"] == "233604007"

    condition = only(resources, "Condition")
    assert condition["code"]["coding"][0]["code"] == "J18.9"
    assert condition["onsetDateTime"] == "2024-03-05"
    assert condition["encounter"]["reference"] == ref(encounter)
    assert encounter["diagnosis"][0]["condition"]["reference"] == ref(condition)
    assert encounter["diagnosis"][0]["use"]["coding"][0]["code"] == "AD"

    allergy = only(resources, "AllergyIntolerance")
    assert allergy["code"]["coding"][0]["code"] == "70618"
    assert allergy["category"] == ["medication"] and allergy["criticality"] == "high"
    assert allergy["reaction"][0]["severity"] == "severe"
    assert allergy["reaction"][0]["manifestation"][0]["text"] == "Hives"

    procedure = only(resources, "Procedure")
    assert procedure["code"]["coding"][0]["code"] == "0BH17EZ"
    assert procedure["performedDateTime"] == "2024-03-05T10:00:00-05:00"
    assert procedure["performer"][0]["function"]["coding"][0]["code"] == "304292004"

    coverage = only(resources, "Coverage")
    assert coverage["status"] == "active"
    assert coverage["beneficiary"]["reference"] == f"Patient/{PATIENT_ID}"
    assert coverage["subscriber"]["reference"] == f"Patient/{PATIENT_ID}"
    assert coverage["relationship"]["coding"][0]["code"] == "self"
    assert coverage["period"] == {"start": "2024-01-01", "end": "2024-12-31"}
    payor = only(resources, "Organization", id=coverage["payor"][0]["reference"].split("/")[1])
    assert payor["name"] == "Evergreen Mutual"
    assert {"group", "plan"} == {c["type"]["coding"][0]["code"] for c in coverage["class"]}

    height = only(resources, "Observation")
    assert height["valueQuantity"] == {"value": 170, "unit": "centimeter", "system": "http://unitsofmeasure.org",
                                       "code": "cm"}
    assert height["effectiveDateTime"] == "2024-03-05T09:10:00-05:00"
    assert height["encounter"]["reference"] == ref(encounter)


def test_adt_a03_finishes_the_same_encounter():
    admit = check(render(fixture("adt_a01.hl7")))
    discharge = check(render(fixture("adt_a03.hl7")))
    before, after = only(admit, "Encounter"), only(discharge, "Encounter")
    assert before["id"] == after["id"]
    assert after["status"] == "finished"
    assert after["period"] == {"start": "2024-03-05T09:00:00-05:00", "end": "2024-03-09T15:30:00-05:00"}
    assert after["location"][0]["status"] == "completed"
    assert after["hospitalization"]["dischargeDisposition"]["coding"][0]["code"] == "01"
    assert only(discharge, "Patient")["id"] == PATIENT_ID


def test_adt_a08_updates_the_patient_and_reads_the_status_from_pv1():
    resources = check(render(fixture("adt_a08.hl7")))
    patient = only(resources, "Patient", id=PATIENT_ID)
    assert patient["address"][0]["city"] == "Millbrook"
    assert patient["telecom"][0]["value"] == "+1 503 5550777"
    assert only(resources, "Encounter")["status"] == "in-progress"


def test_adt_a28_without_visit_data_has_no_encounter():
    resources = check(render(fixture("adt_a28.hl7")))
    assert [r["resourceType"] for r in resources] == ["Patient"]


@pytest.mark.parametrize("event, status", [("A01", "in-progress"), ("A02", "in-progress"), ("A03", "finished"),
                                           ("A04", "in-progress"), ("A05", "planned"), ("A08", "in-progress"),
                                           ("A11", "cancelled"), ("A13", "in-progress"), ("A31", "in-progress")])
def test_encounter_status_by_event(event: str, status: str):
    raw = fixture("adt_a01.hl7").replace(b"ADT^A01^ADT_A01", f"ADT^{event}^ADT_A01".encode())
    raw = raw.replace(b"EVN|A01|", f"EVN|{event}|".encode())
    assert only(check(render(raw)), "Encounter")["status"] == status


def test_adt_a40_merge():
    resources = check(render(fixture("adt_a40.hl7")))
    merged_id = uuid5("Patient", MRN_SYSTEM, "MRN0999")
    survivor = only(resources, "Patient", id=PATIENT_ID)
    merged = only(resources, "Patient", id=merged_id)
    assert survivor["active"] is True
    assert survivor["identifier"][0]["value"] == "MRN1001"
    assert survivor["link"] == [{"other": {"reference": f"Patient/{merged_id}"}, "type": "replaces"}]
    assert merged["active"] is False
    assert merged["identifier"][0]["value"] == "MRN0999"
    assert merged["name"][0]["family"] == "Quilfeather"
    assert merged["link"] == [{"other": {"reference": f"Patient/{PATIENT_ID}"}, "type": "replaced-by"}]
    assert render(fixture("adt_a40.hl7")) == render(fixture("adt_a40.hl7"))


# ORU

def test_oru_r01_report_and_order():
    resources = check(render(fixture("oru_r01.hl7")))
    report = only(resources, "DiagnosticReport")
    assert report["status"] == "final"
    assert report["code"]["coding"][0] == {"system": "http://loinc.org", "code": "24331-1", "display": "Lipid panel"}
    assert report["effectiveDateTime"] == "2024-03-06T07:30:00-05:00"
    assert report["issued"] == "2024-03-06T10:15:30-05:00"
    assert report["subject"]["reference"] == f"Patient/{PATIENT_ID}"
    assert {i["type"]["coding"][0]["code"]: i["value"] for i in report["identifier"]} == \
        {"PLAC": "ORD-77", "FILL": "LAB-5521"}
    observations = [r for r in resources if r["resourceType"] == "Observation"]
    assert len(observations) == 12
    assert [x["reference"] for x in report["result"]] == [ref(o) for o in observations]
    specimen = only(resources, "Specimen")
    assert report["specimen"] == [{"reference": ref(specimen)}]
    assert specimen["type"]["coding"][0]["code"] == "SER"
    assert specimen["collection"]["collectedDateTime"] == "2024-03-06T07:30:00-05:00"
    order = only(resources, "ServiceRequest")
    assert report["basedOn"] == [{"reference": ref(order)}]
    assert order["status"] == "completed" and order["intent"] == "order"
    assert order["note"] == [{"text": "Patient reported fasting for 12 hours."}]
    assert order["requester"]["display"] == "Priya Hale"


def test_oru_r01_value_types():
    resources = check(render(fixture("oru_r01.hl7")))
    mg_dl = {"unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"}

    (nm,) = by_code(resources, "2093-3")
    assert nm["valueQuantity"] == {"value": 212, **mg_dl}
    assert nm["interpretation"][0]["coding"][0]["code"] == "H"
    assert nm["referenceRange"] == [{"text": "<200", "high": {"value": 200, **mg_dl}}]
    assert nm["note"] == [{"text": "Above the desirable range."}]
    assert nm["status"] == "final"
    assert nm["effectiveDateTime"] == "2024-03-06T07:30:00-05:00"

    (sn_quantity,) = by_code(resources, "2571-8")
    assert sn_quantity["valueQuantity"] == {"value": 150, "comparator": "<", **mg_dl}
    (sn_ratio,) = by_code(resources, "5195-3")
    assert sn_ratio["valueRatio"] == {"numerator": {"value": 1}, "denominator": {"value": 128}}
    (sn_range,) = by_code(resources, "2085-9")
    assert sn_range["valueRange"] == {"low": {"value": 40, **mg_dl}, "high": {"value": 60, **mg_dl}}

    st, tx = by_code(resources, "8251-1")
    assert st["valueString"] == "Specimen slightly hemolyzed"
    assert tx["valueString"] == "Line one\nLine two"
    assert st["id"] != tx["id"], "two OBX with one code and sub-id are two Observations"

    (cwe,) = by_code(resources, "882-1")
    assert cwe["valueCodeableConcept"]["coding"][0] == {"system": "http://snomed.info/sct", "code": "278149003",
                                                        "display": "Blood group A Rh(D) positive"}
    (with_offset,) = by_code(resources, "68963-8")
    assert with_offset["valueDateTime"] == "2024-02-20T12:30:00-08:00", "a sent offset is kept"
    (without_offset,) = by_code(resources, "21112-8")
    assert without_offset["valueDateTime"] == "2024-02-20T12:30:00-05:00", "no offset: the channel's zone"
    assert without_offset["status"] == "preliminary"
    (nr,) = by_code(resources, "2951-2")
    mmol = {"unit": "mmol/L", "system": "http://unitsofmeasure.org", "code": "mmol/L"}
    assert nr["valueRange"] == {"low": {"value": 135, **mmol}, "high": {"value": 145, **mmol}}
    (tm,) = by_code(resources, "10000-1")
    assert tm["valueTime"] == "08:15:00"
    (ft,) = by_code(resources, "48767-8")
    assert ft["valueString"] == "First line\nSecond line"


def test_ids_are_deterministic_and_shared_across_messages():
    for name in sorted(p.name for p in FIXTURES.glob("*.hl7")):
        first, second = render(fixture(name)), render(fixture(name))
        assert first == second, name
        check_bundle(first)
        patients = {r["id"] for r in first["resources"] if r["resourceType"] == "Patient"}
        assert PATIENT_ID in patients, name
    encounters = {r["id"] for name in ("adt_a01.hl7", "adt_a03.hl7", "adt_a08.hl7", "oru_r01.hl7", "orm_o01.hl7",
                                       "mdm_t02.hl7")
                  for r in render(fixture(name))["resources"] if r["resourceType"] == "Encounter"}
    assert len(encounters) == 1
    # a resent result does not duplicate Observations; a corrected one updates them in place
    corrected = fixture("oru_r01.hl7").replace(b"|212|", b"|214|").replace(b"|F|||20240306073000", b"|C|||20240306073000")
    before = {r["id"] for r in render(fixture("oru_r01.hl7"))["resources"]}
    after = check(render(corrected))
    assert {r["id"] for r in after} == before
    (cholesterol,) = by_code(after, "2093-3")
    assert cholesterol["valueQuantity"]["value"] == 214 and cholesterol["status"] == "corrected"


# ORM, VXU, SIU, MDM

def test_orm_o01():
    resources = check(render(fixture("orm_o01.hl7")))
    order = only(resources, "ServiceRequest")
    assert order["status"] == "active" and order["intent"] == "order" and order["priority"] == "routine"
    assert order["code"]["coding"][0]["code"] == "24331-1"
    assert order["authoredOn"] == "2024-03-07T10:15:00-05:00"
    assert order["occurrenceDateTime"] == "2024-03-08T08:00:00-05:00"
    assert order["identifier"] == [{"value": "ORD-88", "system": "urn:id:EHR",
                                    "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                                         "code": "PLAC"}]}}]
    assert order["subject"]["reference"] == f"Patient/{PATIENT_ID}"
    assert only(resources, "Practitioner", id=order["requester"]["reference"].split("/")[1])["name"][0]["family"] == "Hale"
    assert order["note"] == [{"text": "Fasting required."}]
    assert order["reasonCode"][0]["coding"][0]["code"] == "E78.5"
    condition = only(resources, "Condition")
    assert order["reasonReference"] == [{"reference": ref(condition)}]
    fasting = only(resources, "Observation")
    assert order["supportingInfo"] == [{"reference": ref(fasting)}]
    assert fasting["valueCodeableConcept"]["coding"][0]["code"] == "Y"


def test_vxu_v04():
    resources = check(render(fixture("vxu_v04.hl7")))
    shot = only(resources, "Immunization")
    assert shot["status"] == "completed"
    assert shot["vaccineCode"]["coding"][0] == {"system": "http://hl7.org/fhir/sid/cvx", "code": "08",
                                                "display": "Hep B, adolescent or pediatric"}
    assert shot["patient"]["reference"] == f"Patient/{PATIENT_ID}"
    assert shot["occurrenceDateTime"] == "2024-03-10T10:30:00-04:00", "daylight saving time began that morning"
    assert shot["primarySource"] is True
    assert shot["lotNumber"] == "LOT-42A"
    assert shot["expirationDate"] == "2025-06-30"
    assert shot["doseQuantity"] == {"value": 0.5, "unit": "mL", "system": "http://unitsofmeasure.org", "code": "mL"}
    assert shot["route"]["coding"][0]["code"] == "C28161"
    assert shot["site"]["coding"][0]["code"] == "LD"
    assert shot["fundingSource"]["coding"][0]["code"] == "VXC50"
    assert shot["programEligibility"][0]["coding"][0]["code"] == "V02"
    functions = {p["function"]["coding"][0]["code"] for p in shot["performer"]}
    assert functions == {"AP", "OP"}
    maker = only(resources, "Organization", id=shot["manufacturer"]["reference"].split("/")[1])
    assert maker["identifier"] == [{"system": "http://hl7.org/fhir/sid/mvx", "value": "MSD"}]
    observations = [r for r in resources if r["resourceType"] == "Observation"]
    assert len(observations) == 2
    assert all(o["partOf"] == [{"reference": ref(shot)}] for o in observations)
    refused = fixture("vxu_v04.hl7").replace(b"|CP|A", b"|RE|A")
    assert only(check(render(refused)), "Immunization")["status"] == "not-done"
    deleted = fixture("vxu_v04.hl7").replace(b"|CP|A", b"|CP|D")
    assert only(check(render(deleted)), "Immunization")["status"] == "entered-in-error"


def test_siu_s12():
    resources = check(render(fixture("siu_s12.hl7")))
    visit = only(resources, "Appointment")
    assert visit["id"] == uuid5("Appointment", "FL-202", "urn:id:SCHED")
    assert visit["status"] == "booked"
    assert visit["start"] == "2024-03-15T14:00:00-04:00" and visit["end"] == "2024-03-15T14:30:00-04:00"
    assert visit["minutesDuration"] == 30
    assert {i["type"]["coding"][0]["code"]: i["value"] for i in visit["identifier"]} == {"PLAC": "PL-101", "FILL": "FL-202"}
    assert visit["serviceType"][0]["coding"][0]["code"] == "99213"
    assert visit["reasonCode"][0]["coding"][0]["code"] == "ROUTINE"
    assert visit["appointmentType"]["coding"][0]["code"] == "CHECKUP"
    assert visit["comment"] == "Bring your medication list."
    actors = {p["actor"]["reference"].split("/")[0]: p for p in visit["participant"]}
    assert set(actors) == {"Patient", "Practitioner", "Location"}
    assert actors["Patient"]["actor"]["reference"] == f"Patient/{PATIENT_ID}"
    assert actors["Practitioner"]["type"][0]["coding"][0]["code"] == "D"
    assert all(p["status"] == "accepted" for p in visit["participant"])
    cancelled = fixture("siu_s12.hl7").replace(b"SIU^S12^SIU_S12", b"SIU^S15^SIU_S12").replace(b"|Booked\r", b"|\r")
    assert only(check(render(cancelled)), "Appointment")["status"] == "cancelled"


def test_mdm_t02():
    resources = check(render(fixture("mdm_t02.hl7")))
    document = only(resources, "DocumentReference")
    assert document["id"] == uuid5("DocumentReference", "DOC-3141", "urn:oid:2.16.840.1.113883.3.999.9")
    assert document["masterIdentifier"] == {"value": "DOC-3141", "system": "urn:oid:2.16.840.1.113883.3.999.9"}
    assert document["status"] == "current" and document["docStatus"] == "final"
    assert document["type"]["coding"][0]["code"] == "DS"
    assert document["date"] == "2024-03-16T12:15:00-04:00"
    assert document["subject"]["reference"] == f"Patient/{PATIENT_ID}"
    author = only(resources, "Practitioner", id=document["author"][0]["reference"].split("/")[1])
    assert author["identifier"][0]["value"] == "ATT1"
    assert document["context"]["encounter"] == [{"reference": ref(only(resources, "Encounter"))}]
    attachment = document["content"][0]["attachment"]
    assert attachment["contentType"] == "text/plain; charset=utf-8"
    assert attachment["creation"] == "2024-03-16T12:00:00-04:00"
    assert base64.b64decode(attachment["data"]).decode("utf-8") == (
        "Admitted with community acquired pneumonia.\nTreated with antibiotics; improving.\nFollow up in\ntwo weeks.")


def test_every_template_renders_an_empty_message_of_its_type():
    """A message with no segment but MSH still renders valid JSON (no resource, or only what can be keyed)."""
    for kind, name in TEMPLATES.items():
        raw = f"MSH|^~\\&|A|B|C|D|20240101||{kind}^X01|1|P|2.5.1\r"
        assert check(render(raw)) == [], name


# regressions

def _segments(raw: bytes, *names: str) -> list[bytes]:
    return [s for s in raw.split(b"\r") if s[:3] in [n.encode() for n in names]]


def _message(*lines: bytes | str) -> bytes:
    return b"\r".join(x.encode() if isinstance(x, str) else x for x in lines) + b"\r"


def test_one_service_request_per_obr_under_one_order_number():
    """Two OBRs under one placer number are two ServiceRequests, and the ORM's meet the ORU's."""
    head = _segments(fixture("oru_r01.hl7"), "MSH", "PID", "PV1")
    result = check(render(_message(
        *head,
        "ORC|RE|ORD-90^EHR|LAB-90^LAB||CM",
        "OBR|1|ORD-90^EHR|LAB-90^LAB|2093-3^Cholesterol^LN|||20240306073000" + "|" * 17 + "CH|F",
        "OBX|1|NM|2093-3^Cholesterol^LN||212|mg/dL^mg/dL^UCUM|||||F",
        "OBR|2|ORD-90^EHR|LAB-90^LAB|2571-8^Triglyceride^LN|||20240306073000" + "|" * 17 + "CH|F",
        "OBX|1|NM|2571-8^Triglyceride^LN||150|mg/dL^mg/dL^UCUM|||||F")))
    orders = [r for r in result if r["resourceType"] == "ServiceRequest"]
    assert sorted(o["code"]["coding"][0]["code"] for o in orders) == ["2093-3", "2571-8"]
    assert all(len(o["code"]["coding"]) == 1 for o in orders)
    reports = {r["code"]["coding"][0]["code"]: r for r in result if r["resourceType"] == "DiagnosticReport"}
    by_code_ = {o["code"]["coding"][0]["code"]: o for o in orders}
    assert {c: r["basedOn"] for c, r in reports.items()} == {c: [{"reference": ref(o)}] for c, o in by_code_.items()}

    msh = _segments(fixture("orm_o01.hl7"), "MSH")[0]
    ordered = check(render(_message(
        msh, *head[1:],
        "ORC|NW|ORD-90^EHR|||||||20240306070000",
        "OBR|1|ORD-90^EHR||2093-3^Cholesterol^LN",
        "OBX|1|CWE|49541-6^Fasting status^LN||Y^Yes^HL70136||||||F",
        "ORC|NW|ORD-90^EHR|||||||20240306070000",
        "OBR|2|ORD-90^EHR||2571-8^Triglyceride^LN",
        "OBX|1|CWE|49541-6^Fasting status^LN||N^No^HL70136||||||F")))
    placed = {r["code"]["coding"][0]["code"]: r for r in ordered if r["resourceType"] == "ServiceRequest"}
    assert {c: o["id"] for c, o in placed.items()} == {c: o["id"] for c, o in by_code_.items()}
    fasting = [r for r in ordered if r["resourceType"] == "Observation"]
    assert len({o["id"] for o in fasting}) == 2, "each OBR keeps its own answers"
    assert {c: o["supportingInfo"] for c, o in placed.items()} == \
        {"2093-3": [{"reference": ref(fasting[0])}], "2571-8": [{"reference": ref(fasting[1])}]}


def test_statuses_sent_as_coded_values_read_their_code():
    """OBR-25 and OBX-11 written as CWE (code^text^system) read their first component."""
    head = _segments(fixture("oru_r01.hl7"), "MSH", "PID")
    result = check(render(_message(
        *head,
        "OBR|1|ORD-91^EHR|LAB-91^LAB|2093-3^Cholesterol^LN|||20240306073000" + "|" * 17 + "CH|F^Final results^HL70123",
        "OBX|1|NM|2093-3^Cholesterol^LN||212|mg/dL^mg/dL^UCUM|||||C^Corrected^HL70085",
        "OBX|2|NM|2571-8^Triglyceride^LN||150|mg/dL^mg/dL^UCUM|||||")))
    assert only(result, "DiagnosticReport")["status"] == "final"
    assert by_code(result, "2093-3")[0]["status"] == "corrected"
    assert by_code(result, "2571-8")[0]["status"] == "final", "no OBX-11: the report's status"


def test_mdm_maps_every_order_with_its_own_notes():
    """Each MDM COMMON_ORDER group (ORC, TQ1, OBR, NTE) is a ServiceRequest that the document relates to."""
    raw = fixture("mdm_t02.hl7")
    head = _segments(raw, "MSH", "EVN", "PID", "PV1")
    tail = _segments(raw, "TXA", "OBX")
    result = check(render(_message(
        *head,
        "ORC|SC|ECHO-1^EHR|IMG-1^RAD",
        "TQ1|1||||||20240316080000",
        "OBR|1|ECHO-1^EHR|IMG-1^RAD|93306^Echo, transthoracic^C4",
        "NTE|1||Limited views.",
        "ORC|SC|ECHO-2^EHR|IMG-2^RAD",
        "NTE|1||Ordered by cardiology.",
        "OBR|1|ECHO-2^EHR|IMG-2^RAD|93350^Stress echo^C4",
        *tail,
        "NTE|1||A note on the document, not on an order.")))
    orders = {r["code"]["coding"][0]["code"]: r for r in result if r["resourceType"] == "ServiceRequest"}
    assert set(orders) == {"93306", "93350"}
    assert orders["93306"]["note"] == [{"text": "Limited views."}]
    assert orders["93350"]["note"] == [{"text": "Ordered by cardiology."}]
    assert orders["93350"]["identifier"][0]["value"] == "ECHO-2"
    document = only(result, "DocumentReference")
    assert document["context"]["related"] == [{"reference": ref(orders["93306"])}, {"reference": ref(orders["93350"])}]


def test_adt_a60_allergy_updates():
    """IAM (A60) as AllergyIntolerance by the IG's IAM map; the same allergen as an AL1 is the same resource."""
    raw = fixture("adt_a01.hl7")
    msh = _segments(raw, "MSH")[0].replace(b"ADT^A01^ADT_A01", b"ADT^A60^ADT_A60")
    result = check(render(_message(
        msh, "EVN|A60|20240320101500", *_segments(raw, "PID"),
        "IAM|1|DA^Drug allergy^HL70127|70618^Penicillin^RXNORM|MO^Moderate^HL70128|Hives~Wheezing|U^Update^HL70206"
        "|AL-9^EHR||||20190401||20240320101000|Quillfeather^Marigold|SEL^Self^HL70063||C^Confirmed^HL70438"
        "||||||||||7980^Penicillin V^RXNORM",
        "NTE|1||Reaction in childhood.",
        "IAM|2|FA^Food allergy^HL70127|256349002^Peanut^SCT|||A^Add^HL70206||||||||Thistle^Rowan|SPO^Spouse^HL70063",
        "IAM|3|EA^Environmental allergy^HL70127|LATEX^Latex^L||||||||||||||I^Inactive^HL70438",
        "IAM|4|FA^Food allergy^HL70127|SHELL^Shellfish^L|||D^Delete^HL70206||||||||Ashgrove^Bram")))
    allergies = {r["code"]["coding"][0]["code"]: r for r in result if r["resourceType"] == "AllergyIntolerance"}
    assert set(allergies) == {"70618", "256349002", "LATEX", "SHELL"}

    penicillin = allergies["70618"]
    al1 = only(check(render(raw)), "AllergyIntolerance")
    assert penicillin["id"] == al1["id"], "an AL1 and an IAM about one allergen are one resource"
    assert [c["code"] for c in penicillin["code"]["coding"]] == ["70618", "7980"]
    assert penicillin["identifier"] == [{"value": "AL-9", "system": "urn:id:EHR"}]
    assert penicillin["category"] == ["medication"] and penicillin["criticality"] == "low"
    assert [r["manifestation"][0]["text"] for r in penicillin["reaction"]] == ["Hives", "Wheezing"]
    assert penicillin["reaction"][0]["severity"] == "moderate"
    assert penicillin["onsetDateTime"] == "2019-04-01"
    assert penicillin["recordedDate"] == "2024-03-20T10:10:00-04:00"
    assert penicillin["recorder"] == {"reference": f"Patient/{PATIENT_ID}"}
    assert penicillin["clinicalStatus"]["coding"][0]["code"] == "active"
    assert penicillin["verificationStatus"]["coding"][0]["code"] == "confirmed"
    assert penicillin["note"] == [{"text": "Reaction in childhood."}]

    peanut = allergies["256349002"]
    spouse = only(result, "RelatedPerson", id=peanut["recorder"]["reference"].split("/")[1])
    assert spouse["name"][0]["family"] == "Thistle"
    assert "SPS" in {c["code"] for c in spouse["relationship"][0]["coding"]}
    assert "verificationStatus" not in peanut and "note" not in peanut

    assert allergies["LATEX"]["clinicalStatus"]["coding"][0]["code"] == "inactive"
    deleted = allergies["SHELL"]
    assert deleted["verificationStatus"]["coding"][0]["code"] == "entered-in-error"
    assert "clinicalStatus" not in deleted, "R4 ait-2: no clinicalStatus when entered in error"
    recorder = only(result, "Practitioner", id=deleted["recorder"]["reference"].split("/")[1])
    assert recorder["name"][0]["family"] == "Ashgrove"


def test_adt_a47_retires_the_patient_under_the_old_identifier():
    """A47 (change patient identifier list): the Patient under MRG-1 is made inactive and linked, not left active."""
    raw = fixture("adt_a40.hl7").replace(b"ADT^A40^ADT_A39", b"ADT^A47^ADT_A30").replace(b"EVN|A40|", b"EVN|A47|")
    raw = raw.replace(b"MRG|MRN0999^^^NWH&2.16.840.1.113883.3.999.1&ISO^MR||||||Quilfeather^Marigold",
                      b"MRG|MRN0999^^^NWH&2.16.840.1.113883.3.999.1&ISO^MR")
    result = check(render(raw))
    old_id = uuid5("Patient", MRN_SYSTEM, "MRN0999")
    current, old = only(result, "Patient", id=PATIENT_ID), only(result, "Patient", id=old_id)
    assert current["active"] is True
    assert current["link"] == [{"other": {"reference": f"Patient/{old_id}"}, "type": "replaces"}]
    assert old["active"] is False
    assert old["identifier"][0]["value"] == "MRN0999"
    assert old["link"] == [{"other": {"reference": f"Patient/{PATIENT_ID}"}, "type": "replaced-by"}]
    # an identifier change that leaves the identifier the id comes from is a plain update
    same = raw.replace(b"MRG|MRN0999^^^NWH&2.16.840.1.113883.3.999.1&ISO^MR", b"MRG|MRN1001^^^NWH&2.16.840.1.113883.3.999.1&ISO^MR")
    (patient,) = [r for r in check(render(same)) if r["resourceType"] == "Patient"]
    assert patient["id"] == PATIENT_ID and "link" not in patient


def test_observations_before_the_first_obr():
    """ORU_R01 patient observations and an OUL specimen's OBX: Observations of the patient, in no report."""
    raw = fixture("oru_r01.hl7")
    msh, pid = _segments(raw, "MSH", "PID")
    order = (b"OBR|1|ORD-92^EHR|LAB-92^LAB|2093-3^Cholesterol^LN|||20240306073000",
             b"OBX|1|NM|2093-3^Cholesterol^LN||212|mg/dL^mg/dL^UCUM|||||F")
    result = check(render(_message(
        msh, pid,
        "OBX|1|NM|29463-7^Body weight^LN||72|kg^kg^UCUM|||||F|||20240301",
        "NTE|1||Weighed at home.",
        *_segments(raw, "PV1"),
        "ORC|RE|ORD-92^EHR",
        "OBX|1|ED|||^TEXT^PLAIN^Base64^SGVsbG8=",
        *order)))
    (weight,) = by_code(result, "29463-7")
    assert weight["subject"] == {"reference": f"Patient/{PATIENT_ID}"}
    assert weight["valueQuantity"]["value"] == 72 and weight["status"] == "final"
    assert weight["effectiveDateTime"] == "2024-03-01" and weight["note"] == [{"text": "Weighed at home."}]
    assert "encounter" not in weight and "basedOn" not in weight
    report = only(result, "DiagnosticReport")
    assert {"reference": ref(weight)} not in report["result"]
    assert len([r for r in result if r["resourceType"] == "Observation"]) == 2, \
        "the document OBX between ORC and OBR (ORDER_DOCUMENT) is not mapped"

    oul = check(render(_message(
        msh.replace(b"ORU^R01^ORU_R01", b"OUL^R22^OUL_R22"), pid,
        "SPM|1|SP-7&LAB||SER^Serum^HL70487",
        "OBX|1|CWE|33882-2^Specimen condition^LN||HEM^Hemolyzed^L||||||F",
        *order)))
    (condition,) = by_code(oul, "33882-2")
    specimen = only(oul, "Specimen")
    assert condition["focus"] == [{"reference": ref(specimen)}]
    assert condition["subject"] == {"reference": f"Patient/{PATIENT_ID}"}
    assert {"reference": ref(condition)} not in only(oul, "DiagnosticReport")["result"]


def test_composite_values_are_decoded_not_encoded_v2_text():
    """RP to the IG's R5 valueAttachment extension (url, MIME type); other composites as decoded text."""
    raw = fixture("oru_r01.hl7")
    result = check(render(_message(
        *_segments(raw, "MSH", "PID"),
        "OBR|1|ORD-93^EHR|LAB-93^LAB|18748-4^Imaging study^LN|||20240306073000",
        r"OBX|1|RP|18748-4^Imaging study^LN|1|http://pacs.example.test/view?study=7\T\series=2^PACS^IM^JPEG||||||F",
        "OBX|2|RP|18748-4^Imaging study^LN|2|http://pacs.example.test/slide 9^^IM^MRXS||||||F",
        r"OBX|3|XAD|56799-0^Address^LN||12 Elm St\T\Co^^Brookhaven^OR^97001||||||F",
        "OBX|4|VR|X-1^Range^L||10^20||||||F",
        "OBX|5|RP|18748-4^Imaging study^LN|3|http://a.test/1^^IM^PNG~http://a.test/2^^IM^GIF||||||F")))
    ext = "http://hl7.org/fhir/5.0/StructureDefinition/extension-Observation.valueAttachment"
    one, two, many = by_code(result, "18748-4")
    assert one["extension"] == [{"url": ext, "valueAttachment": {
        "contentType": "image/jpeg", "url": "http://pacs.example.test/view?study=7&series=2"}}]
    assert two["extension"] == [{"url": ext, "valueAttachment": {"url": "http://pacs.example.test/slide%209"}}]
    assert not [k for k in one if k.startswith("value")]
    assert [c["extension"][0] for c in many["component"]] == [
        {"url": ext.replace("Observation.", "Observation.component."),
         "valueAttachment": {"contentType": "image/png", "url": "http://a.test/1"}},
        {"url": ext.replace("Observation.", "Observation.component."),
         "valueAttachment": {"contentType": "image/gif", "url": "http://a.test/2"}}]
    assert by_code(result, "56799-0")[0]["valueString"] == "12 Elm St&Co Brookhaven OR 97001"
    assert by_code(result, "X-1")[0]["valueString"] == "10-20"


def test_sn_type_is_picked_by_the_separator():
    """An SN is a Quantity, Range or Ratio by SN.3 alone, as the IG maps OBX-5; what is left out stays as originalText."""
    raw = fixture("oru_r01.hl7")
    result = check(render(_message(
        *_segments(raw, "MSH", "PID"),
        "OBR|1|ORD-94^EHR|LAB-94^LAB|24331-1^Lipid panel^LN|||20240306073000",
        "OBX|1|SN|2093-3^Cholesterol^LN||>^1^.^3|mg/dL^mg/dL^UCUM|||||F",
        "OBX|2|SN|2085-9^HDL^LN||-^40^-^60|mg/dL^mg/dL^UCUM|||||F",
        'OBX|3|SN|5195-3^Titer^LN||"^1^:^128||||||F')))
    text = "http://hl7.org/fhir/StructureDefinition/originalText"
    mg_dl = {"unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"}
    assert by_code(result, "2093-3")[0]["valueQuantity"] == {
        "extension": [{"url": text, "valueString": "> 1 . 3"}], "value": 1, "comparator": ">", **mg_dl}
    assert by_code(result, "2085-9")[0]["valueRange"] == {
        "extension": [{"url": text, "valueString": "- 40 - 60"}], "low": {"value": 40, **mg_dl}, "high": {"value": 60, **mg_dl}}
    assert by_code(result, "5195-3")[0]["valueRatio"] == {
        "extension": [{"url": text, "valueString": '" 1 : 128'}], "numerator": {"value": 1}, "denominator": {"value": 128}}


def test_orm_and_oml_map_next_of_kin():
    """NK1 in ORM/OML: Patient.contact and a RelatedPerson, as ADT and ORU map them."""
    raw = fixture("orm_o01.hl7")
    nk1 = _segments(fixture("adt_a01.hl7"), "NK1")
    with_kin = _message(*_segments(raw, "MSH", "PID"), *nk1, *_segments(raw, "PV1", "ORC", "OBR", "NTE", "DG1", "OBX"))
    for message in (with_kin, with_kin.replace(b"ORM^O01^ORM_O01", b"OML^O21^OML_O21")):
        result = check(render(message))
        related = only(result, "RelatedPerson")
        assert related["patient"] == {"reference": f"Patient/{PATIENT_ID}"}
        assert related["name"][0]["given"] == ["Rowan"]
        assert only(result, "Patient")["contact"][0]["name"]["family"] == "Quillfeather"
    adt = only(check(render(fixture("adt_a01.hl7"))), "RelatedPerson")
    assert related["id"] == adt["id"], "the same next of kin as the ADT's"
