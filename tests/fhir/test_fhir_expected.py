"""Our HL7 v2 -> FHIR R4 output next to what other converters ship for the same messages.

The shared corpus holds, beside the HL7 v2 messages, the FHIR output that other converter
projects ship as test expectations (../shared/corpus/fhir-expected/, PAIRS.tsv names each pair
and its producer). They are one converter's opinion each, not ground truth. For every pair this
test renders the message as a channel would (mappings/fhir/v2-to-fhir.fhir.json.j2, then the
transaction Bundle of pipeline.fhir_bundle) and compares, ignoring ids, order and extensions:

- the set of resource types;
- key values per type (FACETS below): Patient identifier values, names, birthDate, gender;
  Encounter class, status, period start; Observation codes, values, units, effective times;
  DiagnosticReport code and status; Immunization vaccineCode and occurrence; ServiceRequest
  code; Appointment start and status; DocumentReference type and status; Condition and
  AllergyIntolerance codes.

Normalised before comparing (differences that say nothing about the mapping):
- code systems: case, a trailing slash, and the OID form of a system that has a URI
  (urn:oid:2.16.840.1.113883.6.1 is http://loinc.org; ReportStream's "UCUM" is UCUM's URI); a
  local coding system or one a converter does not know (ours: no system; Microsoft:
  http://example.com/v2-to-fhir-converter/CodeSystem/<name>; ReportStream: a link to the
  "99zzz or L" row of table 0396) reads as "local";
- times: a dateTime with a time of day is compared as the instant, in UTC. Precision is kept:
  a date against a dateTime is a difference. The Microsoft expectations write times in the
  zone of the machine that made them (+05:30), which keeps the instant when the v2 time has an
  offset. A v2 time without offset gets the channel's zone here (America/New_York), while
  ReportStream and the IG samples read it as UTC: the same text then names another instant
  without either mapping being wrong ("time-zone" in REASONS);
- numbers compare as decimals (1.50 == 1.5), strings with runs of white space collapsed.

Every difference must be explained by a rule in ALLOWED (a deliberate difference, its reason
in REASONS, each reason also written in docs/fhir-mapping.md) or BUGS (our mapping is wrong;
the pair is an xfail(strict=True) until the template is fixed).
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from interface_engine import hl7
from interface_engine.channels.pipeline import fhir_bundle
from interface_engine.channels.templating import Mappings
from interface_engine.fhir.bundle import BundleError

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "corpus"
EXPECTED = SHARED / "fhir-expected"
PAIRS_FILE = EXPECTED / "PAIRS.tsv"
DOC = REPO / "docs" / "fhir-mapping.md"
ZONE = "America/New_York"
TEMPLATE = "fhir/v2-to-fhir.fhir.json.j2"
CI = os.environ.get("CI", "").lower() == "true"

_mappings = Mappings(REPO / "mappings")


# -- the pairs -----------------------------------------------------------------------------------

def pairs() -> list[tuple[str, str, str]]:
    """(hl7v2 file, expected FHIR file, producer), paths relative to the shared corpus."""
    if not PAIRS_FILE.is_file():
        return []
    rows = []
    for line in PAIRS_FILE.read_text(encoding="utf-8").splitlines()[1:]:
        if line.strip():
            source, expected, producer = line.split("\t")[:3]
            rows.append((source, expected, producer.strip()))
    return rows


def pair_name(expected: str) -> str:
    """The expected file's stem: ms__ADT-A01-01, rs-mi__oru_r01-full..."""
    return Path(expected).stem


# -- the two outputs -----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def comparison(source: str, expected: str) -> Comparison:
    """Both outputs of a pair compared (cached: several tests read it)."""
    return compare(ours(source), theirs(expected))


def ours(source: str) -> list[dict]:
    """The resources of the Bundle our channel would send for the message (none: the type is not mapped)."""
    msg = hl7.parse((SHARED / source).read_bytes())
    rendered = _mappings.render_value(TEMPLATE, msg, timezone=ZONE)
    try:
        bundle = json.loads(fhir_bundle(rendered, msg, ZONE))
    except BundleError as e:
        if "no resource" in str(e):
            return []
        raise
    return [e["resource"] for e in bundle["entry"]]


def theirs(expected: str) -> list[dict]:
    """The resources of the other converter's Bundle (JSON, or FHIR XML for one IG sample)."""
    path = SHARED / expected
    text = path.read_text(encoding="utf-8-sig")
    bundle = _from_xml(ET.fromstring(text)) if text.lstrip().startswith("<") else json.loads(text)
    return [r for e in _list(bundle.get("entry")) if isinstance(e, dict) for r in _list(e.get("resource"))
            if isinstance(r, dict) and r.get("resourceType")]


_FHIR_NS = "{http://hl7.org/fhir}"


def _from_xml(element: ET.Element) -> dict:
    """FHIR XML to JSON-like dicts, loosely: every child is a list, a value attribute a string.

    Enough for the key values compared here (they are read through lists, see values()).
    """
    out: dict = {}
    for child in element:
        tag = child.tag.replace(_FHIR_NS, "")
        if not tag or tag.startswith("{"):
            continue  # narrative xhtml
        if tag == "resource":
            inner = next(iter(child), None)
            value = dict(_from_xml(inner), resourceType=inner.tag.replace(_FHIR_NS, "")) if inner is not None else None
        elif "value" in child.attrib and not len(child):
            value = child.attrib["value"]
        else:
            value = _from_xml(child)
            if "url" in child.attrib:
                value["url"] = child.attrib["url"]
        out.setdefault(tag, []).append(value)
    return out


def _list(value) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def values(item, path: str) -> list:
    """Everything at a dotted path, lists read through at every step."""
    current = _list(item)
    for key in path.split("."):
        nxt = []
        for node in current:
            if isinstance(node, dict):
                nxt.extend(_list(node.get(key)))
        current = nxt
    return current


def first(item, path: str):
    found = values(item, path)
    return found[0] if found else None


# -- normalisation -------------------------------------------------------------------------------

#: Systems written two ways: the OID form and the URI FHIR prefers.
SYSTEM_ALIASES = {
    "urn:oid:2.16.840.1.113883.6.1": "http://loinc.org",
    "urn:oid:2.16.840.1.113883.6.96": "http://snomed.info/sct",
    "urn:oid:2.16.840.1.113883.6.8": "http://unitsofmeasure.org",
    "ucum": "http://unitsofmeasure.org",  # ReportStream writes the v2 coding system name as the system
    "urn:oid:2.16.840.1.113883.12.292": "http://hl7.org/fhir/sid/cvx",
    "urn:oid:2.16.840.1.113883.6.90": "http://hl7.org/fhir/sid/icd-10-cm",
    "urn:oid:2.16.840.1.113883.6.3": "http://hl7.org/fhir/sid/icd-10",
    "urn:oid:2.16.840.1.113883.6.103": "http://hl7.org/fhir/sid/icd-9-cm",
    "urn:oid:2.16.840.1.113883.6.88": "http://www.nlm.nih.gov/research/umls/rxnorm",
}
#: Stand-ins for a local coding system (L, 99zzz) or one the converter does not know: Microsoft's
#: placeholder namespace, and ReportStream's link to the "99zzz or L" row of table 0396.
MS_LOCAL = "http://example.com/v2-to-fhir-converter/"
RS_LOCAL = "https://terminology.hl7.org/codesystem-v2-0396.html#v2-0396-99zzzorl"
LOCAL = "local"


def norm_system(system) -> str:
    if not isinstance(system, str) or not system.strip() or system.startswith(MS_LOCAL) \
            or system.strip().lower() == RS_LOCAL:
        return LOCAL
    s = system.strip().rstrip("/").lower()
    return SYSTEM_ALIASES.get(s, s)


def codings(concept) -> list[str]:
    """A CodeableConcept (or Coding) as 'system|code' items; its text when it has no coded coding."""
    out = []
    for c in values(concept, "coding") + [c for c in _list(concept) if isinstance(c, dict) and "code" in c]:
        code = first(c, "code")
        if isinstance(code, str) and code.strip():
            out.append(f"{norm_system(first(c, 'system'))}|{code.strip()}")
    if not out:  # nothing coded: the text, or the display of a coding without code
        text = first(concept, "text") or first(concept, "coding.display")
        if isinstance(text, str) and text.strip():
            out.append(f"text:{squash(text)}")
    return sorted(set(out))


def squash(text: str) -> str:
    return re.sub(r"\s+", " ", str(text)).strip()


def number(value) -> str:
    try:
        d = Decimal(str(value).strip())
    except InvalidOperation:
        return str(value)
    return format(d.normalize(), "f")


_DATE = re.compile(r"^\d{4}(-\d{2}(-\d{2})?)?$")
_DATETIME = re.compile(r"^(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)(Z|[+-]\d{2}:\d{2})?$")


def norm_time(value) -> str:
    """A date as sent (precision kept); a dateTime with time as its instant in UTC; anything else marked."""
    if not isinstance(value, str):
        return f"?{value!r}"
    text = value.strip()
    if _DATE.match(text):
        return text
    m = _DATETIME.match(text)
    if not m:
        return f"?{text}"
    day, clock, offset = m.groups()
    if not offset:
        return f"{day}T{clock} (no offset)"
    if len(clock) == 5:
        clock += ":00"
    parsed = datetime.fromisoformat(f"{day}T{clock}{'+00:00' if offset == 'Z' else offset}")
    utc = parsed.astimezone(timezone.utc)
    frac = f".{utc.microsecond:06d}".rstrip("0").rstrip(".") if utc.microsecond else ""
    return utc.strftime("%Y-%m-%dT%H:%M:%S") + frac + "Z"


def quantity_unit(q: dict) -> str:
    code = first(q, "code")
    if norm_system(first(q, "system")) == "http://unitsofmeasure.org" and code:
        return str(code)
    unit = first(q, "unit") or code
    return f"(not UCUM) {unit}" if unit else "(none)"


def value_of(holder: dict) -> list[str]:
    """An Observation's (or component's) value[x], normalised; [] when it has none."""
    if "valueQuantity" in holder:
        q = first(holder, "valueQuantity") or {}
        return [f"{first(q, 'comparator') or ''}{number(first(q, 'value'))}"]
    if "valueString" in holder:
        return [f"'{squash(first(holder, 'valueString'))}'"]
    if "valueCodeableConcept" in holder:
        return [" + ".join(codings(first(holder, "valueCodeableConcept"))) or "(uncoded concept)"]
    if "valueDateTime" in holder:
        return [norm_time(first(holder, "valueDateTime"))]
    if "valueTime" in holder:
        return [f"time {first(holder, 'valueTime')}"]
    if "valueRange" in holder:
        r = first(holder, "valueRange") or {}
        return [f"{number(first(r, 'low.value'))}..{number(first(r, 'high.value'))}"]
    if "valueRatio" in holder:
        r = first(holder, "valueRatio") or {}
        return [f"{number(first(r, 'numerator.value'))}:{number(first(r, 'denominator.value'))}"]
    if "valuePeriod" in holder:
        p = first(holder, "valuePeriod") or {}
        return [f"{norm_time(first(p, 'start'))}..{norm_time(first(p, 'end'))}"]
    for kind in ("valueBoolean", "valueInteger"):
        if kind in holder:
            return [str(first(holder, kind)).lower()]
    if "valueAttachment" in holder:
        return [f"attachment {first(holder, 'valueAttachment.contentType')}"]
    for ext in values(holder, "extension"):
        if isinstance(ext, dict) and str(first(ext, "url") or "").endswith("Observation.valueAttachment"):
            return [f"attachment {first(ext, 'valueAttachment.contentType')}"]
    return []


NO_CODE = "(no code)"


def obs_key(resource: dict) -> str:
    """An Observation (or component) by its code: the first coding's code, else its text."""
    concept = first(resource, "code") or {}
    for c in values(concept, "coding"):
        if first(c, "code"):
            return str(first(c, "code")).strip()
    text = first(concept, "text")
    return f"text:{squash(text)}" if isinstance(text, str) and text.strip() else NO_CODE


# -- key values ----------------------------------------------------------------------------------

def _patient(r):
    return {
        "identifier": [str(v).strip() for v in values(r, "identifier.value")],
        "name": [f"{squash(first(n, 'family') or '')}|{squash(' '.join(str(g) for g in values(n, 'given')))}"
                 for n in values(r, "name")],
        "birthDate": [str(v) for v in values(r, "birthDate")],
        "gender": [str(v) for v in values(r, "gender")],
    }


def _encounter(r):
    return {"class": concept(first(r, "class")), "status": values(r, "status"),
            "period.start": [norm_time(v) for v in values(r, "period.start")]}


def _observation(r):
    key = obs_key(r)
    out = {"code": concept(first(r, "code")), "value": [], "unit": [], "effective": []}
    for holder in [r] + values(r, "component"):
        k = key if holder is r else f"{key}/{obs_key(holder)}"
        out["value"] += [f"{k} = {v}" for v in value_of(holder)]
        for q in values(holder, "valueQuantity") + values(holder, "valueRange.low") + values(holder, "valueRange.high"):
            if isinstance(q, dict) and first(q, "value") is not None:
                out["unit"].append(f"{k} = {quantity_unit(q)}")
    for field in ("effectiveDateTime", "effectiveInstant", "effectivePeriod.start"):
        out["effective"] += [f"{key} = {norm_time(v)}" for v in values(r, field)]
    return out


def concept(value) -> list[str]:
    """A CodeableConcept as one item, its codings joined: two codes merged into one resource show."""
    items = codings(value)
    return [" + ".join(items)] if items else []


def _codes(element):
    return lambda r: {"code": concept(first(r, element))}


FACETS = {
    "Patient": _patient,
    "Encounter": _encounter,
    "Observation": _observation,
    "DiagnosticReport": lambda r: {"code": concept(first(r, "code")), "status": values(r, "status")},
    "Immunization": lambda r: {"vaccineCode": concept(first(r, "vaccineCode")),
                               "occurrence": [norm_time(v) for v in values(r, "occurrenceDateTime")]
                               + [f"'{squash(v)}'" for v in values(r, "occurrenceString")]},
    "ServiceRequest": _codes("code"),
    "Appointment": lambda r: {"start": [norm_time(v) for v in values(r, "start")], "status": values(r, "status")},
    "DocumentReference": lambda r: {"type": concept(first(r, "type")), "status": values(r, "status")},
    "Condition": _codes("code"),
    "AllergyIntolerance": _codes("code"),
}


def key_values(resources: list[dict]) -> dict[tuple[str, str], set[str]]:
    """(type, facet) -> the set of normalised items over every resource of that type; and the types."""
    out: dict[tuple[str, str], set[str]] = {("*", "resourceType"): {r["resourceType"] for r in resources}}
    for r in resources:
        extract = FACETS.get(r["resourceType"])
        if extract:
            for facet, items in extract(r).items():
                out.setdefault((r["resourceType"], facet), set()).update(items)
    return out


@dataclass(frozen=True)
class Difference:
    type: str       # resource type ('*' for the set of types)
    facet: str      # 'resourceType', 'code', 'value'...
    side: str       # 'ours' (only we have the item) or 'theirs'
    item: str

    def __str__(self):
        where = "resource types" if self.type == "*" else f"{self.type}.{self.facet}"
        return f"{where}: only {self.side}: {self.item}"


@dataclass
class Comparison:
    agreed: int
    differences: list[Difference]


def compare(our: list[dict], their: list[dict]) -> Comparison:
    a, b = key_values(our), key_values(their)
    agreed, diffs = 0, []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key, set()), b.get(key, set())
        if key[0] != "*" and (key[0] not in a[("*", "resourceType")] or key[0] not in b[("*", "resourceType")]):
            continue  # a type only one side has: its values are not compared, the type difference says it
        agreed += len(x & y)
        only_x, only_y = x - y, y - x
        if key[0] == "Observation" and key[1] in KEYED:
            # An Observation one converter left without any code is matched on what it holds
            # (several such Observations may hold the same: one item then stands for them all).
            for side, other in ((only_x, only_y), (only_y, only_x)):
                for item in sorted(i for i in side if i.startswith(NO_CODE + " = ")):
                    held = item.split(" = ", 1)[1]
                    twins = {o for o in other if o.split(" = ", 1)[1] == held}
                    if twins:
                        side.discard(item)
                        other.difference_update(twins)
                        agreed += len(twins)
        diffs += [Difference(key[0], key[1], "ours", i) for i in sorted(only_x)]
        diffs += [Difference(key[0], key[1], "theirs", i) for i in sorted(only_y)]
    return Comparison(agreed, diffs)


#: Observation facets whose items are "<Observation code> = <what it holds>".
KEYED = ("value", "unit", "effective")


# -- explained differences -----------------------------------------------------------------------

#: One line per deliberate difference; each is written, word for word, in docs/fhir-mapping.md.
REASONS = {
    # what we do not make at all
    "message": "No MessageHeader: the output is a transaction Bundle of PUTs, not a FHIR message; "
               "the source message is recorded in the Bundle's one Provenance.",
    "provenance": "Every Bundle carries one Provenance for its source message, added by the bundle builder, "
                  "whether or not the other converter made one.",
    "account": "No Account: the IG's PID[Account] (PID-18) and the billing account of PV1 are not mapped.",
    "device": "No Device: SFT (the sending software), OBX-18 and AIG equipment are not mapped.",
    "episode": "No EpisodeOfCare: DG1[EpisodeOfCare] and PV1-54 are not mapped.",
    "practitioner-role": "Every XCN becomes a Practitioner, its role told by the element that refers to it; "
                         "no PractitionerRole is made.",
    "organization": "Assigning authorities and facilities (CX.4, HD namespaces, XCN.9, MSH-4, MSH-6) become "
                    "Identifier.system, not Organizations; an Organization is made only for the XON-like fields "
                    "the templates map (PD1-3, OBX-23, IN1-3/IN1-4, RXA-17).",
    "location": "A Location is made only for the PL fields of a PV1 that gives an Encounter and for SIU AIL-3; "
                "other converters also make them from facility fields (MSH, EVN-7, ORC, OBX, PRT).",
    "other-persons": "EVN-5 (operator) and IN1-30 (verified by) give no Practitioner; the IG puts EVN-5 in a "
                     "Provenance, which is not made here.",
    "not-mapped-type": "Message types without a template (DFT, BAR, RDE, RDS, REF) render no resource: "
                       "v2-to-fhir.fhir.json.j2 routes ADT, ORU/OUL, ORM/OML, VXU, SIU and MDM, and any other "
                       "delivery fails visibly.",
    "no-pid": "A result message without PID renders no resource (every result needs its subject), so its "
              "delivery fails visibly.",
    "financial-pharmacy": "FT1, GT1, IN2, BLG (ChargeItem, Account, Procedure of a charge), RXO/RXE/RXD "
                          "(Medication, MedicationRequest, MedicationDispense), ODS (NutritionOrder) and RQD "
                          "(SupplyRequest) are not mapped; an ORC of such an order gives a ServiceRequest "
                          "without code.",
    "cti-con-inv": "CTI (ResearchStudy), CON (Consent) and INV (Substance) are not mapped; the IG's message "
                   "maps give them no resource either.",
    "referral": "RF1 (referral) is not mapped: the IG's ADT maps give it no resource; Microsoft makes a "
                "ServiceRequest of it.",
    "siu-service-request": "SIU makes no ServiceRequest: the IG makes one from AIS only when SCH-26/SCH-27 "
                           "name the order, and then it would be created empty.",
    "vxu-order": "VXU ORC gives the Immunization its identifiers and ordering performer (ORC[Immunization]); "
                 "the ServiceRequest the IG makes optional is not made.",
    "vis-document": "Vaccine information statement OBX (69764-9, 29768-9, 29769-7) are Observations; "
                    "Microsoft also makes a DocumentReference holding only an author (the PRT after the OBX).",
    "pda-acc": "PDA (death and autopsy) and ACC (accident) are not mapped, as the IG's ADT maps leave them "
               "out; Microsoft makes Observations, Procedures and a Condition of them.",
    "pid21": "PID-21 (mother's identifier) is not mapped; Microsoft and ReportStream make a RelatedPerson "
             "of it.",
    "nk1-no-name": "An NK1 without a name (NK1-2) gives a Patient.contact but no RelatedPerson.",
    "no-encounter": "No Encounter without a stable key (PV1-19 visit number or PV1-44 admit time), and so "
                    "none of its Locations and Practitioners; other converters make one from any PV1.",
    "no-specimen-without-spm": "No Specimen without an SPM segment: OBR-15 (OBR[Specimen]) is not mapped; "
                               "ReportStream and Microsoft make one from the OBR (OBR-7 as collection time) "
                               "or an empty one.",
    "merge": "A merge (A40) or a change of the patient identifier list (A47) is written as the surviving "
             "Patient and the merged one linked by Patient.link "
             "(replaces, replaced-by); Microsoft writes a Linkage and no Patient.",
    # the same data, mapped differently
    "patient-other-segments": "Patient.identifier and Patient.name come from PID only (PID-2, 3, 4, 19, 20; "
                              "PID-5, PID-9); Microsoft also adds identifiers and names from GT1, IN1, IN2, "
                              "DB1 and CON.",
    "xpn15": "XPN.15 (called by) is a second HumanName with use nickname, as the IG's XPN[HumanName] maps "
             "it; Microsoft appends it to the first name's given names.",
    "pid-19-20": "PID-19 (SSN) and PID-20 (driver's licence) are Patient identifiers, as the IG's "
                 "PID[Patient] maps them; ReportStream and the IG's ADT_A01 sample leave one out.",
    "in1-49": "IN1-49 (insured's id) is Coverage.subscriberId, not a Patient identifier.",
    "birth-time": "Patient.birthDate is the date of PID-7 and the time of birth goes to the patient-birthTime "
                  "extension (IG PID[Patient]); R4 allows no time in birthDate.",
    "ig-adt-sample": "The IG's ADT_A01 sample is abridged: it writes the v2 coding system name (LN) as the "
                     "system, leaves out the OBX-6 units and cuts PV1-44 to a date; ours keeps the precision "
                     "sent.",
    "coding-system-uri": "A coding system is written as its URI when it is known: a table 0396 name listed "
                         "in mappings/tables/coding-systems.csv (LN, SCT, CVX...), HL7nnnn as "
                         "http://terminology.hl7.org/CodeSystem/v2-nnnn, or the field's own v2 table when the "
                         "sender names none (TXA-2: v2-0270); Microsoft writes a placeholder for names it does "
                         "not know.",
    "coding-system-unknown": "A coding system name that mappings/tables/coding-systems.csv does not list "
                             "(ICDO; SNM3, the retired SNOMED International, which Microsoft writes as SNOMED CT) "
                             "gives a coding without system, never an invented URI; a site adds the row it needs.",
    "icd9": "I9 is read as ICD-9-CM, http://hl7.org/fhir/sid/icd-9-cm, the ICD-9 system FHIR R4 lists; "
            "Microsoft writes http://hl7.org/fhir/sid/icd-9.",
    "encounter-class": "Encounter.class comes from PV1-2 through the IG's PatientClass[EncounterClass] map "
                       "(I to IMP in v3 ActCode); the IG's MDM_T02 sample copies the v2-0004 code.",
    "ucum-units": "A unit sent without coding system is UCUM when mappings/tables/ucum-units.csv lists it "
                  "(%, nmol/L, ng/mL...): the Quantity gets the UCUM system and code; other converters keep "
                  "the unit text only.",
    "encounter-status": "Encounter.status: an event that settles it wins (A01, A02, A13 in-progress; A03 "
                        "finished; A05 planned; A11 cancelled), otherwise PV1 decides as the IG's PV1[Encounter] "
                        "says (finished once PV1-45 is valued, planned for class P); Microsoft writes "
                        "in-progress.",
    "pv2-8": "PV2-8 (expected admit time) is a plan, not Encounter.period.start; the IG maps it to an R5 "
             "plannedStartDate extension, not made here.",
    "time-zone": "A v2 time without offset is read in the channel's time zone (America/New_York in this "
                 "test); ReportStream and the IG samples read it as UTC, so the same text names another "
                 "instant.",
    "effective-fallback": "Observation.effective falls back to OBR-7 (ORU) or RXA-3 (VXU) when OBX-14 is "
                          "empty or not a valid time; the other converters leave it out.",
    "rp-ed": "OBX of type RP or ED are Observations (ED Base64 data, or the RP's URL, in the IG's R5 "
             "valueAttachment extension); Microsoft makes DiagnosticReports with presentedForm, or "
             "DocumentReferences, of them.",
    "obx-no-code": "An OBX without OBX-3 still gives an Observation, with code text 'unknown' "
                   "(Observation.code is required).",
    "tm-value": "A TM value is written as a FHIR time (hh:mm:ss); ReportStream copies the v2 text, which is "
                "not a valid FHIR time.",
    "ts-value": "A TS value (the v2.5 timestamp) is read like a DTM, as valueDateTime; Microsoft gives it no "
                "value.",
    "vxu-funding": "The funding OBX (30963-3, 64994-7) fill Immunization.fundingSource and "
                   "programEligibility and are kept as Observations too; Microsoft sometimes keeps only the "
                   "Immunization elements.",
    "mdm-content": "MDM OBX go into the DocumentReference content (the IG's OBX[DocumentReference]) and the "
                   "order into a ServiceRequest; Microsoft makes Observations, DiagnosticReports and "
                   "Specimens of them.",
    "ig-mdm-sample": "The IG's MDM_T02 sample was made by an ADT template (its Provenance says so): it has no "
                     "DocumentReference or ServiceRequest and gives the OBX as Observations.",
    "siu-start": "Appointment start and end come from SCH-11 (the IG's TQ[Appointment]) and from TQ1 only "
                 "without it; Microsoft reads TQ1 first.",
    "rs-order-codes": "The ReportStream ORM translations captured by trusted-intermediary carry no code on "
                      "the ServiceRequest and its Observations and drop CE and XAD values and the NK1; ours "
                      "maps OBR-4, OBX-3, OBX-5 and NK1 (RelatedPerson) as the IG does.",
    "rs-specimen-obx": "ReportStream leaves out the value and units of the OBX under an SPM (SN ^28); ours "
                       "maps them as any OBX.",
    "glued-orc": "In ms__MDHHS-OML-O21-1 the ORC is glued to the GT1 line (a missing segment terminator): Microsoft "
                 "then maps no order, ours maps the OBR and the DG1, OBX and SPM after it.",
    "sr-per-obr": "Under one ORC with several OBRs, ours makes one ServiceRequest per OBR, as the IG's order "
                  "maps do; ReportStream maps the first OBR only (rs__sample_orm_20230809-001).",
}

#: Our mapping is wrong (reported to the template owner): the pairs a rule names are strict xfails.
BUG_REASONS: dict[str, str] = {}


@dataclass(frozen=True)
class Rule:
    """Differences a reason explains: pair stems, resource type, facet, side, item (fnmatch patterns).

    zone_shift: only a time whose twin on the other side (same facet, same Observation code)
    is the same wall-clock time read as UTC instead of in ZONE.
    """
    reason: str
    pairs: str = "*"
    type: str = "*"
    facet: str = "*"
    side: str = "*"
    item: str = "*"
    zone_shift: bool = False

    def explains(self, pair: str, d: Difference, result: Comparison) -> bool:
        return (fnmatch.fnmatchcase(pair, self.pairs) and fnmatch.fnmatchcase(d.type, self.type)
                and fnmatch.fnmatchcase(d.facet, self.facet) and fnmatch.fnmatchcase(d.side, self.side)
                and fnmatch.fnmatchcase(d.item, self.item)
                and (not self.zone_shift or _zone_shifted(d, result)))


def _instant(text: str) -> datetime | None:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        return None


def _zone_shifted(d: Difference, result: Comparison) -> bool:
    """Our instant is their wall-clock time in ZONE where they read it as UTC (or the reverse pairing)."""
    key, _, when = d.item.rpartition(" = ")
    for other in result.differences:
        okey, _, owhen = other.item.rpartition(" = ")
        if (other.type, other.facet) != (d.type, d.facet) or other.side == d.side or okey != key:
            continue
        mine, theirs_ = (when, owhen) if d.side == "ours" else (owhen, when)
        a, b = _instant(mine), _instant(theirs_)
        if a and b and b.replace(tzinfo=ZoneInfo(ZONE)).astimezone(timezone.utc) == a:
            return True
    return False


def _types(reason: str, pairs: str, side: str, *types: str) -> list[Rule]:
    """Rules for resource types only one side has."""
    return [Rule(reason, pairs, "*", "resourceType", side, t) for t in types]


MS_ADT_FULL = "ms__ADT-A[01][0-9]-01"      # the Microsoft ADT messages with every segment
MS_ORDERS = "ms__O[MR][GLM]-O*"            # Microsoft ORM, OML, OMG
MS_LAB = "ms__O[MRU][GLMU]-*"              # ... and ORU, OUL
MS_MEDIA = ("local|1063-7", "local|[34]DH*")  # the codes of their RP and ED OBX
T = "theirs"
O = "ours"

#: Deliberate differences: ours follows the IG, or a documented choice, where theirs differs.
ALLOWED: list[Rule] = [
    # resource types nobody's template here makes
    *_types("message", "*", T, "MessageHeader"),
    *_types("provenance", "ti__*", O, "Provenance"),
    *_types("account", "*", T, "Account"),
    *_types("device", "*", T, "Device"),
    *_types("episode", "*", T, "EpisodeOfCare"),
    *_types("practitioner-role", "*", T, "PractitionerRole"),
    *_types("organization", "*", T, "Organization"),
    *_types("location", "*", T, "Location"),
    *_types("financial-pharmacy", "ms__*", T, "ChargeItem", "MedicationDispense", "Medication",
            "MedicationRequest", "NutritionOrder", "SupplyRequest", "ClaimResponse"),
    *_types("financial-pharmacy", MS_ORDERS, T, "Procedure"),
    *_types("financial-pharmacy", "ms__ORU-R01-01", T, "Procedure"),
    *_types("financial-pharmacy", "ms__ORM-O01-0[456]", O, "ServiceRequest"),
    *_types("cti-con-inv", "ms__*", T, "ResearchStudy", "Consent", "Substance"),
    *_types("financial-pharmacy", "ms__OMG-O19-01", T, "ChargeItem"),
    # whole messages
    Rule("not-mapped-type", "ms__DFT-*", side=T),
    Rule("not-mapped-type", "ms__BAR-*", side=T),
    Rule("not-mapped-type", "ms__RD[ES]-*", side=T),
    Rule("not-mapped-type", "ms__REF-*", side=T),
    Rule("no-pid", "rs-mi__MSH-to-MessageHeader-everything-valued", side=T),
    # segments mapped by others only
    *_types("referral", "ms__ADT-A*", T, "ServiceRequest"),
    *_types("siu-service-request", "ms__SIU-*", T, "ServiceRequest"),
    *_types("vxu-order", "ms__VXU*", T, "ServiceRequest"),
    *_types("vxu-order", "ms__IZ_*", T, "ServiceRequest"),
    *_types("vis-document", "ms__VXU-V04-01", T, "DocumentReference"),
    *_types("pda-acc", "ms__ADT-A02-01", T, "Condition", "Procedure"),
    Rule("pda-acc", MS_ADT_FULL, "Condition", "code", T, "http://hl7.org/fhir/sid/icd-10|I21"),
    Rule("pda-acc", "ms__ADT-A*", "Observation", "*", T, "*autopsy*"),
    Rule("pda-acc", "ms__ADT-A*", "Observation", "*", T, "*coroner*"),
    Rule("pda-acc", "ms__ADT-A*", "Observation", "*", T, "*death-certificate*"),
    Rule("pda-acc", "ms__ADT-A*", "Observation", "*", T, "*injury-incident*"),
    *_types("pid21", "ms__*", T, "RelatedPerson"),
    *_types("pid21", "rs-mi__orm_o01-full", T, "RelatedPerson"),
    *_types("pid21", "rs-mi__pid-to-patient-pid-fully-populated", T, "RelatedPerson"),
    *_types("pid21", "rs__sample_orm_20230809-001", T, "RelatedPerson"),
    Rule("sr-per-obr", "rs__sample_orm_20230809-001", "ServiceRequest", "code", O),
    *_types("nk1-no-name", "rs-mi__xad-to-address-type-h", T, "RelatedPerson"),
    *_types("no-encounter", "ms__ADT01-28", T, "Encounter", "Practitioner"),
    *_types("no-encounter", "ms__MDM-T02-03", T, "Encounter"),
    *_types("no-encounter", "ms__OUL-R22-01", T, "Encounter"),
    *_types("no-encounter", "rs-mi__oru_r01-full", T, "Encounter"),
    *_types("no-encounter", "ti__Ochsner_001_OML_O21", T, "Encounter"),
    *_types("other-persons", "ms__ADT-A4[07]-01", T, "Practitioner"),
    *_types("other-persons", "rs-mi__IN1-to-Coverage", T, "Practitioner"),
    *_types("no-specimen-without-spm", "rs*", T, "Specimen"),
    *_types("no-specimen-without-spm", "ti__*", T, "Specimen"),
    *_types("no-specimen-without-spm", "ms__*", T, "Specimen"),
    *_types("merge", "ms__ADT-A4[07]-01", T, "Linkage"),
    *_types("merge", "ms__ADT-A4[07]-01", O, "Patient"),
    # Patient
    *[Rule("patient-other-segments", "ms__*", "Patient", "identifier", T, value) for value in (
        "1516", "55121", "G-SSN-12",                                          # GT1
        "DB123",                                                              # DB1
        "MCN-008", "MI-12345", "Medicare-12345", "PNM1234", "MB-12345")],     # IN2
    Rule("patient-other-segments", "ms__*", "Patient", "name", T, "Jack|ADAM A Addsm"),
    Rule("patient-other-segments", "ms__*", "Patient", "name", T, "RADIANT|LUCY"),
    Rule("patient-other-segments", "ms__MDM-*", "Patient", "name", T, "Smith|Robert"),
    Rule("patient-other-segments", "ms__ADT01-23", "Patient", "name", T, "123121234A|"),
    Rule("xpn15", "ms__*", "Patient", "name", O, "EVERYMAN|ADAM A"),
    Rule("xpn15", "ms__*", "Patient", "name", O, "|Addsm"),
    Rule("xpn15", "ms__*", "Patient", "name", T, "EVERYMAN|ADAM A Addsm"),
    Rule("pid-19-20", "ig__ADT_A01", "Patient", "identifier", O, "J342342"),
    Rule("pid-19-20", "ti__AL_005_ORU_batch_FHS_BHS", "Patient", "identifier", O, "470-08-1020"),
    Rule("pid-19-20", "ti__Ochsner_001_OML_O21", "Patient", "identifier", O, "000-00-0000"),
    Rule("in1-49", "ig__ADT_A01", "Patient", "identifier", T, "125189"),
    Rule("birth-time", "ig__ADT_A01", "Patient", "birthDate"),
    # codes
    Rule("ig-adt-sample", "ig__ADT_A01", "Observation", "code"),
    Rule("ig-adt-sample", "ig__ADT_A01", "Observation", "unit"),
    Rule("ig-adt-sample", "ig__ADT_A01", "Encounter", "period.start"),
    Rule("coding-system-uri", "ms__MDM-*", "DocumentReference", "type"),
    Rule("coding-system-uri", "ms__*", "Immunization", "vaccineCode", O, "http://hl7.org/fhir/sid/cvx|*"),
    Rule("coding-system-uri", "ms__*", "Immunization", "vaccineCode", T, "local|*"),
    Rule("coding-system-uri", "ms__*", "Observation", "value", O, "*= http://hl7.org/fhir/sid/cvx|*"),
    Rule("coding-system-uri", "ms__*", "Observation", "value", T, "30956-7 = local|*"),
    Rule("coding-system-uri", "ms__*", "Observation", "value", O,
         "64994-7 = http://terminology.hl7.org/codesystem/v2-0064|*"),
    Rule("coding-system-uri", "ms__*", "Observation", "value", T, "64994-7 = local|*"),
    Rule("coding-system-unknown", "ms__*", "AllergyIntolerance", "code", T,
         "http://terminology.hl7.org/codesystem/icd-o|*"),
    Rule("coding-system-unknown", "ms__*", "AllergyIntolerance", "code", O, "local|P"),
    Rule("coding-system-unknown", "ms__ADT-A60-01", "AllergyIntolerance", "code", O, "local|12345 + local|91935009"),
    Rule("coding-system-unknown", "ms__ADT-A60-01", "AllergyIntolerance", "code", T,
         "http://snomed.info/sct|91935009 + local|12345"),
    Rule("icd9", "ms__ADT01-23", "Condition", "code", O, "http://hl7.org/fhir/sid/icd-9-cm|*"),
    Rule("icd9", "ms__ADT01-23", "Condition", "code", T, "http://hl7.org/fhir/sid/icd-9|*"),
    Rule("encounter-class", "ig__MDM_T02", "Encounter", "class"),
    Rule("ucum-units", "ms__LAB-ORU-*", "Observation", "unit", O, "* = [!(]*"),
    Rule("ucum-units", "ms__LAB-ORU-*", "Observation", "unit", T, "* = (not UCUM) *"),
    Rule("ucum-units", "rs__sample_oru_*", "Observation", "unit", O, "* = [!(]*"),
    Rule("ucum-units", "rs__sample_oru_*", "Observation", "unit", T, "* = (not UCUM) *"),
    # encounters
    Rule("encounter-status", "ms__ADT-A04-0[12]", "Encounter", "status"),
    Rule("pv2-8", "ms__ADT-A05-01", "Encounter", "period.start", T),
    Rule("time-zone", "ig__MDM_T02", "Encounter", "period.start", zone_shift=True),
    # observations
    Rule("time-zone", "rs*", "Observation", "effective", zone_shift=True),
    Rule("time-zone", "ti__*", "Observation", "effective", zone_shift=True),
    Rule("time-zone", "rs-mi__OBX-to-Observation-dt-value", "Observation", "value", zone_shift=True),
    Rule("effective-fallback", "ms__ORU-R01-*", "Observation", "effective", O),
    Rule("effective-fallback", "rs-mi__oru_r01-full", "Observation", "effective", O, "8038[23]-*"),
    Rule("effective-fallback", "ms__VXU-V04-0[12]", "Observation", "effective", O),
    Rule("effective-fallback", "ms__IZ_*", "Observation", "effective", O),
    Rule("effective-fallback", "rs__sample_oru_CDPH_NBS_20241021-001", "Observation", "effective", O,
         "53345-5 = *"),  # OBX-14 220241021055726 has a digit too many
    Rule("rp-ed", MS_ORDERS, "*", "resourceType", T, "DiagnosticReport"),
    Rule("rp-ed", "ms__O[RU][UL]-R*", "*", "resourceType", T, "DocumentReference"),
    *[Rule("rp-ed", MS_LAB, "Observation", "code", O, f"{code}*") for code in MS_MEDIA],
    *[Rule("rp-ed", MS_LAB, "Observation", "value", O, f"{code.split('|')[1]} = *") for code in MS_MEDIA],
    Rule("rp-ed", "ms__O[RU][UL]-R*", "DiagnosticReport", "code", T),
    Rule("rp-ed", "ms__ORU-R01-01", "DiagnosticReport", "status", T, "unknown"),
    Rule("rp-ed", "ms__ORU-R01-01", "Observation", "value", O, "8867-4 = attachment *"),  # the RP after PID
    Rule("obx-no-code", "ms__OUL-R22-01", "Observation", "code", O, "text:unknown"),
    Rule("tm-value", "rs-mi__OBX-to-Observation-tm-value", "Observation", "value"),
    Rule("ts-value", "ms__IZ_*", "Observation", "value", O, "2976[89]-* = ????-??-??"),
    Rule("vxu-funding", "ms__VXU-V04-0[12]", "Observation", "*", O, "*30963-3*"),
    Rule("vxu-funding", "ms__VXU-V04-0[12]", "Observation", "*", O, "*64994-7*"),
    # documents
    *_types("mdm-content", "ms__MDM-*", T, "Observation", "DiagnosticReport"),
    *_types("ig-mdm-sample", "ig__MDM_T02", T, "Observation"),
    *_types("ig-mdm-sample", "ig__MDM_T02", O, "DocumentReference", "ServiceRequest"),
    # appointments
    Rule("siu-start", "ms__SIU-*", "Appointment", "start"),
    # ReportStream specifics
    Rule("rs-order-codes", "ti__AL_0[01][123]_ORM_*", "Observation", "code", O),
    Rule("rs-order-codes", "ti__AL_0[01][123]_ORM_*", "ServiceRequest", "code", O),
    Rule("rs-order-codes", "ti__AL_003_ORM_O01_NBS", "Observation", "value", O, "67704-7 = *"),
    Rule("rs-order-codes", "ti__AL_0[01][123]_ORM_*", "Observation", "value", O, "62331-4 = *"),
    *_types("rs-order-codes", "ti__AL_0[01][123]_ORM_*", O, "RelatedPerson"),
    Rule("rs-specimen-obx", "rs-mi__oru_r01-full", "Observation", "*", O, "21612-7 = *"),
    Rule("glued-orc", "ms__MDHHS-OML-O21-1", "*", "resourceType", O),
]


def _bug(reason: str, pairs: str, *where: str) -> list[Rule]:
    """A bug's rules: one per pair named (space separated stems, no patterns: each becomes a strict xfail)."""
    return [Rule(reason, pair, *where) for pair in pairs.split()]


#: Our mapping is wrong here; reported to the template owner. The pairs named are strict xfails.
BUGS: list[Rule] = []


def unexplained(pair: str, result: Comparison) -> tuple[list[Difference], list[tuple[str, Difference]]]:
    """The differences no rule explains, and those a known bug explains (with the bug's name)."""
    loose, bugs = [], []
    for d in result.differences:
        bug = next((rule.reason for rule in BUGS if rule.explains(pair, d, result)), None)
        if bug:
            bugs.append((bug, d))
        elif not any(rule.explains(pair, d, result) for rule in ALLOWED):
            loose.append(d)
    return loose, bugs


def _params(with_bugs: bool = False):
    """One param per pair; with_bugs: the pairs a bug rule names are strict xfails."""
    out = []
    for source, expected, _producer in pairs():
        name = pair_name(expected)
        bugs = sorted({rule.reason for rule in BUGS if rule.pairs == name}) if with_bugs else []
        marks = [pytest.mark.xfail(strict=True, reason="; ".join(f"{b}: {BUG_REASONS[b]}" for b in bugs))] \
            if bugs else []
        out.append(pytest.param(source, expected, id=name, marks=marks))
    return out


def _require_shared():
    if not PAIRS_FILE.is_file():
        reason = f"the shared converter expectations are not beside this checkout ({PAIRS_FILE.parent.name}/PAIRS.tsv)"
        if CI:
            pytest.fail(f"{reason} (CI=true: this test must run)")
        pytest.skip(reason)


# -- the tests -----------------------------------------------------------------------------------

def test_expectations_present():
    _require_shared()
    assert pairs(), "PAIRS.tsv lists no pair"


@pytest.mark.parametrize(("source", "expected"), _params())
def test_pair_differences_are_explained(source: str, expected: str):
    """Every difference is a deliberate one (ALLOWED) or a known bug (BUGS): never xfail."""
    _require_shared()
    name = pair_name(expected)
    loose, _bugs = unexplained(name, comparison(source, expected))
    assert not loose, f"{name}: {len(loose)} unexplained difference(s):\n" + "\n".join(f"  {d}" for d in loose)


@pytest.mark.parametrize(("source", "expected"), _params(with_bugs=True))
def test_pair_has_no_known_bug(source: str, expected: str):
    """No difference comes from a known bug of our mapping; the pairs with one are strict xfails."""
    _require_shared()
    name = pair_name(expected)
    _loose, bugs = unexplained(name, comparison(source, expected))
    assert not bugs, f"{name}: known bug(s):\n" + "\n".join(f"  {b}: {d}" for b, d in bugs)


def test_every_rule_is_used():
    """A rule no pair needs any more is stale: the mapping (or theirs) changed, the table must too."""
    _require_shared()
    used = set()
    for source, expected, _ in pairs():
        name = pair_name(expected)
        result = comparison(source, expected)
        for d in result.differences:
            used.update(("allowed", i) for i, rule in enumerate(ALLOWED) if rule.explains(name, d, result))
            used.update(("bug", i) for i, rule in enumerate(BUGS) if rule.explains(name, d, result))
    stale = [str(rule) for i, rule in enumerate(ALLOWED) if ("allowed", i) not in used]
    stale += [str(rule) for i, rule in enumerate(BUGS) if ("bug", i) not in used]
    assert not stale, "rules that explain no difference:\n" + "\n".join(stale)


def test_reasons_are_documented():
    """Each deliberate difference's reason is in docs/fhir-mapping.md, word for word."""
    doc = squash(DOC.read_text(encoding="utf-8"))
    missing = [key for key, text in REASONS.items() if squash(text) not in doc]
    assert not missing, f"reasons not in {DOC.name}: {missing}"
    unknown = [rule.reason for rule in ALLOWED if rule.reason not in REASONS]
    unknown += [rule.reason for rule in BUGS if rule.reason not in BUG_REASONS]
    assert not unknown, f"rules naming no reason: {unknown}"
    unused = set(REASONS) - {rule.reason for rule in ALLOWED}
    assert not unused, f"reasons no rule uses: {sorted(unused)}"
    section = DOC.read_text(encoding="utf-8").split("## 7.", 1)[1]
    listed = [squash(line[2:]) for line in section.splitlines() if line.startswith("- ")]
    stale = [line for line in listed if line not in {squash(text) for text in REASONS.values()}]
    assert not stale, f"{DOC.name} section 7 lists differences the test no longer names: {stale}"


# -- normalisation checks ------------------------------------------------------------------------

def test_norm_time():
    assert norm_time("2024-03-05T09:00:00-05:00") == "2024-03-05T14:00:00Z"
    assert norm_time("2024-03-05T19:30:00+05:30") == "2024-03-05T14:00:00Z"
    assert norm_time("2024-03-05T14:00:00.500Z") == "2024-03-05T14:00:00.5Z"
    assert norm_time("2024-03-05") == "2024-03-05" and norm_time("2024") == "2024"
    assert norm_time("1970-06-01T09:12") == "1970-06-01T09:12 (no offset)"


def test_norm_codes_and_numbers():
    assert codings({"coding": [{"system": "urn:oid:2.16.840.1.113883.6.1", "code": "1-8"}]}) == ["http://loinc.org|1-8"]
    assert codings({"coding": [{"system": "HTTP://LOINC.ORG/", "code": "1-8"}]}) == ["http://loinc.org|1-8"]
    local = codings({"coding": [{"code": "X"}]})
    assert local == codings({"coding": [{"system": MS_LOCAL + "CodeSystem/L", "code": "X"}]}) == ["local|X"]
    assert codings({"coding": [{"system": RS_LOCAL.replace("99zzzorl", "99zzzorL"), "code": "X"}]}) == local
    assert codings({"text": "free  text"}) == ["text:free text"]
    assert number("1.50") == number(1.5) == "1.5" and number("100") == number(100.0) == "100"


def test_zone_shift():
    result = Comparison(0, [Difference("Observation", "effective", "ours", "1-8 = 2024-10-15T07:43:04Z"),
                            Difference("Observation", "effective", "theirs", "1-8 = 2024-10-15T03:43:04Z"),
                            Difference("Observation", "effective", "theirs", "2-6 = 2024-01-15T03:43:04Z"),
                            Difference("Observation", "effective", "ours", "2-6 = 2024-01-15T07:43:04Z")])
    rule = Rule("time-zone", zone_shift=True)
    assert rule.explains("p", result.differences[0], result)   # EDT: 4 hours
    assert rule.explains("p", result.differences[1], result)
    assert not rule.explains("p", result.differences[2], result)  # EST: 5 hours, not 4
