"""What the fuzzers feed: the three places where bytes from the network meet the engine's code.

Each target takes arbitrary bytes and must return normally or raise only the
error it documents (`HL7Error` from `parse`); anything else is a bug. The
targets are plain functions so that hypothesis (in the test suite) and atheris
(`fuzz/run.py`, coverage-guided) drive the very same code.
"""

from __future__ import annotations

from twisted.internet import task
from twisted.internet.testing import StringTransport

from interface_engine import hl7
from interface_engine.mllp.framing import END_BLOCK, START_BLOCK, MLLPReceiver


class _Collector(MLLPReceiver):
    MAX_LENGTH = 4096
    FRAME_TIMEOUT = 30.0
    IDLE_TIMEOUT = None

    def __init__(self):
        self.callLater = task.Clock().callLater  # timers exist but never fire here
        self.frames: list[bytes] = []
        self.oversized: list[bytes] = []

    def frameReceived(self, payload: bytes):
        self.frames.append(payload)

    def lengthLimitExceeded(self, head: bytes):
        self.oversized.append(head)
        self.transport.loseConnection()


def frame(data: bytes, cut: int = 7) -> list[bytes]:
    """The framer, fed `data` in pieces of `cut` bytes; returns the frames it found.

    Checked here, not by the caller: every frame is what stood between a start
    block and an end block, within the limit, in order.
    """
    receiver = _Collector()
    receiver.makeConnection(StringTransport())
    step = max(1, cut)
    for i in range(0, len(data), step):
        if receiver.oversized:
            break
        receiver.dataReceived(data[i:i + step])
    for payload in receiver.frames:
        assert len(payload) <= receiver.MAX_LENGTH
        assert START_BLOCK + payload + END_BLOCK in data or payload in data
    for head in receiver.oversized:
        assert len(head) == receiver.MAX_LENGTH
    return receiver.frames


PATHS = ("MSH-9", "MSH-10", "PID-3", "PID-3.1", "PID-5[2].1", "OBX[2]-5", "PID-3.4.2", "ZZZ-1")


def parse(data: bytes) -> None:
    """peek never raises; parse raises only HL7Error; reading paths and segments never raises."""
    header = hl7.peek(data)
    assert isinstance(header.control_id, str)
    if hl7.is_batch(data):
        hl7.split_messages(data)
    try:
        msg = hl7.parse(data)
    except hl7.HL7Error:
        return
    for path in PATHS:
        try:
            msg[path]
        except hl7.HL7Error:
            pass  # a path the message's own text makes invalid is reported, not crashed on
    for segment in msg.segments():
        str(segment)


def ack(data: bytes) -> bytes:
    """Any header gets an ACK that parses, names its control id and carries no injected segment."""
    header = hl7.peek(data)
    code = "AR" if header.error else "AA"
    answer = hl7.build_ack(header, code, control_id="FUZZ1", reason=header.error.reason if header.error else "")
    parsed = hl7.parse(answer)
    assert [s.name for s in parsed.segments()][:2] == ["MSH", "MSA"], answer
    assert parsed["MSA-1"] in ("AA", "AR", "CA", "CR"), answer
    assert START_BLOCK not in answer and b"\x1c" not in answer
    if hl7.is_batch(data):
        batch = hl7.build_batch_ack(data, [answer])
        assert START_BLOCK not in batch and b"\x1c" not in batch
    return answer


TARGETS = {"frame": frame, "parse": parse, "ack": ack}
