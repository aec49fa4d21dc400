"""The ``fhir`` namespace's segment maps: whole FHIR R4 resources from one segment (or a pair), in Python.

A FHIR template used to build these resources in Jinja, field by field; run
by the sandbox, that was most of a mapping's cost. The helpers here make the
same resources (the same ids, the same elements) in one call each, and leave
the message-level choices to the template: which segments, which events,
which status. Each follows the segment map of the HL7 Version 2 to FHIR IG
named in its docstring, and says where it departs.

Every helper returns a dict: ``resources``, the resources to add, the one the
helper is named after last (after the Practitioners, Organizations, Locations
or RelatedPersons it refers to), and what a template needs next: ``id`` and
``ref`` (a Reference to it), ``refs``, ``contact``, ``diagnosis``. A template
may adjust a resource before adding it (``dict(made.resources[-1], ...)``).
Values may be none, '' or empty lists: the bundle builder drops empty values.
Ids come from ``fhir.id`` of business keys only, never from positions in the
message or its control id, so a replay gives the same ids. ``'""'`` (the v2
null) reads as empty.

Arguments: segments (``msg.segment('PID')``, a loop variable over
``msg.segments(...)``), a field path as the macros in ``_common.j2`` take it
(``'PV1-7'``, ``'PV1-7[2]'``), ids as strings.
"""

from __future__ import annotations

from jinja2.utils import url_quote

from interface_engine.channels.helpers import Encoded, HelperError, TemplateSegment, uuid5
from interface_engine.fhir.bundle import PrunedDict, PrunedList
from interface_engine.fhir.datatypes import V2_0203, UCUM, FHIRNamespace

NULL = '""'


def _coded(system: str, code: str, display: str | None = None) -> PrunedDict:
    """A CodeableConcept of one Coding, for a system and code (and display) of this module or a
    code table, never empty: built as the Bundle step would leave it (see PrunedDict), once
    for the first _MAX_CODED of them (nothing changes a PrunedDict)."""
    key = (system, code, display)
    found = _CODED.get(key)
    if found is None:
        coding = PrunedDict(system=system, code=code)
        if display:
            coding["display"] = display
        found = PrunedDict(coding=PrunedList((coding,)))
        if len(_CODED) < _MAX_CODED:
            _CODED[key] = found
    return found


_CODED: dict[tuple, PrunedDict] = {}
_MAX_CODED = 1024  # the codes of the tables and this module; a code read from a message may add one


PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
_V2 = "http://terminology.hl7.org/CodeSystem/v2-"
_VN = PrunedDict(_coded(V2_0203, "VN"), text="visit number")
_UNKNOWN_CLASS = PrunedDict(system="http://terminology.hl7.org/CodeSystem/v3-NullFlavor", code="UNK",
                            display="unknown")
_ENCOUNTER_PRACTITIONERS = ((7, "ATND", "attender"), (8, "REF", "referrer"), (9, "CON", "consultant"),
                            (17, "ADM", "admitter"))  # PV1 fields
_ORGANISATION_CONTACTS = ("EMR", "E", "F", "I", "S")  # NK1-3 codes naming an organisation, not a person
_ALLERGY_CATEGORY = {"DA": "medication", "FA": "food", "EA": "environment", "AA": "environment",
                     "PA": "environment", "LA": "environment", "MA": None, "MC": "medication"}
_SEVERITY = {"SV": "severe", "MO": "moderate", "MI": "mild"}
_CRITICALITY = {"SV": "high", "MO": "low", "MI": "low", "U": "unable-to-assess"}
_VERIFICATION = {"C": "confirmed", "U": "unconfirmed", "P": "unconfirmed", "S": "unconfirmed", "D": "unconfirmed",
                 "I": "confirmed"}
_DIAGNOSIS_ROLE = {"A": "AD", "F": "DD", "W": None}
_CONDITION_CATEGORY = PrunedList((_coded("http://terminology.hl7.org/CodeSystem/condition-category",
                                           "encounter-diagnosis"),))
_ATTACHMENT = "http://hl7.org/fhir/5.0/StructureDefinition/extension-Observation.{}valueAttachment"
_MIME = {"pdf": "application/pdf", "rtf": "application/rtf", "html": "text/html", "jpeg": "image/jpeg",
         "jpg": "image/jpeg", "png": "image/png", "tiff": "image/tiff", "gif": "image/gif", "xml": "application/xml",
         "plain": "text/plain", "sgml": "text/sgml", "postscript": "application/postscript",
         "octet-stream": "application/octet-stream", "dicom": "application/dicom"}
_NOT_BASE64 = '<>()[]{}!?*&%$#@~^|":;,. -_'
_FT_COMMANDS = ((".br", "\n"), (".sp", "\n"), (".fi", ""), (".nf", ""), (".ce", ""), ("H", ""), ("N", ""))
_TEXT_TYPES = ("ST", "TX", "FT")
_CODED_TYPES = ("CE", "CWE", "CNE", "CF", "IS", "ID", "CX")
_DATETIME_TYPES = ("DT", "DTM", "TS")
_ORDER_STATUS = {"A": "active", "CA": "revoked", "CM": "completed", "DC": "revoked", "ER": "entered-in-error",
                 "HD": "on-hold", "IP": "active", "RP": "revoked", "SC": "active"}  # ORC-5, table 0038
_PRIORITY = {"S": "stat", "A": "asap", "R": "routine", "P": "urgent", "T": "urgent"}
_PERFORMER_FUNCTION = "http://terminology.hl7.org/CodeSystem/v2-0443"
_MVX = "http://hl7.org/fhir/sid/mvx"
_PROCEDURE_PERFORMERS = (("PR1-8", "88189002", "Anesthesiologist"), ("PR1-11", "304292004", "Surgeon"),
                         ("PR1-12", None, None))  # SNOMED CT functions
_SUBSCRIBER_RELATIONSHIP = {"SEL": "self", "SPO": "spouse", "DOM": "common", "CHD": "child", "PAR": "parent",
                            "FTH": "parent", "MTH": "parent", "OTH": "other", "EME": "injured"}  # IN1-17
_COVERAGE_CLASS = "http://terminology.hl7.org/CodeSystem/coverage-class"
_HISTORICAL = ("01", "02", "03", "04", "05", "06", "07", "08")  # RXA-9 (NIP001): not from the source
_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
_NOT_ASKED = _coded("http://terminology.hl7.org/CodeSystem/data-absent-reason", "not-asked")


def _int(value, default: int) -> int:
    """Jinja's ``int`` filter on text: an integer, else the integer part of a float, else ``default``."""
    try:
        return int(value)
    except (TypeError, ValueError):
        pass
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return default


def _float(value, default: float) -> float:
    """Jinja's ``float`` filter."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _text(value: str) -> str:
    """Trimmed, the v2 null as ''."""
    return "" if value == NULL else value.strip()


def _trimmed(value: str) -> str:
    """Trimmed, then the v2 null as '' (a null with spaces around it too)."""
    value = value.strip()
    return "" if value == NULL else value


def _with_text(concept: PrunedDict | None, text: str) -> dict:
    """``concept`` with a text: its own, else ``text``; ``"text": None`` when neither has one."""
    text = (concept or {}).get("text") or text
    return PrunedDict(concept or {}, text=text) if text else dict(concept or {}, text=None)


def _ref(kind: str, rid: str | None, display=None) -> dict | None:
    if not rid:
        return None
    return {"reference": f"{kind}/{rid}", "display": display} if display is not None else {"reference": f"{kind}/{rid}"}


def _encoding_characters(seg: TemplateSegment) -> tuple[str, str]:
    """The repetition separator and escape character as MSH-2 writes them ('' when it has none)."""
    msh2 = seg._message["MSH-2"]
    return msh2[1:2], msh2[2:3]


def _count(seg: TemplateSegment, f: str, rep: str) -> int:
    """How many repetitions field ``f`` has (0 when empty)."""
    raw = seg[f]
    return (raw.count(rep) + 1 if rep else 1) if raw else 0


def _ft_text(text: str, esc: str) -> str:
    """FT text with its formatting commands as plain text: \\.br\\ and \\.sp\\ line breaks, the others dropped."""
    if esc and esc in text:
        for command, replacement in _FT_COMMANDS:
            text = text.replace(esc + command + esc, replacement)
    return text


def _repetitions(seg: TemplateSegment, f: str) -> list[str]:
    """The paths of field ``f``'s repetitions: ``f`` itself when it has one, ``f[1]``, ``f[2]``... otherwise."""
    raw = seg[f]
    if not raw:
        return []
    rep = seg._message.delimiters.repetition_sep
    if not rep or rep not in raw:
        return [f]
    return [f"{f}[{r}]" for r in range(1, raw.count(rep) + 2)]


def _segment(src, fn: str) -> TemplateSegment | None:
    if src is None or isinstance(src, TemplateSegment):
        return src if src is None or src._segment.name else None
    raise HelperError(f"fhir.{fn} reads a segment (msg.segment('PID'), a loop over msg.segments('NK1'))")


def _field_path(f, fn: str) -> str:
    if not isinstance(f, str) or "-" not in f:
        raise HelperError(f"fhir.{fn}: the field is a path such as 'PV1-7' or 'PV1-7[2]'")
    return f


class FHIRHelpers(FHIRNamespace):
    """``fhir`` as templates see it: the datatype helpers and the segment maps below."""

    __slots__ = ()

    # identifiers of an HD, an EI

    def hd_system(self, namespace, universal, universal_type) -> str | None:
        """An Identifier.system for an HD (namespace id, universal id, its type), by the rule
        ``fhir.identifiers`` applies to CX.4, so that an XCN, XON or EI names the same system as a
        CX from the same authority: the namespace id in table identifier-systems, else an OID
        (ISO) or UUID as its URN, a URI as is, else ``urn:id:<namespace id>``."""
        nsid, uid = _text(namespace or ""), _text(universal or "")
        utype = (universal_type or "").strip().upper()
        if nsid:
            header, rows = self._table("hd_system", "identifier-systems", "system")
            row = rows.get(nsid)
            if row and row["system"]:
                return row["system"]
        oid = uid[8:] if uid[:8].lower() == "urn:oid:" else uid
        if uid and utype == "ISO" and oid[:1] in "012" and "." in oid and _int(oid.replace(".", ""), -1) >= 0 \
                and ".." not in oid:
            return "urn:oid:" + oid
        if uid and utype == "UUID" and len(uid) == 36:
            return "urn:uuid:" + uid.lower()
        if uid and utype in ("URI", "URL") and ":" in uid and " " not in uid:
            return uid
        if nsid:
            return "urn:id:" + url_quote(nsid)
        return None

    def ei(self, src, f, type_code=None) -> dict | None:
        """An Identifier from an EI (entity id ^ namespace id ^ universal id ^ type) at ``f`` (a field,
        or a component such as SPM-2.1 whose parts are sub-components), typed with a v2-0203 code
        (PLAC, FILL...); none when the EI has no entity id. A v2.7+ EI whose namespace component
        holds a whole HD (NS&UID&TYPE) is read as such."""
        seg = _segment(src, "ei")
        if seg is None:
            return None
        f = _field_path(f, "ei")
        value = _text(seg[f + ".1"])
        if not value:
            return None
        if "." not in f and seg[f + ".2.2"]:
            a, b, t = seg[f + ".2.1"], seg[f + ".2.2"], seg[f + ".2.3"]
        else:
            a, b, t = seg[f + ".2"], seg[f + ".3"], seg[f + ".4"]
        return {"value": value, "system": self.hd_system(a, b, t),
                "type": {"coding": [{"system": V2_0203, "code": type_code}]} if type_code else None}

    # XCN, XON, PL

    def practitioner(self, src, f) -> dict:
        """XCN[Practitioner] for one repetition at ``f``: ``resources`` [the Practitioner] and ``ref``
        (with the name as display), or none and [] when the XCN has neither id nor name.
        Id from XCN.1 and its assigning authority XCN.9; without XCN.1, from the name
        (departure: the IG always keys on XCN.1)."""
        seg = _segment(src, "practitioner")
        f = _field_path(f, "practitioner")
        if seg is None:
            return {"resources": [], "ref": None}
        xcn = seg._components(f)
        text = seg[f]
        # The same XCN in one segment (PV1-7 attending and PV1-17 admitting, often) is one
        # Practitioner: made once, the same dict both times (the Bundle step adds it once).
        # Encoded or decoded: a composite's text, or a decoded leaf, says all the XCN holds.
        key = ("practitioner", isinstance(text, Encoded), text)
        memo = seg._memo
        if memo is not None and key in memo:
            return memo[key]
        made = self._practitioner(xcn)
        if memo is None:
            memo = seg._memo = {}
        memo[key] = made
        return made

    def _practitioner(self, xcn) -> dict:
        idv = _text(xcn(1))
        family = _trimmed(xcn(2))
        given = _trimmed(xcn(3))
        if not (idv or family or given):
            return {"resources": [], "ref": None}
        middle = xcn(4).strip()
        system = self.hd_system(xcn(9), xcn(9, 2), xcn(9, 3))
        prid = uuid5("Practitioner", system, idv) if idv else uuid5("Practitioner", "name", family, given, middle)
        identifiers = []
        if idv:
            id_type = xcn(13).strip()
            identifiers.append({"value": idv, "system": system,
                                "type": _coded(V2_0203, id_type) if id_type and id_type != NULL else None})
        names = []
        if family or given:
            names.append({"family": family, "given": [x for x in (given, middle) if x and x != NULL],
                          "prefix": [x for x in (xcn(6).strip(),) if x and x != NULL],
                          "suffix": [x for x in (xcn(5).strip(), xcn(7).strip())
                                     if x and x != NULL]})
        return {"resources": [{"resourceType": "Practitioner", "id": prid, "identifier": identifiers,
                               "name": names}],
                "ref": {"reference": "Practitioner/" + prid, "display": f"{given} {family}".strip() or None}}

    def practitioners(self, src, f) -> dict:
        """``practitioner`` for every repetition of XCN field ``f``: ``resources`` and ``refs``."""
        seg = _segment(src, "practitioners")
        f = _field_path(f, "practitioners")
        resources, refs = [], []
        for path in _repetitions(seg, f) if seg is not None else ():
            made = self.practitioner(seg, path)
            if made["ref"]:
                resources += made["resources"]
                refs.append(made["ref"])
        return {"resources": resources, "refs": refs}

    def organization(self, src, f) -> dict:
        """XON[Organization] at ``f``: ``resources`` and ``ref``, none when the XON has neither name nor
        id. Name XON.1, identifier XON.10 (else XON.3) with authority XON.6; the id from that
        identifier, else the name."""
        seg = _segment(src, "organization")
        f = _field_path(f, "organization")
        if seg is None or not seg[f]:
            return {"resources": [], "ref": None}
        name = _text(seg[f + ".1.1"])
        idv = _text(seg[f + ".10.1"] or seg[f + ".3.1"])
        if not (name or idv):
            return {"resources": [], "ref": None}
        system = self.hd_system(seg[f + ".6.1"], seg[f + ".6.2"], seg[f + ".6.3"])
        oid = uuid5("Organization", system, idv) if idv else uuid5("Organization", "name", name)
        return {"resources": [{"resourceType": "Organization", "id": oid, "name": name,
                               "identifier": [{"value": idv, "system": system}] if idv else []}],
                "ref": {"reference": "Organization/" + oid, "display": name or None}}

    def location(self, src, f) -> dict:
        """PL[Location] at ``f``: ``resources`` and ``ref``, none when empty. Simplified (departure):
        one Location for the most granular level the PL names (bed, room, floor, point of care,
        building, facility), keyed by all of them, named by the parts joined; no partOf chain."""
        seg = _segment(src, "location")
        f = _field_path(f, "location")
        if seg is None or not seg[f]:
            return {"resources": [], "ref": None}
        pl = seg._components(f)
        poc, room, bed = pl(1), pl(2), pl(3)
        facility, building, floor = pl(4), pl(7), pl(8)
        parts = [p.strip() for p in (facility, building, floor, poc, room, bed) if p != NULL]
        named = [p for p in parts if p]
        if not named:
            return {"resources": [], "ref": None}
        lid = uuid5("Location", *parts)
        kind = ("bd" if bed and bed != NULL else "ro" if room and room != NULL else "lvl" if floor and floor != NULL
                else "wa" if poc and poc != NULL else "bu" if building and building != NULL else "si")
        name = " ".join(named)
        description = seg[f + ".9"]
        return {"resources": [{
            "resourceType": "Location", "id": lid, "name": name,
            "description": description if description != NULL else None, "mode": "instance",
            "physicalType": _coded("http://terminology.hl7.org/CodeSystem/location-physical-type", kind)}],
            "ref": {"reference": "Location/" + lid, "display": name}}

    # PID, PD1

    def patient_id(self, pid) -> str:
        """The Patient id of a PID: PID-3's first identifier (value + system from its assigning
        authority); without PID-3, PID-2 then PID-4; without any, the name and birth date
        (departure: the IG does not say how to key a Patient)."""
        pid = _segment(pid, "patient_id")
        if pid is None:
            raise HelperError("fhir.patient_id reads a PID segment")
        return self._patient_key(pid)[1]

    def _patient_key(self, pid: TemplateSegment) -> tuple[list[dict], str]:
        """PID-3's Identifiers and the Patient id (see patient_id), read once per segment: a
        mapping asks for the id first, for the resources that refer to the Patient, then for
        the Patient. The Identifiers go into the Patient only, which nothing changes."""
        memo = pid._memo
        if memo is not None and "patient" in memo:
            return memo["patient"]
        mrns = self.identifiers(pid, "PID-3")
        key = mrns[0] if mrns else self.identifier(pid, "PID-2") or self.identifier(pid, "PID-4")
        if key:
            found = mrns, uuid5("Patient", key.get("system"), key.get("value"))
        else:
            found = mrns, uuid5("Patient", "name", pid["PID-5.1.1"], pid["PID-5.2"], pid["PID-7.1"])
        if memo is None:
            memo = pid._memo = {}
        memo["patient"] = found
        return found

    def patient(self, pid, pd1=None, contacts=(), links=(), active=None) -> dict:
        """PID[Patient] + PD1[Patient]: ``resources`` (PD1-4 Practitioners, the PD1-3 Organization, the
        Patient), ``id``, ``ref``. ``contacts``, ``links``, ``active``: Patient.contact, .link, .active.
        Left out: race and ethnicity (the IG maps them to Observations, realm specific), PID-21
        mother's identifier, citizenship/nationality/animal extensions."""
        pid = _segment(pid, "patient")
        pd1 = _segment(pd1, "patient")
        if pid is None:
            raise HelperError("fhir.patient reads a PID segment")
        mrns, patient_id = self._patient_key(pid)
        filled = self._filled(pid, "PID")  # most of the fields below are empty: no helper call for those
        identifiers = ((self.identifiers(pid, "PID-2") if filled[2] else []) + mrns
                       + (self.identifiers(pid, "PID-4") if filled[4] else []))
        ssn = pid["PID-19"] if filled[19] else ""
        if ssn and ssn != NULL:
            identifiers.append({"system": "http://hl7.org/fhir/sid/us-ssn", "value": ssn,
                                "type": _coded(V2_0203, "SS")})
        licence = pid["PID-20.1"] if filled[20] else ""
        if licence and licence != NULL:
            identifiers.append({"value": licence, "type": _coded(V2_0203, "DL")})
        telecom = []
        for n, default_use in ((13, "home"), (14, "work"), (40, None)):
            for t in self.telecoms(pid, f"PID-{n}") if filled[n] else ():
                use = t.get("use") or default_use
                telecom.append(PrunedDict(t, use=use) if use else dict(t, use=use))
        resources, gp = [], []
        if pd1 is not None:
            made = self.practitioners(pd1, "PD1-4")
            resources += made["resources"]
            gp += made["refs"]
            made = self.organization(pd1, "PD1-3")
            resources += made["resources"]
            if made["ref"]:
                gp.append(made["ref"])
        extensions = []
        maiden = pid["PID-6.1.1"] if filled[6] else ""
        if maiden and maiden != NULL:
            extensions.append({"url": "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName",
                               "valueString": maiden})
        religion = self.concept(pid, "PID-17", _V2 + "0006") if filled[17] else None
        if religion:
            extensions.append({"url": "http://hl7.org/fhir/StructureDefinition/patient-religion",
                               "valueCodeableConcept": religion})
        birthplace = pid["PID-23"] if filled[23] else ""
        if birthplace and birthplace != NULL:
            extensions.append({"url": "http://hl7.org/fhir/StructureDefinition/patient-birthPlace",
                               "valueAddress": {"text": birthplace}})
        birth_date = self.date(pid, "PID-7") if filled[7] else None
        birth_time = None
        if birth_date and len(_text(pid["PID-7.1"])) > 8:
            birth_time = {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
                                         "valueDateTime": self.datetime(pid, "PID-7")}]}
        death = self.datetime(pid, "PID-29") if filled[29] else None
        death_flag = pid["PID-30"] if filled[30] else ""
        multiple = pid["PID-24"] if filled[24] else ""
        birth_order = _int(pid["PID-25"], -1) if filled[25] else -1
        language = self.concept(pid, "PID-15", "urn:ietf:bcp:47") if filled[15] else None
        resources.append({
            "resourceType": "Patient",
            "id": patient_id,
            "extension": extensions,
            "identifier": identifiers,
            "active": active,
            "name": self.names(pid, "PID-5") + (self.names(pid, "PID-9") if filled[9] else []),
            "telecom": telecom,
            "gender": self.code(pid["PID-8.1"], "v2-0001-gender"),
            "birthDate": birth_date,
            "_birthDate": birth_time,
            "deceasedDateTime": death,
            "deceasedBoolean": None if death else True if death_flag == "Y" else False if death_flag == "N" else None,
            "address": self.addresses(pid, "PID-11"),
            "maritalStatus": self.concept(pid, "PID-16", "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus"),
            "multipleBirthInteger": birth_order if birth_order > 0 else None,
            "multipleBirthBoolean": None if birth_order > 0 else True if multiple == "Y"
            else False if multiple == "N" else None,
            "communication": [{"language": language}] if language else [],
            "generalPractitioner": gp,
            "contact": list(contacts or ()),
            "link": list(links or ()),
        })
        return {"resources": resources, "id": patient_id, "ref": {"reference": "Patient/" + patient_id}}

    # NK1

    def next_of_kin(self, nk1, patient_id) -> dict:
        """NK1[Patient] and NK1[RelatedPerson]: ``contact`` (a Patient.contact), ``resources`` [the
        RelatedPerson] and ``ref``, or [] and none: as the ADT_A01 message map says, no RelatedPerson
        when NK1-3 names an organisation (EMR, E, F, I, S) or NK1-2 has no name.
        Id: patient + NK1-1 set id + NK1-2 name."""
        nk1 = _segment(nk1, "next_of_kin")
        if nk1 is None:
            return {"contact": None, "resources": [], "ref": None}
        filled = self._filled(nk1, "NK1")  # most of the fields below are empty: no helper call for those
        names = self.names(nk1, "NK1-2") if filled[2] else []
        relationship = self._relationship(nk1, "NK1-3")
        role = self.concept(nk1, "NK1-7", _V2 + "0131") if filled[7] else None
        relationships = PrunedList([x for x in (relationship, role) if x])
        telecom = ((self.telecoms(nk1, "NK1-5") if filled[5] else [])
                   + [dict(t, use="work") for t in (self.telecoms(nk1, "NK1-6") if filled[6] else ())])
        other_telecom = self.telecoms(nk1, "NK1-40") if filled[40] else []
        period = {"start": self.datetime(nk1, "NK1-8") if filled[8] else None,
                  "end": self.datetime(nk1, "NK1-9") if filled[9] else None}
        organisation = nk1["NK1-13.1"] if filled[13] else ""
        gender = self.code(nk1["NK1-15.1"] if filled[15] else "", "v2-0001-gender")
        addresses = self.addresses(nk1, "NK1-4") if filled[4] else []
        contact = {
            "relationship": relationships,
            "name": names[0] if names else None,
            "telecom": telecom + other_telecom,
            "address": addresses[0] if addresses else None,
            "gender": gender,
            "organization": {"display": organisation} if organisation and organisation != NULL else None,
            "period": period,
        }
        if not names or nk1["NK1-3.1"] in _ORGANISATION_CONTACTS:
            return {"contact": contact, "resources": [], "ref": None}
        rpid = uuid5("RelatedPerson", patient_id, nk1["NK1-1"], nk1["NK1-2"])
        return {"contact": contact, "ref": {"reference": "RelatedPerson/" + rpid}, "resources": [{
            "resourceType": "RelatedPerson",
            "id": rpid,
            "patient": _ref("Patient", patient_id),
            "identifier": ((self.identifiers(nk1, "NK1-12") if filled[12] else [])
                           + (self.identifiers(nk1, "NK1-33") if filled[33] else [])),
            "relationship": relationships,
            "name": names + (self.names(nk1, "NK1-30") if filled[30] else []),
            "telecom": telecom + (self.telecoms(nk1, "NK1-31") if filled[31] else []) + other_telecom,
            "address": addresses + (self.addresses(nk1, "NK1-32") if filled[32] else []),
            "gender": gender,
            "birthDate": self.date(nk1, "NK1-16") if filled[16] else None,
            "period": period,
            "communication": [{"language": self.concept(nk1, "NK1-20", "urn:ietf:bcp:47")}]
            if filled[20] and nk1["NK1-20"] else [],
        }]}

    def _relationship(self, seg: TemplateSegment, f: str) -> dict | None:
        """A relationship CWE (v2-0063) with the coding table v2-0063-relationship gives its code first."""
        concept = self.concept(seg, f, _V2 + "0063")
        mapped = self.coding(seg[f + ".1"], "v2-0063-relationship")
        if not mapped:
            return concept
        return PrunedDict(concept or {}, coding=PrunedList([mapped] + ((concept or {}).get("coding") or [])))

    # PV1, PV2

    def encounter_id(self, pv1, patient_id) -> str | None:
        """The Encounter id of a PV1: PV1-19 value + its assigning authority; else the patient id +
        PV1-44; none without either (no stable key later messages about the visit would share)."""
        pv1 = _segment(pv1, "encounter_id")
        if pv1 is None:
            return None
        return self._encounter_id(pv1, self._visit(pv1), patient_id)

    def _visit(self, pv1: TemplateSegment) -> dict | None:
        """PV1-19 as an Identifier, read once per segment (for encounter_id, then encounter, which
        copies it)."""
        memo = pv1._memo
        if memo is not None and "visit" in memo:
            return memo["visit"]
        visit = self.identifier(pv1, "PV1-19")
        if memo is None:
            memo = pv1._memo = {}
        memo["visit"] = visit
        return visit

    @staticmethod
    def _encounter_id(pv1: TemplateSegment, visit: dict | None, patient_id) -> str | None:
        if visit and visit.get("value"):
            return uuid5("Encounter", visit.get("system"), visit.get("value"))
        admit = _text(pv1["PV1-44.1"])
        return uuid5("Encounter", patient_id, admit) if admit else None

    def encounter(self, pv1, pv2=None, patient_id=None, status=None, diagnoses=()) -> dict:
        """PV1[Encounter] + PV2[Encounter]: ``resources`` (the Practitioners of PV1-7/8/9/17 and PV2-13,
        the Locations, the Encounter), ``id``, ``ref``; none and [] when there is no id (see
        encounter_id). ``status``: the trigger event's, when it says more than PV1 does; else
        finished once PV1-45 (discharge) is valued, else by patient class (P planned, U or none
        unknown, others in-progress). Locations: PV1-3 active (planned for class P; completed
        once discharged, where the IG keeps active), PV1-6 completed, PV1-11 active, PV1-42
        reserved. Left out: PV1-37, PV1-40, PV1-52/53/54, PV2-12 and PV2-22."""
        pv1, pv2 = _segment(pv1, "encounter"), _segment(pv2, "encounter")
        if pv1 is None:
            return {"resources": [], "id": None, "ref": None}
        visit = self._visit(pv1)
        eid = self._encounter_id(pv1, visit, patient_id)
        if not eid:
            return {"resources": [], "id": None, "ref": None}
        filled = self._filled(pv1, "PV1")  # most of the fields below are empty: no helper call for those
        patient_class = pv1["PV1-2.1"].strip()
        discharged = self.datetime(pv1, "PV1-45") if filled[45] else None
        status = status or ("finished" if discharged else "planned" if patient_class == "P"
                            else "unknown" if patient_class in ("", "U", NULL) else "in-progress")
        resources, participants, locations = [], [], []
        roles = [(pv1, f"PV1-{n}", code, display) for n, code, display in _ENCOUNTER_PRACTITIONERS if filled[n]]
        if pv2 is not None:
            roles.append((pv2, "PV2-13", "REF", "referrer"))
        for seg, f, code, display in roles:
            made = self.practitioners(seg, f)
            resources += made["resources"]
            for ref in made["refs"]:
                participants.append({"type": PrunedList((_coded(PARTICIPATION, code, display),)), "individual": ref})
        first = "planned" if patient_class == "P" else "completed" if discharged else "active"
        for n, location_status in ((3, first), (6, "completed"), (11, "active"), (42, "reserved")):
            if not filled[n]:
                continue
            made = self.location(pv1, f"PV1-{n}")
            resources += made["resources"]
            if made["ref"]:
                locations.append({"location": made["ref"], "status": location_status})
        length = _float(pv2["PV2-11"], -1) if pv2 is not None else -1
        resources.append({
            "resourceType": "Encounter",
            "id": eid,
            "identifier": PrunedList((PrunedDict(visit, type=_VN),)) if visit
            else self.identifiers(pv1, "PV1-50") if filled[50] else [],
            "status": status,
            "class": self.coding(patient_class, "v2-0004-encounter-class") or _UNKNOWN_CLASS,
            "type": [c for c in (self.concept(pv1, "PV1-4", _V2 + "0007"),) if c] if filled[4] else [],
            "serviceType": self.concept(pv1, "PV1-10", _V2 + "0069") if filled[10] else None,
            "priority": self.concept(pv2, "PV2-25", _V2 + "0217") if pv2 is not None else None,
            "subject": _ref("Patient", patient_id),
            "participant": participants,
            "period": {"start": self.datetime(pv1, "PV1-44") if filled[44] else None, "end": discharged},
            "length": {"value": length, "unit": "days", "system": UCUM, "code": "d"} if length >= 0 else None,
            "reasonCode": [c for c in (self.concept(pv2, "PV2-3"),) if c] if pv2 is not None else [],
            "diagnosis": list(diagnoses or ()),
            "hospitalization": {
                "preAdmissionIdentifier": self.identifier(pv1, "PV1-5") if filled[5] else None,
                "admitSource": self.concept(pv1, "PV1-14", _V2 + "0023") if filled[14] else None,
                "reAdmission": self.concept(pv1, "PV1-13", _V2 + "0092") if filled[13] else None,
                "dietPreference": [c for c in (self.concept(pv1, "PV1-38", _V2 + "0114"),) if c] if filled[38] else [],
                "specialCourtesy": [c for c in (self.concept(pv1, "PV1-16", _V2 + "0099"),) if c] if filled[16] else [],
                "specialArrangement": [c for c in (self.concept(pv1, "PV1-15", _V2 + "0009"),) if c]
                if filled[15] else [],
                "dischargeDisposition": self.concept(pv1, "PV1-36", _V2 + "0112") if filled[36] else None,
            },
            "location": locations,
        })
        return {"resources": resources, "id": eid, "ref": {"reference": "Encounter/" + eid}}

    # AL1, IAM

    def allergy(self, seg, patient_id, notes=()) -> dict:
        """AL1[AllergyIntolerance] or IAM[AllergyIntolerance]: ``resources`` and ``ref``.
        Id: patient + the allergen code (field 3, or its text) + its coding system, the same for
        AL1 and IAM, so that an ADT's AL1 and a later A60 IAM update one resource. Both:
        category and type from the allergen type (field 2, table 0127); criticality from the
        severity (field 4, table 0128: SV high, MO/MI low, U unable-to-assess); a reaction only
        when field 5 names one (FHIR requires a manifestation), with the severity as its
        severity. AL1-6 is onsetDateTime. clinicalStatus active.
        IAM only: identifier IAM-7; IAM-27 (clinician identified code) adds its codings to
        code; onsetDateTime IAM-11, else onsetString IAM-12; recordedDate IAM-13; recorder
        IAM-14 (XPN): the Patient when IAM-15 is SEL, a RelatedPerson with IAM-15 as its
        relationship when IAM-15 names another, else a Practitioner keyed by the name (as an
        XCN without id is). IAM-17 (table 0438, which R4's required bindings do not take as
        is): C confirmed, U/P/S/D unconfirmed (verificationStatus), I clinicalStatus inactive,
        E entered-in-error. Departure: IAM-6 D (delete) is verificationStatus entered-in-error
        too, so a deleted allergy does not stay active; the IG leaves IAM-6 unmapped.
        ``notes``: Annotations (the NTE after the IAM)."""
        seg = _segment(seg, "allergy")
        if seg is None or seg.name not in ("AL1", "IAM"):
            raise HelperError("fhir.allergy reads an AL1 or IAM segment")
        f = seg.name
        iam = f == "IAM"
        code = self.concept(seg, f + "-3")
        key = seg[f + "-3.1"] or seg[f + "-3.2"] or seg[f + "-3"]
        if not (code and key):
            return {"resources": [], "ref": None}
        aid = uuid5("AllergyIntolerance", patient_id, key, seg[f + "-3.3"])
        kind = seg[f + "-2.1"].strip().upper()
        severity = seg[f + "-4.1"].strip().upper()
        codings = code.get("coding") or []
        reactions = []
        for path in _repetitions(seg, f + "-5"):
            text = seg[path]
            if text and text != NULL:
                reactions.append({"manifestation": [{"text": text}], "severity": _SEVERITY.get(severity)})
        resources = []
        clinical, verification, onset_text, identifier, recorder = "active", None, None, None, None
        patient_ref = _ref("Patient", patient_id)
        if iam:
            identifier = self.ei(seg, "IAM-7")
            for c in (self.concept(seg, "IAM-27") or {}).get("coding") or []:
                if c not in codings:
                    codings = codings + [c]
            status = seg["IAM-17.1"].strip().upper()
            verification = ("entered-in-error" if status == "E" or seg["IAM-6.1"].strip().upper() == "D"
                            else _VERIFICATION.get(status))
            clinical = None if verification == "entered-in-error" else "inactive" if status == "I" else "active"
            onset_text = seg["IAM-12"] if not self.datetime(seg, "IAM-11") and seg["IAM-12"] != NULL else None
            names = self.names(seg, "IAM-14")
            relation = seg["IAM-15.1"].strip().upper()
            if names and relation == "SEL":
                recorder = patient_ref
            elif names and relation and relation != NULL:
                rpid = uuid5("RelatedPerson", patient_id, "reported-by", seg["IAM-14"])
                resources.append({"resourceType": "RelatedPerson", "id": rpid, "patient": patient_ref,
                                  "relationship": [r for r in (self._relationship(seg, "IAM-15"),) if r],
                                  "name": names})
                recorder = {"reference": "RelatedPerson/" + rpid}
            elif names:
                prid = uuid5("Practitioner", "name", seg["IAM-14.1.1"].strip(), seg["IAM-14.2"].strip(),
                             seg["IAM-14.3"].strip())
                resources.append({"resourceType": "Practitioner", "id": prid, "name": names})
                recorder = {"reference": "Practitioner/" + prid}
        category = _ALLERGY_CATEGORY.get(kind)
        resources.append({
            "resourceType": "AllergyIntolerance",
            "id": aid,
            "identifier": [identifier] if identifier else [],
            "clinicalStatus": _coded("http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", clinical)
            if clinical else None,
            "verificationStatus": _coded("http://terminology.hl7.org/CodeSystem/allergyintolerance-verification",
                                         verification) if verification else None,
            "type": "intolerance" if kind == "MC" else "allergy" if kind else None,
            "category": [category] if category else [],
            "criticality": _CRITICALITY.get(severity),
            "code": PrunedDict(code, coding=PrunedList(codings)) if codings else dict(code, coding=codings),
            "patient": patient_ref,
            "onsetDateTime": self.datetime(seg, "IAM-11" if iam else "AL1-6"),
            "onsetString": onset_text,
            "recordedDate": self.datetime(seg, "IAM-13") if iam else None,
            "recorder": recorder,
            "reaction": reactions,
            "note": list(notes or ()),
        })
        return {"resources": resources, "ref": {"reference": "AllergyIntolerance/" + aid}}

    # DG1

    def condition(self, dg1, patient_id, encounter_id=None) -> dict:
        """DG1[Condition]: ``resources`` (the DG1-16 Practitioner, the Condition), ``ref`` and
        ``diagnosis`` (an Encounter.diagnosis for it, DG1[Encounter]: use from DG1-6, rank DG1-15).
        Id: patient + DG1-3 code + its coding system (or DG1-4 text). Category
        encounter-diagnosis; verificationStatus entered-in-error when DG1-21 is D."""
        dg1 = _segment(dg1, "condition")
        if dg1 is None:
            return {"resources": [], "ref": None, "diagnosis": None}
        filled = self._filled(dg1, "DG1")  # most of the fields below are empty: no helper call for those
        code = self.concept(dg1, "DG1-3") if filled[3] else None
        text = dg1["DG1-4"] if filled[4] else ""
        text = "" if text == NULL else text
        code_value = dg1["DG1-3.1"] if filled[3] else ""
        key = code_value or text
        if not key:
            return {"resources": [], "ref": None, "diagnosis": None}
        cid = uuid5("Condition", patient_id, key, dg1["DG1-3.3"] if code_value else "text")
        asserter = self.practitioner(dg1, "DG1-16") if filled[16] else {"resources": [], "ref": None}
        ref = {"reference": "Condition/" + cid}
        role = _DIAGNOSIS_ROLE.get(dg1["DG1-6.1"].strip().upper()) if filled[6] else None
        rank = _int(dg1["DG1-15"], 0) if filled[15] else 0
        return {"ref": ref, "resources": asserter["resources"] + [{
            "resourceType": "Condition",
            "id": cid,
            "identifier": [i for i in (self.identifier(dg1, "DG1-20"),) if i] if filled[20] else [],
            "verificationStatus": _coded("http://terminology.hl7.org/CodeSystem/condition-ver-status", "entered-in-error")
            if filled[21] and dg1["DG1-21"] == "D" else None,
            "category": _CONDITION_CATEGORY,
            "code": _with_text(code, text),
            "subject": _ref("Patient", patient_id),
            "encounter": _ref("Encounter", encounter_id),
            "onsetDateTime": self.datetime(dg1, "DG1-5") if filled[5] else None,
            "recordedDate": self.datetime(dg1, "DG1-19") if filled[19] else None,
            "asserter": asserter["ref"],
        }], "diagnosis": {
            "condition": ref,
            "use": _coded("http://terminology.hl7.org/CodeSystem/diagnosis-role", role) if role else None,
            "rank": rank if rank > 0 else None}}

    # OBX

    def observation(self, obx, obsid, ctx=None) -> dict:
        """OBX[Observation] (with NTE[Observation] notes given): ``resources`` (the OBX-16 Practitioners,
        the OBX-23 Organization, the Observation with id ``obsid``) and ``ref``.
        ``ctx`` (a dict): subject, encounter, basedOn, partOf, specimen, focus (references),
        effective (when OBX-14 is empty, e.g. OBR-7), status (when OBX-11 is empty or unmapped),
        notes (Annotations), category. Status: OBX-11 (its code) via v2-0085, else ctx status,
        else unknown. The value by OBX-2 (see ``_obx_value``); a repeating OBX-5 of a coded or
        numeric type becomes one component per repetition (OBX[Observation-Component]),
        repetitions of a text type are joined by line breaks. No value and OBX-11 N:
        dataAbsentReason not-asked (IG). Interpretation: OBX-8 via v2-0078-interpretation,
        else the v2-0078 code as is."""
        obx = _segment(obx, "observation")
        if obx is None or obx.name != "OBX":
            raise HelperError("fhir.observation reads an OBX segment")
        ctx = ctx or {}
        if not isinstance(ctx, dict):
            raise HelperError("fhir.observation: the context is a dict (subject, encounter, notes...)")
        rep, esc = _encoding_characters(obx)
        vtype = obx["OBX-2.1"].strip().upper()
        reps = _count(obx, "OBX-5", rep)
        code = self.concept(obx, "OBX-3") or {"text": obx["OBX-3"] or "unknown"}
        components = []
        if reps > 1 and vtype in _TEXT_TYPES:
            lines = []
            for r in range(1, reps + 1):
                v = obx[f"OBX-5[{r}]"]
                lines.append("" if v == NULL else v)
            joined = "\n".join(lines)
            value = {"valueString": _ft_text(joined, esc) if vtype == "FT" else joined}
        elif reps > 1:
            for r in range(1, reps + 1):
                made = self._obx_value(obx, f"OBX-5[{r}]", vtype, esc, component=True)
                if made:
                    components.append(dict({"code": code}, **made))
            value = {}
        else:
            value = self._obx_value(obx, "OBX-5", vtype, esc)
        interpretation = []
        for r in range(1, _count(obx, "OBX-8", rep) + 1):
            flag = obx[f"OBX-8[{r}].1"].strip()
            mapped = self.code(flag, "v2-0078-interpretation")
            if mapped:
                interpretation.append(_coded(_INTERPRETATION, mapped))
            elif flag and flag != NULL:
                interpretation.append(_coded(_V2 + "0078", flag))
        made = self.practitioners(obx, "OBX-16")
        resources, performers = made["resources"], made["refs"]
        made = self.organization(obx, "OBX-23")
        resources += made["resources"]
        if made["ref"]:
            performers.append(made["ref"])
        result_status = obx["OBX-11.1"].strip().upper()
        status = self.code(result_status, "v2-0085-observation-status") or ctx.get("status") or "unknown"
        reference_range = self.reference_range(obx, "OBX-7", "OBX-6")
        identifier = self.ei(obx, "OBX-21", "FILL") if obx["OBX-21"] else None
        resources.append(dict({
            "resourceType": "Observation",
            "id": obsid,
            "identifier": [identifier] if identifier else [],
            "basedOn": ctx.get("basedOn") or [],
            "partOf": ctx.get("partOf") or [],
            "status": status,
            "category": ctx.get("category") or [],
            "code": code,
            "subject": ctx.get("subject"),
            "focus": ctx.get("focus") or [],
            "encounter": ctx.get("encounter"),
            "effectiveDateTime": self.datetime(obx, "OBX-14") or ctx.get("effective"),
            "performer": performers,
            "dataAbsentReason": _NOT_ASKED if not value and not components and result_status == "N" else None,
            "interpretation": interpretation,
            "note": ctx.get("notes") or [],
            "bodySite": self.concept(obx, "OBX-20"),
            "method": self.concept(obx, "OBX-17"),
            "specimen": ctx.get("specimen"),
            "referenceRange": [reference_range] if reference_range else [],
            "component": components,
        }, **value))
        return {"resources": resources, "ref": _ref("Observation", obsid)}

    def _obx_value(self, obx: TemplateSegment, f: str, vtype: str, esc: str, component: bool = False) -> dict:
        """The value[x] of one OBX-5 repetition at ``f`` by the value type OBX-2 (OBX[Observation]):
        NM valueQuantity with OBX-6 units (valueString if not a number); SN by SN.3 (``sn``:
        valueRatio, valueRange, valueString, else valueQuantity); ST TX valueString; FT valueString
        with its formatting commands as line breaks; CE CWE CNE CF IS ID CX valueCodeableConcept;
        DT DTM TS valueDateTime; TM valueTime; NR valueRange; DR valuePeriod; ED with Base64 data
        and RP: the IG's R5 cross-version extension valueAttachment (R4 Observation has none; for a
        component extension-Observation.component.valueAttachment): ED's data with the MIME
        type of ED.3 (table 0291), RP[Attachment]'s url RP.1 (escapes decoded, spaces as %20) with
        the MIME type of RP.4 when it names one (the IG writes RP.3/RP.4, e.g. IM/MRXS, which is
        no MIME type: left out); VR valueString low-high (IG); any other type valueString of its
        components decoded and joined by spaces, never the encoded v2 text. {} when empty."""
        raw = obx[f]
        if raw == "" or raw == NULL:
            return {}
        if vtype == "NM":
            q = self.quantity(raw, obx, "OBX-6")
            return {"valueQuantity": q} if q else {"valueString": self.text(obx, f)}
        if vtype == "SN":
            sn = self.sn(obx, f, "OBX-6")
            return {"value" + sn["kind"]: sn["value"]} if sn else {"valueString": self.text(obx, f)}
        if vtype in ("ST", "TX"):
            return {"valueString": str(raw)}
        if vtype == "FT":
            return {"valueString": _ft_text(str(raw), esc)}
        if vtype in _CODED_TYPES:
            return {"valueCodeableConcept": self.concept(obx, f)}
        if vtype in _DATETIME_TYPES:
            return {"valueDateTime": self.datetime(obx, f + ".1")}
        if vtype == "TM":
            return self._obx_time(obx, f)
        if vtype == "NR":
            low = self.quantity(obx[f + ".1"], obx, "OBX-6")
            high = self.quantity(obx[f + ".2"], obx, "OBX-6")
            return {"valueRange": {"low": low, "high": high}} if low or high else {"valueString": self.text(obx, f)}
        url = _ATTACHMENT.format("component." if component else "")
        if vtype == "ED":
            data = obx[f + ".5"].strip()
            if (len(data) % 4 != 0 or obx[f + ".4"].strip().lower() != "base64"
                    or any(c in data for c in _NOT_BASE64) or not data):
                return {}
            mime = _MIME.get(obx[f + ".3"].strip().lower()) or "application/octet-stream"
            return {"extension": [{"url": url, "valueAttachment": {"contentType": mime, "data": data}}]}
        if vtype == "RP":
            location = self.text(obx, f + ".1", "&")
            if not location:
                return {"valueString": self.text(obx, f)}
            mime = _MIME.get((self.text(obx, f + ".4") or "").lower())
            return {"extension": [{"url": url, "valueAttachment": {"contentType": mime,
                                                                   "url": location.replace(" ", "%20")}}]}
        if vtype == "DR":
            return {"valuePeriod": {"start": self.datetime(obx, f + ".1.1"), "end": self.datetime(obx, f + ".2.1")}}
        if vtype == "VR":
            return {"valueString": self.text(obx, f, "-")}
        return {"valueString": self.text(obx, f)}

    def _obx_time(self, obx: TemplateSegment, f: str) -> dict:
        """A TM value as valueTime (hh:mm:ss with its fraction; the offset dropped), else as valueString."""
        t = obx[f + ".1"].strip().split("+")[0].split("-")[0]
        hh, mm, ss = t[0:2], t[2:4] or "00", t[4:6] or "00"
        frac = t[6:] if t[6:7] == "." and _int(t[7:], -1) >= 0 else ""
        digits = hh + mm + ss
        if (len(t) >= 2 and len(digits) == 6 and _int(digits, -1) >= 0 and _int(hh, 0) < 24 and _int(mm, 0) < 60
                and _int(ss, 0) < 60):
            return {"valueTime": f"{hh}:{mm}:{ss}{frac}"}
        return {"valueString": self.text(obx, f)}

    # ORC, OBR, SPM

    def order_numbers(self, orc=None, obr=None) -> dict:
        """An order's numbers: ``placer`` (ORC-2, else OBR-2) and ``filler`` (ORC-3, else OBR-3) as
        Identifiers typed PLAC and FILL, and ``key``, its business key: the placer number, else
        the filler one, as value|system ('' without either)."""
        orc, obr = _segment(orc, "order_numbers"), _segment(obr, "order_numbers")
        placer = self.ei(orc, "ORC-2", "PLAC") if orc is not None else None
        if not placer and obr is not None:
            placer = self.ei(obr, "OBR-2", "PLAC")
        filler = self.ei(orc, "ORC-3", "FILL") if orc is not None else None
        if not filler and obr is not None:
            filler = self.ei(obr, "OBR-3", "FILL")
        k = placer or filler
        return {"placer": placer, "filler": filler, "key": f"{k['value']}|{k['system'] or ''}" if k else ""}

    def service_request(self, orc, obr, patient_id=None, extra=None) -> dict:
        """ORC[ServiceRequest] + OBR[ServiceRequest] (either may be none): ``resources`` (the requester's
        Practitioner, ORC-12 else OBR-16, then the ServiceRequest), ``id`` and ``ref``, none and []
        when there is neither an order number nor an OBR-4 code to key it; and the
        ``order_numbers``. Id: the order key (placer number, else filler number, with its
        system) and the OBR-4 code (code, else text, and its coding system): one ServiceRequest
        per OBR, as the IG makes them, even when several OBRs share one order number; an ORC
        without OBR (or an OBR without OBR-4) by the order key alone; without any order number,
        patient + OBR-4 + OBR-7 (else ORC-9) (departure: the IG keys on the order numbers).
        status: ORC-5 (table 0038), else ORC-1 via v2-0119-order-control, else unknown. intent:
        order (reflex-order when OBR-11 is G). authoredOn: ORC-9 when ORC-1 is NW (IG).
        occurrence: OBR-6, else OBR-27.4, else ORC-7.4; priority: OBR-27.6, else OBR-5, else
        ORC-7.6. reasonCode: each OBR-31. ``extra``: more elements (subject, encounter, note,
        supportingInfo, reasonReference, specimen, insurance...), which win over these."""
        orc, obr = _segment(orc, "service_request"), _segment(obr, "service_request")
        if extra is not None and not isinstance(extra, dict):
            raise HelperError("fhir.service_request: extra is a dict of more elements (note, subject...)")
        numbers = self.order_numbers(orc, obr)
        order_key = numbers["key"]
        code = self.concept(obr, "OBR-4") if obr is not None else None
        code_key = (obr["OBR-4.1"] or obr["OBR-4.2"]) if obr is not None else ""
        if order_key and code_key:
            srid = uuid5("ServiceRequest", order_key, code_key, obr["OBR-4.3"])
        elif order_key:
            srid = uuid5("ServiceRequest", order_key)
        elif code:
            srid = uuid5("ServiceRequest", patient_id, obr["OBR-4.1"] or obr["OBR-4.2"],
                         obr["OBR-7.1"] or (orc["ORC-9.1"] if orc is not None else ""))
        else:
            return {"resources": [], "id": None, "ref": None, "order_numbers": numbers}
        control = orc["ORC-1"].strip() if orc is not None else ""
        order_status = orc["ORC-5.1"].strip() if orc is not None else ""
        status = _ORDER_STATUS.get(order_status) or self.code(control, "v2-0119-order-control") or "unknown"
        resources, requester, reasons, occurrence, priority = [], None, [], None, ""
        if orc is not None:
            made = self.practitioner(orc, "ORC-12")
            resources += made["resources"]
            requester = made["ref"]
        if not requester and obr is not None:
            made = self.practitioner(obr, "OBR-16")
            resources += made["resources"]
            requester = made["ref"]
        if obr is not None:
            rep, _ = _encoding_characters(obr)
            for r in range(1, _count(obr, "OBR-31", rep) + 1):
                reason = self.concept(obr, f"OBR-31[{r}]")
                if reason:
                    reasons.append(reason)
            occurrence = self.datetime(obr, "OBR-6") or self.datetime(obr, "OBR-27.4")
            priority = obr["OBR-27.6"] or obr["OBR-5"]
        if orc is not None:
            occurrence = occurrence or self.datetime(orc, "ORC-7.4")
            priority = priority or orc["ORC-7.6"]
        resources.append(dict({
            "resourceType": "ServiceRequest",
            "id": srid,
            "identifier": [i for i in (numbers["placer"], numbers["filler"]) if i],
            "requisition": self.ei(orc, "ORC-4", "PGN") if orc is not None else None,
            "status": status,
            "intent": "reflex-order" if obr is not None and obr["OBR-11"] == "G" else "order",
            "priority": _PRIORITY.get(priority.strip().upper()),
            "code": code,
            "occurrenceDateTime": occurrence,
            "authoredOn": self.datetime(orc, "ORC-9") if orc is not None and control == "NW" else None,
            "requester": requester,
            "reasonCode": reasons,
        }, **(extra or {})))
        return {"resources": resources, "id": srid, "ref": _ref("ServiceRequest", srid), "order_numbers": numbers}

    def specimen(self, spm, patient_id=None, fallback_key="", subject=None) -> dict:
        """SPM[Specimen]: ``resources`` [the Specimen], ``id`` and ``ref``. Id: SPM-2's filler number
        (else its placer number) with its system; without either, patient + ``fallback_key`` +
        SPM-1 (departure: the IG keys on SPM-2). ``subject``: a Reference (the patient)."""
        spm = _segment(spm, "specimen")
        if spm is None or spm.name != "SPM":
            raise HelperError("fhir.specimen reads an SPM segment")
        filler = self.ei(spm, "SPM-2.2", "FILL")
        placer = self.ei(spm, "SPM-2.1", "PLAC")
        k = filler or placer
        spid = uuid5("Specimen", k["value"], k["system"]) if k else uuid5("Specimen", patient_id, fallback_key,
                                                                            spm["SPM-1"])
        collected_end = self.datetime(spm, "SPM-17.2")
        description = spm["SPM-14"]
        return {"id": spid, "ref": _ref("Specimen", spid), "resources": [{
            "resourceType": "Specimen",
            "id": spid,
            "identifier": [i for i in (placer, filler, self.identifier(spm, "SPM-31")) if i],
            "accessionIdentifier": self.identifier(spm, "SPM-30"),
            "type": self.concept(spm, "SPM-4", _V2 + "0487"),
            "subject": subject,
            "receivedTime": self.datetime(spm, "SPM-18"),
            "collection": {
                "collectedDateTime": None if collected_end else self.datetime(spm, "SPM-17.1"),
                "collectedPeriod": {"start": self.datetime(spm, "SPM-17.1"), "end": collected_end}
                if collected_end else None,
                "quantity": self.quantity(spm["SPM-12.1"], spm, "SPM-12.2"),
                "method": self.concept(spm, "SPM-7", _V2 + "0488"),
                "bodySite": self.concept(spm, "SPM-8"),
            },
            "container": [{"type": self.concept(spm, "SPM-27"),
                           "additiveCodeableConcept": self.concept(spm, "SPM-6", _V2 + "0371")}],
            "condition": [c for c in (self.concept(spm, "SPM-24", _V2 + "0493"),) if c],
            "note": [{"text": description}] if description and description != NULL else [],
        }]}

    # RXA, RXR

    def immunization(self, rxa, rxr=None, orc=None, patient_id=None, extra=None) -> dict:
        """RXA[Immunization] + RXR[Immunization] + ORC[Immunization]: ``resources`` (the RXA-10 and ORC-12
        Practitioners, the RXA-17 manufacturer's Organization, the Immunization), ``id`` and ``ref``.
        Id: patient + RXA-5 (code, else text, and its coding system) + RXA-3, so that a resent or
        updated record is the same resource. status: entered-in-error when RXA-21 is D, else RXA-20
        via v2-0322-completion-status, else completed (IG); statusReason RXA-18 when not-done.
        primarySource from RXA-9 (NIP001): 00 true, 01-08 false with RXA-9 as reportOrigin.
        recorded: RXA-22 when RXA-21 is A (IG), else ORC-9. doseQuantity: RXA-6 with RXA-7 units,
        none for 999 (amount unknown). manufacturer: an Organization keyed by its MVX code
        (RXA-17.1), else its name. performer: RXA-10 (function AP), ORC-12 (function OP; the IG
        makes a PractitionerRole). identifier: the ORC's order numbers. ``extra``: more elements
        (patient, encounter, fundingSource, programEligibility...), which win over these."""
        rxa = _segment(rxa, "immunization")
        rxr, orc = _segment(rxr, "immunization"), _segment(orc, "immunization")
        if rxa is None or rxa.name != "RXA":
            raise HelperError("fhir.immunization reads an RXA segment")
        if extra is not None and not isinstance(extra, dict):
            raise HelperError("fhir.immunization: extra is a dict of more elements (patient, encounter...)")
        imid = uuid5("Immunization", patient_id, rxa["RXA-5.1"] or rxa["RXA-5.2"], rxa["RXA-5.3"], rxa["RXA-3.1"])
        resources, performers, identifiers = [], [], []
        for seg, f, code, display in ((rxa, "RXA-10", "AP", "Administering Provider"),
                                      (orc, "ORC-12", "OP", "Ordering Provider")):
            if seg is None:
                continue
            made = self.practitioners(seg, f)
            resources += made["resources"]
            for ref in made["refs"]:
                performers.append({"actor": ref, "function": _coded(_PERFORMER_FUNCTION, code, display)})
        if orc is not None:
            numbers = self.order_numbers(orc, None)
            identifiers = [i for i in (numbers["placer"], numbers["filler"]) if i]
        mvx, maker = rxa["RXA-17.1"].strip(), rxa["RXA-17.2"].strip()
        manufacturer = None
        if (mvx or maker) and mvx != NULL:
            orgid = uuid5("Organization", _MVX, mvx) if mvx else uuid5("Organization", "name", maker)
            resources.append({"resourceType": "Organization", "id": orgid, "name": maker or mvx,
                              "identifier": [{"system": _MVX, "value": mvx}] if mvx else []})
            manufacturer = {"reference": "Organization/" + orgid, "display": maker or None}
        action = rxa["RXA-21"].strip().upper()
        completion = rxa["RXA-20"].strip().upper()
        status = "entered-in-error" if action == "D" else self.code(completion, "v2-0322-completion-status") or "completed"
        source = rxa["RXA-9.1"].strip()
        amount = rxa["RXA-6"].strip()
        lot = rxa["RXA-15[1]"]
        resources.append(dict({
            "resourceType": "Immunization",
            "id": imid,
            "identifier": identifiers,
            "status": status,
            "statusReason": self.concept(rxa, "RXA-18") if status == "not-done" else None,
            "vaccineCode": self.concept(rxa, "RXA-5") or {"text": "unknown"},
            "occurrenceDateTime": self.datetime(rxa, "RXA-3") or self.datetime(rxa, "RXA-4"),
            "recorded": ((self.datetime(rxa, "RXA-22") if action == "A" else None)
                         or (self.datetime(orc, "ORC-9") if orc is not None else None)),
            "primarySource": True if source == "00" else False if source in _HISTORICAL else None,
            "reportOrigin": self.concept(rxa, "RXA-9") if source and source != "00" else None,
            "manufacturer": manufacturer,
            "lotNumber": lot if lot and lot != NULL else None,
            "expirationDate": self.date(rxa, "RXA-16"),
            "site": self.concept(rxr, "RXR-2", _V2 + "0163") if rxr is not None else None,
            "route": self.concept(rxr, "RXR-1", _V2 + "0162") if rxr is not None else None,
            "doseQuantity": self.quantity(amount, rxa, "RXA-7") if amount != "999" else None,
            "performer": performers,
            "reasonCode": self.concepts(rxa, "RXA-19"),
        }, **(extra or {})))
        return {"resources": resources, "id": imid, "ref": _ref("Immunization", imid)}

    # PR1, IN1

    def procedure(self, pr1, patient_id=None, extra=None) -> dict:
        """PR1[Procedure]: ``resources`` (the PR1-8, PR1-11 and PR1-12 Practitioners, the Procedure) and
        ``ref``; [] and none without a PR1-3 code or PR1-4 text. Id: patient + PR1-3 code (else the
        text) + its coding system + PR1-5 time. status unknown (the IG leaves it to the message:
        a PR1 does not say whether it was done). performer: PR1-8 anesthesiologist, PR1-11 surgeon
        (SNOMED CT functions), PR1-12 without function. ``extra``: more elements (subject,
        encounter...), which win over these."""
        pr1 = _segment(pr1, "procedure")
        if pr1 is None or pr1.name != "PR1":
            raise HelperError("fhir.procedure reads a PR1 segment")
        if extra is not None and not isinstance(extra, dict):
            raise HelperError("fhir.procedure: extra is a dict of more elements (subject, encounter...)")
        code = self.concept(pr1, "PR1-3")
        text = pr1["PR1-4"]
        text = "" if text == NULL else text
        key = pr1["PR1-3.1"] or text
        if not key:
            return {"resources": [], "ref": None}
        prid = uuid5("Procedure", patient_id, key, pr1["PR1-3.3"], pr1["PR1-5.1"])
        resources, performers = [], []
        for f, function, display in _PROCEDURE_PERFORMERS:
            made = self.practitioners(pr1, f)
            resources += made["resources"]
            for ref in made["refs"]:
                performers.append({"actor": ref, "function": _coded("http://snomed.info/sct", function, display)
                                   if function else None})
        resources.append(dict({
            "resourceType": "Procedure",
            "id": prid,
            "identifier": [i for i in (self.identifier(pr1, "PR1-19"),) if i],
            "status": "unknown",
            "code": _with_text(code, text),
            "category": self.concept(pr1, "PR1-6"),
            "performedDateTime": self.datetime(pr1, "PR1-5"),
            "performer": performers,
            "reasonCode": [c for c in (self.concept(pr1, "PR1-15"),) if c],
        }, **(extra or {})))
        return {"resources": resources, "ref": _ref("Procedure", prid)}

    def coverage(self, in1, patient_id=None, patient_ref=None) -> dict:
        """IN1[Coverage]: ``resources`` (the payor's Organization, the subscriber's RelatedPerson, the
        Coverage) and ``ref``. Id: patient + IN1-2 plan + IN1-3 company id + IN1-36 policy. status
        active (IN1 has none; FHIR requires one). payor: the Organization of IN1-3/IN1-4 (id
        IN1-3, name IN1-4, address IN1-5, phone IN1-7); without either, a display. subscriber: the
        Patient (``patient_ref``) when IN1-17 is SEL, else a RelatedPerson from IN1-16. subscriberId
        IN1-49, else IN1-36 (R4 has a string; the IG's IN1-49 extension is R5). class: group IN1-8
        (IN1-9 name) and plan IN1-2."""
        in1 = _segment(in1, "coverage")
        if in1 is None or in1.name != "IN1":
            raise HelperError("fhir.coverage reads an IN1 segment")
        plan = in1["IN1-2.1"]
        company = self.identifier(in1, "IN1-3")
        company_name = in1["IN1-4.1"]
        company_name = "" if company_name == NULL else company_name
        policy = in1["IN1-36"]
        policy = "" if policy == NULL else policy
        member = in1["IN1-49.1"]
        member = "" if member == NULL else member
        company_system, company_value = (company or {}).get("system"), (company or {}).get("value")
        cvid = uuid5("Coverage", patient_id, in1["IN1-2.1"], in1["IN1-2.3"], company_system, company_value, policy)
        resources = []
        if company or company_name:
            orgid = (uuid5("Organization", company_system, company_value) if company
                     else uuid5("Organization", "name", company_name))
            resources.append({"resourceType": "Organization", "id": orgid, "identifier": [company] if company else [],
                              "name": company_name, "address": self.addresses(in1, "IN1-5"),
                              "telecom": self.telecoms(in1, "IN1-7")})
            payor = {"reference": "Organization/" + orgid, "display": company_name or None}
        else:
            payor = {"display": in1["IN1-2.2"] or plan or "unknown payor"}
        relation = in1["IN1-17.1"].strip().upper()
        relationship = _SUBSCRIBER_RELATIONSHIP.get(relation)
        insured = self.names(in1, "IN1-16") or []
        if relation == "SEL":
            subscriber = patient_ref
        elif insured:
            rpid = uuid5("RelatedPerson", patient_id, "insured", in1["IN1-16"])
            resources.append({
                "resourceType": "RelatedPerson",
                "id": rpid,
                "patient": patient_ref,
                "relationship": [c for c in (self.concept(in1, "IN1-17", _V2 + "0063"),) if c],
                "name": insured,
                "birthDate": self.date(in1, "IN1-18"),
                "address": self.addresses(in1, "IN1-19"),
                "gender": self.code(in1["IN1-43.1"], "v2-0001-gender"),
            })
            subscriber = {"reference": "RelatedPerson/" + rpid}
        else:
            subscriber = None
        group, group_name = in1["IN1-8"], in1["IN1-9.1"]
        plan_concept = self.concept(in1, "IN1-2")
        classes = []
        if group and group != NULL:
            classes.append({"type": _coded(_COVERAGE_CLASS, "group"),
                            "value": group, "name": group_name or None})
        if plan and plan != NULL:
            classes.append({"type": _coded(_COVERAGE_CLASS, "plan"),
                            "value": plan, "name": (plan_concept or {}).get("text") or in1["IN1-2.2"] or None})
        resources.append({
            "resourceType": "Coverage",
            "id": cvid,
            "identifier": [{"value": policy, "type": _coded(V2_0203, "SN")}]
            if policy else [],
            "status": "active",
            "type": self.concept(in1, "IN1-15", _V2 + "0086"),
            "subscriber": subscriber,
            "subscriberId": member or policy or None,
            "beneficiary": patient_ref,
            "relationship": _coded("http://terminology.hl7.org/CodeSystem/subscriber-relationship", relationship)
            if relationship else self.concept(in1, "IN1-17", _V2 + "0063"),
            "period": {"start": self.datetime(in1, "IN1-12"), "end": self.datetime(in1, "IN1-13")},
            "payor": [payor],
            "class": classes,
        })
        return {"resources": resources, "ref": _ref("Coverage", cvid)}
