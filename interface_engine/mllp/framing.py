"""MLLP framing: <VT> message <FS><CR>, with the limits a listener on a hospital network needs.

Reads like ``twisted.protocols.basic``: a class-level limit, one hook for a complete
frame (`frameReceived`) and one for the limit being broken (`lengthLimitExceeded`),
plus `frameTimedOut` for a frame that starts and never ends.
"""

from __future__ import annotations

from twisted.internet import protocol
from twisted.protocols.policies import TimeoutMixin

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"


def frame(payload: bytes) -> bytes:
    return START_BLOCK + payload + END_BLOCK


class MLLPReceiver(protocol.Protocol, TimeoutMixin):
    """Splits a byte stream into MLLP frames, in order, whatever the TCP reads look like.

    Bytes outside a frame are discarded and counted. A frame larger than
    `MAX_LENGTH` is not buffered past the limit: `lengthLimitExceeded` is called
    with what has arrived so far and the rest of the connection is ignored.
    """

    MAX_LENGTH = 1024 * 1024
    FRAME_TIMEOUT = 30.0
    IDLE_TIMEOUT = 300.0

    discarded = 0
    _in_frame = False
    _scan = 0
    _frame_timer = None
    _broken = False

    def connectionMade(self):
        self._buffer = bytearray()
        self.setTimeout(self.IDLE_TIMEOUT)

    def dataReceived(self, data: bytes):
        if self._broken:
            return
        self.resetTimeout()
        buffer = self._buffer
        buffer += data
        while buffer and not self._broken:
            if not self._in_frame:
                start = buffer.find(START_BLOCK)
                if start < 0:
                    self.discarded += len(buffer)
                    buffer.clear()
                    return
                self.discarded += start
                del buffer[:start + 1]
                self._in_frame, self._scan = True, 0
            end = buffer.find(END_BLOCK, self._scan)
            if end < 0 or end > self.MAX_LENGTH:
                if len(buffer) > self.MAX_LENGTH:
                    self._break(lambda: self.lengthLimitExceeded(bytes(buffer[:self.MAX_LENGTH])))
                else:
                    self._scan = max(0, len(buffer) - 1)
                    if self._frame_timer is None:
                        # Only a frame that spans reads needs a deadline; most arrive whole.
                        self._frame_timer = self.callLater(self.FRAME_TIMEOUT, self._frameDeadline)
                return
            payload = bytes(buffer[:end])
            del buffer[:end + 2]
            self._in_frame = False
            self._cancelFrameTimer()
            self.frameReceived(payload)

    def _frameDeadline(self):
        self._frame_timer = None
        self._break(self.frameTimedOut)

    def _break(self, hook):
        """Stop reading for good, free the buffer and let the hook answer."""
        self._broken = True
        self._buffer = bytearray()
        self._cancelFrameTimer()
        self.setTimeout(None)
        hook()

    def _cancelFrameTimer(self):
        if self._frame_timer is not None and self._frame_timer.active():
            self._frame_timer.cancel()
        self._frame_timer = None

    def connectionLost(self, reason=protocol.connectionDone):
        self._cancelFrameTimer()
        self.setTimeout(None)

    def sendFrame(self, payload: bytes):
        self.transport.write(START_BLOCK + payload + END_BLOCK)

    # -- hooks ------------------------------------------------------------------

    def frameReceived(self, payload: bytes):
        """Called with each complete frame's payload, in the order the frames arrived."""
        raise NotImplementedError

    def lengthLimitExceeded(self, head: bytes):
        """A frame outgrew MAX_LENGTH; `head` is its first MAX_LENGTH bytes."""
        self.transport.loseConnection()

    def frameTimedOut(self):
        """A frame started but did not end within FRAME_TIMEOUT seconds."""
        self.transport.loseConnection()

    def timeoutConnection(self):
        """Nothing arrived for IDLE_TIMEOUT seconds."""
        self.transport.loseConnection()
