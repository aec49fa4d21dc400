"""Delimiters of a message and its escape sequences.

Every message names its own delimiters in MSH-1/MSH-2, so nothing here assumes
``|^~\\&``. Reading decodes ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\``, ``\\P\\`` (the v2.7
truncation character) and ``\\Xhh..\\`` (bytes in the message's charset).
Formatting sequences (``\\H\\``, ``\\.br\\``, ``\\Cxxyy\\``...) and anything unknown
are left verbatim: they are text markup, not data. Writing escapes the escape
character, every delimiter and CR, LF, 0x0B and 0x1C, so no value can end a
field, a segment or an MLLP frame.

The round trip ``unescape(escape(s)) == s`` holds when the delimiters are
distinct and not themselves letters or hex digits used in escape sequences.
A message without an escape character cannot escape at all: ``escape`` then
replaces the characters it would have escaped with spaces (lossy but safe).
"""

from __future__ import annotations

import re
from functools import lru_cache

_CONTROLS = {"\r": "X0D", "\n": "X0A", "\x0b": "X0B", "\x1c": "X1C"}
_CONTROL = re.compile("[\r\n\x0b\x1c]")
_HEX = re.compile(r"(?:[0-9A-Fa-f]{2})+")


class Delimiters:
    """The separators of one message, read from MSH-1 and MSH-2 in order.

    A character repeating MSH-1 or an earlier encoding character is treated as
    absent: with ``^~\\\\&`` (a doubled backslash copied from an escaped string)
    the escape character is ``\\``, there is no sub-component separator and
    ``&`` is the truncation character.
    """

    __slots__ = ("field_sep", "component_sep", "repetition_sep", "escape_char",
                 "subcomponent_sep", "truncation_char", "encoding_chars",
                 "structural", "_escape_table", "_control_table", "_sequences", "_special")

    def __init__(self, field_sep: str = "|", encoding_chars: str = "^~\\&"):
        self.field_sep = field_sep
        self.encoding_chars = encoding_chars
        seen = {field_sep}
        chars = []
        for i in range(5):
            c = encoding_chars[i] if i < len(encoding_chars) else ""
            chars.append("" if c in seen else c)
            seen.add(c)
        (self.component_sep, self.repetition_sep, self.escape_char,
         self.subcomponent_sep, self.truncation_char) = chars
        #: separators that make a field value composite
        self.structural = tuple(c for c in (self.repetition_sep, self.component_sep,
                                            self.subcomponent_sep) if c)
        esc = self.escape_char
        named = {"F": field_sep, "S": self.component_sep, "T": self.subcomponent_sep,
                 "R": self.repetition_sep, "E": esc, "P": self.truncation_char}
        named = {k: v for k, v in named.items() if v}
        self._sequences = named
        if esc:
            controls = {ord(c): f"{esc}{x}{esc}" for c, x in _CONTROLS.items()}
            table = dict(controls)
            table.update({ord(v): f"{esc}{k}{esc}" for k, v in named.items()})
        else:
            controls = {ord(c): " " for c in _CONTROLS}
            table = dict(controls)
            table.update({ord(v): " " for v in named.values()})
        self._escape_table = table
        self._control_table = controls
        self._special = re.compile("[" + re.escape("".join(map(chr, table))) + "]")

    def __repr__(self) -> str:
        return f"Delimiters({self.field_sep!r}, {self.encoding_chars!r})"

    def escape(self, text: str) -> str:
        """Encode a leaf value so it cannot be mistaken for structure."""
        if self._special.search(text) is None:
            return text
        return text.translate(self._escape_table)

    def escape_controls(self, encoded: str) -> str:
        """Make already-encoded (composite) text safe to copy: only CR, LF, 0x0B, 0x1C are escaped."""
        if _CONTROL.search(encoded) is None:
            return encoded
        return encoded.translate(self._control_table)

    def unescape(self, text: str, encoding: str = "utf-8") -> str:
        """Decode the escape sequences of a leaf value; unknown ones stay as written."""
        esc = self.escape_char
        if not esc or esc not in text:
            return text
        named = self._sequences
        out = []
        pos = 0
        while True:
            start = text.find(esc, pos)
            if start < 0:
                break
            end = text.find(esc, start + 1)
            if end < 0:
                break
            seq = text[start + 1:end]
            value = named.get(seq)
            if value is None and seq[:1] == "X" and _HEX.fullmatch(seq, 1):
                try:
                    value = bytes.fromhex(seq[1:]).decode(encoding)
                except (UnicodeDecodeError, LookupError):
                    value = None
            if value is None:
                out.append(text[pos:end + 1])
            else:
                out.append(text[pos:start])
                out.append(value)
            pos = end + 1
        out.append(text[pos:])
        return "".join(out)


@lru_cache(maxsize=64)
def delimiters(field_sep: str = "|", encoding_chars: str = "^~\\&") -> Delimiters:
    """Shared, cached Delimiters for a given MSH-1/MSH-2."""
    return Delimiters(field_sep, encoding_chars)


DEFAULT = delimiters()


def _resolve(spec, field_sep: str) -> Delimiters:
    if isinstance(spec, str):
        return delimiters(field_sep, spec)
    return getattr(spec, "delimiters", spec)


def escape(text: str, spec="^~\\&", *, field_sep: str = "|") -> str:
    """Escape ``text`` for writing into a message.

    ``spec`` is a Header, a Message, a Delimiters, or the MSH-2 encoding
    characters (with ``field_sep`` as MSH-1).
    """
    return _resolve(spec, field_sep).escape(text)


def unescape(text: str, spec="^~\\&", *, field_sep: str = "|", encoding: str | None = None) -> str:
    """Decode escape sequences in ``text`` read from a message.

    ``spec`` as for ``escape``; ``\\Xhh\\`` bytes are decoded with ``encoding``,
    by default the message's own codec (utf-8 when only characters are given).
    """
    if encoding is None:
        encoding = "utf-8" if isinstance(spec, str) else getattr(spec, "encoding", "utf-8")
    return _resolve(spec, field_sep).unescape(text, encoding)
