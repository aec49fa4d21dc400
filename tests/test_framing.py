"""MLLPReceiver on its own: frame boundaries, limits and deadlines, with a fake clock."""

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from interface_engine.mllp.framing import MLLPReceiver


class Collector(MLLPReceiver):
    MAX_LENGTH = 100
    FRAME_TIMEOUT = 5.0
    IDLE_TIMEOUT = 60.0

    def __init__(self, clock):
        self.clock = clock
        self.frames, self.overflows, self.timeouts = [], [], 0

    def callLater(self, period, func):
        return self.clock.callLater(period, func)

    def frameReceived(self, payload):
        self.frames.append(payload)

    def lengthLimitExceeded(self, head):
        self.overflows.append(head)
        super().lengthLimitExceeded(head)

    def frameTimedOut(self):
        self.timeouts += 1
        super().frameTimedOut()


def connect():
    clock = Clock()
    p = Collector(clock)
    transport = StringTransport()
    p.makeConnection(transport)
    return p, transport, clock


def test_frame_split_byte_by_byte():
    p, _, _ = connect()
    for b in b"\x0bMSH|one\x1c\x0d":
        p.dataReceived(bytes([b]))
    assert p.frames == [b"MSH|one"]


def test_ten_frames_in_one_read_in_order():
    p, _, _ = connect()
    p.dataReceived(b"".join(b"\x0bM%d\x1c\x0d" % i for i in range(10)))
    assert p.frames == [b"M%d" % i for i in range(10)]


def test_garbage_outside_frames_is_discarded_and_counted():
    p, _, _ = connect()
    p.dataReceived(b"junk\x0bA\x1c\x0dmore\r\n\x0bB\x1c\x0d")
    assert p.frames == [b"A", b"B"]
    assert p.discarded == len(b"junk") + len(b"more\r\n")


def test_fs_without_cr_is_content_and_split_end_block_is_found():
    p, _, _ = connect()
    p.dataReceived(b"\x0bA\x1cB\x1c")
    p.dataReceived(b"\x0d")
    assert p.frames == [b"A\x1cB"]


def test_oversized_frame_is_not_buffered_past_the_limit():
    p, transport, _ = connect()
    p.dataReceived(b"\x0b" + b"x" * 60)
    p.dataReceived(b"x" * 60)
    assert p.overflows == [b"x" * 100]
    assert transport.disconnecting
    p.dataReceived(b"y" * 10_000 + b"\x1c\x0d\x0bNEXT\x1c\x0d")
    assert p.frames == [] and len(p._buffer) == 0


def test_frame_at_exactly_the_limit_is_accepted():
    p, _, _ = connect()
    p.dataReceived(b"\x0b" + b"x" * 100 + b"\x1c\x0d")
    assert p.frames == [b"x" * 100] and not p.overflows


def test_started_frame_must_end_before_the_deadline():
    p, transport, clock = connect()
    p.dataReceived(b"\x0bMSH|partial")
    clock.advance(4.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert p.timeouts == 1 and transport.disconnecting


def test_deadline_is_per_frame():
    p, transport, clock = connect()
    for _ in range(4):
        p.dataReceived(b"\x0bA\x1c\x0d")
        clock.advance(3)
    assert p.timeouts == 0 and not transport.disconnecting
    assert len(p.frames) == 4


def test_idle_connection_times_out_and_data_resets_the_clock():
    p, transport, clock = connect()
    clock.advance(59)
    p.dataReceived(b"\x0bA\x1c\x0d")
    clock.advance(59)
    assert not transport.disconnecting
    clock.advance(2)
    assert transport.disconnecting
