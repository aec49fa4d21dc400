import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from interface_engine.hl7 import decode, encode, parse, peek
from interface_engine.hl7.charset import codec_for


@pytest.mark.parametrize(("msh18", "codec"), [
    ("ASCII", "utf-8"),
    ("8859/1", "latin-1"),
    ("8859/2", "iso8859-2"),
    ("8859/5", "iso8859-5"),
    ("8859/9", "iso8859-9"),
    ("8859/15", "iso8859-15"),
    ("UNICODE UTF-8", "utf-8"),
    ("UTF-8", "utf-8"),
    ("UNICODE", "utf-8"),
    ("ISO IR6", "utf-8"),
    ("ISO IR100", "latin-1"),
    ("ISO IR192", "utf-8"),
    ("ISO IR87", "iso2022_jp"),
    ("GB 18030-2000", "gb18030"),
    ("KS X 1001", "euc_kr"),
    ("BIG-5", "big5"),
    ("UNICODE UTF-16", "utf-16"),
])
def test_msh18_names(msh18, codec):
    assert codec_for(msh18) == codec


def test_empty_and_unknown_msh18():
    assert codec_for("", "latin-1", "utf-8") == "latin-1"
    assert codec_for("", "ascii", "latin-1") == "utf-8"  # ASCII is always read as its superset
    assert codec_for("KLINGON", "utf-8", "cp1252") == "cp1252"
    assert codec_for("KLINGON", "utf-8", "no-such-codec") == "latin-1"


def msg(charset: str, body: bytes = b"") -> bytes:
    return (f"MSH|^~\\&|APP|FAC|||20240101||ADT^A01|C1|P|2.5.1||||||{charset}\r".encode("ascii")
            + body)


def test_declared_codec_used_when_it_fits():
    raw = msg("8859/1", b"PID|1||X||M\xdcLLER^ANNA\r")
    m = parse(raw)
    assert m.encoding == "latin-1"
    assert m["PID-5.1"] == "MÜLLER"
    assert m.to_bytes() == raw


def test_utf8_body():
    raw = msg("UNICODE UTF-8", "OBX|1|NM|X||5|µmol/L\r".encode())
    m = parse(raw)
    assert m.encoding == "utf-8"
    assert m["OBX-6"] == "µmol/L"
    assert m.to_bytes() == raw


def test_empty_msh18_uses_default():
    raw = msg("", "PID|1||X||ÅSTRÖM\r".encode())
    assert peek(raw).encoding == "utf-8"
    assert peek(raw, default_charset="latin-1").encoding == "latin-1"


def test_bytes_that_do_not_fit_fall_back():
    raw = msg("UNICODE UTF-8", b"PID|1||X||M\xdcLLER\r")  # latin-1 byte in a 'UTF-8' message
    h = peek(raw)
    assert h.error is None
    assert h.encoding == "latin-1"
    m = parse(raw)
    assert m["PID-5"] == "MÜLLER"
    assert m.to_bytes() == raw


def test_fallback_that_does_not_fit_either_ends_in_latin1():
    raw = msg("ASCII", b"PID|1||X||\xff\xfe\r")
    h = peek(raw, fallback_charset="utf-8")
    assert h.encoding == "latin-1"
    assert parse(raw, fallback_charset="utf-8").to_bytes() == raw


def test_utf16_declaration_on_ascii_bytes_falls_back():
    raw = msg("UNICODE UTF-16", b"PID|1||X\r")  # even length, would 'decode' as UTF-16
    assert peek(raw).encoding == "latin-1"
    assert parse(raw)["PID-3"] == "X"


def test_non_ascii_msh_line():
    raw = "MSH|^~\\&|ÄPP|FAC|||20240101||ADT^A01|C1|P|2.5.1||||||8859/1\r".encode("latin-1")
    h = peek(raw)
    assert h.sending_application == "ÄPP"
    assert h.encoding == "latin-1"


def test_gb18030_message():
    raw = msg("GB 18030-2000", "PID|1||X||张^三\r".encode("gb18030"))
    m = parse(raw)
    assert m.encoding == "gb18030"
    assert m["PID-5.1"] == "张"
    assert m.to_bytes() == raw


def test_hex_escape_uses_message_codec():
    raw = msg("8859/1", b"OBX|1|ST|X||A\\XE9\\B\r")
    assert parse(raw)["OBX-5"] == "AéB"


EXACT_CODECS = ["utf-8", "ascii", "latin-1", "iso8859-2", "iso8859-7", "gb18030", "euc_kr"]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.sampled_from(EXACT_CODECS))
def test_decode_encode_is_byte_exact(raw, codec):
    assert encode(decode(raw, codec), codec) == raw


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=50), st.sampled_from(["big5", "iso2022_jp", "utf-16", "cp1252"]))
def test_decode_never_raises(raw, codec):
    assert isinstance(decode(raw, codec), str)


def test_big5_duplicate_mappings_are_not_chosen():
    # 0xA2CE reads as U+5345, which big5 writes as 0xA4CA: the codec cannot give these bytes back.
    raw = msg("BIG-5", b"OBX|1|ST|X||\xa2\xce\r")
    assert peek(raw).encoding == "latin-1"
    assert parse(raw).to_bytes() == raw


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.sampled_from(["UNICODE UTF-8", "ASCII", "8859/1", "8859/7", "GB 18030-2000",
                                                 "BIG-5", "KS X 1001", "ISO IR87", "UNICODE UTF-16", ""]))
def test_parse_round_trip_is_byte_exact_for_any_body(body, charset):
    body = body.replace(b"\r", b"").replace(b"\n", b"")
    raw = msg(charset, b"OBX|1|ST|X||" + body + b"\r")
    m = parse(raw)
    assert m.to_bytes() == raw
    assert m.encoding == peek(raw).encoding
