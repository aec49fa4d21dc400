"""ACK/NAK messages answering a received message or batch.

Which code (HL7 table 0155 on MSH-15, accept acknowledgement type):

=========  ==========  ==========  ==========
MSH-15     accept      error       reject
=========  ==========  ==========  ==========
(empty)    AA          AE          AR          original mode
AL         CA          CE          CR
ER         AA*         CE          CR
SU         CA          AE*         AR*
NE         AA*         AE*         AR*
other      CA          CE          CR          unknown value: treated as AL
=========  ==========  ==========  ==========

``*``: the sender said no commit ACK is due. MLLP still needs an answer to
every frame, so this engine then answers in original mode. (MSH-16, the
application acknowledgement, is for the receiving application, not for the
engine that stores the message.)

An ACK uses the received message's field separator and encoding characters, so
the sender can read it with the settings it writes with; everything copied or
written into it is escaped, so no value can inject a field, segment or frame.
"""

from __future__ import annotations

import re
import string
import time

from .batch import batch_header_lines
from .charset import encode, usable
from .errors import TABLE_0357
from .escape import DEFAULT, Delimiters, delimiters
from .header import Header, peek

_CODES = {
    "": ("AA", "AE", "AR"),
    "AL": ("CA", "CE", "CR"),
    "ER": ("AA", "CE", "CR"),
    "SU": ("CA", "AE", "AR"),
    "NE": ("AA", "AE", "AR"),
}
_OUTCOMES = {"accept": 0, "error": 1, "reject": 2}
_ACK_CODES = frozenset({"AA", "AE", "AR", "CA", "CE", "CR"})
_NEGATIVE = frozenset({"AE", "AR", "CE", "CR"})
_VERSION = re.compile(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?")
_DEFAULT_VERSION = "2.5.1"


def ack_code(header: Header, outcome: str) -> str:
    """MSA-1 for ``outcome`` ('accept', 'error' or 'reject') by the table in this module's docstring."""
    try:
        index = _OUTCOMES[outcome]
    except KeyError:
        raise ValueError(f"outcome must be 'accept', 'error' or 'reject', not {outcome!r}") from None
    if not header.wants_enhanced_ack:
        return _CODES[""][index]
    return _CODES.get(header.accept_ack_type.strip().upper(), _CODES["AL"])[index]


def _version(text: str) -> tuple[int, ...]:
    m = _VERSION.match(text.strip())
    if m is None:
        return (2, 5, 1)
    return tuple(int(x) for x in m.groups() if x is not None)


_clock = (-1, "")


def _now() -> str:
    """UTC now as an HL7 timestamp; formatted once a second, since every ACK needs one."""
    global _clock
    t = int(time.time())
    if t != _clock[0]:
        _clock = (t, time.strftime("%Y%m%d%H%M%S+0000", time.gmtime(t)))
    return _clock[1]


def _encode(text: str, header: Header) -> bytes:
    # The codec that decoded the received MSH line: values copied from it come
    # back as the sender's bytes, and the whole message need not be decoded.
    try:
        return encode(text, header._line_codec)
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace")


def _segment(d: Delimiters, name: str, *fields: str) -> str:
    """A segment without trailing empty fields."""
    last = len(fields)
    while last and not fields[last - 1]:
        last -= 1
    return d.field_sep.join((name, *fields[:last]))


_PUNCTUATION = frozenset(string.punctuation)


def _answer_delimiters(d: Delimiters):
    """The delimiters to answer in, and how to copy the sender's encoded values into them.

    Letters or digits as delimiters would split our own words ("ACK", the reason) into
    fields, a control byte could end the MLLP frame, and one character in two roles is
    ambiguous: then the answer uses the standard delimiters, escaping whatever it echoes.
    """
    chars = d.field_sep + d.encoding_chars
    if all(c in _PUNCTUATION for c in chars) and len(set(chars)) == len(chars):
        return d, d.escape_controls
    return DEFAULT, DEFAULT.escape


def build_ack(header: Header, code: str, *, control_id: str, reason: str = "", error_code: str = "",
              timestamp: str | None = None) -> bytes:
    """The ACK for a received message described by ``header`` (from ``peek``).

    MSH swaps sender and receiver, echoes MSH-11/MSH-12 and carries
    ``control_id`` as MSH-10; MSA-2 echoes the received MSH-10. A negative code
    (AE/AR/CE/CR) adds ``reason`` as MSA-3 and an ERR segment: v2.5 and later
    ``ERR||<location>|<code>^<text>^HL70357|E||||<reason>``, earlier versions
    ``ERR|^^^<code>&<text>&HL70357``. ``error_code`` (table 0357) defaults to 207.
    Encoded with the codec that read the received MSH (its MSH-18 codec unless
    that line did not decode with it), or UTF-8 where that cannot carry the text.
    """
    if code not in _ACK_CODES:
        raise ValueError(f"ACK code must be one of {sorted(_ACK_CODES)}, not {code!r}")
    d, safe = _answer_delimiters(header.delimiters)
    esc = d.escape
    fs, cs = d.field_sep, d.component_sep
    version = header.raw(12) or _DEFAULT_VERSION
    number = _version(header.version or _DEFAULT_VERSION)
    trigger = esc(header.trigger_event)
    if not trigger:
        message_type = "ACK"
    elif number >= (2, 3, 1):
        message_type = f"ACK{cs}{trigger}{cs}ACK"
    else:
        message_type = f"ACK{cs}{trigger}"
    msh = fs.join((
        "MSH", d.encoding_chars,
        safe(header.raw(5)), safe(header.raw(6)), safe(header.raw(3)), safe(header.raw(4)),
        esc(timestamp if timestamp is not None else _now()), "", message_type, esc(control_id),
        safe(header.raw(11)) or "P", safe(version),
    ))
    negative = code in _NEGATIVE
    segments = [msh, _segment(d, "MSA", code, safe(header.raw(10)), esc(reason) if negative else "")]
    if negative:
        error_code = error_code or "207"
        text = TABLE_0357.get(error_code, "")
        if number >= (2, 5):
            err_code = cs.join((esc(error_code), esc(text), "HL70357"))
            segments.append(_segment(d, "ERR", "", "", err_code, "E", "", "", "", esc(reason)))
        else:
            ss = d.subcomponent_sep
            coded = ss.join((esc(error_code), esc(text), "HL70357")) if ss else esc(error_code)
            segments.append(_segment(d, "ERR", cs * 3 + coded))
    return _encode("\r".join(segments) + "\r", header)


def _batch_delimiters(line: str):
    fs = line[3:4] or "|"
    encoding_chars = line[4:].split(fs)[0]
    return _answer_delimiters(delimiters(fs, encoding_chars) if encoding_chars else delimiters(fs))


def _batch_header(line: str, name: str, timestamp: str) -> str:
    """FHS/BHS answering a received one: sender and receiver swapped, -12 refers to the received -11."""
    d, safe = _batch_delimiters(line)
    fields = line[4:].split(line[3:4] or "|")

    def f(n: int) -> str:
        return safe(fields[n - 2]) if n - 2 < len(fields) else ""

    return _segment(d, name, d.encoding_chars, f(5), f(6), f(3), f(4), d.escape(timestamp),
                    "", "", "", "", f(11))


def build_batch_ack(batch_raw: bytes, acks: list[bytes], *, timestamp: str | None = None,
                    default_charset: str = "utf-8", fallback_charset: str = "latin-1") -> bytes:
    """The answer to an FHS/BHS batch: [FHS] BHS, the ACKs in order, BTS with their count [, FTS|1].

    The batch header segments use the received batch's delimiters and swap its
    sender and receiver; BHS-12/FHS-12 carry the received BHS-11/FHS-11.
    """
    header = peek(batch_raw, default_charset=default_charset, fallback_charset=fallback_charset)
    codec = header.encoding
    stamp = timestamp if timestamp is not None else _now()
    lines = batch_header_lines(batch_raw, codec)
    fhs, bhs = lines.get("FHS"), lines.get("BHS")
    fs = _batch_delimiters(fhs or bhs or "MSH|")[0].field_sep
    head = []
    if fhs is not None:
        head.append(_batch_header(fhs, "FHS", stamp))
    head.append(_batch_header(bhs if bhs is not None else (fhs or ""), "BHS", stamp))
    tail = [f"BTS{fs}{len(acks)}"]
    if fhs is not None:
        tail.append(f"FTS{fs}1")
    codec = usable(codec, "utf-8")
    return (encode("\r".join(head) + "\r", codec) + b"".join(acks)
            + encode("\r".join(tail) + "\r", codec))
