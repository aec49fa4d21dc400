"""The MLLP listener: framing plus connection limits, in-order answers and backpressure."""

from __future__ import annotations

import ipaddress
import time
from collections import Counter, deque

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IHandshakeListener
from twisted.logger import Logger
from zope.interface import implementer

from ..config import ListenerConfig
from ..metrics import Metrics
from .framing import MLLPReceiver

log = Logger()


class _Answer:
    __slots__ = ("payload", "ready", "close", "started")

    def __init__(self, payload=None, ready=False, close=False, started=None):
        self.payload, self.ready, self.close = payload, ready, close
        self.started = started   # when its frame was complete: for the ACK latency


@implementer(IHandshakeListener)
class MLLPListenerProtocol(MLLPReceiver):
    """Answers every frame in the order the frames came, each only once it is stored."""

    handshaken = False
    tls_refusal: str | None = None   # set by the TLS layer when it refuses the client's certificate
    _handshake_timer = None

    def connectionMade(self):
        config = self.factory.config
        self.MAX_LENGTH = config.max_frame
        self.FRAME_TIMEOUT = config.frame_timeout
        self.IDLE_TIMEOUT = config.idle_timeout
        super().connectionMade()
        self.peer = self.transport.getPeer().host
        self._answers: deque[_Answer] = deque()
        self._paused: set[str] = set()
        self._closed = False
        self._draining = False
        self.factory.connected(self)
        if config.tls is not None:
            # A handshake must not hold a connection longer than a frame may take.
            self._handshake_timer = self.callLater(self.FRAME_TIMEOUT, self._handshakeTimedOut)

    def handshakeCompleted(self):
        self.handshaken = True
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()

    def _handshakeTimedOut(self):
        self.tls_refusal = f"no TLS handshake within {self.FRAME_TIMEOUT:g}s"
        self.transport.abortConnection()

    def frameReceived(self, payload: bytes):
        if self._closed:
            return
        answer = _Answer(started=time.perf_counter())
        self._answers.append(answer)
        d = self.factory.ingest.receive(payload, self.peer)
        d.addCallbacks(self._answered, self._notStored, callbackArgs=(answer,), errbackArgs=(answer,))
        if len(self._answers) >= self.factory.config.max_pending_per_connection:
            self.pause("pending")
        self.factory.checkBacklog()

    def _answered(self, payload: bytes, answer: _Answer):
        answer.payload, answer.ready = payload, True
        self._flush()

    def _notStored(self, failure, answer: _Answer):
        # No positive answer for what is not durable: close, and the sender resends.
        log.error("a message from {peer} was not stored ({error}); closing the connection "
                  "without an answer so that the sender resends it",
                  peer=self.peer, error=failure.getErrorMessage())
        answer.ready, answer.close = True, True
        self._flush()

    def _flush(self):
        answers = self._answers
        while answers and answers[0].ready:
            answer = answers.popleft()
            if answer.payload is not None and not self._closed:
                self.sendFrame(answer.payload)
                if answer.started is not None:
                    self.factory.ack_latency.observe(time.perf_counter() - answer.started)
            if answer.close:
                self._close()
                answers.clear()
                return
        if len(answers) <= self.factory.config.max_pending_per_connection // 2:
            self.resume("pending")
        self.factory.checkBacklog()
        if self._draining and not answers:
            self.transport.loseConnection()

    def _close(self):
        self._closed = True
        self.transport.loseConnection()

    def _closeAfterAnswers(self, final: bytes | None = None):
        self._answers.append(_Answer(final, ready=True, close=True))
        self._flush()

    def pause(self, reason: str):
        if not self._paused:
            self.transport.pauseProducing()
        self._paused.add(reason)

    def resume(self, reason: str):
        if reason in self._paused:
            self._paused.discard(reason)
            if not self._paused and not self._closed:
                self.transport.resumeProducing()

    @property
    def waiting(self) -> int:
        return len(self._answers)

    def lengthLimitExceeded(self, head: bytes):
        self.factory.counts["oversized"] += 1
        nak = self.factory.ingest.oversized(head, self.peer, self.MAX_LENGTH)
        self._closeAfterAnswers(nak)

    def frameTimedOut(self):
        self.factory.counts["frame_timeouts"] += 1
        log.warn("closing connection from {peer}: a frame did not end within {seconds}s",
                 peer=self.peer, seconds=self.FRAME_TIMEOUT)
        self._closeAfterAnswers()

    def timeoutConnection(self):
        self.factory.counts["idle_timeouts"] += 1
        log.info("closing idle connection from {peer}", peer=self.peer)
        self._closeAfterAnswers()

    def drainAndClose(self):
        """For shutdown: read nothing more, answer what is stored, then close."""
        self.pause("shutdown")
        self._draining = True
        if not self._answers:
            self.transport.loseConnection()

    def connectionLost(self, reason=protocol.connectionDone):
        super().connectionLost(reason)
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        if self.factory.config.tls is not None and not self.handshaken:
            from ..tls import handshake_error

            self.factory.handshakeFailed(self.peer, self.tls_refusal or handshake_error(reason))
        if self.discarded:
            self.factory.counts["discarded_bytes"] += self.discarded
            log.info("discarded {count} bytes outside MLLP frames from {peer}",
                     count=self.discarded, peer=self.peer)
        self.factory.disconnected(self)


class MLLPListenerFactory(protocol.Factory):
    protocol = MLLPListenerProtocol
    noisy = False  # the listener logs its own start, with its name

    def __init__(self, config: ListenerConfig, ingest, committer, max_backlog: int,
                 metrics: Metrics | None = None):
        self.config = config
        metrics = metrics or Metrics()
        self.ack_latency = metrics.ack_latency.labels(config.name)
        self.tls_failures = metrics.tls_failures.labels(config.name)
        self.ingest = ingest
        self.committer = committer
        self.max_backlog = max_backlog
        self.connections: set[MLLPListenerProtocol] = set()
        self.per_peer: Counter = Counter()
        self.counts: Counter = Counter()
        self._store_paused = False
        self._all_closed: list[defer.Deferred] = []

    def buildProtocol(self, addr):
        host = getattr(addr, "host", "?")
        if self.config.allowed_peers and not _allowed(host, self.config.allowed_peers):
            self.counts["refused_not_allowed"] += 1
            log.warn("refused connection from {peer}: not on the allowed_peers of listener {name}",
                     peer=host, name=self.config.name)
            self.refused(self.config.name, host, "address not on allowed_peers")
            return None
        if len(self.connections) >= self.config.max_connections:
            self.counts["refused_total_cap"] += 1
            log.warn("refused connection from {peer}: listener {name} is at its cap of {cap}",
                     peer=host, name=self.config.name, cap=self.config.max_connections)
            return None
        if self.per_peer[host] >= self.config.max_connections_per_peer:
            self.counts["refused_peer_cap"] += 1
            log.warn("refused connection from {peer}: it already has {cap} connections",
                     peer=host, cap=self.config.max_connections_per_peer)
            return None
        return super().buildProtocol(addr)

    def connected(self, p: MLLPListenerProtocol):
        self.connections.add(p)
        self.per_peer[p.peer] += 1
        self.counts["connections"] += 1
        log.debug("connection from {peer} on {name}", peer=p.peer, name=self.config.name)
        if self._store_paused:
            p.pause("store")

    def disconnected(self, p: MLLPListenerProtocol):
        if p in self.connections:
            self.connections.discard(p)
            self.per_peer[p.peer] -= 1
            if self.per_peer[p.peer] <= 0:
                del self.per_peer[p.peer]
        if not self.connections and self._all_closed:
            waiting, self._all_closed = self._all_closed, []
            for d in waiting:
                d.callback(None)

    def handshakeFailed(self, peer: str, why: str):
        self.counts["tls_refused"] += 1
        self.tls_failures.inc()
        log.warn("refused TLS connection from {peer} on {name}: {why}", peer=peer,
                 name=self.config.name, why=why)
        self.refused(self.config.name, peer, why)

    @staticmethod
    def refused(listener: str, peer: str, why: str):
        """Told of every peer refused for who it is (TLS, allow-list); the engine audits it."""

    def checkBacklog(self):
        """Stop reading from every connection while the store is behind, so memory stays bounded."""
        pending = self.committer.pending
        if not self._store_paused and pending >= self.max_backlog:
            self._store_paused = True
            log.warn("store is {pending} messages behind: pausing reads on {name}",
                     pending=pending, name=self.config.name)
            for p in self.connections:
                p.pause("store")
        elif self._store_paused and pending <= self.max_backlog // 2:
            self._store_paused = False
            for p in list(self.connections):
                p.resume("store")

    def closeAll(self) -> defer.Deferred:
        d = defer.Deferred()
        if not self.connections:
            d.callback(None)
            return d
        self._all_closed.append(d)
        for p in list(self.connections):
            p.drainAndClose()
        return d


def _allowed(host: str, networks) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in network for network in networks)


class ListenerService(service.Service):
    """One TCP port: stop accepting first on shutdown, then drain and close."""

    def __init__(self, factory: MLLPListenerFactory, reactor):
        self.factory = factory
        self.reactor = reactor
        self.port = None
        self.setName(f"listener:{factory.config.name}")

    def startService(self):
        config = self.factory.config
        factory = self.factory
        if config.tls is not None:
            from ..tls import TLSListenerFactory

            factory = TLSListenerFactory(config.tls, factory)
        self.port = self.reactor.listenTCP(config.port, factory, interface=config.host)
        super().startService()
        log.info("listening for MLLP on {host}:{port} ({name}){tls}", host=config.host,
                 port=self.port.getHost().port, name=config.name,
                 tls=" with TLS" + (", client certificates required" if config.tls.client_ca else "")
                 if config.tls is not None else "")

    def stopAccepting(self) -> defer.Deferred:
        return defer.maybeDeferred(self.port.stopListening) if self.port else defer.succeed(None)

    def stopService(self):
        super().stopService()
        return self.stopAccepting()
