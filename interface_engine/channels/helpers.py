"""What templates see of a message, and the helpers they call (listed in templating.py).

Templates get a read-only view of the message (``TemplateMessage``) so an
analyst cannot change the stored message. Reads follow the model's value rule
(a leaf decoded, a composite as encoded text), but a composite comes back as
``Encoded``: the str subclass that marks text as already HL7-encoded, which an
hl7 template copies as is while escaping everything else. ``Encoded`` text
never holds 0x0B or 0x1C (escaped as ``\\X0B\\``/``\\X1C\\``), and holds CR only
between whole segments.

Helpers raise ``HelperError`` with a message naming the helper and the reason,
never the value; templating.py turns it into a TemplateError.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Iterator
from datetime import datetime, tzinfo
from fnmatch import fnmatchcase

from lxml import etree
from markupsafe import Markup

from interface_engine import hl7
from interface_engine.hl7.escape import Delimiters
from interface_engine.hl7.path import Path, parse_path

_HEADER_IDS = frozenset({"MSH", "FHS", "BHS"})
_BAD_PATH = ("malformed HL7 path: expected SEG[n]-field[r].component.subcomponent "
             "with 1-based numbers, e.g. PID-3, PID-5[2].1, OBX[3]-5")

#: Namespace of every ``uuid5`` id the engine makes. Chosen at random once and
#: fixed forever: changing it would change every id already sent out.
ENGINE_NAMESPACE = uuid.UUID("f744e326-c56d-4af6-81c9-ccdfaeca6999")


class HelperError(Exception):
    """A helper or a message read refused its input; the text never quotes message content."""


class Encoded(str):
    """HL7 text already encoded with the message's delimiters (composite, segment, message)."""

    __slots__ = ()


class EncodedMessage(Encoded):
    """A whole message's text from an hl7_* helper, with the message it was written from, so that
    the next helper in a chain need not parse it again."""

    def __new__(cls, message: hl7.Message):
        text = super().__new__(cls, _message_text(message))
        text._message = message
        return text


def _path(path) -> Path:
    try:
        return parse_path(path)
    except ValueError:
        raise HelperError(_BAD_PATH) from None


def _nth(value: str, sep: str, n: int) -> str:
    if sep and sep in value:
        parts = value.split(sep, n)
        return parts[n - 1] if n <= len(parts) else ""
    return value if n == 1 else ""


def _message_text(message: hl7.Message) -> Encoded:
    """The whole message as Encoded text: segments joined and ended by CR."""
    escape = message.delimiters.escape_controls
    return Encoded("\r".join(escape(text) for _, text in message.lines()) + "\r")


class TemplateSegment:
    """One segment as templates see it: ``seg.name``, ``seg['5.1']``, ``seg.raw``; ``{{ seg }}`` is its text."""

    __slots__ = ("_segment", "_message", "_memo")

    def __init__(self, segment: hl7.Segment, message: hl7.Message):
        self._segment = segment
        self._message = message
        #: What the fhir segment maps read of this segment more than once a render (a key they
        #: need both for an id and for the resource); a view lives for one render.
        self._memo: dict | None = None

    def __repr__(self) -> str:
        return f"<segment {self._segment.name or '(not a segment)'}>"

    def __str__(self) -> str:
        return self.raw

    @property
    def name(self) -> str:
        """The segment id; '' for a line that is not a segment."""
        return self._segment.name

    @property
    def raw(self) -> Encoded:
        """The segment as Encoded text, without terminator."""
        return Encoded(self._message.delimiters.escape_controls(self._segment.text))

    def __getitem__(self, path) -> str:
        try:
            p = parse_path(path)
        except ValueError:
            raise HelperError(_BAD_PATH) from None
        if (p.segment and p.segment != self._segment.name) or p.occurrence is not None:
            self._own_path(path)  # says which
        return self._read(p)

    def _own_path(self, path) -> Path:
        p = _path(path)
        if p.segment and p.segment != self._segment.name:
            raise HelperError("the path names another segment than the one it is read from")
        if p.occurrence is not None:
            raise HelperError("a segment occurrence [n] has no meaning inside one segment")
        return p

    def _components(self, field):
        """A reader of one composite: ``read(c, s=1)`` is ``self[f"{field}.{c}.{s}"]``.

        For the segment maps, which take many components of one field (an XCN, a PL):
        the field and its repetition are found and split once instead of once a component.
        """
        if _path(field).component is not None:  # field.c.s would not be a path
            raise HelperError(_BAD_PATH)
        p = self._own_path(field)
        segment = self._segment
        if not segment.name or segment.name in _HEADER_IDS:
            return lambda c, s=1: self[f"{field}.{c}.{s}"]
        d: Delimiters = self._message.delimiters
        fields = segment._parts or segment._fields()  # split on the first read
        if p.field >= len(fields):
            return lambda c, s=1: ""
        rep = _nth(fields[p.field], d.repetition_sep, p.repetition or 1)
        parts = rep.split(d.component_sep) if d.component_sep else [rep]
        count, sub, esc, unescape, encoding = (len(parts), d.subcomponent_sep, d.escape_char, d.unescape,
                                               self._message.encoding)

        def read(c: int, s: int = 1) -> str:
            if c > count:
                return ""
            value = parts[c - 1]
            if sub and sub in value:
                subs = value.split(sub)
                value = subs[s - 1] if s <= len(subs) else ""
            elif s > 1:
                return ""
            return unescape(value, encoding) if esc and esc in value else value
        return read

    def _read(self, p: Path) -> str:
        """The model's value rule, but a composite comes back Encoded."""
        segment = self._segment
        name = segment.name
        if not name:
            return ""
        d: Delimiters = self._message.delimiters
        fields = segment._parts or segment._fields()  # split on the first read
        _, _, n, repetition, component, subcomponent = p
        if name in _HEADER_IDS:
            if n <= 2:
                if (repetition or 1, component or 1, subcomponent or 1) != (1, 1, 1):
                    return ""
                return Encoded(d.field_sep if n == 1 else (fields[1] if len(fields) > 1 else ""))
            n -= 1
        if n >= len(fields):
            return ""
        value = fields[n]
        if repetition is None and component is None:
            composite = False
            for sep in d.structural:
                if sep in value:
                    composite = True
                    break
        else:
            sep = d.repetition_sep
            if repetition and repetition > 1:
                value = _nth(value, sep, repetition)
            elif sep:  # the first repetition, which most paths read: _nth(value, sep, 1)
                value = value.partition(sep)[0]
            sub = d.subcomponent_sep
            if component is None:
                sep = d.component_sep
                composite = (sep and sep in value) or (sub and sub in value)
            else:
                value = _nth(value, d.component_sep, component)
                if subcomponent is None:
                    composite = sub and sub in value
                else:
                    value = _nth(value, sub, subcomponent)
                    composite = False
        if composite:
            return Encoded(d.escape_controls(value))
        esc = d.escape_char
        return d.unescape(value, self._message.encoding) if esc and esc in value else value


class TemplateMessage:
    """A message as templates see it: read-only (no ``set``), nothing private reachable from the sandbox.

    ``msg['PID-3.1']``, ``msg.segments('OBX')``, ``msg.segment('PID')`` (none
    if absent), ``{% for seg in msg %}``, ``msg.raw``; ``{{ msg }}`` is the raw text.
    """

    __slots__ = ("_message", "_views", "_raw")

    def __init__(self, message: hl7.Message):
        self._message = message
        self._views: dict[hl7.Segment, TemplateSegment] = {}
        self._raw: Encoded | None = None

    def __repr__(self) -> str:
        return "<message>"

    def __str__(self) -> str:
        return self.raw

    @property
    def raw(self) -> Encoded:
        """The message as Encoded text, segments ended by CR."""
        if self._raw is None:
            self._raw = _message_text(self._message)
        return self._raw

    def _view(self, segment: hl7.Segment) -> TemplateSegment:
        view = self._views.get(segment)
        if view is None:
            view = self._views[segment] = TemplateSegment(segment, self._message)
        return view

    def __getitem__(self, path) -> str:
        p = _path(path)
        if not p.segment:
            raise HelperError(_BAD_PATH)
        if p.occurrence is None:
            found = self._message.segment(p.segment)
        else:
            found = self._message.segments(p.segment)
            found = found[p.occurrence - 1] if p.occurrence <= len(found) else None
        return "" if found is None else self._view(found)._read(p)

    def segment(self, name: str) -> TemplateSegment | None:
        """The first segment with this id, or none."""
        seg = self._message.segment(name)
        return None if seg is None else self._view(seg)

    def segments(self, name: str | None = None) -> list[TemplateSegment]:
        """The segments with this id in order; without an id, every line."""
        return [self._view(s) for s in self._message.segments(name)]

    def __iter__(self):
        return iter(self.segments())


def _as_message(value, helper: str) -> hl7.Message:
    """The message behind ``msg`` or behind Encoded message text from another hl7_* helper."""
    if isinstance(value, TemplateMessage):
        return value._message
    if isinstance(value, EncodedMessage):
        return value._message
    if isinstance(value, Encoded):
        try:
            return hl7.parse(str(value))
        except hl7.HL7Error:
            raise HelperError(f"{helper}: the value is not a whole HL7 message") from None
    raise HelperError(f"{helper} takes msg or the result of another hl7_* helper")


def hl7_set(message, path, value) -> Encoded:
    """A copy of the message with one leaf written (escaped); the original is untouched."""
    if isinstance(value, Encoded):
        raise HelperError("hl7_set writes one leaf value; give a decoded value "
                          "(e.g. PID-5.1), not a composite, segment or message")
    p = _path(path)  # the model's message would quote a malformed path, which may be content
    copy = _as_message(message, "hl7_set").copy()
    try:
        copy.set(path, "" if value is None else str(value))
    except ValueError as e:  # the model's reasons name paths and segment ids, never values
        raise HelperError(f"hl7_set: {e}") from None
    except KeyError as e:
        raise HelperError(f"hl7_set: {e.args[0]}") from None
    if p.segment == "MSH" and p.field == 18:
        return _message_text(copy)   # a new charset: the next helper reads the text anew
    return EncodedMessage(copy)


def hl7_drop(message, *patterns) -> Encoded:
    """A copy of the message without the segments whose id matches a glob pattern.

    A line that is not a segment (a wrapped continuation) goes with the segment before it.
    """
    if not all(isinstance(p, str) for p in patterns):
        raise HelperError("hl7_drop: patterns are segment ids or globs such as 'Z*'")
    m = _as_message(message, "hl7_drop")
    d = m.delimiters
    kept = []
    dropping = False
    for name, text in m.lines():
        if name:
            dropping = any(fnmatchcase(name, p) for p in patterns)
            if dropping and name == "MSH":
                raise HelperError("hl7_drop: MSH cannot be dropped")
        if not dropping:
            kept.append(d.escape_controls(text))
    return Encoded("\r".join(kept) + "\r")


_XML_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _split(text: str, sep: str) -> list[str]:
    return text.split(sep) if sep else [text]


def hl7_xml(message) -> Markup:
    """The message in the style of the HL7 v2 XML encoding; see templating.py for where it departs."""
    m = _as_message(message, "hl7_xml")
    d, encoding = m.delimiters, m.encoding
    root_name = m["MSH-9.3"]
    if not _XML_NAME.fullmatch(root_name):
        root_name = "_".join(x for x in (m["MSH-9.1"], m["MSH-9.2"]) if x)
        if not _XML_NAME.fullmatch(root_name):
            raise HelperError("hl7_xml: MSH-9 gives no usable root element name")
    root = etree.Element(root_name)
    try:
        for seg in m.segments():
            name = seg.name
            if not name:
                continue
            if not _XML_NAME.fullmatch(name):
                raise HelperError("hl7_xml: a segment id that starts with a digit cannot be an XML element")
            element = etree.SubElement(root, name)
            fields = seg.text.split(d.field_sep)
            if name in _HEADER_IDS:
                etree.SubElement(element, f"{name}.1").text = d.field_sep
                if len(fields) > 1:
                    etree.SubElement(element, f"{name}.2").text = fields[1]
                numbered = enumerate(fields[2:], 3)
            else:
                numbered = enumerate(fields[1:], 1)
            for n, field in numbered:
                if field:
                    for rep in _split(field, d.repetition_sep):
                        _xml_field(etree.SubElement(element, f"{name}.{n}"), rep, d, encoding)
    except ValueError:  # lxml refuses characters XML 1.0 cannot carry
        raise HelperError("hl7_xml: a value holds a character that XML cannot carry") from None
    return Markup(etree.tostring(root, encoding="unicode"))


def _xml_field(element, rep: str, d: Delimiters, encoding: str) -> None:
    comps = _split(rep, d.component_sep)
    if len(comps) == 1 and not (d.subcomponent_sep and d.subcomponent_sep in rep):
        element.text = d.unescape(rep, encoding)
        return
    for i, comp in enumerate(comps, 1):
        if not comp:
            continue
        child = etree.SubElement(element, f"{element.tag}.{i}")
        subs = _split(comp, d.subcomponent_sep)
        if len(subs) == 1:
            child.text = d.unescape(comp, encoding)
            continue
        for j, sub in enumerate(subs, 1):
            if sub:
                etree.SubElement(child, f"{child.tag}.{j}").text = d.unescape(sub, encoding)


_DTM = re.compile(r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d+))?)?)?)?)?)?"
                  r"([+-]\d{4})?", re.ASCII)
_PRECISIONS = {"year": 1, "month": 2, "day": 3, "second": 6}
_PLAIN_LENGTHS = frozenset({4, 6, 8, 10, 12, 14})  # YYYY[MM[DD[HH[MM[SS]]]]]


_OFFSETS: dict[int, str] = {}  # minutes east of UTC -> "+hh:mm"; at most 2,879 entries (under a day either way)


def _offset(minutes: int) -> str:
    text = _OFFSETS.get(minutes)
    if text is None:
        sign = "-" if minutes < 0 else "+"
        text = f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
        if abs(minutes) < 1440:
            _OFFSETS[minutes] = text
    return text


def hl7_to_iso(value, zone: tzinfo, precision: str | None = None, *, instant: bool = False) -> str:
    """HL7 DTM/TS text to ISO 8601 at the precision given; '' if it is not a valid date/time.

    A time without an offset gets ``zone``'s offset at that local time; a
    date never gets a zone. A time always has seconds (FHIR dateTime wants
    them). ``instant`` wants seconds in the value and gives '' otherwise.
    """
    if precision is not None and precision not in _PRECISIONS:
        raise HelperError("hl7_datetime: precision is one of year, month, day, second")
    text = "" if value is None else str(value).strip()
    if len(text) in _PLAIN_LENGTHS and text.isascii() and text.isdigit():  # most values: no pattern to run
        year, month, day, hour, minute, second = (text[:4], text[4:6], text[6:8], text[8:10], text[10:12],
                                                  text[12:])
        fraction = offset = None
    else:
        m = _DTM.fullmatch(text)
        if m is None:
            return ""
        year, month, day, hour, minute, second, fraction, offset = m.groups()
    try:  # that it is a date and time; the text is written from the digits
        dt = datetime.fromisoformat(f"{year}-{month or '01'}-{day or '01'}T{hour or '00'}:{minute or '00'}:"
                                    f"{second or '00'}")
    except ValueError:
        return ""
    if offset and (int(offset[1:3]) > 23 or int(offset[3:]) > 59):
        return ""
    if instant and not second:
        return ""
    level = 7 if fraction else 6 if second else 5 if minute else 4 if hour else 3 if day else 2 if month else 1
    if precision is not None:
        level = min(level, _PRECISIONS[precision])
    if level <= 3:
        return year if level == 1 else f"{year}-{month}" if level == 2 else f"{year}-{month}-{day}"
    text = f"{year}-{month}-{day}T{hour}:{minute or '00'}:{second or '00'}" + (f".{fraction}" if level == 7 else "")
    if offset:
        minutes = int(offset[1:3]) * 60 + int(offset[3:])
        return text + _offset(-minutes if offset[0] == "-" else minutes)
    return text + _offset(int(zone.utcoffset(dt).total_seconds()) // 60)


def _csv_field(value) -> str:
    text = "" if value is None else str(value)
    if any(c in text for c in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


def csv_row(*values) -> str:
    """One RFC 4180 line without line end; a single list, tuple or iterator argument is the row."""
    if len(values) == 1 and isinstance(values[0], (list, tuple, Iterator)):
        values = tuple(values[0])
    return ",".join(map(_csv_field, values))


_ENGINE_NAMESPACE_BYTES = ENGINE_NAMESPACE.bytes
# The variant's hex digit: its two high bits set to 10 (RFC 4122), the two low bits kept.
_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def uuid5_text(namespace: bytes, name: str) -> str:
    """``str(uuid.uuid5(UUID(bytes=namespace), name))`` without building UUID objects.

    SHA-1 of the namespace and name in hex, with the version digit 5 and the variant bits
    written into that text, in the 8-4-4-4-12 form.
    """
    h = hashlib.sha1(namespace + name.encode("utf-8")).hexdigest()
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"


def uuid5(*parts) -> str:
    """A deterministic id: the same parts give the same id, forever (none counts as '').

    ``str(uuid.uuid5(ENGINE_NAMESPACE, name))`` (see uuid5_text): a FHIR mapping makes a
    dozen ids per message.
    """
    try:  # most ids are made of text only: joined as they are, as str() gives text
        name = "|".join(parts)
    except TypeError:
        name = "|".join(["" if p is None else str(p) for p in parts])
    return uuid5_text(_ENGINE_NAMESPACE_BYTES, name)


def b64encode(value, encoding: str = "utf-8") -> str:
    """Base64 of a text (FHIR Attachment.data): ``{{ text | b64encode }}``."""
    import base64

    return base64.b64encode(("" if value is None else str(value)).encode(encoding)).decode("ascii")
