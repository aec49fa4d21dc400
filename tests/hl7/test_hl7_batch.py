import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from interface_engine.hl7 import is_batch, parse, peek, split_messages

M1 = b"MSH|^~\\&|A||||||ADT^A01|C1|P|2.5\rPID|1||X1\r"
M2 = b"MSH|^~\\&|A||||||ADT^A02|C2|P|2.5\rPID|1||X2\rPV1|1|I\r"


def test_is_batch():
    assert is_batch(b"FHS|^~\\&\r")
    assert is_batch(b"BHS|^~\\&\r" + M1)
    assert is_batch(b"\xef\xbb\xbf\r\nFHS|^~\\&\r")
    assert not is_batch(M1)
    assert not is_batch(b"")
    assert not is_batch(b"PID|FHS\r")


def test_full_batch():
    raw = b"FHS|^~\\&|F\rBHS|^~\\&|B\r" + M1 + M2 + b"BTS|2\rFTS|1\r"
    assert split_messages(raw) == [M1, M2]


def test_batch_without_trailers():
    raw = b"BHS|^~\\&|B\r" + M1 + M2
    assert split_messages(raw) == [M1, M2]


def test_batch_lf_and_crlf_slices_are_exact():
    m1 = M1.replace(b"\r", b"\r\n")
    m2 = M2.replace(b"\r", b"\n")
    raw = b"FHS|^~\\&\r\nBHS|^~\\&\r\n" + m1 + m2 + b"BTS|2\nFTS|1"
    assert split_messages(raw) == [m1, m2]


def test_batch_last_message_without_terminator():
    raw = b"BHS|^~\\&\r" + M1 + M2.rstrip(b"\r")
    assert split_messages(raw) == [M1, M2.rstrip(b"\r")]


def test_nested_batches():
    raw = b"FHS|^~\\&\rBHS|^~\\&\r" + M1 + b"BTS|1\rBHS|^~\\&\r" + M2 + b"BTS|1\rFTS|2\r"
    assert split_messages(raw) == [M1, M2]


def test_segment_ids_only_at_line_start():
    m = b"MSH|^~\\&|A||||||ORU^R01|C1|P|2.5\rOBX|1|TX|X||see MSH and BTS|here\r"
    raw = b"BHS|^~\\&\r" + m + b"BTS|1\r"
    assert split_messages(raw) == [m]


def test_empty_batch():
    assert split_messages(b"FHS|^~\\&\rBHS|^~\\&\rBTS|0\rFTS|1\r") == []


@pytest.mark.parametrize("raw", [M1, b"\xef\xbb\xbf" + M1, b"", b"junk"])
def test_non_batch_returned_whole(raw):
    parts = split_messages(raw)
    assert parts == [raw] and parts[0] is raw


def test_each_part_peeks_and_parses():
    raw = b"FHS|^~\\&\rBHS|^~\\&\r" + M1 + M2 + b"BTS|2\rFTS|1\r"
    headers = [peek(p) for p in split_messages(raw)]
    assert [h.control_id for h in headers] == ["C1", "C2"]
    assert [parse(p).to_bytes() for p in split_messages(raw)] == [M1, M2]


FIELD = st.text(alphabet="ABCXYZ0123 ^&.-", max_size=12)
MESSAGE = st.builds(
    lambda cid, fields, n: (f"MSH|^~\\&|APP||||||ADT^A01|{cid}|P|2.5\r"
                            + "".join(f"OBX|{i + 1}|ST|{'|'.join(fields)}\r" for i in range(n))).encode(),
    st.text(alphabet="ABC123", min_size=1, max_size=8), st.lists(FIELD, max_size=4), st.integers(0, 3))


@settings(max_examples=150, deadline=None)
@given(st.lists(MESSAGE, max_size=6), st.booleans(), st.booleans(), st.sampled_from([b"\r", b"\n", b"\r\n"]))
def test_generated_batches(messages, with_fhs, with_trailers, eol):
    messages = [m.replace(b"\r", eol) for m in messages]
    head = (b"FHS|^~\\&|F" + eol if with_fhs else b"") + b"BHS|^~\\&|B" + eol
    tail = (b"BTS|%d" % len(messages) + eol + (b"FTS|1" + eol if with_fhs else b"")) if with_trailers else b""
    raw = head + b"".join(messages) + tail
    assert is_batch(raw)
    parts = split_messages(raw)
    assert parts == messages
    assert head + b"".join(parts) + tail == raw
