import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interface_engine.hl7 import Header, HL7Error, peek

VALID = (b"MSH|^~\\&|SENDAPP|SENDFAC|RECVAPP|RECVFAC|20240102030405||ADT^A01^ADT_A01|CTRL0001|P|2.5.1"
         b"|||AL|NE||UNICODE UTF-8\rPID|1||MRN001||DOE^JANE\r")


def test_reads_msh_fields(adt_bytes):
    h = peek(adt_bytes)
    assert isinstance(h, Header)
    assert h.error is None
    assert (h.field_sep, h.component_sep, h.repetition_sep, h.escape_char, h.subcomponent_sep) == \
        ("|", "^", "~", "\\", "&")
    assert h.encoding_chars == "^~\\&"
    assert h.sending_application == "SENDAPP"
    assert h.sending_facility == "SENDFAC"
    assert h.receiving_application == "RECVAPP"
    assert h.receiving_facility == "RECVFAC^1.2.3^ISO"  # composite: encoded text
    assert h.timestamp == "20240102030405"
    assert (h.message_type, h.trigger_event, h.message_structure) == ("ADT", "A01", "ADT_A01")
    assert h.control_id == "CTRL0001"
    assert h.processing_id == "P"
    assert h.version == "2.5.1"
    assert (h.accept_ack_type, h.application_ack_type) == ("AL", "NE")
    assert h.charset == "UNICODE UTF-8"
    assert h.encoding == "utf-8"
    assert h.wants_enhanced_ack


def test_absent_values_are_empty():
    h = peek(b"MSH|^~\\&|||||||ORU^R01|X1\r")
    assert h.error is None
    assert h.sending_application == h.version == h.charset == h.message_structure == ""
    assert h.accept_ack_type == "" and not h.wants_enhanced_ack
    assert h.processing_id == ""


def test_header_values_are_unescaped():
    h = peek(b"MSH|^~\\&|A\\F\\B|FAC\\E\\X|||||ORU^R01|C\\T\\1\r")
    assert h.sending_application == "A|B"
    assert h.sending_facility == "FAC\\X"
    assert h.control_id == "C&1"
    assert h.raw(10) == "C\\T\\1"


@pytest.mark.parametrize("prefix", [b"\xef\xbb\xbf", b"\r\n", b"  \n", b"\xef\xbb\xbf\r\n", b"\x0b"])
def test_bom_and_leading_whitespace_skipped(prefix):
    h = peek(prefix + VALID)
    assert h.error is None
    assert h.control_id == "CTRL0001"


@pytest.mark.parametrize("eol", [b"\r", b"\n", b"\r\n"])
def test_segment_terminators(eol):
    h = peek(VALID.replace(b"\r", eol))
    assert h.error is None
    assert h.charset == "UNICODE UTF-8"  # the last MSH field must not carry the terminator


def test_msh_only_without_terminator():
    h = peek(b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|X1|P|2.3")
    assert h.error is None and h.version == "2.3"


def test_non_standard_field_separator():
    h = peek(b"MSH^~|\\&^APP^FAC^RAPP^RFAC^20240101^^ADT~A24^C42^T^2.4^^^AL\r")
    assert h.error is None
    assert (h.field_sep, h.component_sep, h.repetition_sep) == ("^", "~", "|")
    assert (h.message_type, h.trigger_event) == ("ADT", "A24")
    assert h.control_id == "C42"
    assert h.accept_ack_type == "AL"


def test_three_encoding_characters():
    h = peek(b"MSH|^~}|APP|FAC|||20240101||BAR^P01|C1|P|2.4\r")
    assert h.error is None
    assert (h.component_sep, h.repetition_sep, h.escape_char, h.subcomponent_sep) == ("^", "~", "}", "")
    assert h.encoding_chars == "^~}"


def test_escape_char_brace():
    h = peek(b"MSH|^~}&|A}F}B||||||BAR^P01|C1\r")
    assert h.escape_char == "}"
    assert h.sending_application == "A|B"


def test_truncation_character():
    h = peek(b"MSH|^~\\&#|APP||||||ORU^R01|C1|P|2.7\r")
    assert h.error is None
    assert h.subcomponent_sep == "&" and h.truncation_char == "#"
    assert h.encoding_chars == "^~\\&#"


def test_doubled_backslash_encoding_characters():
    # ^~\\& : five characters copied from an escaped string, taken in order.
    h = peek(b"MSH|^~\\\\&|SE050|050|PACS|050|20120912011230||ADT^A01|102|T|2.6\r")
    assert h.error is None
    assert h.encoding_chars == "^~\\\\&"
    assert (h.component_sep, h.repetition_sep, h.escape_char) == ("^", "~", "\\")
    assert h.subcomponent_sep == ""  # repeats the escape character: treated as absent
    assert h.control_id == "102"


@pytest.mark.parametrize("enc", ["^", "^~"])
def test_short_encoding_characters(enc):
    h = peek(f"MSH|{enc}|A||||||ADT{enc[0]}A01|C1\r".encode())
    assert h.error is None
    assert h.escape_char == "" and h.subcomponent_sep == ""
    assert h.trigger_event == "A01"


def test_batch_reads_first_msh():
    batch = (b"FHS|^~\\&|BAPP\rBHS|^~\\&|BAPP\r" + VALID + b"MSH|^~\\&|OTHER||||||ADT^A02|C2\rBTS|2\rFTS|1\r")
    h = peek(batch)
    assert h.error is None
    assert h.control_id == "CTRL0001"


ERRORS = [
    (b"", "100", "no MSH segment at start of message"),
    (b"\xef\xbb\xbf", "100", "no MSH segment at start of message"),
    (b"PID|1||X\r", "100", "no MSH segment at start of message"),
    (b"xMSH|^~\\&|\r", "100", "no MSH segment at start of message"),
    (b"FHS|^~\\&\rBHS|^~\\&\rBTS|0\rFTS|1\r", "100", "no MSH segment in batch"),
    (b"MSH", "101", "MSH-2 (encoding characters) is empty"),
    (b"MSH|", "101", "MSH-2 (encoding characters) is empty"),
    (b"MSH||APP|FAC|||20240101||ADT^A01|C1|P|2.5\r", "101", "MSH-2 (encoding characters) is empty"),
    (b"MSH|^~\\&|APP|FAC|||20240101|||C1|P|2.5\r", "101", "MSH-9 (message type) is empty"),
    (b"MSH|^~\\&|APP|FAC|||20240101||^A01|C1|P|2.5\r", "101", "MSH-9 (message type) is empty"),
    (b"MSH|^~\\&abc|APP||||||ADT^A01|C1\r", "102", "MSH-2 (encoding characters) has more than 5 characters"),
]


@pytest.mark.parametrize(("raw", "code", "reason"), ERRORS)
def test_errors(raw, code, reason):
    h = peek(raw)
    assert isinstance(h.error, HL7Error)
    assert (h.error.code, h.error.reason) == (code, reason)


def test_error_header_keeps_what_it_could_read():
    h = peek(b"MSH||SENDAPP|SENDFAC|||20240101||ADT^A01|CTRL77|P|2.5\r")
    assert h.error.code == "101"
    assert h.control_id == "CTRL77"
    assert h.sending_application == "SENDAPP"
    assert (h.field_sep, h.component_sep, h.repetition_sep, h.escape_char, h.subcomponent_sep) == \
        ("|", "^", "~", "\\", "&")


def test_error_header_defaults_delimiters():
    h = peek(b"garbage")
    assert (h.field_sep, h.component_sep, h.repetition_sep, h.escape_char, h.subcomponent_sep) == \
        ("|", "^", "~", "\\", "&")
    assert h.control_id == ""


def test_empty_control_id_is_accepted():
    h = peek(b"MSH|^~\\&|APP|FAC|||20240101||ADT^A01||P|2.5\r")
    assert h.error is None and h.control_id == ""


def test_error_reason_holds_no_content():
    h = peek(b"MSH|^~\\&|SECRETAPP|SECRETFAC|||20240101||||P|2.5\r")
    assert "SECRET" not in h.error.reason and "SECRET" not in str(h.error)


@pytest.mark.parametrize("raw", [
    b"MSHH0\r", b"MSH|^|||||||^A|||2.2\r^AA", b"MSH", b"MSH|", b"\x0bMSH|^~\\&|", b"", b"\xef\xbb\xbf",
    b"MSH\r", b"MSH|\xff\xfe|\x00", b"FHS", b"BHS|\rMSH", b"MSH|^~\\&|" + b"|" * 5000,
])
def test_parser_killers(raw):
    h = peek(raw)
    assert h.error is not None
    assert isinstance(h.control_id, str) and isinstance(h.encoding, str)


def test_peek_does_not_decode_the_body():
    # A body that is not valid UTF-8: peek still answers from MSH; the codec is
    # settled (and falls back) only when asked.
    raw = VALID + b"OBX|1|ST|X||caf\xe9\r"
    h = peek(raw)
    assert h.error is None and h._encoding is None
    assert h.encoding == "latin-1"


MUTATIONS = st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.binary(max_size=3)), max_size=6)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_peek_never_raises_on_any_bytes(raw):
    h = peek(raw)
    assert isinstance(h, Header)
    assert all(isinstance(getattr(h, a), str) for a in (
        "field_sep", "component_sep", "control_id", "message_type", "version", "charset", "encoding"))
    assert h.error is None or h.error.code in {"100", "101", "102"}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(MUTATIONS, st.sampled_from([b"", b"\xef\xbb\xbf", b"\r\n", b"FHS|^~\\&\r"]))
def test_peek_never_raises_on_mutated_messages(edits, prefix):
    raw = bytearray(VALID)
    for pos, chunk in edits:
        raw[pos:pos + 1] = chunk
    h = peek(prefix + bytes(raw))
    assert isinstance(h, Header)
    assert isinstance(h.encoding, str)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.sampled_from(["utf-8", "ascii", "latin-1", "no-such-codec", "UNICODE UTF-8"]))
def test_peek_never_raises_with_any_charset_settings(tail, charset):
    h = peek(b"MSH|^~\\&|" + tail, default_charset=charset, fallback_charset=charset)
    assert isinstance(h.encoding, str)
