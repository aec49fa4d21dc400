"""The engine as a Twisted MultiService: store writer, channel runtime, listeners, directory sources.

Shutdown runs in the order the durable-ACK contract needs: stop accepting, stop
reading, let the commits in flight finish, send the answers for what was stored,
close the connections, let each destination finish its attempt in flight, end the
writer thread, close the store.

Reload (SIGHUP or `interface-engine reload`) re-reads the channel files. A set that
does not validate is refused whole and the running one stays. A valid one applies
channel by channel: a listener whose settings did not change keeps its connections
and only learns its new routes; a destination whose settings did not change keeps
its worker and its connection.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from twisted.application import internet, service
from twisted.internet import defer, threads
from twisted.logger import Logger

from . import keys
from .audit import FAILURE, SUCCESS, AuditTrail, Checkpointer, RefusalAudit
from .channels.config import ChannelConfig, load_channels
from .channels.directory import DirectorySource
from .channels.ownership import QueueOwnership
from .channels.runtime import ChannelRuntime
from .channels.templating import Mappings
from .config import ConfigError, EngineConfig, ListenerConfig, prepare_sqlite_file
from .ingest import Ingest
from .metrics import Metrics
from .mllp.listener import ListenerService, MLLPListenerFactory
from .retention import RetentionService
from .store import GroupCommitter, Store, control
from .store.journal import SentJournal
from .store.writer import OwnProcess as WriterProcess, WriterSpec
from .store.cipher import Cipher

log = Logger()

SHUTDOWN_GRACE = 10.0
# The reactor and the writer thread hand the GIL to each other once per batch;
# with Python's default 5 ms switch interval that hand-over alone can add
# milliseconds to every ACK.
GIL_SWITCH_INTERVAL = 0.0005
#: How often the key file is looked at: a rotation is taken up within this many seconds.
KEY_FILE_POLL = keys.FILE_POLL
#: How often paused channels and destinations are re-read from the store.
PAUSES_POLL = 2.0


def load_channel_set(config: EngineConfig) -> tuple[list[ChannelConfig], Mappings]:
    """The channels directory, checked whole against its mappings; raises ConfigError."""
    mappings = Mappings(config.channels.mappings)
    return load_channels(config, checker=mappings), mappings


class Engine(service.MultiService):
    def __init__(self, config: EngineConfig, reactor):
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.store: Store | None = None
        self.keys: keys.Keys | None = None
        self.audit: AuditTrail | None = None
        self.checkpoints: Checkpointer | None = None
        self.committer: GroupCommitter | None = None
        self.runtime: ChannelRuntime | None = None
        self.listeners: dict[str, ListenerService] = {}
        self.sources: dict[str, DirectorySource] = {}
        self.channels: list[ChannelConfig] = []
        self.retention: RetentionService | None = None
        #: the engine's metrics (`metrics.render()` for a scrape), made when the store opens
        self.metrics: Metrics | None = None
        self.alerts = None   # an alerts.AlertService when [[alerts.rules]] exist

    @property
    def charsets(self) -> dict:
        return {"default_charset": self.config.hl7.default_charset,
                "fallback_charset": self.config.hl7.fallback_charset}

    def startService(self):
        """Open the store, load the channels and bind every port; raises on what a user must fix."""
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        config = self.config
        self.channels, mappings = load_channel_set(config)
        self.keys, created = keys.load_or_create(config.keys_file)
        self._keys_seen = keys.file_stamp(config.keys_file)
        self.cipher = Cipher(self.keys, reload=lambda: keys.load(config.keys_file))
        prepare_sqlite_file(config.store.url)
        self.audit = AuditTrail(self.keys.audit, config.node)
        self.refusals = RefusalAudit(self.audit, self.reactor)
        self.store = Store(config.store.url, duplicate_window=config.store.duplicate_window,
                           audit=self.audit, node=config.node, cipher=self.cipher)
        self.store.check_schema()
        self.metrics = Metrics(self.store)
        internet.TimerService(KEY_FILE_POLL, self.watch_keys).setServiceParent(self)
        self.audit.record("config.loaded", actor=self.audit.actor, object_type="config",
                          object_id=config.path, source=self.audit.source,
                          detail={"channels": [c.name for c in self.channels]})
        writer = None
        if config.store.writer == "process":
            writer = WriterProcess(WriterSpec(config.store.url, config.store.duplicate_window, config.node,
                                              config.keys_file))
        self.committer = GroupCommitter(self.store, self.reactor, max_batch=config.store.max_batch,
                                        metrics=self.metrics, process=writer)
        self.committer.start()
        ownership = QueueOwnership(self.committer, self.reactor, config.node, config.queue_lease)
        self.runtime = ChannelRuntime(self.channels, mappings, self.committer, self.reactor, self.charsets,
                                      ownership=ownership, metrics=self.metrics,
                                      journal=SentJournal.for_store(config.store.url, config.node),
                                      processor=config.channels.processor)
        self.runtime.paused = frozenset(control.paused(self.store))
        internet.TimerService(PAUSES_POLL, self._read_pauses).setServiceParent(self)
        if config.retention.schedule:
            self.retention = RetentionService(self.store, config.retention, self.reactor, self.audit)
            self.retention.setServiceParent(self)
        if config.alerts.rules:
            from .alerts import AlertService

            self.alerts = AlertService(config.alerts, self.store, self.metrics, self.audit, self.reactor,
                                       config.node,
                                       channels=lambda: [c.name for c in self.channels if c.enabled])
            self.alerts.setServiceParent(self)
        try:
            self._arrange(self.channels)
            if config.admin.enabled:
                self._admin()   # after the listeners: a port taken by another engine fails first
            super().startService()
        except Exception:
            for svc in self.listeners.values():
                if svc.port is not None:
                    svc.port.stopListening()
            self.committer.stop()
            raise
        self.runtime.start()
        self._audit_start()
        self.checkpoints = Checkpointer(self.audit, config.audit.checkpoint_file,
                                        config.audit.checkpoint_interval, self.reactor)
        self.checkpoints.start()
        self._write_pid()
        if created:
            log.info("{done} the key file {path} (mode 0600); back it up apart from the store",
                     done=created, path=config.keys_file)
        log.info("engine started: {listeners} listener(s), {channels} channel(s), store {kind}",
                 listeners=len(self.listeners), channels=len(self.channels),
                 kind=config.store.url.split(":")[0])

    def _audit_start(self):
        """Record the start once every port is bound (blocking: the reactor is not running yet)."""
        config, audit = self.config, self.audit
        audit.record("engine.started", actor=audit.actor, object_type="engine", object_id=config.node,
                     source=audit.source, detail={"pid": os.getpid()})

    def _audit_reload(self, ok: bool, error: str | None = None):
        audit = self.audit
        d = threads.deferToThread(
            audit.record, "config.reloaded", actor=audit.actor, object_type="config",
            object_id=self.config.path, source=audit.source, outcome=SUCCESS if ok else FAILURE,
            detail={"error": error[:500]} if error else {"channels": [c.name for c in self.channels]})
        d.addErrback(lambda f: log.error("could not audit the reload: {error}", error=f.getErrorMessage()))

    def _listener_configs(self, channels: list[ChannelConfig]) -> dict[str, tuple[ListenerConfig, list]]:
        wanted = {listener.name: (listener, []) for listener in self.config.listeners}
        for channel in channels:
            if not channel.enabled or channel.source.type != "mllp":
                continue
            if channel.source.listener is not None:
                wanted[channel.source.listener][1].append(channel)
            else:
                own = channel.source.own_listener
                wanted.setdefault(own.name, (own, []))[1].append(channel)
        return wanted

    def _arrange(self, channels: list[ChannelConfig]):
        """Make listeners and directory sources match `channels`, keeping what did not change."""
        wanted = self._listener_configs(channels)
        for name in list(self.listeners):
            svc = self.listeners[name]
            if name not in wanted or wanted[name][0] != svc.factory.config:
                del self.listeners[name]
                svc.disownServiceParent()
                svc.factory.closeAll()
        for name, (listener, routes) in wanted.items():
            if name in self.listeners:
                self.listeners[name].factory.ingest.routes = tuple(routes)
                continue
            ingest = Ingest(self.committer, listener, self.config.hl7, self.runtime, routes,
                            keys=self.keys, metrics=self.metrics)
            factory = MLLPListenerFactory(listener, ingest, self.committer, self.config.store.max_backlog,
                                          metrics=self.metrics)
            factory.refused = self.refusals
            svc = ListenerService(factory, self.reactor)
            self.listeners[name] = svc
            svc.setServiceParent(self)
        directories = {c.name: c for c in channels if c.enabled and c.source.type == "directory"}
        for name in list(self.sources):
            if name not in directories or directories[name] != self.sources[name].channel:
                self.sources.pop(name).disownServiceParent()
        for name, channel in directories.items():
            if name not in self.sources:
                listener = ListenerConfig(name=f"directory:{name}")
                ingest = Ingest(self.committer, listener, self.config.hl7, self.runtime, [channel],
                                keys=self.keys, metrics=self.metrics)
                source = DirectorySource(channel, ingest, self.reactor)
                self.sources[name] = source
                source.setServiceParent(self)

    def _admin(self):
        """The admin server, with API tokens kept in memory and re-read every few seconds."""
        from .admin.api import Api
        from .admin.auth import TOKEN_REFRESH, Accounts, Gate
        from .admin.pages import Console
        from .admin.server import AdminService, AdminSite

        config = self.config.admin
        gate = Gate(config.session_timeout)
        accounts = Accounts(self.store)
        gate.tokens = accounts.live_tokens()

        def refresh():
            d = threads.deferToThread(accounts.live_tokens)
            d.addCallbacks(lambda tokens: setattr(gate, "tokens", tokens),
                           lambda f: log.error("could not re-read the API tokens: {error}",
                                               error=f.getErrorMessage()))
        api = Api(self, gate)
        site = AdminSite(api.routes() + Console(api).routes(), gate, config.max_body, self.audit, self.refusals)
        AdminService(config, site, self.reactor).setServiceParent(self)
        internet.TimerService(TOKEN_REFRESH, refresh).setServiceParent(self)

    def _read_pauses(self):
        """Pauses set by another engine on the same store (or by this one) apply here within seconds."""
        d = threads.deferToThread(control.paused, self.store)
        d.addCallbacks(self.runtime.set_paused, lambda f: log.error("could not read the paused queues: {error}",
                                                                    error=f.getErrorMessage()))

    def audit_later(self, action: str, **event):
        """Record an audit event from the reactor: the write goes to a thread."""
        d = threads.deferToThread(self.audit.record, action, **event)
        d.addErrback(lambda f: log.error("could not audit {action}: {error}", action=action,
                                         error=f.getErrorMessage()))

    def watch_keys(self):
        """Take up a changed key file: after `keys rotate`, new writes use the new data key."""
        path = self.config.keys_file
        stamp = keys.file_stamp(path)
        if stamp is None or stamp == self._keys_seen:
            return
        self._keys_seen = stamp
        try:
            found = keys.load(path)
            before = self.cipher.active
            self.cipher.use(found)
        except keys.KeyFileError as e:
            log.error("the key file changed and cannot be used, the keys in use stay: {error}", error=str(e))
            return
        if found.active != before:
            log.info("data key {key} now seals what is stored (was {before})", key=found.active,
                     before=before)

    def reload(self):
        """Re-read the channel files and the key file; keep the running set if the new one does not validate."""
        self.watch_keys()
        try:
            channels, mappings = load_channel_set(self.config)
        except (ConfigError, OSError) as e:
            log.error("reload refused, the running channels stay: {error}", error=str(e))
            self._audit_reload(False, str(e))
            return False
        try:
            self._arrange(channels)
            self.runtime.reload(channels, mappings)
        except Exception as e:  # e.g. a port now taken: what could be applied stays applied
            log.error("reload applied in part: {error}; fix it and reload again", error=str(e) or type(e).__name__)
            self._audit_reload(False, str(e) or type(e).__name__)
            return False
        self.channels = channels
        log.info("reloaded: {count} channel(s)", count=len(channels))
        self._audit_reload(True)
        return True

    def _write_pid(self):
        path = Path(self.config.pid_file)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.write_text(f"{os.getpid()}\n")

    @defer.inlineCallbacks
    def stopService(self):
        service.Service.stopService(self)
        log.info("stopping: no new connections; answering what is stored")
        listeners = list(self.listeners.values())
        yield defer.DeferredList([svc.stopAccepting() for svc in listeners] +
                                 [defer.maybeDeferred(s.stopService) for s in self.sources.values()])
        for svc in listeners:
            for p in list(svc.factory.connections):
                p.pause("shutdown")
        if self.committer is not None:
            yield self.committer.drained()
        closing = defer.DeferredList([svc.factory.closeAll() for svc in listeners])
        closing.addTimeout(SHUTDOWN_GRACE, self.reactor)
        try:
            yield closing
        except defer.TimeoutError:
            log.warn("some connections did not close within {s}s; dropping them", s=SHUTDOWN_GRACE)
            for svc in listeners:
                for p in list(svc.factory.connections):
                    p.transport.abortConnection()
        if self.runtime is not None:
            stopping = self.runtime.stop()
            stopping.addTimeout(SHUTDOWN_GRACE, self.reactor)
            try:
                yield stopping
            except defer.TimeoutError:
                log.warn("destinations did not finish within {s}s; their attempts in flight are "
                         "made again at the next start", s=SHUTDOWN_GRACE)
        if self.committer is not None:
            yield self.committer.stop()
        for svc in listeners:
            counts = dict(svc.factory.ingest.counts) | dict(svc.factory.counts)
            log.info("listener {name}: {counts}", name=svc.factory.config.name,
                     counts=", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "idle")
        if self.retention is not None:
            yield self.retention.stopService()  # ends after its batch in flight
        if self.alerts is not None:
            yield self.alerts.stopService()     # ends after its evaluation in flight
        if self.checkpoints is not None:
            audit = self.audit
            try:
                yield threads.deferToThread(audit.record, "engine.stopped", actor=audit.actor,
                                            object_type="engine", object_id=self.config.node,
                                            source=audit.source, detail={"pid": os.getpid()})
                yield self.checkpoints.stop()
            except Exception as e:  # the store may be what failed; stopping goes on
                log.error("could not audit the stop or write the checkpoint: {error}", error=str(e))
        if self.store is not None:
            self.store.close()
        try:
            os.unlink(self.config.pid_file)
        except OSError:
            pass
        log.info("engine stopped")

