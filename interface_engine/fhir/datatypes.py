"""The ``fhir`` template namespace: HL7 v2 datatypes as FHIR R4 datatypes, plain dicts ready for ``| tojson``.

FHIR templates would otherwise repeat the same dozen lines for every name,
address or coded value, each a chance to emit invalid FHIR. These helpers
follow the datatype and vocabulary maps of the HL7 Version 2 to FHIR IG
(v1.0.0); where they depart from it, the entry says so.

Calling them
------------
``fhir.<name>(src, path, ...)``: ``src`` is ``msg`` (the path names a segment,
``'PID-5'``, ``'OBX[2]-5'``) or a segment from ``msg.segment(...)`` /
``msg.segments(...)`` (the path may leave the segment out: ``'5'``). A bare
field path (``'PID-3'``) reads every repetition, ``'PID-3[2]'`` one; a
component path (``'PID-3.4'``) reads its sub-components as the datatype's
parts (a CWE or HD inside a composite). ``src`` none (an absent segment) reads
as empty.

Results are dicts, lists and strings; an empty source gives ``None`` or
``[]``, never ``''`` or an empty dict (FHIR allows no empty values). Bad data
(a malformed date, a missing component, a number that is not one, an unknown
code) never raises: the element is left out. Only a template mistake raises
(TemplateError): a malformed path, a ``src`` that is not ``msg`` or a segment,
an unknown table. Every value is decoded (escapes resolved), trimmed, and the
v2 null ``""`` counts as empty.

Code tables live in ``<mappings>/tables/`` (see templating.py ``lookup``);
the v2-to-FHIR vocabulary maps are tables too, so a site can change them
without code (the IG asks that vocabulary mapping be configuration). A table
``v2-NNNN-*.csv`` has ``code`` (the v2 code), ``display`` (the FHIR code)
and, where the target is a Coding, ``system`` and ``name`` (its display).
A v2 code a table lacks gives no FHIR code: the IG leaves it unmatched.

Shipped in mappings/tables/: the IG's maps ``v2-0001-gender``,
``v2-0004-encounter-class`` (PV1-2 to Encounter.class: v3 ActCode, or the
v2-0004 code where ActCode has none), ``v2-0063-relationship`` (v3 RoleCode,
v2-0063 or v2-0131 as the IG splits it), ``v2-0078-interpretation``,
``v2-0085-observation-status``, ``v2-0119-order-control`` (ORC-1 to
ServiceRequest.status), ``v2-0123-report-status``, ``v2-0190-address-use``,
``v2-0190-address-type``, ``v2-0200-name-use``, ``v2-0201-telecom-use``,
``v2-0202-telecom-system``, ``v2-0278-appointment-status``,
``v2-0322-completion-status``; ``v2-0271-document-status`` (TXA-17 to
DocumentReference.docStatus) is this engine's, the IG has no map for it.
``coding-systems`` holds the usual table 0396 names (LN, SCT, I10 for WHO
ICD-10 and I10C for ICD-10-CM as table 0396 defines them, I9C, UCUM, CVX,
NDC, RXNORM, C4/CPT...); ``identifier-systems`` is the site's own list of
assigning authorities, shipped with synthetic examples (OIDs under 2.999,
the arc kept for examples) and the US SSN and NPI systems; ``ucum-units``
the lab units senders write without a coding system.

Functions
---------
- ``fhir.id('Patient', msg['PID-3.4.1'], msg['PID-3.1'])``: a FHIR id, the
  ``uuid5`` helper's (same parts, same id, forever; none counts as '').
- ``fhir.identifiers(msg, 'PID-3', type=none)`` / ``fhir.identifier(...)``
  (first or none): CX to Identifier. ``value`` CX.1 (a repetition without
  it is left out); ``system`` from the assigning authority CX.4: its namespace
  id CX.4.1 in table ``identifier-systems`` (``code,system``), else CX.4.2 by
  CX.4.3 (ISO ``urn:oid:``, UUID ``urn:uuid:``, URI/URL as is), else
  ``urn:id:<CX.4.1>`` (percent-encoded), else none; ``type`` CX.5 (or
  ``type=`` when CX.5 is empty) in v2-0203; ``period`` CX.7/CX.8. Departs:
  CX.4 always gives ``system``, never ``assigner``; no check-digit extensions.
- ``fhir.names(msg, 'PID-5')``: XPN to HumanName. ``family`` XPN.1 (FN.1),
  ``given`` [XPN.2, XPN.3] (XPN.3 kept whole: "Mary Anne" is one item),
  ``prefix`` XPN.5, ``suffix`` [XPN.4, XPN.6, XPN.14], ``use`` XPN.7 by
  ``v2-0200-name-use``, ``period`` XPN.12/XPN.13 else XPN.10. XPN.15 (called
  by) adds a second name, ``use`` nickname. Departs: no assembly-order
  (XPN.11) or FN.2-5 surname-part extensions. A repetition with no name
  part is left out.
- ``fhir.addresses(msg, 'PID-11')``: XAD to Address. ``line`` [SAD.1, SAD.2,
  SAD.3, XAD.2], ``city`` XAD.3, ``state`` XAD.4, ``postalCode`` XAD.5,
  ``country`` XAD.6, ``district`` XAD.9, ``use`` XAD.7 by
  ``v2-0190-address-use`` (H home, B/O work, C temp, BI billing, BA old),
  ``type`` XAD.7 by ``v2-0190-address-type`` (M, SH postal), ``period``
  XAD.13/XAD.14 else XAD.12. Departs: no census-tract or iso21090 extensions,
  addressee XAD.19 left out.
- ``fhir.telecoms(msg, 'PID-13')``: XTN to ContactPoint. ``system`` XTN.3 by
  ``v2-0202-telecom-system`` (CP is phone with ``use`` mobile); ``value``
  XTN.4 for Internet/X.400, else XTN.12, else built from XTN.5-8
  (``+1 555 5550100 X12``), else XTN.1; ``use`` XTN.2 by
  ``v2-0201-telecom-use``; ``period`` XTN.13/XTN.14; ``rank`` XTN.18.
  Departs: no XTN.3 gives email when the value is XTN.4 or holds '@', else
  phone (FHIR needs a system with a value; the IG puts a data-absent-reason
  there); no contactpoint-* extensions. A repetition without value is left out.
- ``fhir.concept(obx, '3', system=none)`` / ``fhir.concepts(...)`` (every
  repetition): CWE/CE/CNE to CodeableConcept. A coding per triplet with a
  code (CWE.1-3, 4-6, 10-12; version CWE.7, 8, 13); its ``system`` from the
  coding system name by table ``coding-systems`` (``code,system``), else
  ``HL7nnnn`` as ``http://terminology.hl7.org/CodeSystem/v2-nnnn``, else a
  name that is itself an OID or URI, else the triplet's OID (CWE.14, 17, 20).
  A name none of these knows (a local "L", "99XYZ") gives a coding without
  system: add a row to coding-systems rather than invent one. ``system=``
  (a URI or a name those rules know) is the system of triplets that name
  none: ``fhir.concept(msg, 'PID-8', system='HL70001')``. ``text`` CWE.9,
  else CWE.2.
- ``fhir.code(msg['PID-8'], 'v2-0001-gender')``: a v2 code through a table,
  ``none`` when it has no row (unlike ``lookup``), for the ``code`` elements
  with required bindings; ``column=`` picks another column.
  ``fhir.coding(msg['PV1-2'], 'v2-0004-encounter-class')``: the same as a
  Coding (``system``, ``code``, ``display`` from the columns above).
- ``fhir.datetime(msg, 'PID-7')``, ``fhir.date(msg, 'PID-7')`` (at most a
  day, for ``birthDate``), ``fhir.instant(msg, 'MSH-7')``: DTM/TS to dateTime,
  as ``hl7_datetime``/``hl7_instant``: the precision sent (``'2023'`` stays
  ``2023``), a time without offset gets the render's time zone (the
  channel's, read when called), an instant needs seconds. Reads TS.1.
- ``fhir.quantity(obx['5'], obx, '6')``: NM and units to Quantity.
  ``value`` a JSON number (an int when the text has no decimal point, else
  the nearest double: exact to 15 significant digits; ``1.50`` gives 1.5, the
  json output re-serialises numbers anyway); ``unit`` CWE.2 else CWE.1;
  ``system``/``code`` when CWE.3 names a known system, or when CWE.3 is empty
  or UCUM and CWE.1 is in table ``ucum-units`` (``code`` the v2 unit,
  ``display`` its UCUM code, e.g. ``mEq/L`` to ``meq/L``). The units may be a
  plain unit string instead: ``fhir.quantity(v, 'kg')``. Not a number: none.
- ``fhir.sn(obx, '5', '6')``: SN to ``{"kind": K, "value": V}`` for
  ``"value" ~ kind``, the type picked by the separator SN.3 alone, as the
  IG's OBX-5 rows do: ``:`` or ``/`` Ratio (``^1^:^128``; SN.1 a comparator
  goes on the numerator), ``-`` Range (``^10^-^20``, ``^10^-``; SN.1 is not
  part of a Range), ``+`` String (``^2^+``), any other (none, ``.``...)
  Quantity of SN.2 with SN.1 as comparator when it is one (``>^100``;
  ``>^1^.^3`` is ``>1``, SN.4 left out as the IG's SN[Quantity] does).
  SN.1 ``<>``, or numbers a type needs that are missing or not numbers, give
  String (the parts and units joined by spaces). The IG's originalText
  extension (``SN.1 SN.2 SN.3 SN.4``) goes on the value when it leaves part of
  the SN out (a comparator R4 has no code for, a Range's SN.1, SN.3/SN.4 of a
  Quantity); departure: the IG adds it whenever SN.3 is valued, so to every
  Range and Ratio, where the separator says nothing the value does not.
  The units (third argument, a path in the same ``src``) go on every
  quantity, as the IG maps OBX-6. None when empty.
- ``fhir.reference_range(obx, '7', '6')``: OBX-7 to an Observation
  referenceRange: ``text`` always, ``low``/``high`` when it reads
  ``3.5-5.0``, ``<5`` / ``<=5`` (high), ``>10`` / ``>=10`` (low).
- ``fhir.text(obx, '5', sep=' ')``: any value as readable text, for a
  composite (XAD, XPN, CP, RP...) that FHIR has no element for where it
  appears (an OBX-5 of such a type goes to valueString): its components and
  sub-components decoded (escapes resolved), trimmed, the empty ones left
  out, joined by ``sep``; repetitions read joined by line breaks.
  ``1234 Main St^^Springfield^IL`` gives ``1234 Main St Springfield IL``.
  ``sep='&'`` rebuilds a text the sender split at a sub-component separator
  it did not escape (an RP pointer URL). None when empty.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from datetime import UTC, tzinfo
from urllib.parse import quote

from interface_engine.channels.helpers import (
    Encoded, HelperError, TemplateMessage, TemplateSegment, hl7_to_iso, uuid5,
)
from interface_engine.fhir.bundle import PrunedDict, PrunedList
from interface_engine.hl7.escape import Delimiters
from interface_engine.hl7.path import parse_path

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
UCUM = "http://unitsofmeasure.org"

_HEADER_IDS = frozenset({"MSH", "FHS", "BHS"})
_BAD_PATH = ("a malformed HL7 path: expected SEG[n]-field[r].component.subcomponent with 1-based numbers, "
             "e.g. PID-5, OBX[2]-5, or '5' read from a segment")
_RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
_HL7_TABLE = re.compile(r"HL7(\d{4})", re.ASCII | re.IGNORECASE)
_OID = re.compile(r"[0-2](?:\.(?:0|[1-9][0-9]*))+", re.ASCII)
_URI = re.compile(r"(?:https?|urn):\S+", re.ASCII | re.IGNORECASE)
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)", re.ASCII)
_MAX_DEFAULTS = 256
_MAX_NUMBER = 40  # characters; a longer "number" is not a measurement
_COMPARATORS = {"<": "<", "<=": "<=", ">": ">", ">=": ">="}
_ORIGINAL_TEXT = "http://hl7.org/fhir/StructureDefinition/originalText"
_RANGE = re.compile(r"\s*([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))\s*-\s*([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))\s*",
                    re.ASCII)
_BOUND = re.compile(r"\s*(<=|>=|<|>)\s*([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))\s*", re.ASCII)
_PRECISIONS = (None, "year", "month", "day", "second")
#: The tables the datatype helpers read even for an empty field (see FHIRNamespace._filled).
_READ_TABLES = (("identifier-systems", "system"), ("v2-0200-name-use", "display"),
                ("v2-0190-address-use", "display"), ("v2-0190-address-type", "display"),
                ("v2-0202-telecom-system", "display"), ("v2-0201-telecom-use", "display"),
                ("coding-systems", "system"))
_PAST_THE_END = [""] * 100  # the segment maps look at fields 1-99
_EVERY_FIELD = ["filled"] * 100
_TRIPLETS = ((1, 2, 3, 7, 14), (4, 5, 6, 8, 17), (10, 11, 12, 13, 20))  # code, display, system, version, OID


class _Value:
    """One datatype instance: its components, encoded; split into sub-components and decoded when read.

    Both on read, not up front: most components a helper asks for are absent, and most
    that are present have one sub-component. ``text``: the text ``parts`` were split from.
    """

    __slots__ = ("_parts", "_delimiters", "_encoding", "_sub", "_esc", "_plain", "_escaped")

    def __init__(self, parts: list[str], text: str, delimiters: Delimiters, encoding: str):
        self._parts = parts
        self._delimiters = delimiters
        self._encoding = encoding
        self._sub = sub = delimiters.subcomponent_sep
        self._esc = esc = delimiters.escape_char
        self._escaped = escaped = bool(esc and esc in text)
        # no sub-component to split off and no escape to decode: most values
        self._plain = not (escaped or (sub and sub in text))

    def count(self, component: int | None = None) -> int:
        """How many components there are, or how many sub-components ``component`` has."""
        if component is None:
            return len(self._parts)
        return len(_split(self._parts[component - 1], self._sub)) if 0 < component <= len(self._parts) else 0

    def components(self, n: int) -> list[str]:
        """``['', get(1), get(2), ... get(n)]`` (item c is component c), read in one pass: the
        datatype maps take most of a value's components."""
        parts = self._parts[:n]
        if not self._plain and not self._escaped:  # sub-components (an assigning authority): the first of each
            sub = self._sub
            parts = [p.partition(sub)[0] for p in parts]
        if not self._escaped and '""' not in parts:
            out = ["", *map(str.strip, parts)]
            if len(out) <= n:
                out += [""] * (n + 1 - len(out))
            return out
        sub, esc = self._sub, self._esc
        out = [""]
        for raw in parts:
            if sub and sub in raw:
                raw = raw.split(sub, 1)[0]
            if not raw or raw == '""':
                out.append("")
            elif esc and esc in raw:
                out.append(self._delimiters.unescape(raw, self._encoding).strip())
            else:
                out.append(raw.strip())
        if len(out) <= n:
            out += [""] * (n + 1 - len(out))
        return out

    def get(self, component: int, sub: int = 1) -> str:
        """Decoded and trimmed; '' when missing or the v2 null ``""``."""
        parts = self._parts
        if component > len(parts):
            return ""
        raw = parts[component - 1]
        sep = self._sub
        if sep and sep in raw:
            subs = raw.split(sep)
            if sub > len(subs):
                return ""
            raw = subs[sub - 1]
        elif sub > 1:
            return ""
        if not raw or raw == '""':
            return ""
        esc = self._esc
        if esc and esc in raw:  # most values have no escape: no call to decode them
            raw = self._delimiters.unescape(raw, self._encoding)
        return raw.strip()


def _split(text: str, sep: str) -> list[str]:
    return text.split(sep) if sep else [text]


def _nth(text: str, sep: str, n: int) -> str:
    parts = _split(text, sep)
    return parts[n - 1] if n <= len(parts) else ""


def _put(out: dict, key: str, value) -> None:
    if value:
        out[key] = value


def _number(text) -> int | float | None:
    """An HL7 NM as a JSON number; none if it is not one."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return text if text == text and abs(text) != float("inf") else None
    t = text.strip() if isinstance(text, str) else ""
    if len(t) > _MAX_NUMBER or not _NUMBER.fullmatch(t):
        return None
    if "." not in t:
        return int(t)
    return float(t)


def _mapped(rows: dict, code: str) -> str | None:
    """The FHIR code a vocabulary table gives a v2 code; none when it has no row (unmatched)."""
    row = rows.get(code) if code else None
    return (row["display"] or None) if row else None


def _period(start: str | None, end: str | None) -> dict | None:
    out: dict = {}
    _put(out, "start", start)
    _put(out, "end", end)
    return out or None


def _find_identifier_system(rows: dict, namespace: str, universal: str, kind: str) -> str | None:
    """CX.4 as an Identifier.system: the table, else HD.2 by HD.3, else urn:id:HD.1."""
    if namespace:
        row = rows.get(namespace)
        if row and row["system"]:
            return row["system"]
    if universal:
        kind = kind.upper()
        if kind == "ISO":
            oid = universal[8:] if universal.lower().startswith("urn:oid:") else universal
            if _OID.fullmatch(oid):
                return "urn:oid:" + oid
        elif kind == "UUID":
            try:
                return "urn:uuid:" + str(uuid.UUID(universal))
            except ValueError:
                pass
        elif kind in ("URI", "URL") and _URI.fullmatch(universal):
            return universal
    if namespace:
        return "urn:id:" + quote(namespace, safe="-._~!$&'()*+,;=:@")
    return None


class FHIRNamespace:
    """What templates reach as ``fhir``: only the public methods below; nothing else is an attribute.

    ``tables(name)`` gives a code table as templating's Mappings loads it
    (header, rows by code); ``zone()`` the time zone of the render under way.
    """

    __slots__ = ("_tables", "_zone", "_found", "_defaults", "_tables_read")

    def __init__(self, tables: Callable[[str], tuple], zone: Callable[[], tzinfo] | None = None):
        self._tables = tables
        self._zone = zone or (lambda: UTC)
        # The tables found, by (name, column): a mapping reads its code tables some 70 times a
        # message, and ``tables`` gives the same one every time (loaded once per Mappings); only
        # tables that exist are kept, so there are never more than the mappings directory holds.
        self._found: dict[tuple, tuple] = {}
        # The URIs of the system= names the mappings give concept(s) (a dozen calls a message, most
        # for empty fields): the table lookup and patterns run once per name; the first
        # _MAX_DEFAULTS names only, should a template take them from messages.
        # Names read from messages (coding systems, assigning authorities) are not kept from one
        # render to the next: the engine keeps no message content between messages.
        self._defaults: dict[str, str] = {}
        self._tables_read = False  # every table of _READ_TABLES found (see _filled)

    def __repr__(self) -> str:
        return "<fhir helpers>"

    # ids

    def id(self, resource_type, *parts) -> str:
        """A deterministic FHIR id for a resource of this type and these business keys."""
        if not isinstance(resource_type, str) or not _RESOURCE_TYPE.fullmatch(resource_type):
            raise HelperError("fhir.id: the first argument is a resource type such as 'Patient'")
        return uuid5(resource_type, *parts)

    # CX

    def identifiers(self, src, path, type=None) -> list[dict]:
        """Every CX repetition with a value as an Identifier."""
        if type is not None and not isinstance(type, str):
            raise HelperError("fhir.identifiers: type= is a v2-0203 code such as 'MR'")
        self._table("identifiers", "identifier-systems", "system")  # missing: an error even for empty values
        values = self._values(src, path, "identifiers")
        if not values:  # most fields a mapping reads
            return []
        out = PrunedList()
        for v in values:
            c = v.components(8)
            if not c[1]:
                continue
            ident = PrunedDict()
            ident["value"] = c[1]
            _put(ident, "system", self._identifier_system(c[4], v.get(4, 2), v.get(4, 3)))
            code = c[5] or (type or "").strip()
            if code:
                ident["type"] = {"coding": [{"system": V2_0203, "code": code}]}
            if c[7] or c[8]:  # most values have no period: no calls for them
                _put(ident, "period", _period(self._dt(c[7]), self._dt(c[8])))
            out.append(ident)
        return out

    def _identifier_system(self, namespace: str, universal: str, kind: str) -> str | None:
        header, rows = self._table("identifiers", "identifier-systems", "system")
        return _find_identifier_system(rows, namespace, universal, kind)

    def identifier(self, src, path, type=None) -> dict | None:
        """The first of ``identifiers``, or none."""
        found = self.identifiers(src, path, type)
        return found[0] if found else None

    # XPN

    def names(self, src, path) -> list[dict]:
        """Every XPN repetition as a HumanName, and a nickname for XPN.15."""
        header, uses = self._table("names", "v2-0200-name-use", "display")
        values = self._values(src, path, "names")
        if not values:  # most fields a mapping reads
            return []
        out = PrunedList()
        for v in values:
            c = v.components(15)
            name = PrunedDict()
            _put(name, "family", c[1])
            _put(name, "given", [g for g in (c[2], c[3]) if g])
            _put(name, "prefix", [c[5]] if c[5] else [])
            _put(name, "suffix", [s for s in (c[4], c[6], c[14]) if s])
            if name:
                _put(name, "use", _mapped(uses, c[7]))
                start, end = c[12], c[13]
                if not (start or end):
                    start, end = c[10], v.get(10, 2)
                if start or end:
                    _put(name, "period", _period(self._dt(start), self._dt(end)))
                out.append(name)
            called = c[15]
            if called:
                out.append(PrunedDict(given=[called], use="nickname"))
        return out

    # XAD

    def addresses(self, src, path) -> list[dict]:
        """Every XAD repetition as an Address."""
        header, uses = self._table("addresses", "v2-0190-address-use", "display")
        header, types = self._table("addresses", "v2-0190-address-type", "display")
        values = self._values(src, path, "addresses")
        if not values:  # most fields a mapping reads
            return []
        out = PrunedList()
        for v in values:
            c = v.components(14)
            address = PrunedDict()
            _put(address, "line", [x for x in (c[1], v.get(1, 2), v.get(1, 3), c[2]) if x])
            _put(address, "city", c[3])
            _put(address, "district", c[9])
            _put(address, "state", c[4])
            _put(address, "postalCode", c[5])
            _put(address, "country", c[6])
            if not address:
                continue
            kind = c[7]
            _put(address, "use", _mapped(uses, kind))
            _put(address, "type", _mapped(types, kind))
            start, end = c[13], c[14]
            if not (start or end):
                start, end = c[12], v.get(12, 2)
            if start or end:
                _put(address, "period", _period(self._dt(start), self._dt(end)))
            out.append(address)
        return out

    # XTN

    def telecoms(self, src, path) -> list[dict]:
        """Every XTN repetition with a value as a ContactPoint."""
        header, systems = self._table("telecoms", "v2-0202-telecom-system", "display")
        header, uses = self._table("telecoms", "v2-0201-telecom-use", "display")
        values = self._values(src, path, "telecoms")
        if not values:  # most fields a mapping reads
            return []
        out = PrunedList()
        for v in values:
            c = v.components(18)
            equipment, email = c[3], c[4]
            if equipment in ("Internet", "X.400"):
                value = email or (c[1] if "@" in c[1] else "")
            else:
                value = c[12] or self._phone(c) or c[1]
                if not value and not equipment:
                    value = email
            if not value:
                continue
            point = PrunedDict()
            row = systems.get(equipment) if equipment else None
            if not equipment:
                point["system"] = "email" if value == email or "@" in value else "phone"
            else:  # FHIR wants a system with every value: an equipment type the table lacks is 'other'
                point["system"] = (row["display"] if row else "") or "other"
            point["value"] = value
            use = (row or {}).get("use") or _mapped(uses, c[2])
            _put(point, "use", use)
            rank = _number(c[18])
            if isinstance(rank, int) and rank > 0:
                point["rank"] = rank
            if c[13] or c[14]:
                _put(point, "period", _period(self._dt(c[13]), self._dt(c[14])))
            out.append(point)
        return out

    @staticmethod
    def _phone(c: list[str]) -> str:
        """XTN.5-8 (``c``: the XTN's components) as ``+1 555 5550100 X12``; '' without XTN.7."""
        local = c[7]
        if not local:
            return ""
        country, area, extension = c[5], c[6], c[8]
        parts = [f"+{country}" if country else "", area, local, f"X{extension}" if extension else ""]
        return " ".join(p for p in parts if p)

    # CWE

    def concept(self, src, path, system=None) -> dict | None:
        """The first CWE repetition as a CodeableConcept, or none."""
        default = self._default_system("concept", system)
        for v in self._values(src, path, "concept"):
            found = self._concept(v, default)
            if found:
                return found
        return None

    def concepts(self, src, path, system=None) -> list[dict]:
        """Every CWE repetition as a CodeableConcept."""
        default = self._default_system("concepts", system)
        return PrunedList(c for c in (self._concept(v, default) for v in self._values(src, path, "concepts")) if c)

    def _default_system(self, fn: str, system) -> str | None:
        if type(system) is str:
            found = self._defaults.get(system)
            if found is not None:
                return found
        self._table(fn, "coding-systems", "system")  # a missing table is an error even for empty values
        if system is None:
            return None
        found = self._system(system, "") if isinstance(system, str) else None
        if found is None:
            raise HelperError(f"fhir.{fn}: system= is a URI or a coding system name "
                              "that the coding-systems table or the HL7nnnn form gives a URI")
        if type(system) is str and len(self._defaults) < _MAX_DEFAULTS:
            self._defaults[system] = found
        return found

    def _concept(self, v: _Value, default: str | None) -> dict | None:
        c = v.components(20)
        codings = []
        for code_at, display_at, system_at, version_at, oid_at in _TRIPLETS:
            code = c[code_at]
            if not code:
                continue
            name, oid = c[system_at], c[oid_at]
            system = self._system(name, oid) if (name or oid) else default
            coding: dict = {}
            if system:
                coding["system"] = system
                _put(coding, "version", c[version_at])
            coding["code"] = code
            _put(coding, "display", c[display_at])
            if not any(k.get("system") == system and k["code"] == code for k in codings):
                codings.append(coding)
        concept = PrunedDict()
        _put(concept, "coding", codings)
        _put(concept, "text", c[9] or c[2])
        return concept or None

    def _system(self, name: str, oid: str) -> str | None:
        """The URI of a v2 coding system name (or its OID); none when unknown."""
        if name:
            header, rows = self._table("concepts", "coding-systems", "system")
            row = rows.get(name) or rows.get(name.upper())
            if row and row["system"]:
                return row["system"]
            m = _HL7_TABLE.fullmatch(name)
            if m:
                return f"http://terminology.hl7.org/CodeSystem/v2-{m.group(1)}"
            if _OID.fullmatch(name):
                return "urn:oid:" + name
            if _URI.fullmatch(name):
                return name
        if oid and _OID.fullmatch(oid):
            return "urn:oid:" + oid
        return None

    # code tables

    def code(self, value, table, column="display") -> str | None:
        """The ``column`` of the row for ``value`` in ``table``; none when the table has no such row."""
        header, rows = self._table("code", table, column)
        row = rows.get(self._key(value))
        return (row[column] or None) if row else None

    def coding(self, value, table) -> dict | None:
        """The row for ``value`` in ``table`` as a Coding (columns display, system, name); none when missing."""
        header, rows = self._table("coding", table, "system")
        row = rows.get(self._key(value))
        if not row or not row.get("display"):
            return None
        coding = PrunedDict()
        _put(coding, "system", row["system"])
        coding["code"] = row["display"]
        _put(coding, "display", row.get("name"))
        return coding

    @staticmethod
    def _key(value) -> str:
        return "" if value is None else str(value).strip()

    # DTM / TS

    def datetime(self, src, path, precision=None) -> str | None:
        """TS.1/DTM as a FHIR dateTime at the precision sent (or ``precision``: year, month, day, second)."""
        if precision not in _PRECISIONS:
            raise HelperError("fhir.datetime: precision is one of year, month, day, second")
        v = self._first(src, path, "datetime")
        text = hl7_to_iso(v.get(1, 1), self._zone(), precision) if v else ""
        return text or None

    def date(self, src, path) -> str | None:
        """TS.1/DTM as a FHIR date: at most a day, never a zone."""
        return self.datetime(src, path, "day")

    def instant(self, src, path) -> str | None:
        """TS.1/DTM as a FHIR instant; none unless the value has seconds."""
        v = self._first(src, path, "instant")
        text = hl7_to_iso(v.get(1, 1), self._zone(), instant=True) if v else ""
        return text or None

    def _dt(self, value: str) -> str | None:
        return (hl7_to_iso(value, self._zone()) or None) if value else None

    # NM, SN

    def quantity(self, value, units_src=None, units_path=None) -> dict | None:
        """A numeric value (and units, read from ``units_src``/``units_path`` or given as text) as a Quantity."""
        number = _number(value)
        units = self._units("quantity", units_src, units_path)
        if number is None:
            return None
        return {"value": number, **units}

    def sn(self, src, path, units_path=None) -> dict | None:
        """A structured numeric as ``{"kind": Quantity|Range|Ratio|String, "value": ...}``; none when empty."""
        v = self._first(src, path, "sn")
        units = self._units("sn", src, units_path) if units_path is not None else {}
        if v is None:
            return None
        comparator, first, separator, second = v.get(1), v.get(2), v.get(3), v.get(4)
        if not (comparator or first or separator or second):
            return None
        n1, n2 = _number(first), _number(second)
        sign = _COMPARATORS.get(comparator)
        plain = comparator in ("", "=")  # no comparator to keep
        found: tuple | None = None
        if comparator == "<>" or separator == "+":
            pass  # the IG's valueString cases
        elif separator in (":", "/"):
            if n1 is not None and n2 is not None:
                numerator = {"value": n1, **units}
                _put(numerator, "comparator", sign)
                found = ("Ratio", {"numerator": numerator, "denominator": {"value": n2, **units}},
                         not (plain or sign))
        elif separator == "-":
            if (first or second) and (n1 is not None or not first) and (n2 is not None or not second):
                rng: dict = {}
                if n1 is not None:
                    rng["low"] = {"value": n1, **units}
                if n2 is not None:
                    rng["high"] = {"value": n2, **units}
                found = ("Range", rng, not plain)
        elif n1 is not None:  # any other SN.3 (none, '.', ...): SN[Quantity] of SN.1 and SN.2
            q = {"value": n1, **units}
            _put(q, "comparator", sign)
            found = ("Quantity", q, bool(separator or second) or not (plain or sign))
        if found:
            kind, value, lossy = found
            if lossy:  # the IG's originalText, where the FHIR value leaves part of the SN out
                value = {"extension": [{"url": _ORIGINAL_TEXT, "valueString": " ".join(
                    p for p in (comparator, first, separator, second) if p)}], **value}
            return {"kind": kind, "value": value}
        text = " ".join(p for p in (comparator, first, separator, second, units.get("unit", "")) if p)
        return {"kind": "String", "value": text}

    def reference_range(self, src, path, units_path=None) -> dict | None:
        """An OBX-7 reference range as ``{"text", "low"?, "high"?}``; none when empty."""
        v = self._first(src, path, "reference_range")
        units = self._units("reference_range", src, units_path) if units_path is not None else {}
        text = v.get(1) if v else ""
        if not text:
            return None
        out: dict = {"text": text}
        m = _RANGE.fullmatch(text)
        if m:
            bounds = (("low", m.group(1)), ("high", m.group(2)))
        else:
            m = _BOUND.fullmatch(text)
            bounds = ((("high" if m.group(1).startswith("<") else "low"), m.group(2)),) if m else ()
        for key, number in bounds:
            value = _number(number)
            if value is not None:
                out[key] = {"value": value, **units}
        return out

    # any datatype, as text

    def text(self, src, path, sep=" ") -> str | None:
        """Every repetition read as text: its parts decoded and joined by ``sep``, empty ones left out."""
        if not isinstance(sep, str):
            raise HelperError("fhir.text: sep= is a string, ' ' unless given")
        lines = []
        for v in self._values(src, path, "text"):
            parts = (v.get(c, s) for c in range(1, v.count() + 1) for s in range(1, v.count(c) + 1))
            line = sep.join(p for p in parts if p)
            if line:
                lines.append(line)
        return "\n".join(lines) or None

    def _units(self, fn: str, src, path) -> dict:
        """Quantity unit, system and code from a units CWE (or a plain unit string as ``src``)."""
        header, ucum = self._table(fn, "ucum-units", "display")
        self._table(fn, "coding-systems", "system")
        if isinstance(src, Encoded):
            raise HelperError(f"fhir.{fn}: give units as a segment and a path (obx, '6'), not a composite value")
        if isinstance(src, str) and path is None:
            code, text, name = src.strip(), "", ""
        elif src is None and path is None:
            return {}
        else:
            v = self._first(src, path, fn)
            if v is None:
                return {}
            code, text, name = v.get(1), v.get(2), v.get(3)
        out: dict = {}
        _put(out, "unit", text or code)
        system = self._system(name, "") if name else None
        if code and (system == UCUM or not name):
            row = ucum.get(code)
            if row and row["display"]:
                out["system"], out["code"] = UCUM, row["display"]
            elif system == UCUM:
                out["system"], out["code"] = UCUM, code
        elif code and system:
            out["system"], out["code"] = system, code
        return out

    # reading

    def _table(self, fn: str, table, column: str) -> tuple:
        found = self._found.get((table, column))
        if found is not None:
            return found
        try:
            header, rows = self._tables(table)
        except HelperError as e:
            reason = str(e).removeprefix("lookup: ")
        else:
            if column not in header:
                raise HelperError(f"fhir.{fn}: code table {table!r} has no {column!r} column")
            self._found[(table, column)] = header, rows
            return header, rows
        raise HelperError(f"fhir.{fn}: {reason}")

    def _filled(self, seg: TemplateSegment, name: str) -> list[str]:
        """Each field's encoded text by number ('' when empty or absent, up to field 99) in
        segment ``name``, for a segment map to look at before it asks a helper to read the field:
        most fields a map reads are empty, and a helper's read of an empty one still costs some
        5,000 instructions (the calls, the path, the segment). In another segment (which the
        helpers refuse to read by these paths), and while a table the helpers read is missing
        (which a helper reports even for an empty field), every field reads as filled: each
        read goes to the helper, as without the check."""
        segment = seg._segment
        if segment.name != name or not (self._tables_read or self._read_tables()):
            return _EVERY_FIELD
        return (segment._parts or segment._fields()) + _PAST_THE_END

    def _read_tables(self) -> bool:
        try:
            for table, column in _READ_TABLES:
                self._table("_filled", table, column)
        except HelperError:
            return False
        self._tables_read = True
        return True

    def _first(self, src, path, fn: str) -> _Value | None:
        values = self._values(src, path, fn)
        return values[0] if values else None

    @staticmethod
    def _values(src, path, fn: str) -> list[_Value]:
        """The datatype instances at ``path`` in ``src``: one per repetition read, empty ones left out."""
        try:
            seg_id, occurrence, n, repetition, component, subcomponent = parse_path(path)
        except ValueError:
            raise HelperError(f"fhir.{fn}: {_BAD_PATH}") from None
        if isinstance(src, TemplateSegment):  # the segment maps' reads, most of them
            segment, message = src._segment, src._message
            name = segment.name
            if not name:
                return []
            if (seg_id and seg_id != name) or occurrence is not None:
                raise HelperError(f"fhir.{fn}: a path read from a segment names no other segment "
                                  "and no occurrence [n]")
        elif isinstance(src, TemplateMessage):
            if not seg_id:
                raise HelperError(f"fhir.{fn}: a path read from msg starts with a segment id, e.g. PID-5")
            message = src._message
            if occurrence is None:
                segment = message.segment(seg_id)
            else:
                found = message.segments(seg_id)
                segment = found[occurrence - 1] if occurrence <= len(found) else None
            if segment is None:
                return []
            name = segment.name
        elif src is None:
            return []
        else:
            raise HelperError(f"fhir.{fn} reads msg or a segment (msg.segment('PID'), msg.segments('OBX'))")
        # The field's encoded text (MSH-1/MSH-2, the delimiters, read as ''): most reads end here, empty.
        fields = segment._parts or segment._fields()  # split on the first read
        if name in _HEADER_IDS:
            if n <= 2:
                return []
            n -= 1
        text = fields[n] if n < len(fields) else ""
        if not text:
            return []
        d, encoding = message.delimiters, message.encoding
        if repetition is None and component is None:
            sep = d.repetition_sep
            reps = text.split(sep) if sep and sep in text else [text]
        else:
            reps = [_nth(text, d.repetition_sep, repetition or 1)]
        values = []
        for rep in reps:
            if not rep or rep == '""':
                continue
            if component is None:
                sep = d.component_sep
                text, parts = rep, rep.split(sep) if sep else [rep]
            else:  # the sub-components of one component are the value's components
                text = _nth(rep, d.component_sep, component)
                if subcomponent is None:
                    parts = _split(text, d.subcomponent_sep)
                else:
                    text = _nth(text, d.subcomponent_sep, subcomponent)
                    parts = [text]
            values.append(_Value(parts, text, d, encoding))
        return values
