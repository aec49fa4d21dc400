"""The fhir namespace's segment maps (interface_engine/fhir/segments.py), called from templates.

What they make, message by message, is checked against the templates' expected output by
test_fhir_templates.py, test_fhir_expected.py and the corpus; here: their contract with a template.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest

from interface_engine import hl7
from interface_engine.channels.helpers import ENGINE_NAMESPACE
from interface_engine.channels.templating import Mappings, TemplateError

MAPPINGS = Path(__file__).resolve().parents[2] / "mappings"
LINES = [
    "MSH|^~\\&|ADT_APP|GEN|ENGINE|HUB|20260101120000||ADT^A01^ADT_A01|MSG1|P|2.5.1",
    "PID|1||MRN1^^^GEN&2.999.1&ISO^MR||DOE^JANE||19800101|F",
    "PD1|||CLINIC^^^^^GEN&2.999.1&ISO^^^^C1|11^SMITH^ANN",
    "PV1|1|I|W1^101^A^GEN||||22^WELBY^MARCUS~33^KILDARE^JAMES||||||||||||V1^^^GEN&2.999.1&ISO^VN",
    "PV1|1|O",
    "DG1|1||I10^Hypertension^I10||20260101|A|||||||||1|44^HOUSE^GREG",
    "AL1|1|DA|PCN^Penicillin^L|SV|HIVES~RASH",
    "OBX|1|NM|GLU^Glucose^L||5.4~6.1|mmol/L^^UCUM|3.9-5.5|H|||F|||||55^LAB^LEO|||||||LABCO^^^^^GEN&2.999.1&ISO^^^^L1",
    "OBX|2|FT|TXT^Text^L||line one\\.br\\two~three||||||X",
    "OBX|3|ST|EMPTY^Nothing^L||||||||N",
    "ORC|NW|P1^PL^2.999.5^ISO|F1^FL||CM||^^^^^S||20260101|||77^ORD^ANN",
    "OBR|1|||GLU^Glucose^L|||20260102||||G" + "|" * 20 + "R1^Reason^L~R2^Other^L",  # OBR-31
    "SPM|1|^SF1&FLAB&2.999.6&ISO||BLD^Blood^HL70487" + "|" * 10 + "desc",  # SPM-14
    "SPM|2",
    "RXA|0|1|20260101||08^HepB^CVX|999|||01^Historical^NIP001|11^NURSE^NOR|||||LOT1||MSD^Merck^MVX|||CP|A",
    "RXR|C28161^IM^NCIT|LA^Left arm^HL70163",
    "PR1|1||P1^Appendectomy^I10P|Appendectomy|20260101120000||||||22^CUT^BOB",
    "IN1|1|GOLD^Gold Plan^L|CO1^^^PAY&2.999.9&ISO|Payer Inc||||||||||||SMITH^AL|SPO^Spouse^HL70063",
]
MSG = hl7.parse(("\r".join(LINES) + "\r").encode())
_mappings = Mappings(MAPPINGS)


def run(expression: str):
    text = _mappings.render_string("{% set pid = msg.segment('PID') %}{% set pv1 = msg.segments('PV1')[0] %}"
                                   "{{ (" + expression + ") | tojson }}", MSG, timezone="UTC")
    return json.loads(text)


def fhir_id(*parts) -> str:
    return str(uuid.uuid5(ENGINE_NAMESPACE, "|".join("" if p is None else str(p) for p in parts)))


def test_patient_is_last_after_what_it_refers_to_with_the_id_of_its_business_key():
    made = run("fhir.patient(pid, msg.segment('PD1'))")
    assert [r["resourceType"] for r in made["resources"]] == ["Practitioner", "Organization", "Patient"]
    patient = made["resources"][-1]
    mrn = run("fhir.identifier(pid, 'PID-3')")
    assert patient["id"] == made["id"] == run("fhir.patient_id(pid)") == fhir_id("Patient", mrn["system"], "MRN1")
    assert made["ref"] == {"reference": "Patient/" + patient["id"]}
    assert [g["reference"].split("/")[0] for g in patient["generalPractitioner"]] == ["Practitioner", "Organization"]


def test_a_template_can_adjust_a_resource_before_adding_it():
    patient = run("dict(fhir.patient(pid).resources[-1], active=false)")
    assert patient["active"] is False and patient["resourceType"] == "Patient"


def test_encounter_with_its_practitioners_and_location():
    made = run("fhir.encounter(pv1, none, 'p1', 'in-progress')")
    kinds = [r["resourceType"] for r in made["resources"]]
    assert kinds == ["Practitioner", "Practitioner", "Location", "Encounter"]
    encounter = made["resources"][-1]
    assert encounter["id"] == made["id"] == run("fhir.encounter_id(pv1, 'p1')")
    assert [p["individual"]["display"] for p in encounter["participant"]] == ["MARCUS WELBY", "JAMES KILDARE"]
    assert encounter["status"] == "in-progress" and encounter["subject"] == {"reference": "Patient/p1"}


def test_no_encounter_without_visit_number_or_admit_time():
    assert run("fhir.encounter(msg.segments('PV1')[1], none, 'p1')") == {"resources": [], "id": None, "ref": None}
    assert run("fhir.encounter_id(msg.segments('PV1')[1], 'p1')") is None


def test_condition_gives_its_encounter_diagnosis():
    made = run("fhir.condition(msg.segment('DG1'), 'p1', 'e1')")
    condition = made["resources"][-1]
    assert made["resources"][0]["resourceType"] == "Practitioner" and condition["asserter"]["display"] == "GREG HOUSE"
    assert condition["encounter"] == {"reference": "Encounter/e1"}
    assert made["diagnosis"]["condition"] == made["ref"] and made["diagnosis"]["rank"] == 1


def test_allergy_reactions_per_repetition():
    allergy = run("fhir.allergy(msg.segment('AL1'), 'p1')")["resources"][-1]
    assert [r["manifestation"][0]["text"] for r in allergy["reaction"]] == ["HIVES", "RASH"]
    assert allergy["id"] == fhir_id("AllergyIntolerance", "p1", "PCN", "L")


def test_observation_after_its_performers_with_a_component_per_repetition():
    made = run("fhir.observation(msg.segments('OBX')[0], 'o1', {'subject': {'reference': 'Patient/p1'}, 'status': 'final'})")
    assert [r["resourceType"] for r in made["resources"]] == ["Practitioner", "Organization", "Observation"]
    observation = made["resources"][-1]
    assert made["ref"] == {"reference": "Observation/o1"} and observation["id"] == "o1"
    assert [c["valueQuantity"]["value"] for c in observation["component"]] == [5.4, 6.1]
    assert [p["reference"].split("/")[0] for p in observation["performer"]] == ["Practitioner", "Organization"]
    assert observation["interpretation"][0]["coding"][0]["code"] == "H"
    assert observation["referenceRange"][0]["low"]["value"] == 3.9
    assert observation["status"] == "final" and observation["subject"] == {"reference": "Patient/p1"}


def test_observation_text_repetitions_joined_and_no_value_not_asked():
    text = run("fhir.observation(msg.segments('OBX')[1], 'o2').resources[-1]")
    assert text["valueString"] == "line one\ntwo\nthree" and text["status"] == "cancelled"
    empty = run("fhir.observation(msg.segments('OBX')[2], 'o3').resources[-1]")
    assert empty["dataAbsentReason"]["coding"][0]["code"] == "not-asked" and "valueString" not in empty


def test_service_request_keyed_by_order_number_and_code_after_its_requester():
    made = run("fhir.service_request(msg.segment('ORC'), msg.segment('OBR'), 'p1', {'note': [{'text': 'n'}]})")
    assert [r["resourceType"] for r in made["resources"]] == ["Practitioner", "ServiceRequest"]
    request = made["resources"][-1]
    numbers = made["order_numbers"]
    assert numbers["key"] == "P1|urn:oid:2.999.5" and numbers["filler"]["value"] == "F1"
    assert request["id"] == made["id"] == fhir_id("ServiceRequest", numbers["key"], "GLU", "L")
    assert made["ref"] == {"reference": "ServiceRequest/" + request["id"]}
    assert (request["status"], request["intent"], request["priority"]) == ("completed", "reflex-order", "stat")
    assert request["authoredOn"] == "2026-01-01" and request["note"] == [{"text": "n"}]
    assert [r["coding"][0]["code"] for r in request["reasonCode"]] == ["R1", "R2"]


def test_service_request_needs_an_order_number_or_a_code():
    assert run("fhir.service_request(none, none, 'p1')")["resources"] == []


def test_specimen_by_its_filler_number_else_the_patient_and_set_id():
    made = run("fhir.specimen(msg.segments('SPM')[0], 'p1', 'k', {'reference': 'Patient/p1'})")
    specimen = made["resources"][0]
    assert specimen["id"] == made["id"] == fhir_id("Specimen", "SF1", "urn:oid:2.999.6")
    assert specimen["subject"] == {"reference": "Patient/p1"} and specimen["note"] == [{"text": "desc"}]
    assert run("fhir.specimen(msg.segments('SPM')[1], 'p1', 'k')")["id"] == fhir_id("Specimen", "p1", "k", "2")


def test_immunization_after_its_performers_and_manufacturer():
    made = run("fhir.immunization(msg.segment('RXA'), msg.segment('RXR'), msg.segment('ORC'), 'p1', "
               "{'patient': {'reference': 'Patient/p1'}})")
    assert [r["resourceType"] for r in made["resources"]] == ["Practitioner", "Practitioner", "Organization",
                                                             "Immunization"]
    immunization = made["resources"][-1]
    assert immunization["id"] == made["id"] == fhir_id("Immunization", "p1", "08", "CVX", "20260101")
    assert made["ref"] == {"reference": "Immunization/" + made["id"]}
    assert [p["function"]["coding"][0]["code"] for p in immunization["performer"]] == ["AP", "OP"]
    assert immunization["primarySource"] is False and immunization["reportOrigin"]["coding"][0]["code"] == "01"
    assert immunization["doseQuantity"] is None and immunization["lotNumber"] == "LOT1"
    assert immunization["manufacturer"]["display"] == "Merck" and immunization["status"] == "completed"
    assert immunization["patient"] == {"reference": "Patient/p1"}
    assert immunization["identifier"][0]["value"] == "P1"


def test_procedure_after_its_surgeon():
    made = run("fhir.procedure(msg.segment('PR1'), 'p1', {'subject': {'reference': 'Patient/p1'}})")
    assert [r["resourceType"] for r in made["resources"]] == ["Practitioner", "Procedure"]
    procedure = made["resources"][-1]
    assert procedure["id"] == fhir_id("Procedure", "p1", "P1", "I10P", "20260101120000")
    assert made["ref"] == {"reference": "Procedure/" + procedure["id"]}
    assert procedure["performer"][0]["function"]["coding"][0]["display"] == "Surgeon"
    assert procedure["status"] == "unknown" and procedure["subject"] == {"reference": "Patient/p1"}


def test_coverage_after_its_payor_and_subscriber():
    made = run("fhir.coverage(msg.segment('IN1'), 'p1', {'reference': 'Patient/p1'})")
    assert [r["resourceType"] for r in made["resources"]] == ["Organization", "RelatedPerson", "Coverage"]
    coverage = made["resources"][-1]
    assert coverage["id"] == fhir_id("Coverage", "p1", "GOLD", "L", "urn:oid:2.999.9", "CO1", "")
    assert made["ref"] == {"reference": "Coverage/" + coverage["id"]}
    assert coverage["relationship"]["coding"][0]["code"] == "spouse"
    assert coverage["subscriber"] == {"reference": "RelatedPerson/" + made["resources"][1]["id"]}
    assert coverage["beneficiary"] == {"reference": "Patient/p1"} and coverage["payor"][0]["display"] == "Payer Inc"


@pytest.mark.parametrize(("args", "system"), [
    ("'', '2.999.7', 'ISO'", "urn:oid:2.999.7"),
    ("'', 'urn:oid:2.999.7', 'iso'", "urn:oid:2.999.7"),
    ("'', '2.999..7', 'ISO'", None),
    ("'', 'F81D4FAE-7DEC-11D0-A765-00A0C91E6BF6', 'UUID'", "urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6"),
    ("'', 'https://example.org/ids', 'URI'", "https://example.org/ids"),
    ("'MY LAB', '', ''", "urn:id:MY%20LAB"),
    ("'\"\"', '', ''", None),
])
def test_hd_system_follows_the_cx4_rule(args, system):
    assert run(f"fhir.hd_system({args})") == system


@pytest.mark.parametrize(("expression", "reason"), [
    ("fhir.patient(msg)", "fhir.patient reads a segment"),
    ("fhir.practitioner(pv1, 7)", "fhir.practitioner: the field is a path"),
    ("fhir.allergy(pid, 'p1')", "fhir.allergy reads an AL1 or IAM segment"),
    ("fhir.observation(pid, 'o1')", "fhir.observation reads an OBX segment"),
    ("fhir.observation(msg.segment('OBX'), 'o1', 'subject')", "fhir.observation: the context is a dict"),
    ("fhir.service_request(msg.segment('ORC'), none, 'p1', 'x')", "fhir.service_request: extra is a dict"),
    ("fhir.specimen(pid)", "fhir.specimen reads an SPM segment"),
    ("fhir.immunization(pid)", "fhir.immunization reads an RXA segment"),
    ("fhir.procedure(pid)", "fhir.procedure reads a PR1 segment"),
    ("fhir.coverage(pid)", "fhir.coverage reads an IN1 segment"),
    # another segment: the first read fails, although that field (PID-2) is empty
    ("fhir.next_of_kin(pid, 'p1')", "fhir.names: a path read from a segment names no other segment"),
])
def test_a_wrong_argument_is_a_template_error_naming_the_helper(expression, reason):
    with pytest.raises(TemplateError, match=reason):
        run(expression)


def test_a_missing_table_fails_a_segment_map_even_where_its_fields_are_empty(tmp_path):
    """The maps skip the helpers for empty fields only once the helpers' tables are all found: without
    one, every NK1 fails, as before, not only those that have a name."""
    shutil.copytree(MAPPINGS / "tables", tmp_path / "tables")
    (tmp_path / "tables" / "v2-0200-name-use.csv").unlink()
    msg = hl7.parse(("\r".join([LINES[0], "NK1|1||SPO^Spouse^HL70063"]) + "\r").encode())
    with pytest.raises(TemplateError, match="fhir.names: .*v2-0200-name-use"):
        Mappings(tmp_path).render_string("{{ fhir.next_of_kin(msg.segment('NK1'), 'p1') | tojson }}", msg)


def test_the_same_xcn_twice_in_a_segment_is_one_practitioner():
    """PV1-7 and PV1-17 naming the same doctor give one Practitioner (made once); an escaped '&' and a
    sub-component separator are not the same XCN."""
    fields = {2: "I", 7: "22^WELBY^MARCUS", 8: "A\\T\\B^X", 9: "A&B^X", 17: "22^WELBY^MARCUS", 19: "V1^^^GEN^VN"}
    pv1 = "|".join(["PV1"] + [fields.get(n, "") for n in range(1, 20)])
    msg = hl7.parse(("\r".join([LINES[0], pv1]) + "\r").encode())
    text = _mappings.render_string("{{ fhir.encounter(msg.segment('PV1'), none, 'p1') | tojson }}", msg, timezone="UTC")
    made = json.loads(text)
    doctors = [r for r in made["resources"] if r["resourceType"] == "Practitioner"]
    assert [d["identifier"][0]["value"] for d in doctors] == ["22", "A&B", "A", "22"]
    assert doctors[0] == doctors[3] and doctors[1]["id"] != doctors[2]["id"]
    assert _mappings.render_string("{% set r = fhir.encounter(msg.segment('PV1'), none, 'p1').resources %}"
                                   "{{ r[0] is sameas r[3] }} {{ r[1] is sameas r[2] }}", msg) == "True False"
    assert [p["type"][0]["coding"][0]["code"] for p in made["resources"][-1]["participant"]] == \
        ["ATND", "REF", "CON", "ADM"]
