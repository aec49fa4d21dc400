"""Deliver messages to a downstream MLLP listener over one kept-open connection.

One frame is in flight at a time and each must be answered by an ACK naming
it (MSA-2 = the sent MSH-10). Whenever the answer stream may be out of step
with what was sent (no answer in time, an answer for another message, or
something that is not an ACK) the connection is dropped, so that a late answer
can never be taken for the next message's. The next `deliver` connects again.
"""

from __future__ import annotations

from functools import partial

from twisted.internet import defer, error, protocol
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener
from twisted.logger import Logger
from zope.interface import implementer

from .. import hl7
from ..mllp.framing import END_BLOCK, MLLPReceiver
from .base import Destination, Result, one_line

log = Logger()

_ACK_CODES = frozenset({"AA", "AE", "AR", "CA", "CE", "CR"})
_ACCEPTED = frozenset({"AA", "CA"})


class _Failed(Exception):
    """An attempt ended without a usable answer; the text is the one-line Result.error."""


@implementer(IHandshakeListener)
class _AnswerReader(MLLPReceiver):
    """The sending side of a connection, reading answers with the listener's framing and size limit."""

    IDLE_TIMEOUT = None  # an idle link is kept; a dead one shows up as a missing ACK

    def __init__(self, destination: MLLPDestination):
        self.MAX_LENGTH = destination.max_frame
        self.FRAME_TIMEOUT = destination.ack_timeout  # the ACK deadline always comes first
        self._destination = destination
        self._waiting: defer.Deferred[bytes] | None = None
        self._lost_waiters: list[defer.Deferred[None]] = []
        self.closing = False
        self.dropped = False
        self.handshaken = False

    def handshakeCompleted(self):
        self.handshaken = True

    def connectionMade(self):
        super().connectionMade()
        self.transport.setTcpNoDelay(True)
        self.transport.setTcpKeepAlive(True)
        self._destination._live.add(self)

    def send(self, payload: bytes) -> defer.Deferred[bytes]:
        """Send one frame; the Deferred fires with the answer frame or fails with _Failed."""
        self._waiting = defer.Deferred(canceller=self._forget)
        self.sendFrame(payload)
        return self._waiting

    def _forget(self, d):
        self._waiting = None

    def _fail(self, reason: str):
        d, self._waiting = self._waiting, None
        if d is not None:
            d.errback(_Failed(reason))

    def frameReceived(self, payload: bytes):
        if self.dropped:
            return
        d, self._waiting = self._waiting, None
        if d is None:
            self._destination._drop(self, "an answer came when none was awaited")
            return
        d.callback(payload)

    def lengthLimitExceeded(self, head: bytes):
        self._destination._drop(self, "oversized answer")
        self._fail(f"answer longer than {self.MAX_LENGTH} bytes")

    def whenLost(self) -> defer.Deferred[None]:
        d = defer.Deferred()
        self._lost_waiters.append(d)
        return d

    def connectionLost(self, reason=protocol.connectionDone):
        super().connectionLost(reason)
        # Forgotten before the waiting attempt resumes: its caller may deliver again at once.
        self._destination._lost(self)
        address = self._destination.address
        if self.closing:
            self._fail("destination closed before the ACK came")
        elif self._destination.tls is not None and not self.handshaken:
            from ..tls import handshake_error

            self._fail(f"TLS handshake with {address} failed: {one_line(handshake_error(reason))}")
        elif reason.check(error.ConnectionDone):
            self._fail(f"connection closed by {address} before the ACK")
        else:
            self._fail(f"connection to {address} lost before the ACK: {one_line(reason.getErrorMessage())}")
        waiters, self._lost_waiters = self._lost_waiters, []
        for d in waiters:
            d.callback(None)


class MLLPDestination(Destination):
    def __init__(self, name: str, host: str, port: int, *, ack_timeout: float = 30.0,
                 connect_timeout: float = 10.0, max_frame: int = 1024 * 1024, tls=None, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self.name = name
        self.host, self.port = host, port
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.ack_timeout = ack_timeout
        self.connect_timeout = connect_timeout
        self.max_frame = max_frame
        self._reactor = reactor
        self.tls = tls
        self._endpoint = HostnameEndpoint(reactor, host, port, timeout=connect_timeout)
        if tls is not None:
            from ..tls import client_options

            # The server's certificate and name are verified; there is no switch to skip it.
            self._endpoint = wrapClientTLS(client_options(tls, host), self._endpoint)
        self._factory = protocol.Factory.forProtocol(partial(_AnswerReader, self))
        self._factory.noisy = False
        self._connection: _AnswerReader | None = None
        self._connecting: defer.Deferred | None = None
        self._live: set[_AnswerReader] = set()

    def deliver(self, payload: bytes, target: str | None = None) -> defer.Deferred[Result]:
        return self._one_at_a_time(lambda: self._attempt(payload))

    async def _attempt(self, payload: bytes) -> Result:
        if END_BLOCK in payload:
            return Result(ok=False, error="message contains the MLLP end-of-frame bytes 1C 0D",
                          retry=False)
        control_id = hl7.peek(payload).control_id
        try:
            conn = self._connection or await self._connect()
            answer = await self._exchange(conn, payload, control_id)
        except _Failed as e:
            return Result(ok=False, error=str(e))
        return self._judge(conn, answer, control_id)

    async def _connect(self) -> _AnswerReader:
        def timed_out(result, timeout):
            raise _Failed(f"no connection to {self.address} within {timeout:g}s")

        d = self._endpoint.connect(self._factory)
        d.addTimeout(self.connect_timeout, self._reactor, onTimeoutCancel=timed_out)
        self._connecting = d
        try:
            conn = await d
        except error.ConnectionRefusedError:
            raise _Failed(f"connection refused by {self.address}") from None
        except error.TimeoutError:
            raise _Failed(f"no connection to {self.address} within {self.connect_timeout:g}s") from None
        except error.DNSLookupError:
            raise _Failed(f"cannot resolve {self.host}") from None
        except error.ConnectingCancelledError:
            raise _Failed("destination closed while connecting") from None
        except error.ConnectError as e:
            raise _Failed(f"cannot connect to {self.address}: {one_line(str(e))}") from None
        finally:
            self._connecting = None
        self._connection = conn
        log.info("destination {name}: connected to {address}", name=self.name, address=self.address)
        return conn

    async def _exchange(self, conn: _AnswerReader, payload: bytes, control_id: str) -> bytes:
        def timed_out(result, timeout):
            self._drop(conn, f"no ACK for {control_id} within {timeout:g}s")
            raise _Failed(f"no ACK within {timeout:g}s")

        answer = conn.send(payload)
        answer.addTimeout(self.ack_timeout, self._reactor, onTimeoutCancel=timed_out)
        return await answer

    def _judge(self, conn: _AnswerReader, answer: bytes, control_id: str) -> Result:
        try:
            ack = hl7.parse(answer)
        except hl7.HL7Error:
            ack = None
        code = ack["MSA-1"].strip().upper() if ack is not None else ""
        if code not in _ACK_CODES:
            self._drop(conn, f"the answer to {control_id} is not an ACK")
            return Result(ok=False, response=answer, error="answer is not an HL7 ACK")
        acked = ack["MSA-2"].strip()
        if acked != control_id:
            acked, sent = one_line(acked, 50), one_line(control_id, 50)
            self._drop(conn, f"an ACK for '{acked}' came for '{sent}'")
            return Result(ok=False, response=answer,
                          error=f"ACK MSA-2 '{acked}' does not match MSH-10 '{sent}'")
        if code in _ACCEPTED:
            return Result(ok=True, response=answer)
        # MSA-3 is deprecated from v2.5 on; ERR-8 and ERR-3.2 carry the reason there.
        reason = one_line(ack["MSA-3"] or ack["ERR-8"] or ack["ERR-3.2"]) or "(no reason given)"
        return Result(ok=False, response=answer, error=f"{code} from downstream: {reason}")

    def _drop(self, conn: _AnswerReader, why: str):
        """Abort a connection whose answers can no longer be matched to what was sent."""
        log.warn("destination {name}: dropping the connection to {address}: {why}",
                 name=self.name, address=self.address, why=why)
        if self._connection is conn:
            self._connection = None
        conn.dropped = True
        conn.transport.abortConnection()

    def _lost(self, conn: _AnswerReader):
        self._live.discard(conn)
        if self._connection is conn:
            self._connection = None
            log.info("destination {name}: connection to {address} closed",
                     name=self.name, address=self.address)

    def close(self) -> defer.Deferred[None]:
        """Close the connection (a later `deliver` opens a new one); fires once it is gone."""
        if self._connecting is not None:
            self._connecting.cancel()
        self._connection = None
        waits = []
        for conn in list(self._live):
            conn.closing = True
            waits.append(conn.whenLost())
            if not conn.dropped:  # a dropped one is already on its way out
                conn.transport.loseConnection()
        return defer.gatherResults(waits).addCallback(lambda _: None)
