"""Real messages from the shared corpus: our verdicts and values against EXPECT.tsv and python-hl7."""

import os
from pathlib import Path

import hl7 as python_hl7
import pytest

from interface_engine.hl7 import ack_code, build_ack, is_batch, parse, peek, split_messages

CORPUS = Path(__file__).resolve().parents[2] / ".." / "shared" / "corpus" / "hl7v2"



def _corpus() -> Path:
    if not CORPUS.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"HL7 corpus missing at {CORPUS} (expected beside the repository in shared/)")
        pytest.skip(f"HL7 corpus not present at {CORPUS} (shared/corpus/hl7v2 beside the repository)")
    return CORPUS


def _files() -> list[str]:
    if not CORPUS.is_dir():
        return ["(corpus missing)"]
    return sorted(str(p.relative_to(CORPUS)) for p in CORPUS.glob("*/*.hl7"))


def _expectations() -> dict[str, str]:
    rows = {}
    for line in (_corpus() / "EXPECT.tsv").read_text().splitlines():
        if line.startswith("#") or line.startswith("file\t") or not line.strip():
            continue
        name, answer, _why = line.split("\t", 2)
        rows[name] = answer
    return rows


@pytest.mark.parametrize("name", _files())
def test_peek_verdicts(name):
    corpus = _corpus()
    raw = (corpus / name).read_bytes()
    expect = _expectations().get(name)
    h = peek(raw)
    if expect == "AR":
        assert h.error is not None, "expected a rejection"
    else:
        assert h.error is None, h.error
        assert h.message_type
    answer = build_ack(h, ack_code(h, "reject" if h.error else "accept"), control_id="T1",
                       reason=h.error.reason if h.error else "")
    assert parse(answer)["MSA-2"] == h.control_id
    if expect == "AR":
        assert parse(answer)["MSA-1"] == "AR"


def test_edge_expectations():
    corpus = _corpus()
    expect = _expectations()
    assert expect, "EXPECT.tsv lists no files"
    for name, answer in expect.items():
        raw = (corpus / name).read_bytes()
        if answer == "AA*":
            assert is_batch(raw)
            parts = split_messages(raw)
            assert parts and all(peek(p).error is None for p in parts)
        h = peek(raw)
        code = ack_code(h, "reject" if h.error else "accept")
        allowed = {"AA": {"AA", "CA"}, "AA*": {"AA", "CA"}, "AA or AE": {"AA", "CA", "AE", "CE"},
                   "AR": {"AR", "CR"}}[answer]
        assert code in allowed, (name, code)


def test_specific_edge_facts():
    corpus = _corpus()
    h = peek((corpus / "edge/rs__mmtc_msh5_msh6.hl7").read_bytes())
    ack = parse(build_ack(h, ack_code(h, "accept"), control_id="T"))
    assert ack["MSH-3"] == h.receiving_application and ack["MSH-4"] == h.receiving_facility
    assert ack["MSH-5"] == h.sending_application and ack["MSH-6"] == h.sending_facility
    assert ack["MSA-1"] == "AA"  # MSH-15 = NE

    h = peek((corpus / "edge/hapi__npac_ORU_R01_v22_OBX_inline.hl7").read_bytes())
    assert ack_code(h, "accept") == "CA"  # MSH-15 = AL
    assert parse(build_ack(h, "CA", control_id="T"))["MSH-9"] == "ACK^R01"  # v2.2

    h = peek((corpus / "edge/hapi__segmentfinder_a24_nonstd_delims.hl7").read_bytes())
    assert (h.field_sep, h.component_sep, h.repetition_sep) == ("^", "~", "|")
    assert (h.message_type, h.trigger_event) == ("ADT", "A24")

    h = peek((corpus / "edge/hapi__npac_BAR_P01_3char_enc.hl7").read_bytes())
    assert (h.escape_char, h.subcomponent_sep) == ("}", "")

    raw = (corpus / "edge/ti__008_ORU_R01_micro_utf8.hl7").read_bytes()
    m = parse(raw)
    assert m.encoding == "utf-8"
    assert any("µ" in obx["6"] for obx in m.segments("OBX"))

    raw = (corpus / "edge/lfh__sample_win_crlf.hl7").read_bytes()
    h = peek(raw)
    assert h.control_id == "102" and h.encoding_chars == "^~\\\\&"

    m = parse((corpus / "edge/ti__TX_001_OML_O21_wrapped_line.hl7").read_bytes())
    assert "" in [s.name for s in m.segments()]
    assert len(m.segments("OBX")) == 13


def _normalised(raw: bytes) -> bytes:
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    return raw.replace(b"\r\n", b"\r").replace(b"\n", b"\r")


def _incomparable(raw: bytes) -> str | None:
    """Why python-hl7 cannot serve as oracle here (it defaults missing delimiters), or None."""
    h = peek(raw)
    if h.error is not None:
        return "rejected by peek"
    enc = h.encoding_chars
    if len(enc) not in (4, 5) or len(set(h.field_sep + enc)) != len(enc) + 1:
        return "missing or repeated delimiters, which python-hl7 reads differently"
    return None


@pytest.mark.parametrize("name", _files())
def test_values_match_python_hl7(name):
    corpus = _corpus()
    raw = _normalised((corpus / name).read_bytes())
    reason = _incomparable(raw)
    if reason:
        pytest.skip(reason)
    for part in split_messages(raw):
        try:
            theirs = python_hl7.parse(part.decode(peek(part).encoding))
        except Exception as e:  # the oracle fails on some real messages
            pytest.skip(f"python-hl7 cannot parse it: {type(e).__name__}")
        ours = parse(part)
        esc = ours.header.escape_char
        compared = 0
        for seg_name in ("MSH", "PID", "PV1", "OBR", "OBX", "ORC", "NK1", "EVN", "SCH", "RXA", "IN1", "TXA"):
            ours_segs = ours.segments(seg_name)
            theirs_segs = [s for s in theirs if str(s[0]) == seg_name]
            assert len(ours_segs) == len(theirs_segs), seg_name
            for k, other in enumerate(theirs_segs[:3], start=1):
                for f in range(1, min(len(other), 25)):
                    field = str(other[f])
                    path = f"{seg_name}[{k}]-{f}"
                    if seg_name == "MSH" and f <= 2:
                        assert ours[path] == field
                        continue
                    if esc in field:
                        continue  # python-hl7 drops escapes it does not know; we keep them
                    assert ours[path] == field
                    compared += 1
                    for r in (1, 2):
                        for c in (1, 2, 3):
                            for s in (1, 2):
                                value = other.extract_field(segment_num=k, field_num=f, repeat_num=r,
                                                            component_num=c, subcomponent_num=s) \
                                    if _present(other, f, r, c, s) else ""
                                assert ours[f"{path}[{r}].{c}.{s}"] == value, f"{path}[{r}].{c}.{s}"
                                compared += 1
        assert compared > 0


def _present(seg, f, r, c, s) -> bool:
    """Whether python-hl7 holds this element (its extract_field raises on some absent ones)."""
    try:
        seg.extract_field(field_num=f, repeat_num=r, component_num=c, subcomponent_num=s)
    except IndexError:
        return False
    return True
