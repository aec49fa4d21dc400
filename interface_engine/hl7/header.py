"""``peek``: what the engine needs to know about a frame, from its MSH segment alone.

peek runs for every received frame, before anything is stored, and must never
raise: whatever the bytes, it returns a Header, with ``error`` set when the
frame cannot be accepted as an HL7 message. The Header still carries whatever
could be read (MSH-10 above all) so a NAK can echo it.

Only the MSH line is decoded: with MSH-18's codec if it decodes that line, else
the fallback, else latin-1. Header values come from that line (and an ACK
copying them is encoded with the same codec, so copies are byte-exact). Which codec
decodes the *whole* message is a separate, lazier question: ``Header.encoding``
answers it on first access (it has to read all the bytes), so peek stays cheap
on a 1 MiB message.
"""

from __future__ import annotations

import re

from .charset import ascii_transparent, codec_for, decode_best, usable
from .errors import HL7Error
from .escape import DEFAULT, Delimiters, delimiters
from .path import pick

_LEAD = (re.compile(rb"(?:\xef\xbb\xbf|[ \t\r\n\x0b\x0c])*"), re.compile("(?:\ufeff|[ \t\r\n\x0b\x0c])*"))
_BATCH_IDS = ((b"FHS", b"BHS"), ("FHS", "BHS"))
_MSH = (b"MSH", "MSH")
_CR = (b"\r", "\r")
_LF = (b"\n", "\n")
_LINE_MSH = ((b"\rMSH", b"\nMSH"), ("\rMSH", "\nMSH"))

NO_MSH = "no MSH segment at start of message"
NO_MSH_IN_BATCH = "no MSH segment in batch"
EMPTY_MSH2 = "MSH-2 (encoding characters) is empty"
LONG_MSH2 = "MSH-2 (encoding characters) has more than 5 characters"
EMPTY_MSH9 = "MSH-9 (message type) is empty"


class Header:
    """The routing and acknowledgement facts of one message, read from MSH.

    All values are str, '' when absent. Leaf values are decoded; a composite
    field (e.g. MSH-3 ``APP^1.2.3^ISO``) is given as encoded text, as a path
    read would give it.
    """

    __slots__ = ("field_sep", "component_sep", "repetition_sep", "escape_char",
                 "subcomponent_sep", "truncation_char", "encoding_chars", "delimiters",
                 "sending_application", "sending_facility", "receiving_application",
                 "receiving_facility", "timestamp", "message_type", "trigger_event",
                 "message_structure", "control_id", "processing_id", "version",
                 "accept_ack_type", "application_ack_type", "charset", "error",
                 "_fields", "_raw", "_start", "_codec", "_fallback", "_encoding", "_line_codec")

    def __init__(self, d: Delimiters = DEFAULT, fields: list[str] | None = None,
                 codec: str = "utf-8", fallback: str = "latin-1", escaped: bool = True):
        self.delimiters = d
        self.field_sep = d.field_sep
        self.component_sep = d.component_sep
        self.repetition_sep = d.repetition_sep
        self.escape_char = d.escape_char
        self.subcomponent_sep = d.subcomponent_sep
        self.truncation_char = d.truncation_char
        self._fields = fields = fields or []
        self.encoding_chars = fields[0] if fields else ""
        self._codec = codec
        self._line_codec = codec  # what decoded the MSH line; peek corrects it if it differs
        self._fallback = fallback
        self._raw = None
        self._start = 0
        self._encoding = None
        self.error = None
        f = fields if len(fields) >= 17 else fields + [""] * (17 - len(fields))  # f[n - 2] is MSH-n
        if escaped:
            def value(num: int, rep: int | None = None, comp: int | None = None) -> str:
                return pick(f[num - 2], rep, comp, None, d, codec)

            self.sending_application, self.sending_facility = value(3), value(4)
            self.receiving_application, self.receiving_facility = value(5), value(6)
            self.timestamp, self.control_id, self.processing_id = value(7), value(10), value(11)
            self.message_type, self.trigger_event, self.message_structure = (
                value(9, 1, 1), value(9, 1, 2), value(9, 1, 3))
            self.version, self.charset = value(12, 1, 1), value(18, 1)
            self.accept_ack_type, self.application_ack_type = value(15), value(16)
            return
        # Fast path, nothing to unescape: a whole field reads as its text and
        # a component as its slice, whatever the value rule would say.
        rep, comp = d.repetition_sep, d.component_sep
        (self.sending_application, self.sending_facility, self.receiving_application,
         self.receiving_facility, self.timestamp) = f[1:6]
        self.control_id, self.processing_id = f[8], f[9]
        self.accept_ack_type, self.application_ack_type = f[13], f[14]
        msh9, msh12, msh18 = f[7], f[10], f[16]
        if rep:
            msh9, msh12, msh18 = msh9.split(rep, 1)[0], msh12.split(rep, 1)[0], msh18.split(rep, 1)[0]
        if comp:
            msh9 = msh9.split(comp, 3)
            msh12 = msh12.split(comp, 1)[0]
            if len(msh9) < 3:
                msh9 += ("", "")
        else:
            msh9 = [msh9, "", ""]
        self.message_type, self.trigger_event, self.message_structure = msh9[:3]
        self.version, self.charset = msh12, msh18

    def __repr__(self) -> str:
        return (f"<Header {self.message_type}^{self.trigger_event} control_id={self.control_id!r}"
                f" version={self.version!r} error={self.error!r}>")

    def raw(self, n: int) -> str:
        """MSH-n exactly as encoded in the message ('' if absent), for copying into output."""
        if n == 1:
            return self.field_sep
        return self._fields[n - 2] if 2 <= n <= len(self._fields) + 1 else ""

    @property
    def encoding(self) -> str:
        """The codec that decodes the whole message byte-exactly (see charset.py); computed once, on demand."""
        if self._encoding is None:
            if self._raw is None:
                self._encoding = self._codec
            else:
                self._encoding = decode_best(self._raw[self._start:], self._codec, self._fallback)[1]
        return self._encoding

    @property
    def wants_enhanced_ack(self) -> bool:
        """Whether the sender asked for enhanced-mode acknowledgement (MSH-15 valued); see ack.ack_code."""
        return bool(self.accept_ack_type.strip())


def _from_line(line, default_charset: str, fallback_charset: str) -> Header:
    """Header from the text of an MSH line (str)."""
    fs = line[3:4]
    fields = line[4:].split(fs) if fs else []
    msh2 = fields[0] if fields else ""
    error = None
    if not msh2:
        d, error = delimiters(fs or "|"), HL7Error("101", EMPTY_MSH2)
    elif len(msh2) > 5:
        d, error = delimiters(fs), HL7Error("102", LONG_MSH2)
    else:
        d = delimiters(fs, msh2)
    msh18 = pick(fields[16], 1, None, None, d, "latin-1") if len(fields) > 16 else ""
    codec = codec_for(msh18, default_charset, fallback_charset)
    esc = d.escape_char
    escaped = bool(esc) and esc in line[5 + len(msh2):]
    h = Header(d, fields, codec, usable(fallback_charset), escaped)
    if error is None:
        # An empty MSH-10 is accepted: the message is still stored and answered
        # (MSA-2 empty); it just cannot be recognised as a duplicate.
        if not h.message_type:
            error = HL7Error("101", EMPTY_MSH9)
    h.error = error
    return h


def locate(buf) -> tuple[int, int, int, str | None]:
    """(body start, MSH start, MSH line end, error reason) in bytes or str.

    The body starts after a leading BOM and whitespace; in an FHS/BHS batch the
    MSH is the first one at a line start.
    """
    k = 0 if isinstance(buf, (bytes, bytearray)) else 1
    n = len(buf)
    i = _LEAD[k].match(buf).end()
    head = buf[i:i + 3]
    if head == _MSH[k]:
        msh = i
    elif head in _BATCH_IDS[k]:
        found = [p for p in (buf.find(t, i) for t in _LINE_MSH[k]) if p >= 0]
        if not found:
            return i, i, i, NO_MSH_IN_BATCH
        msh = min(found) + 1
    else:
        return i, i, i, NO_MSH
    cr = buf.find(_CR[k], msh)
    if cr < 0:
        cr = n
    lf = buf.find(_LF[k], msh, cr)
    return i, msh, (lf if lf >= 0 else cr), None


def _failed(reason: str, codec: str, fallback: str) -> Header:
    h = Header(DEFAULT, None, codec, fallback)
    h.error = HL7Error("100", reason)
    return h


def peek(raw: bytes, *, default_charset: str = "utf-8", fallback_charset: str = "latin-1") -> Header:
    """Read the MSH segment of a frame; never raises, whatever the bytes."""
    start, msh, end, problem = locate(raw)
    if problem is not None:
        h = _failed(problem, usable(default_charset, usable(fallback_charset)), usable(fallback_charset))
    else:
        line = raw[msh:end]
        if line.isascii():
            text = line.decode("ascii")
            h = _from_line(text, default_charset, fallback_charset)
            transparent = ascii_transparent(h._codec)
        else:
            text = line.decode("latin-1")  # provisional: enough to read MSH-18
            h = _from_line(text, default_charset, fallback_charset)
            transparent = False
        if not transparent:
            decoded, line_codec = decode_best(line, h._codec, h._fallback)
            if decoded != text:
                h = _from_line(decoded, default_charset, fallback_charset)
            h._line_codec = line_codec
    h._raw = raw
    h._start = start
    return h


def peek_text(text: str, *, default_charset: str = "utf-8", fallback_charset: str = "latin-1") -> Header:
    """``peek`` for a message already decoded; its encoding is the declared one."""
    start, msh, end, problem = locate(text)
    if problem is not None:
        h = _failed(problem, usable(default_charset, usable(fallback_charset)), usable(fallback_charset))
    else:
        h = _from_line(text[msh:end], default_charset, fallback_charset)
    h._start = start
    return h
