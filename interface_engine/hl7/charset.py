"""MSH-18 character sets and the Python codec that reads a message byte-exactly.

The engine promises "bytes in, bytes out": text decoded with the codec chosen
here encodes back to the very same bytes. So a codec is only chosen if it
decodes the whole message strictly (and, for codecs where that alone does not
guarantee it, if re-encoding gives the same bytes); otherwise the fallback is
tried, and finally latin-1, which maps every byte to one character and so never
fails.

MSH-18 names (HL7 table 0211 plus the DICOM-style ``ISO IRnnn`` aliases some
senders use) map to codecs below. Plain ``UNICODE`` is ambiguous in v2 (early
versions meant UCS-2); on the wire it is nearly always UTF-8, so it is read as
UTF-8. Declared ``ASCII`` is read as UTF-8 too: ASCII is a subset of it, and
senders that declare ASCII and send UTF-8 are common. UTF-16/UTF-32 and ISO-2022-JP are best effort: a message whose first
bytes read ``MSH`` in ASCII cannot be UTF-16, so such a declaration fails the
check and the fallback is used.
"""

from __future__ import annotations

import codecs
from functools import lru_cache

_HL7_CHARSETS = {
    "ASCII": "utf-8",
    "8859/1": "latin-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "UNICODE": "utf-8",
    "UNICODEUTF8": "utf-8",
    "UTF8": "utf-8",
    "UNICODEUTF16": "utf-16",
    "UNICODEUTF32": "utf-32",
    "ISOIR6": "utf-8",
    "ISOIR100": "latin-1",
    "ISOIR192": "utf-8",
    "ISOIR87": "iso2022_jp",
    "GB180302000": "gb18030",
    "KSX1001": "euc_kr",
    "BIG5": "big5",
}

# Codecs whose strict decoding is already a bijection, so no re-encode check is needed.
_BIJECTIVE = frozenset({"ascii", "utf-8"})

# Codecs that read ASCII bytes as the same ASCII characters: an ASCII-only MSH
# line can be decoded as ASCII whatever MSH-18 says.
_ASCII_TRANSPARENT = frozenset({"ascii", "utf-8", "gb18030", "euc_kr", "big5", "cp949", "big5hkscs"})


@lru_cache(maxsize=256)
def _lookup(name: str) -> str | None:
    """Canonical Python codec name, or None if Python has no such codec."""
    try:
        return codecs.lookup(name).name
    except (LookupError, TypeError, ValueError):
        return None


def _key(name: str) -> str:
    """HL7 charset names are matched ignoring case, spaces, hyphens and underscores."""
    return name.upper().replace(" ", "").replace("-", "").replace("_", "")


@lru_cache(maxsize=256)
def codec_for(msh18: str, default_charset: str = "utf-8", fallback_charset: str = "latin-1") -> str:
    """The codec declared by an MSH-18 value: ``default_charset`` if empty, ``fallback_charset`` if unknown."""
    name = msh18.strip()
    if not name:
        return usable(default_charset, fallback_charset)
    codec = _HL7_CHARSETS.get(_key(name))
    return codec if codec is not None else usable(fallback_charset, "latin-1")


@lru_cache(maxsize=64)
def usable(name: str, otherwise: str = "latin-1") -> str:
    """``name`` if Python knows the codec (an HL7 name is translated first), else ``otherwise``."""
    codec = _HL7_CHARSETS.get(_key(name), name)
    if _lookup(codec) is not None:
        return codec
    return otherwise if _lookup(otherwise) is not None else "latin-1"


def ascii_transparent(codec: str) -> bool:
    """Whether ASCII bytes decode to the same characters under ``codec`` (true for most, not UTF-16 or ISO-2022)."""
    canonical = _lookup(codec) or ""
    return canonical in _ASCII_TRANSPARENT or canonical.startswith(("iso8859-", "cp125"))


def _fits(raw: bytes, codec: str) -> str | None:
    """``raw`` decoded with ``codec`` if that is strict and byte-exact, else None."""
    try:
        text = raw.decode(codec)
    except (UnicodeDecodeError, LookupError):
        return None
    head = raw[:3]
    if head.isascii() and not text.startswith(head.decode("ascii")):
        return None  # an ASCII-incompatible codec (UTF-16...) misread the segment id
    canonical = _lookup(codec)
    if canonical not in _BIJECTIVE and not canonical.startswith("iso8859-"):
        try:
            if text.encode(codec) != raw:
                return None
        except UnicodeEncodeError:
            return None
    return text


def decode_best(raw: bytes, codec: str, fallback_charset: str = "latin-1") -> tuple[str, str]:
    """(text, codec used): ``codec`` if it fits the bytes, else the fallback, else latin-1."""
    for candidate in (codec, fallback_charset):
        text = _fits(raw, candidate)
        if text is not None:
            return text, candidate
    return raw.decode("latin-1"), "latin-1"


def decode(raw: bytes, encoding: str) -> str:
    """Decode without ever raising on bad bytes: undecodable bytes survive as surrogates for ``encode``.

    ``encode(decode(raw, c), c) == raw`` for any bytes with utf-8, ascii,
    latin-1, the ISO 8859 codecs, gb18030 and euc_kr, and for a message's own
    ``Header.encoding`` (chosen because it holds there). Stateful ISO-2022
    codecs cannot keep broken escape sequences: those are replaced by U+FFFD.
    """
    try:
        return raw.decode(encoding, "surrogateescape")
    except UnicodeDecodeError:
        return raw.decode(encoding, "replace")


def encode(text: str, encoding: str) -> bytes:
    """Inverse of ``decode``: byte-exact for text decoded with the same codec.

    Raises UnicodeEncodeError for characters the codec cannot represent (a value
    written into a message that its charset cannot carry).
    """
    return text.encode(encoding, "surrogateescape")
