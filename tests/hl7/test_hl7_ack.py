import re

import hl7 as python_hl7
import pytest

from interface_engine.hl7 import ack_code, build_ack, build_batch_ack, parse, peek, split_messages

TS = "20240102030405+0000"


def received(msh15="", version="2.5.1", enc="^~\\&", fs="|", control="CTRL0001", trigger="A01"):
    c = enc[0]
    fields = ["MSH", enc, f"SENDAPP{c}1.2{c}ISO", "SENDFAC", "RECVAPP", f"RECVFAC{c}9.9{c}ISO", "20240101",
              "", f"ADT{c}{trigger}" if trigger else "ADT", control, "T", version, "", "", msh15, ""]
    return peek((fs.join(fields) + "\rPID|1\r").encode())


def segments(ack: bytes) -> list[str]:
    text = ack.decode()
    assert text.endswith("\r") and "\n" not in text
    return text[:-1].split("\r")


def test_accept_ack():
    h = received()
    ack = build_ack(h, "AA", control_id="ACK0001", timestamp=TS)
    assert segments(ack) == [
        "MSH|^~\\&|RECVAPP|RECVFAC^9.9^ISO|SENDAPP^1.2^ISO|SENDFAC|" + TS + "||ACK^A01^ACK|ACK0001|T|2.5.1",
        "MSA|AA|CTRL0001",
    ]
    m = parse(ack)
    assert m["MSA-2"] == h.control_id
    assert (m["MSH-3"], m["MSH-4"]) == (h.receiving_application, h.receiving_facility)
    assert (m["MSH-5"], m["MSH-6"]) == (h.sending_application, h.sending_facility)
    assert m["MSH-12"] == "2.5.1"
    assert m.segment("ERR") is None


@pytest.mark.parametrize("code", ["AE", "AR", "CE", "CR"])
def test_negative_ack_has_reason_and_err(code):
    h = received(version="2.6")
    ack = build_ack(h, code, control_id="N1", reason="MSH-9 (message type) is empty", error_code="101",
                    timestamp=TS)
    m = parse(ack)
    assert m["MSA-1"] == code
    assert m["MSA-2"] == "CTRL0001"
    assert m["MSA-3"] == "MSH-9 (message type) is empty"
    assert segments(ack)[2] == ("ERR|||101^Required field missing^HL70357|E||||"
                                "MSH-9 (message type) is empty")
    assert m["ERR-3.1"] == "101" and m["ERR-4"] == "E" and m["ERR-8"] == "MSH-9 (message type) is empty"


def test_err_default_code_is_207():
    ack = build_ack(received(), "AE", control_id="N1", reason="boom", timestamp=TS)
    assert parse(ack)["ERR-3"] == "207^Application internal error^HL70357"


def test_err_before_v25_uses_eld():
    ack = build_ack(received(version="2.3"), "AR", control_id="N1", reason="bad", error_code="100", timestamp=TS)
    segs = segments(ack)
    assert segs[2] == "ERR|^^^100&Segment sequence error&HL70357"
    assert segs[1] == "MSA|AR|CTRL0001|bad"


@pytest.mark.parametrize(("version", "msh9"), [
    ("2.5.1", "ACK^A01^ACK"), ("2.3.1", "ACK^A01^ACK"), ("2.8", "ACK^A01^ACK"), ("2.3", "ACK^A01"),
    ("2.2", "ACK^A01"), ("2.1", "ACK^A01"),
])
def test_msh9_by_version(version, msh9):
    ack = parse(build_ack(received(version=version), "AA", control_id="X", timestamp=TS))
    assert ack["MSH-9"] == msh9
    assert ack["MSH-12"] == version


def test_msh9_without_trigger():
    ack = parse(build_ack(received(trigger=""), "AA", control_id="X", timestamp=TS))
    assert ack["MSH-9"] == "ACK"


def test_defaults_when_fields_absent():
    h = peek(b"MSH|^~\\&|||||||ORU^R01|C1\r")
    ack = parse(build_ack(h, "AA", control_id="X"))
    assert ack["MSH-11"] == "P"
    assert ack["MSH-12"] == "2.5.1"
    assert re.fullmatch(r"\d{14}\+0000", ack["MSH-7"])


@pytest.mark.parametrize(("msh15", "expected"), [
    ("", ("AA", "AE", "AR")),
    ("AL", ("CA", "CE", "CR")),
    ("ER", ("AA", "CE", "CR")),
    ("SU", ("CA", "AE", "AR")),
    ("NE", ("AA", "AE", "AR")),
    ("al", ("CA", "CE", "CR")),
    ("ACCEPT", ("CA", "CE", "CR")),  # not in table 0155: treated as AL
])
def test_ack_code_table_0155(msh15, expected):
    h = received(msh15=msh15)
    assert tuple(ack_code(h, o) for o in ("accept", "error", "reject")) == expected
    assert h.wants_enhanced_ack == bool(msh15)


def test_ack_code_rejects_unknown_outcome():
    with pytest.raises(ValueError):
        ack_code(received(), "maybe")
    with pytest.raises(ValueError):
        build_ack(received(), "XX", control_id="1")


def test_non_standard_delimiters_used():
    h = received(enc="~|}&", fs="^")
    ack = build_ack(h, "AE", control_id="N1", reason="a^b~c|d}e&f", timestamp=TS)
    segs = segments(ack)
    assert segs[0].startswith("MSH^~|}&^RECVAPP^RECVFAC~9.9~ISO^SENDAPP~1.2~ISO^SENDFAC^")
    assert "^ACK~A01~ACK^N1^T^2.5.1" in segs[0]
    assert segs[1] == "MSA^AE^CTRL0001^a}F}b}S}c}R}d}E}e}T}f"
    m = parse(ack)
    assert m["MSA-3"] == "a^b~c|d}e&f"
    assert m["ERR-3.2"] == "Application internal error"


def test_three_char_encoding_err_without_subcomponents():
    h = peek(b"MSH|^~}|A|B|C|D|20240101||BAR^P01|C1|P|2.4\r")
    ack = build_ack(h, "AR", control_id="N1", reason="x", timestamp=TS)
    assert segments(ack)[0].startswith("MSH|^~}|C|D|A|B|")
    assert segments(ack)[2] == "ERR|^^^207"


def test_no_escape_character_replaces_separators():
    h = peek(b"MSH|^~|A||||||ADT^A01|C1|P|2.5\r")
    ack = build_ack(h, "AE", control_id="N1", reason="a|b\rc", timestamp=TS)
    assert segments(ack)[1] == "MSA|AE|C1|a b c"


def test_injection_in_reason_is_escaped():
    reason = "x|y\rMSH|^~\\&|EVIL\x1c\rZ\x0b&~^"
    ack = build_ack(received(), "AR", control_id="N\r1", reason=reason, timestamp=TS)
    assert b"\x1c" not in ack and b"\x0b" not in ack
    segs = segments(ack)
    assert [s[:3] for s in segs] == ["MSH", "MSA", "ERR"]
    m = parse(ack)
    assert m["MSA-3"] == reason
    assert m["ERR-8"] == reason
    assert m["MSH-10"] == "N\r1"


def test_control_characters_in_received_fields_neutralised():
    h = peek(b"MSH|^~\\&|APP\x0b|FAC|||20240101||ADT^A01|C1\x1c|P|2.5\r")
    ack = build_ack(h, "AA", control_id="X", timestamp=TS)
    assert b"\x1c" not in ack and b"\x0b" not in ack
    assert parse(ack)["MSA-2"] == "C1\x1c"


def test_ack_for_rejected_header_uses_defaults():
    h = peek(b"MSH||APP|FAC|||20240101||ADT^A01|CTRL9|P|2.5\r")
    assert h.error is not None
    ack = build_ack(h, ack_code(h, "reject"), control_id="N1", reason=h.error.reason, error_code=h.error.code,
                    timestamp=TS)
    m = parse(ack)
    assert m["MSH-2"] == "^~\\&"
    assert m["MSA-1"] == "AR" and m["MSA-2"] == "CTRL9"
    assert m["MSA-3"] == "MSH-2 (encoding characters) is empty"
    for raw in (b"", b"\xff\xfe", b"MSH"):
        assert parse(build_ack(peek(raw), "AR", control_id="N2", reason="r"))["MSA-1"] == "AR"


def test_ack_encoded_with_message_codec():
    raw = "MSH|^~\\&|APP|FAC|||20240101||ADT^A01|C1|P|2.5||||||8859/1\rPID|1\r".encode("latin-1")
    ack = build_ack(peek(raw), "AE", control_id="N1", reason="Grüße", timestamp=TS)
    assert "Grüße".encode("latin-1") in ack
    ack = build_ack(peek(raw.replace(b"8859/1", b"ASCII")), "AE", control_id="N1", reason="Grüße", timestamp=TS)
    assert "Grüße".encode() in ack  # ASCII cannot carry it: utf-8


@pytest.mark.parametrize("code", ["AA", "AE", "AR", "CA", "CE", "CR"])
@pytest.mark.parametrize("version", ["2.3", "2.5.1"])
def test_python_hl7_reads_our_ack(code, version):
    h = received(version=version)
    ack = build_ack(h, code, control_id="ACK9", reason="bad | thing", timestamp=TS)
    theirs = python_hl7.parse(ack.decode())
    assert str(theirs.segment("MSA")[1]) == code
    assert str(theirs.segment("MSA")[2]) == "CTRL0001"
    assert str(theirs.segment("MSH")[10]) == "ACK9"
    assert str(theirs.segment("MSH")[3]) == "RECVAPP"
    if code[1] != "A":
        assert theirs.unescape(str(theirs.segment("MSA")[3])) == "bad | thing"


BATCH = (b"FHS|^~\\&|FAPP|FFAC|FRAPP|FRFAC|20240101||||FILE1\r"
         b"BHS|^~\\&|BAPP|BFAC|BRAPP|BRFAC|20240101||||BATCH1\r"
         b"MSH|^~\\&|A||||||ADT^A01|C1|P|2.5\rPID|1\r"
         b"MSH|^~\\&|A||||||ADT^A02|C2|P|2.5\rPID|1\r"
         b"BTS|2\rFTS|1\r")


def test_batch_ack():
    acks = [build_ack(peek(p), "AA", control_id=f"K{i}", timestamp=TS) for i, p in enumerate(split_messages(BATCH))]
    answer = build_batch_ack(BATCH, acks, timestamp=TS)
    segs = answer.decode()[:-1].split("\r")
    assert segs[0] == f"FHS|^~\\&|FRAPP|FRFAC|FAPP|FFAC|{TS}|||||FILE1"
    assert segs[1] == f"BHS|^~\\&|BRAPP|BRFAC|BAPP|BFAC|{TS}|||||BATCH1"
    assert segs[-2:] == ["BTS|2", "FTS|1"]
    parts = split_messages(answer)
    assert parts == acks
    assert [parse(p)["MSA-2"] for p in parts] == ["C1", "C2"]


def test_batch_ack_bhs_only_and_odd_delimiters():
    batch = b"BHS^~|\\&^BAPP^^BRAPP\rMSH^~|\\&^A^^^^^^ADT~A01^C1^P^2.5\r"
    answer = build_batch_ack(batch, [], timestamp=TS)
    assert answer == f"BHS^~|\\&^BRAPP^^BAPP^^{TS}\rBTS^0\r".encode()
