"""The engine as a Twisted MultiService: the store's writer, then one service per listener.

Shutdown runs in the order the durable-ACK contract needs: stop accepting, stop
reading, let the commits in flight finish, send the answers for what was stored,
close the connections, end the writer thread, close the store.
"""

from __future__ import annotations

import sys

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from .config import EngineConfig, prepare_sqlite_file
from .ingest import Ingest
from .mllp.listener import ListenerService, MLLPListenerFactory
from .store import GroupCommitter, Store

log = Logger()

SHUTDOWN_GRACE = 10.0
GIL_SWITCH_INTERVAL = 0.0005


class Engine(service.MultiService):
    def __init__(self, config: EngineConfig, reactor):
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.store: Store | None = None
        self.committer: GroupCommitter | None = None
        self.listeners: list[ListenerService] = []

    def startService(self):
        """Open the store and bind every port; raises StoreError or CannotListenError."""
        # The reactor and the writer thread hand the GIL to each other once per batch;
        # with Python's default 5 ms switch interval that hand-over alone can add
        # milliseconds to every ACK.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        config = self.config
        prepare_sqlite_file(config.store.url)
        self.store = Store(config.store.url, duplicate_window=config.store.duplicate_window)
        self.store.check_schema()
        self.committer = GroupCommitter(self.store, self.reactor, max_batch=config.store.max_batch)
        self.committer.start()
        for listener in config.listeners:
            ingest = Ingest(self.committer, listener, config.hl7)
            factory = MLLPListenerFactory(listener, ingest, self.committer, config.store.max_backlog)
            svc = ListenerService(factory, self.reactor)
            svc.setServiceParent(self)
            self.listeners.append(svc)
        try:
            super().startService()
        except Exception:
            for svc in self.listeners:
                if svc.port is not None:
                    svc.port.stopListening()
            self.committer.stop()
            raise
        log.info("engine started: {count} listener(s), store {kind}",
                 count=len(self.listeners), kind=config.store.url.split(":")[0])

    @defer.inlineCallbacks
    def stopService(self):
        service.Service.stopService(self)
        log.info("stopping: no new connections; answering what is stored")
        yield defer.DeferredList([svc.stopAccepting() for svc in self.listeners])
        for svc in self.listeners:
            for p in list(svc.factory.connections):
                p.pause("shutdown")
        if self.committer is not None:
            yield self.committer.drained()
        closing = defer.DeferredList([svc.factory.closeAll() for svc in self.listeners])
        closing.addTimeout(SHUTDOWN_GRACE, self.reactor)
        try:
            yield closing
        except defer.TimeoutError:
            log.warn("some connections did not close within {s}s; dropping them", s=SHUTDOWN_GRACE)
            for svc in self.listeners:
                for p in list(svc.factory.connections):
                    p.transport.abortConnection()
        if self.committer is not None:
            yield self.committer.stop()
        for svc in self.listeners:
            counts = dict(svc.factory.ingest.counts) | dict(svc.factory.counts)
            log.info("listener {name}: {counts}", name=svc.factory.config.name,
                     counts=", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "idle")
        if self.store is not None:
            self.store.close()
        log.info("engine stopped")
