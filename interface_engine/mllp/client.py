"""A small blocking MLLP client: for `interface-engine send`, tests and scripts."""

from __future__ import annotations

import socket
import ssl

from .framing import END_BLOCK, START_BLOCK


class MLLPError(Exception):
    """The peer closed, timed out or answered something that is not an MLLP frame."""


def tls_context(ca: str | None = None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """The client side of the engine's TLS policy: 1.2 or later, AEAD suites, the server verified."""
    from ..tls import AEAD_CIPHERS

    try:
        context = ssl.create_default_context(cafile=ca)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(AEAD_CIPHERS)
        if cert:
            context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise MLLPError(f"cannot use the TLS files: {getattr(e, 'strerror', None) or e}") from None
    return context


class MLLPClient:
    def __init__(self, host: str, port: int, timeout: float = 10.0, tls: ssl.SSLContext | None = None,
                 server_name: str | None = None):
        self.address = (host, port)
        self.timeout = timeout
        self.tls = tls
        self.server_name = server_name or host
        self._sock: socket.socket | None = None
        self._buffer = b""

    def __enter__(self):
        self.connect()
        return self

    def __exit__(self, *exc):
        self.close()

    def connect(self):
        try:
            self._sock = socket.create_connection(self.address, timeout=self.timeout)
        except OSError as e:
            raise MLLPError(f"cannot connect to {self.address[0]}:{self.address[1]}: "
                            f"{e.strerror or e}") from None
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            try:
                self._sock = self.tls.wrap_socket(self._sock, server_hostname=self.server_name)
            except (OSError, ssl.SSLError) as e:
                self.close()
                raise MLLPError(f"TLS handshake with {self.address[0]}:{self.address[1]} failed: "
                                f"{getattr(e, 'reason', None) or e}") from None

    def close(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def send(self, payload: bytes) -> bytes:
        """Send one frame and return the payload of the answer frame."""
        self.send_raw(START_BLOCK + payload + END_BLOCK)
        return self.receive()

    def send_raw(self, data: bytes):
        try:
            self._sock.sendall(data)
        except OSError as e:
            raise MLLPError(f"connection lost while sending: {e.strerror or e}") from None

    def receive(self) -> bytes:
        while True:
            start = self._buffer.find(START_BLOCK)
            end = self._buffer.find(END_BLOCK, start + 1) if start >= 0 else -1
            if end >= 0:
                payload = self._buffer[start + 1:end]
                self._buffer = self._buffer[end + 2:]
                return payload
            try:
                chunk = self._sock.recv(65536)
            except socket.timeout:
                raise MLLPError(f"no answer within {self.timeout:g}s") from None
            except OSError as e:
                raise MLLPError(f"connection lost while waiting for the answer: {e.strerror or e}") from None
            if not chunk:
                raise MLLPError("the peer closed the connection without answering")
            self._buffer += chunk
