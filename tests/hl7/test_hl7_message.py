import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interface_engine.hl7 import HL7Error, Message, Segment, parse, peek


@pytest.fixture
def adt(adt_bytes) -> Message:
    return parse(adt_bytes)


@pytest.mark.parametrize(("path", "value"), [
    ("MSH-1", "|"),
    ("MSH-2", "^~\\&"),
    ("MSH-3", "SENDAPP"),
    ("MSH-6", "RECVFAC^1.2.3^ISO"),
    ("MSH-6.2", "1.2.3"),
    ("MSH-9", "ADT^A01^ADT_A01"),
    ("MSH-9.1", "ADT"),
    ("MSH-9.3", "ADT_A01"),
    ("MSH-10", "CTRL0001"),
    ("PID-3", "MRN001^^^HOSP&1.2.3&ISO^MR~SSN002^^^SSA^SS"),  # whole field, all repetitions
    ("PID-3.1", "MRN001"),                                    # first repetition
    ("PID-3[1]", "MRN001^^^HOSP&1.2.3&ISO^MR"),
    ("PID-3[2]", "SSN002^^^SSA^SS"),
    ("PID-3[2].4", "SSA"),
    ("PID-3.4", "HOSP&1.2.3&ISO"),                            # composite: encoded
    ("PID-3.4.2", "1.2.3"),
    ("PID-3.4.3", "ISO"),
    ("PID-5", "DOE^JANE^Q~SMITH^JANE"),
    ("PID-5.1", "DOE"),
    ("PID-5[2].1", "SMITH"),
    ("PID-5[2].2", "JANE"),
    ("PID-7", "19800101"),
    ("PID-13", "555&1234"),                                   # leaf: escapes decoded
    ("PID-14", '""'),                                         # explicit null
    ("OBX-5", "value one"),
    ("OBX[2]-5", "line\\.br\\two | pipe"),                    # formatting kept, \F\ decoded
    ("OBX[3]-3.2", "Third&Sub"),
    ("OBX[3]-3.2.2", "Sub"),
    ("OBX[3]-6", "mg&milligram"),
    ("OBX[3]-5", "42"),
])
def test_paths(adt, path, value):
    assert adt[path] == value


@pytest.mark.parametrize("path", [
    "ZZZ-1", "OBX[4]-5", "PID-40", "PID-3[3]", "PID-3[3].1", "PID-5.9", "PID-3.1.2",
    "MSH-1.2", "MSH-2[2]", "EVN-2.2", "PV1-3.3.2",
])
def test_missing_parts_are_empty(adt, path):
    assert adt[path] == ""


def test_leaf_subcomponent_of_plain_value(adt):
    assert adt["PV1-3.3.1"] == "A"
    assert adt["EVN-2.1.1"] == "20240102030405"


@pytest.mark.parametrize("path", [
    "PID", "PID-", "pid-3", "PID-0", "PID-3.0", "PID-3[0]", "PID[0]-3", "PID-3.1.2.3", "PID-x", "PID 3",
    "-3", "PID-3[", "PID-3]", "PIDD-3", "", "3",
])
def test_malformed_paths_raise_value_error(adt, path):
    with pytest.raises(ValueError, match=r"HL7 path|segment id"):
        adt[path]


def test_segments(adt):
    assert [s.name for s in adt.segments()] == ["MSH", "EVN", "PID", "PV1", "OBX", "OBX", "OBX"]
    assert len(adt.segments("OBX")) == 3
    assert adt.segments("NTE") == []
    assert adt.segment("NTE") is None
    pid = adt.segment("PID")
    assert isinstance(pid, Segment) and pid.name == "PID"
    assert adt.segment("OBX") is adt.segments("OBX")[0]


def test_segment_relative_paths(adt):
    obx = adt.segments("OBX")[2]
    assert obx["5"] == "42"
    assert obx["3.1"] == "CODE3"
    assert obx["OBX-3.2.2"] == "Sub"
    pid = adt.segment("PID")
    assert pid["5[2].1"] == "SMITH"
    assert pid["PID-3[2].4"] == "SSA"
    msh = adt.segment("MSH")
    assert msh["1"] == "|" and msh["2"] == "^~\\&" and msh["9.2"] == "A01"
    with pytest.raises(ValueError):
        obx["PID-3"]
    with pytest.raises(ValueError):
        obx["OBX[2]-5"]


def test_header_and_encoding(adt):
    assert adt.header.control_id == "CTRL0001"
    assert adt.encoding == "utf-8"


def test_round_trip_cr(adt_bytes, adt):
    assert adt.to_bytes() == adt_bytes
    assert adt.to_text() == adt_bytes.decode()


@pytest.mark.parametrize("eol", ["\n", "\r\n"])
def test_other_terminators(adt_text, eol):
    m = parse(adt_text.replace("\r", eol).encode())
    assert m["PID-5[2].1"] == "SMITH"
    assert len(m.segments()) == 7
    assert m.to_text() == adt_text


def test_blank_lines_dropped(adt_text):
    m = parse(adt_text.replace("\r", "\r\n\r\n").encode())
    assert len(m.segments()) == 7


def test_str_input(adt_text):
    m = parse(adt_text)
    assert m["PID-5.1"] == "DOE"
    assert m.encoding == "utf-8"


def test_str_input_latin1_declared():
    m = parse("MSH|^~\\&|A||||||ADT^A01|C1|P|2.5||||||8859/1\rPID|1||X||MÜLLER\r")
    assert m.encoding == "latin-1"
    assert m.to_bytes().endswith(b"M\xdcLLER\r")


def test_bom_and_leading_whitespace(adt_bytes):
    m = parse(b"\xef\xbb\xbf\r\n" + adt_bytes)
    assert m["MSH-10"] == "CTRL0001"
    assert m.to_bytes() == adt_bytes


def test_continuation_line_kept():
    raw = (b"MSH|^~\\&|A||||||OML^O21|C1|P|2.5.1\r"
           b"OBR|1|123||54089-8^Newborn screening\r"
           b"panel AHIC^LN|||201907200835\r"
           b"OBX|1|ST|X||Y\r")
    m = parse(raw)
    segs = m.segments()
    assert [s.name for s in segs] == ["MSH", "OBR", "", "OBX"]
    assert str(segs[2]) == "panel AHIC^LN|||201907200835"
    assert segs[2]["1"] == ""
    assert m["OBR-4.2"] == "Newborn screening"
    assert m["OBX-5"] == "Y"
    assert m.to_bytes() == raw
    with pytest.raises(ValueError):
        segs[2].set("1", "x")


def test_non_standard_delimiters():
    m = parse(b"MSH^~|\\&^APP^FAC^^^20240101^^ADT~A24^C9^T^2.4\r"
              b"PID^1^^11111~~~FOO&&0363|22222~~~BAR^^SMITH~JOHN\r")
    assert m["MSH-1"] == "^"
    assert m["MSH-2"] == "~|\\&"
    assert m["MSH-9.2"] == "A24"
    assert m["PID-3"] == "11111~~~FOO&&0363|22222~~~BAR"
    assert m["PID-3[2].4"] == "BAR"
    assert m["PID-3.4.3"] == "0363"
    assert m["PID-5.2"] == "JOHN"


def test_three_char_encoding_and_brace_escape():
    m = parse(b"MSH|^~}|A||||||BAR^P01|C1|P|2.4\rPID|1||X&Y^Z}F}W\r")
    assert m["PID-3.1"] == "X&Y"  # no sub-component separator: & is data
    assert m["PID-3.1.1"] == "X&Y"
    assert m["PID-3.1.2"] == ""
    assert m["PID-3.2"] == "Z|W"


def test_parse_rejects_what_peek_rejects():
    for raw in (b"", b"PID|1\r", b"MSH||A\r", b"MSH|^~\\&|A|||||||C1\r"):
        with pytest.raises(HL7Error) as info:
            parse(raw)
        assert info.value.code == peek(raw).error.code
    with pytest.raises(HL7Error):
        parse("PID|1\r")


def test_set_leaf_values(adt):
    adt.set("PID-5.1", "DOE-SMITH")
    assert adt["PID-5.1"] == "DOE-SMITH"
    assert adt["PID-5[2].1"] == "SMITH"
    adt.set("PID-5[2].2", "JO|ANN^E")
    assert adt["PID-5[2].2"] == "JO|ANN^E"
    assert "JO\\F\\ANN\\S\\E" in adt.to_text()
    adt.set("PID-3.4.2", "9.9.9")
    assert adt["PID-3.4"] == "HOSP&9.9.9&ISO"
    adt.set("OBX[2]-5", "plain")
    assert adt["OBX[2]-5"] == "plain"
    assert adt["OBX[1]-5"] == "value one"


def test_set_creates_missing_parts(adt):
    adt.set("PV1-45", "20240101")
    assert adt["PV1-45"] == "20240101"
    assert adt.segment("PV1").text.count("|") == 45
    adt.set("EVN-7[3].2.3", "x")
    assert adt["EVN-7"] == "~~^&&x"
    assert adt["EVN-7[3].2.3"] == "x"
    adt.set("MSH-10", "NEW1")
    assert adt["MSH-10"] == "NEW1"
    assert adt.to_text().startswith("MSH|^~\\&|SENDAPP|SENDFAC|RECVAPP|RECVFAC^1.2.3^ISO|20240102030405||"
                                    "ADT^A01^ADT_A01|NEW1|")


def test_set_whole_field_replaces_repetitions(adt):
    adt.set("PID-3", "ONLY")
    assert adt["PID-3"] == "ONLY"
    assert adt["PID-3[2]"] == ""


def test_set_injection_is_escaped(adt):
    adt.set("OBX-5", "evil|\rMSH|^~\\&|\x1c\x0b")
    out = adt.to_bytes()
    assert b"\x1c" not in out and b"\x0b" not in out
    assert out.count(b"\r") == 7
    again = parse(out)
    assert again["OBX-5"] == "evil|\rMSH|^~\\&|\x1c\x0b"
    assert len(again.segments()) == 7


def test_set_errors(adt):
    with pytest.raises(KeyError, match="no ZZZ segment"):
        adt.set("ZZZ-1", "x")
    with pytest.raises(KeyError, match="OBX segment number 9"):
        adt.set("OBX[9]-1", "x")
    with pytest.raises(ValueError):
        adt.set("MSH-1", "#")
    with pytest.raises(ValueError):
        adt.set("MSH-2", "^~\\&")
    with pytest.raises(ValueError):
        adt.set("bad path", "x")


def test_set_beyond_missing_separator():
    m = parse(b"MSH|^~}|A||||||BAR^P01|C1|P|2.4\rPID|1||X\r")
    m.set("PID-3.1.1", "Y")
    assert m["PID-3"] == "Y"
    with pytest.raises(ValueError, match="no sub-component separator"):
        m.set("PID-3.1.2", "Z")


def test_batch_parses_as_one_message():
    raw = b"FHS|^~\\&|F\rBHS|^~\\&|B\rMSH|^~\\&|A||||||ADT^A01|C1|P|2.5\rPID|1||X\rBTS|1\rFTS|1\r"
    m = parse(raw)
    assert m["MSH-10"] == "C1"
    assert m["FHS-1"] == "|" and m["BHS-3"] == "B"
    assert m.to_bytes() == raw


def test_large_message_reads_lazily():
    body = b"".join(b"OBX|%d|TX|X||%s\r" % (i, b"y" * 900) for i in range(1, 1200))
    raw = b"MSH|^~\\&|A||||||ORU^R01|C1|P|2.5\r" + body
    m = parse(raw)
    assert m["OBX[1100]-1"] == "1100"
    assert len(m.segments("OBX")) == 1199


SAMPLE = (b"MSH|^~\\&|APP|FAC|RAPP|RFAC|20240101||ORU^R01^ORU_R01|C1|P|2.5.1|||AL|NE||UNICODE UTF-8\r"
          b"PID|1||ID1^^^A&1.2&ISO^MR~ID2||DOE^JANE||19800101|F\rOBX|1|ST|X^Y||v\\F\\w||||||F\r")
PATHS = ["MSH-1", "MSH-2", "MSH-9.2", "MSH-10", "PID-3", "PID-3[2]", "PID-3.4.2", "PID-5.1", "OBX-5",
         "OBX[2]-5", "ZZZ-1", "PID-99.9.9", "MSH-18"]


def _exercise(m: Message) -> None:
    for p in PATHS:
        assert isinstance(m[p], str)
    for seg in m.segments():
        for f in ("1", "2", "3", "3.1", "3[2].1.1"):
            assert isinstance(seg[f], str)
    assert isinstance(m.to_bytes(), bytes)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(SAMPLE) - 1), st.binary(max_size=3)), max_size=8))
def test_parse_never_raises_when_peek_accepts_mutations(edits):
    raw = bytearray(SAMPLE)
    for pos, chunk in edits:
        raw[pos:pos + 1] = chunk
    raw = bytes(raw)
    if peek(raw).error is None:
        _exercise(parse(raw))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_parse_never_raises_when_peek_accepts_msh_plus_anything(tail):
    raw = b"MSH" + tail
    if peek(raw).error is None:
        _exercise(parse(raw))
    else:
        with pytest.raises(HL7Error):
            parse(raw)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_parse_never_raises_on_text_peek_accepts(tail):
    text = "MSH|^~\\&|A||||||ADT^A01|C1|" + tail
    _exercise(parse(text))


def test_a_copy_carries_written_values_and_is_written_apart():
    from tests.messages import adt_a01

    original = parse(adt_a01("CPY1"))
    original.set("PID-5.1", "ROE")
    copy = original.copy()
    copy.set("MSH-5", "ELSEWHERE")
    assert copy["PID-5.1"] == "ROE" and copy["MSH-5"] == "ELSEWHERE"
    assert original["MSH-5"] != "ELSEWHERE"
    assert copy.to_text() == original.to_text().replace(f"|{original['MSH-5']}|", "|ELSEWHERE|", 1)
    assert [name for name, _ in copy.lines()] == [s.name for s in original.segments()]
    assert [text for _, text in original.lines()] == [s.text for s in original.segments()]
    unread = parse(adt_a01("CPY2"))
    fresh = unread.copy()   # copied before any segment was looked up: each finds its own
    assert len(fresh.segments("PID")) == 1 and len(unread.segments("PID")) == 1


def test_segments_are_found_by_their_id_and_separator_only():
    """A line is a segment when it starts with an id (three capitals or digits) and the field
    separator, or is the id alone; any other line reads as a line without a name."""
    msg = parse(b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|1|P|2.5\r"
                b"PID|1\rPIDX|2\rpid|3\rNK1\rZ01|4\rPI|5\rNK1|6\r  PID|7\r123|8\r")
    assert [s.name for s in msg.segments()] == ["MSH", "PID", "", "", "NK1", "Z01", "", "NK1", "", "123"]
    assert [s.text for s in msg.segments("NK1")] == ["NK1", "NK1|6"]
    assert [s["1"] for s in msg.segments("PID")] == ["1"]
    assert msg.segment("123")["1"] == "8" and msg.segment("Z01")["1"] == "4"
    for name in ("pid", "PIDX", "PI", "", "ZZZ"):
        assert msg.segments(name) == [] and msg.segment(name) is None
    assert msg.segment("NK1") is msg.segments()[4] and msg.segments("NK1")[1] is msg.segments()[7]
