"""The message model: lazy, read by analyst paths, writable leaf by leaf.

``parse`` splits the text into segment lines once; a segment's fields are
split the first time one is read, components and sub-components each time they
are read. So a message costs little more than its decode unless it is looked at.

Reading follows the value rule of path.py: a leaf (no separator left in it)
comes decoded, a composite as the message's encoded text; without ``[n]`` the
first repetition is meant, but a bare ``PID-3`` is the whole field. Missing
parts read as '', an explicit null as ``""``. A malformed path raises
ValueError; missing data never raises.

MSH, FHS and BHS count fields the HL7 way: field 1 is the field separator
itself, field 2 the encoding characters (both read whole, never split).

A line that does not start with a segment id (three capital letters or digits,
then the field separator) - typically a hard-wrapped continuation - is kept
verbatim as a segment with name '' whose fields all read ''.

Writing with ``set`` escapes the value and rebuilds only that segment.
``to_bytes`` ends every segment with CR, so an unmodified message read from
CR-terminated bytes (without a BOM or blank lines) gives back the same bytes.
``Message.header`` describes the MSH as received; ``set`` does not change it.
"""

from __future__ import annotations

from .charset import decode_best, encode
from .escape import Delimiters
from .header import Header, peek, peek_text
from .path import Path, parse_path, pick

_HEADER_IDS = frozenset({"MSH", "FHS", "BHS"})
_NONE: list[int] = []  # no occurrences; never changed


def _is_id(name: str) -> bool:
    """Three capital ASCII letters or digits."""
    return len(name) == 3 and name.isascii() and name.isalnum() and (name.isupper() or name.isdigit())


class Segment:
    """One segment line; fields split on first read."""

    __slots__ = ("name", "_text", "_parts", "_message")

    def __init__(self, text: str, name: str, message: Message):
        self.name = name
        self._text = text
        self._parts: list[str] | None = None
        self._message = message

    def __repr__(self) -> str:
        return f"<Segment {self.name or '(not a segment)'}>"

    def __str__(self) -> str:
        return self.text

    @property
    def text(self) -> str:
        """The segment as encoded text, without terminator."""
        if self._text is None:
            fs = self._message.delimiters.field_sep
            self._text = fs.join(self._parts)
        return self._text

    def _fields(self) -> list[str]:
        if self._parts is None:
            text = self._text
            if self.name and len(text) > 3:
                self._parts = [self.name, *text[4:].split(self._message.delimiters.field_sep)]
            else:
                self._parts = [self.name]
        return self._parts

    def _path(self, path: str) -> Path:
        p = parse_path(path)
        if p.segment and p.segment != self.name:
            raise ValueError(f"path {path!r} names segment {p.segment}, "
                             f"this segment is {self.name or 'not a segment'}")
        if p.occurrence is not None:
            raise ValueError(f"path {path!r}: a segment occurrence [n] has no meaning inside one segment")
        return p

    def __getitem__(self, path: str) -> str:
        return self._read(self._path(path))

    def _read(self, p: Path) -> str:
        parts = self._fields()
        n = p.field
        if self.name in _HEADER_IDS:
            if n <= 2:
                value = self._message.delimiters.field_sep if n == 1 else (parts[1] if len(parts) > 1 else "")
                deeper = (p.repetition or 1, p.component or 1, p.subcomponent or 1)
                return value if deeper == (1, 1, 1) else ""
            n -= 1
        if n >= len(parts):
            return ""
        m = self._message
        return pick(parts[n], p.repetition, p.component, p.subcomponent, m.delimiters, m.encoding)

    def set(self, path: str, value: str) -> None:
        """Write a leaf value (escaped here) at ``path``, creating missing fields and components."""
        self._write(self._path(path), value)

    def _write(self, p: Path, value: str) -> None:
        if not self.name:
            raise ValueError("this line is not a segment (no segment id); it cannot be written")
        d: Delimiters = self._message.delimiters
        n = p.field
        if self.name in _HEADER_IDS:
            if n <= 2:
                raise ValueError(f"{self.name}-1 and {self.name}-2 are the delimiters; they cannot be set")
            n -= 1
        parts = self._fields()
        if len(parts) <= n:
            parts.extend([""] * (n + 1 - len(parts)))
        encoded = d.escape(value)
        if p.repetition is None and p.component is None:
            parts[n] = encoded
        else:
            reps = _split(parts[n], d.repetition_sep, p.repetition or 1, "repetition")
            i = (p.repetition or 1) - 1
            if p.component is None:
                reps[i] = encoded
            else:
                comps = _split(reps[i], d.component_sep, p.component, "component")
                j = p.component - 1
                if p.subcomponent is None:
                    comps[j] = encoded
                else:
                    subs = _split(comps[j], d.subcomponent_sep, p.subcomponent, "sub-component")
                    subs[p.subcomponent - 1] = encoded
                    comps[j] = d.subcomponent_sep.join(subs)
                reps[i] = d.component_sep.join(comps)
            parts[n] = d.repetition_sep.join(reps)
        self._text = None


def _split(value: str, sep: str, n: int, what: str) -> list[str]:
    if not sep:
        if n > 1:
            raise ValueError(f"this message has no {what} separator in MSH-2; cannot write {what} {n}")
        return [value]
    parts = value.split(sep)
    if len(parts) < n:
        parts.extend([""] * (n - len(parts)))
    return parts


class Message:
    """A parsed message; see the module docstring for the reading and writing rules."""

    __slots__ = ("header", "encoding", "delimiters", "_lines", "_segments", "_names", "_index")

    def __init__(self, text: str, header: Header, encoding: str):
        self.header = header
        self.encoding = encoding
        self.delimiters: Delimiters = header.delimiters
        if "\n" in text:
            text = text.replace("\r\n", "\r").replace("\n", "\r")
        self._lines = [line for line in text.split("\r") if line]
        self._segments: list[Segment | None] = [None] * len(self._lines)
        self._names: list[str] | None = None
        self._index: dict[str, list[int]] = {}

    def __repr__(self) -> str:
        return f"<Message {self.header.message_type}^{self.header.trigger_event} {len(self._lines)} segments>"

    def _line_names(self) -> list[str]:
        """Each line's segment id ('' for a line that is not a segment), and the index of the
        lines by id: both found in one pass, on the first request for a segment."""
        names = self._names
        if names is None:
            fs = self.delimiters.field_sep
            names = self._names = [line[:3] if (len(line) == 3 or line[3:4] == fs) and _is_id(line[:3]) else ""
                                   for line in self._lines]
            index = self._index
            for i, name in enumerate(names):
                if name:
                    found = index.get(name)
                    if found is None:
                        index[name] = [i]
                    else:
                        found.append(i)
        return names

    def _occurrences(self, name: str) -> list[int]:
        """Line numbers of the segments with this id."""
        if self._names is None:
            self._line_names()
        return self._index.get(name, _NONE)

    def _segment_at(self, i: int, name: str) -> Segment:
        seg = self._segments[i]
        if seg is None:
            seg = self._segments[i] = Segment(self._lines[i], name, self)
        return seg

    def _find(self, p: Path) -> Segment | None:
        if not p.segment:
            raise ValueError("a message path must start with a segment id, e.g. PID-3")
        found = self._occurrences(p.segment)
        k = (p.occurrence or 1) - 1
        if k >= len(found):
            return None
        return self._segment_at(found[k], p.segment)

    def __getitem__(self, path: str) -> str:
        p = parse_path(path)
        seg = self._find(p)
        return "" if seg is None else seg._read(p)

    def set(self, path: str, value: str) -> None:
        """Write a leaf value; KeyError if the segment is not in the message (segments are not created)."""
        p = parse_path(path)
        seg = self._find(p)
        if seg is None:
            raise KeyError(f"no {p.segment} segment number {p.occurrence or 1} in the message; "
                           "set() does not create segments")
        seg._write(p, value)

    def segment(self, name: str) -> Segment | None:
        """The first segment with this id, or None."""
        found = self._occurrences(name)
        return self._segment_at(found[0], name) if found else None

    def segments(self, name: str | None = None) -> list[Segment]:
        """All segments with this id, in order; with no id, every line, non-segments included."""
        if name is not None:
            return [self._segment_at(i, name) for i in self._occurrences(name)]
        return [self._segment_at(i, name) for i, name in enumerate(self._line_names())]

    def lines(self) -> list[tuple[str, str]]:
        """(segment id, or '' for a line that is not a segment; its text) of every line, in order.

        What ``segments()`` gives, without making a Segment of each line.
        """
        return [(name, line if seg is None else seg.text)
                for name, line, seg in zip(self._line_names(), self._lines, self._segments, strict=True)]

    def copy(self) -> Message:
        """A message with this one's text (values written included) and header, without parsing again."""
        copy = Message.__new__(Message)
        copy.header, copy.encoding, copy.delimiters = self.header, self.encoding, self.delimiters
        copy._lines = [line if seg is None else seg.text
                       for line, seg in zip(self._lines, self._segments, strict=True)]
        copy._segments = [None] * len(copy._lines)
        # Writes never change a line's segment id: ids found already, and their index, are shared
        # (never changed once found).
        copy._names, copy._index = (self._names, self._index) if self._names is not None else (None, {})
        return copy

    def to_text(self) -> str:
        """Segments joined with CR, with a final CR."""
        segs = self._segments
        return "\r".join(line if seg is None else seg.text
                         for line, seg in zip(self._lines, segs, strict=True)) + "\r"

    def to_bytes(self) -> bytes:
        """``to_text`` encoded with the message's codec (UnicodeEncodeError if a set value does not fit it)."""
        return encode(self.to_text(), self.encoding)


def parse(raw: bytes | str, *, default_charset: str = "utf-8", fallback_charset: str = "latin-1") -> Message:
    """Parse a message; raises HL7Error exactly when ``peek`` reports an error.

    Bytes are decoded by the charset rules (see charset.py); a str is taken as
    it is, its codec for ``to_bytes`` being the one MSH-18 declares. A batch
    parses as one message holding all its segments: split it first with
    ``split_messages``.
    """
    if isinstance(raw, str):
        header = peek_text(raw, default_charset=default_charset, fallback_charset=fallback_charset)
        if header.error is not None:
            raise header.error
        return Message(raw[header._start:], header, header.encoding)
    header = peek(raw, default_charset=default_charset, fallback_charset=fallback_charset)
    if header.error is not None:
        raise header.error
    body = raw[header._start:] if header._start else raw
    text, codec = decode_best(body, header._codec, header._fallback)
    header._encoding = codec
    return Message(text, header, codec)
