"""A downstream MLLP system for tests: a real server on 127.0.0.1, in a background thread.

Plain sockets rather than the Twisted reactor, so it serves an engine running in
a subprocess and tests that run their own reactor alike. It can be stopped and
started again on the same port, to play a downstream system going down and
coming back.

Modes, chosen per received frame (a queued script first, then ``mode``):

- ``AA``, ``AE``, ``AR``: answer with that code and MSA-2 = the frame's MSH-10
  (AE and AR carry ``reason`` as MSA-3);
- ``silent``: never answer;
- ``close``: close the connection without answering;
- ``wrong-id``: answer AA with an MSA-2 naming another message;
- ``not-ack``: answer with a frame that is not HL7.

Every frame is recorded in ``received``, whatever the mode.
"""

from __future__ import annotations

import itertools
import selectors
import socket
import threading
import time

from interface_engine import hl7
from interface_engine.mllp.framing import END_BLOCK, START_BLOCK

MODES = frozenset({"AA", "AE", "AR", "silent", "close", "wrong-id", "not-ack"})


def _checked(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown receiver mode {mode!r}; one of {sorted(MODES)}")
    return mode


class Receiver:
    def __init__(self, mode: str = "AA", *, port: int = 0,
                 reason: str = "rejected by the test receiver", delay: float = 0.0):
        self.host = "127.0.0.1"
        self.port = port
        self.mode = mode
        self.reason = reason
        #: Seconds to hold each answer back, to play a slow downstream system.
        self.delay = delay
        self._received: list[bytes] = []
        self._connections = 0
        self._script: list[str] = []
        self._cond = threading.Condition()
        self._ack_ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._wake: socket.socket | None = None

    # -- control --------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str):
        self._mode = _checked(value)

    def script(self, modes: list[str]):
        """Use these modes for the next frames, one each, before falling back to ``mode``."""
        modes = [_checked(m) for m in modes]
        with self._cond:
            self._script.extend(modes)

    def start(self) -> Receiver:
        """Listen (again) on ``port``; the first start picks a free port when it is 0."""
        if self._thread is not None:
            raise RuntimeError("the receiver is already running")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(16)
        listener.setblocking(False)
        self.port = listener.getsockname()[1]
        wake_reader, self._wake = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, args=(listener, wake_reader),
                                        name=f"test-receiver:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Close the listening socket and every connection; ``start`` reopens the same port."""
        if self._thread is None:
            return
        self._wake.send(b"x")
        self._thread.join(10)
        self._wake.close()
        self._thread = self._wake = None

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- what arrived -----------------------------------------------------------

    @property
    def received(self) -> list[bytes]:
        """Payloads of the frames received so far, in arrival order (a copy)."""
        with self._cond:
            return list(self._received)

    @property
    def connections(self) -> int:
        """Connections accepted since the receiver was made, across restarts."""
        with self._cond:
            return self._connections

    def control_ids(self) -> list[str]:
        return [hl7.peek(p).control_id for p in self.received]

    def wait_for(self, count: int, timeout: float = 5.0) -> bool:
        """Wait until at least ``count`` frames have arrived; False if they did not in time."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._received) >= count, timeout)

    # -- the server thread ------------------------------------------------------------

    def _serve(self, listener: socket.socket, wake: socket.socket):
        sel = selectors.DefaultSelector()
        sel.register(listener, selectors.EVENT_READ)
        sel.register(wake, selectors.EVENT_READ)
        buffers: dict[socket.socket, bytearray] = {}
        held: list[tuple[float, socket.socket, bytes]] = []  # answers waiting out `delay`

        def drop(conn: socket.socket):
            if buffers.pop(conn, None) is not None:
                sel.unregister(conn)
                conn.close()

        def send(conn: socket.socket, data: bytes):
            try:
                conn.sendall(data)
            except OSError:
                drop(conn)

        try:
            while True:
                timeout = max(0.0, min(h[0] for h in held) - time.monotonic()) if held else None
                for key, _ in sel.select(timeout):
                    sock = key.fileobj
                    if sock is wake:
                        return
                    if sock is listener:
                        try:
                            conn, _ = listener.accept()
                        except BlockingIOError:
                            continue
                        conn.settimeout(5)
                        buffers[conn] = bytearray()
                        sel.register(conn, selectors.EVENT_READ)
                        with self._cond:
                            self._connections += 1
                        continue
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        drop(sock)
                        continue
                    buffer = buffers[sock]
                    buffer += data
                    for answer in self._frames(buffer):
                        if answer is None or sock not in buffers:
                            drop(sock)
                            break
                        if self.delay > 0:
                            held.append((time.monotonic() + self.delay, sock, answer))
                        else:
                            send(sock, answer)
                now = time.monotonic()
                for item in [h for h in held if h[0] <= now]:
                    held.remove(item)
                    if item[1] in buffers:  # still open
                        send(item[1], item[2])
        finally:
            for conn in list(buffers):
                drop(conn)
            sel.close()
            listener.close()
            wake.close()

    def _frames(self, buffer: bytearray):
        """Take each complete frame out of ``buffer``; yield the answer to send, or None to close."""
        while True:
            start = buffer.find(START_BLOCK)
            end = buffer.find(END_BLOCK, start + 1) if start >= 0 else -1
            if end < 0:
                return
            payload = bytes(buffer[start + 1:end])
            del buffer[:end + len(END_BLOCK)]
            with self._cond:
                self._received.append(payload)
                mode = self._script.pop(0) if self._script else self._mode
                self._cond.notify_all()
            if mode == "close":
                yield None
                return
            if mode != "silent":
                yield START_BLOCK + self._answer(mode, payload) + END_BLOCK

    def _answer(self, mode: str, payload: bytes) -> bytes:
        if mode == "not-ack":
            return b"this is not an HL7 message"
        header = hl7.peek(payload)
        control_id = f"RCV{next(self._ack_ids)}"
        if mode == "wrong-id":
            ack = hl7.parse(hl7.build_ack(header, "AA", control_id=control_id))
            ack.set("MSA-2", f"NOT-{header.control_id}")
            return ack.to_bytes()
        reason = self.reason if mode in ("AE", "AR") else ""
        return hl7.build_ack(header, mode, control_id=control_id, reason=reason)
