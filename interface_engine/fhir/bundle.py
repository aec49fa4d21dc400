"""From a FHIR template's loose JSON to a transaction Bundle that can be sent twice safely.

A template renders `{"resources": [...]}`, each resource with a deterministic `id`
derived from business identifiers. Here the empty values a template emits freely
(null, "", [], {}) are removed, resources of the same type and id are merged (a
later one fills what the first left out), a Provenance records the source message
(MSH-3/4, MSH-10), and every resource becomes a `PUT Type/id` entry: sending the same
message again, or replaying a day of them, leaves the server with the same resources.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime, timezone

import orjson

from interface_engine.channels.helpers import uuid5_text

_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_INFINITY = float("inf")
PROVENANCE_NAMESPACE = uuid.UUID("0b0d9e4e-5f6f-5c1b-9a55-6f1d3c1e7a10")
_PROVENANCE_NAMESPACE_BYTES = PROVENANCE_NAMESPACE.bytes


class BundleError(ValueError):
    """The template's output cannot become a Bundle; says what, never which values."""


class NotJSON(BundleError):
    """A template's own values that JSON cannot carry as they are (see prune)."""


class NothingToSend(BundleError):
    """The message holds nothing the mapping turns into a resource (a bare MSH, say)."""


_INFINITY = float("inf")


def prune(value):
    """`value` without null, "", [] and {} anywhere inside; None if nothing is left.

    One walk that also checks that `value` is plain JSON, for a template's values
    that were never written as text: dicts with text keys, lists (or tuples), text,
    numbers other than NaN and Infinity, booleans; anything else raises NotJSON.
    Keys keep their order (see _sorted). Floats that Python writes with an exponent come back
    as _Exponent.
    """
    return _walk(_pruned, value)


def _walk(walker, value):
    """`walker(value)`, with a value nested past Python's recursion limit refused as not JSON."""
    try:
        return walker(value)
    except RecursionError:
        pass   # raised outside the handler, so the error does not carry the deep traceback
    raise NotJSON("nested too deeply")


def _pruned(value):
    kind = type(value)
    if kind is dict:
        if not _TEXT.issuperset(map(type, value)):
            raise NotJSON("an object key that is not text")
        kept = {}
        for key, v in value.items():
            if type(v) in _AS_IS:  # most values: kept or dropped here, without a call
                if v:
                    kept[key] = v
            elif v is not None:
                v = _pruned(v)
                if v is not None:
                    kept[key] = v
        return kept or None
    if kind is str:
        return value or None
    if kind is list or kind is tuple:
        kept = []
        for v in value:
            if type(v) in _AS_IS:
                if v:
                    kept.append(v)
            elif v is not None:
                v = _pruned(v)
                if v is not None:
                    kept.append(v)
        return kept or None
    if kind is PrunedDict or kind is PrunedList:
        return value or None
    if value is None:
        return None
    if kind is int or kind is bool:
        return value
    if kind is float:
        if value != value or value in (_INFINITY, -_INFINITY):
            raise NotJSON("NaN or Infinity")
        return value if 1e-4 <= abs(value) < 1e16 or not value else _Exponent(value)
    for plain in (str, dict, list, tuple, bool, int, float):  # subclasses: as JSON writes them
        if isinstance(value, plain):
            return _pruned(plain(value))
    raise NotJSON(f"a {kind.__name__} value")


class PrunedDict(dict):
    """A dict the fhir helpers built as prune would leave it (text keys; text, ints, lists and
    dicts of them, none empty; other Pruned values), which prune keeps as it is. Templates
    cannot change it (the sandbox refuses to mutate dicts and lists), nor do the helpers."""

    __slots__ = ()


class PrunedList(list):
    """A list of what a PrunedDict may hold, kept as it is by prune (see PrunedDict)."""

    __slots__ = ()


_TEXT = frozenset({str})
#: What prune keeps as it is when not empty.
_AS_IS = frozenset({str, PrunedDict, PrunedList})


class _Exponent(float):
    """A float that Python's repr writes with an exponent (under 1e-4, from 1e16), which orjson
    spells otherwise (``1e-7``, ``0.00001``): orjson refuses it, so the standard library writes it."""

    __slots__ = ()


def merge(first: dict, later: dict) -> dict:
    """`first` with what only `later` has; lists gain the items they lack."""
    out = dict(first)
    for key, value in later.items():
        if key not in out:
            out[key] = value
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = merge(out[key], value)
        elif isinstance(out[key], list) and isinstance(value, list):
            out[key] = out[key] + [v for v in value if v not in out[key]]
    return out


def _collect(rendered: dict, sort_keys: bool) -> tuple[list[dict], list[bool]]:
    """The resources to send, pruned and merged by type and id, in order; and for each whether its
    keys are in their final order (a merged one's are: see merge), or are still to be sorted
    (`sort_keys`: the JSON writer sorts them, for less than prune would spend)."""
    if not isinstance(rendered, dict) or not isinstance(rendered.get("resources"), (list, tuple)):
        raise BundleError('a FHIR template must render {"resources": [...]}')
    resources: dict[tuple[str, str], dict] = {}
    merged: set[tuple[str, str]] = set()
    seen: set[int] = set()
    for n, resource in enumerate(rendered["resources"]):
        if id(resource) in seen:  # the very same value again (a helper's, made once): merged, it adds nothing
            continue
        seen.add(id(resource))
        resource = prune(resource)
        if resource is None:
            continue
        if not isinstance(resource, dict):
            raise BundleError(f"resources[{n}] is not a resource (a JSON object)")
        kind, rid = resource.get("resourceType"), resource.get("id")
        if not isinstance(kind, str) or not _TYPE.match(kind):
            raise BundleError(f"resources[{n}] has no valid resourceType")
        if not isinstance(rid, str) or not _ID.match(rid):
            raise BundleError(f"resources[{n}] ({kind}) has no valid id: ids must be deterministic, "
                              "from fhir.id(...)")
        key = (kind, rid)
        if key in resources:
            first = resources[key]
            if sort_keys and key not in merged:
                first = _sorted(first)
            resources[key] = merge(first, _sorted(resource) if sort_keys else resource)
            merged.add(key)
        else:
            resources[key] = resource
    if not resources:
        raise NothingToSend("the mapping produced no resource: nothing to send")
    return list(resources.values()), [not sort_keys or key in merged for key in resources]


def _sorted(value):
    """A pruned value with every object's keys sorted, as a template's ``tojson`` would have written
    them (to merge resources as written; the JSON writer sorts the others)."""
    return _walk(_sorted_copy, value)


def _sorted_copy(value):
    kind = type(value)
    if kind is dict or kind is PrunedDict:
        out = {}
        for key in sorted(value):
            out[key] = _sorted_copy(value[key])
        return out
    if kind is list or kind is PrunedList:
        out = []
        for v in value:
            out.append(_sorted_copy(v))
        return out
    return value


def build(rendered: dict, source: dict, *, sort_keys: bool = False) -> dict:
    """The transaction Bundle for one message. `source` names it: sender, facility, control id, type, time.

    `sort_keys`: `rendered` holds a template's own values (see prune). `transaction` writes the same
    Bundle as JSON.
    """
    resources, ordered = _collect(rendered, sort_keys)
    entries = [r if done else _sorted(r) for r, done in zip(resources, ordered)]
    entries.append(provenance(entries, source))
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                  for r in entries],
    }


def transaction(rendered: dict, source: dict, *, sort_keys: bool = False) -> bytes:
    """``to_bytes(build(rendered, source, sort_keys=sort_keys))``, with the keys sorted as the JSON is written."""
    resources, ordered = _collect(rendered, sort_keys)
    entries = [_dumps(r, not done) for r, done in zip(resources, ordered)]
    resources.append(provenance(resources, source))
    entries.append(_dumps(resources[-1], False))
    # resourceType and id are plain ASCII (_TYPE, _ID): the url needs no escaping
    return b'{"resourceType":"Bundle","type":"transaction","entry":[' + b",".join([
        b'{"resource":%b,"request":{"method":"PUT","url":"%b/%b"}}' % (json, r["resourceType"].encode(),
                                                                         r["id"].encode())
        for json, r in zip(entries, resources)]) + b"]}"


def provenance(resources: list[dict], source: dict) -> dict:
    """Which HL7 v2 message these resources came from; its id depends on that message only."""
    sender = "|".join(filter(None, (source.get("application"), source.get("facility"))))
    control_id = source.get("control_id") or ""
    rid = uuid5_text(_PROVENANCE_NAMESPACE_BYTES, f"{sender}|{control_id}|{source.get('sha256', '')}")
    entity = {"role": "source", "what": {"display": f"HL7 v2 {source.get('type', '')} {control_id}".strip()}}
    if control_id:
        entity["what"]["identifier"] = {"system": "urn:id:hl7v2-message-control-id", "value": control_id}
    return {
        "resourceType": "Provenance",
        "id": rid,
        "target": [{"reference": f"{r['resourceType']}/{r['id']}"} for r in resources],
        "recorded": source.get("recorded") or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "activity": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                                 "code": "CREATE" if not source.get("update") else "UPDATE"}]},
        "agent": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                                        "code": "assembler"}]},
                   "who": {"display": sender or "unknown sender"}}],
        "entity": [entity],
    }


# No circular check: every object and list in a Bundle is a new one made by prune, which
# fails on values nested too deeply, so none can hold itself (about a fifth of the encoding).
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False)
_SORTED = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False, sort_keys=True)


def to_bytes(bundle: dict) -> bytes:
    return _bytes(_ENCODER.encode(bundle))


def _dumps(value, sort_keys: bool) -> bytes:
    """A pruned value as `_ENCODER` (or `_SORTED`) writes it, in UTF-8; by orjson, ten times faster.

    orjson writes the same bytes for what prune leaves (exact dicts, lists, str, int, float,
    bool), and refuses the rest: ints past 64 bits, invalid Unicode, an _Exponent. Those
    are written by the standard library, which keeps its output and its errors (NotJSON).
    """
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS if sort_keys else 0)
    except orjson.JSONEncodeError:
        pass
    return _bytes((_SORTED if sort_keys else _ENCODER).encode(value))


def _bytes(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        pass
    raise NotJSON("text that is not valid Unicode")
