"""The channel runtime: stored messages through their channel, then out through each destination.

    ingest commit ─▶ processor thread: filter, transform ─▶ store: deliveries queued
                                                            │
                         destination worker (one per destination, FIFO) ◀┘
                         deliver ─▶ attempt recorded ─▶ retry / block / dead-letter

Every step is a state in the store: a message leaves `received` in the same
transaction that queues its deliveries, and a delivery leaves its queue in the same
transaction that records its attempt. After a stop or a crash, `start()` picks up
messages still `received` and every queue where it stands: nothing is processed
twice by the filter and transform stage, nothing is forgotten, and a destination
sees a message again only if the crash came between its delivery and the record.
"""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import timedelta

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from .. import hl7
from ..destinations.base import Destination, Result
from ..destinations.file import FileDestination
from ..destinations.mllp import MLLPDestination
from ..store.journal import SentJournal
from ..store import (DEAD, ERROR, FILTERED, QUEUED, SENT, Attempt, Processed, QueuedDelivery,
                     utcnow)
from ..config import ConfigError
from ..metrics import DEAD_LETTERED, DELIVERY_FAILED, TEMPLATE, Metrics
from ..secrets import SecretError
from .config import ChannelConfig, DestinationConfig
from .ownership import QueueOwnership
from .pipeline import prepare_again
from .processor import InProcess, OwnProcess, Snapshot
from .templating import Mappings

log = Logger()

QUEUE_READ = 256
# An idle queue is read again this often: new deliveries that no message of this engine
# queued (a replay from the command line) wait at most this long. One indexed read.
IDLE_POLL = 1.0
RETRY_AFTER_CAP = 3600.0


def make_destination(config: DestinationConfig, reactor) -> Destination:
    if config.type == "file":
        return FileDestination(config.name, reactor=reactor)
    if config.type == "fhir":
        from ..destinations.fhir import FHIRDestination

        return FHIRDestination(config.name, config.url, auth=make_auth(config.auth),
                               timeout=config.timeout, ca_file=config.ca_file, reactor=reactor)
    return MLLPDestination(config.name, config.host, config.port, ack_timeout=config.ack_timeout,
                           connect_timeout=config.connect_timeout, tls=config.tls, reactor=reactor)


def make_auth(auth):
    from ..destinations import auth as strategies

    if auth.type == "bearer":
        return strategies.BearerToken(auth.token)
    if auth.type == "client_credentials":
        return strategies.ClientCredentials(auth.token_url, auth.client_id, auth.client_secret,
                                            scope=auth.scope)
    if auth.type == "smart":
        return strategies.SmartBackendServices(auth.token_url, auth.client_id, auth.private_key,
                                               key_id=auth.key_id, algorithm=auth.algorithm,
                                               scope=auth.scope or "system/*.write")
    return strategies.NoAuth()


def loggable(error: str | None) -> str:
    """An attempt's error for the log: a downstream system's own reason text (MSA-3) may quote
    patient data, so the log says only that it answered; the attempt record keeps the text."""
    text = error or "failed"
    head, sep, _ = text.partition(" from downstream:")
    return f"{head} from downstream (reason stored with the attempt)" if sep else text


class ChannelRuntime:
    def __init__(self, channels: list[ChannelConfig], mappings: Mappings, committer, reactor,
                 charsets: dict | None = None, *, ownership: QueueOwnership, metrics: Metrics | None = None,
                 journal: SentJournal | None = None, processor: str = "thread"):
        self.committer = committer
        #: where a non-idempotent destination notes a confirmed send before its record commits
        self.journal = journal
        self.metrics = metrics or Metrics()
        #: which destination queues this engine may deliver for (leases shared with other engines)
        self.ownership = ownership
        ownership.runtime = self
        self.store = committer.store
        self.reactor = reactor
        self.charsets = charsets or {}
        self.channels: dict[str, ChannelConfig] = {}
        self.mappings = mappings
        self.workers: dict[tuple[str, str], DestinationWorker] = {}
        #: filters and transforms the batches of the one processor thread, in order
        self._processor = (OwnProcess if processor == "process" else InProcess)(self.charsets)
        self._pool = ThreadPool(1, 1, name="channel-processor")
        self._incoming: list | None = None
        #: messages handed to processing whose results are not committed yet
        self._in_hand: set[int] = set()
        self._waiters: dict[int, _Waiter] = {}
        self._running = False
        #: (channel, destination) paused by an operator; destination "": the channel's processing
        self.paused: frozenset[tuple[str, str]] = frozenset()
        self._apply(channels)

    # -- lifecycle ----------------------------------------------------------------

    @defer.inlineCallbacks
    def start(self):
        self._pool.start()
        # First in the processor thread's queue: messages that arrive meanwhile wait behind it.
        threads.deferToThreadPool(self.reactor, self._pool, self._processor.start).addErrback(
            lambda f: log.error("could not start the channel processor: {error}", error=f.getErrorMessage()))
        if self.journal is not None:
            yield self._record_journaled()
        self._running = True
        self.ownership.start()
        for worker in self.workers.values():
            worker.start()
        yield self._resume()

    @defer.inlineCallbacks
    def _record_journaled(self):
        """Sends confirmed before a stop or crash whose records did not commit: recorded now, not sent again."""
        ids = tuple(self.journal.entries())
        if ids:
            try:
                missing = yield self.committer.submit(ids, self.store.record_journaled)
            except Exception as error:
                # The journal stays as it is for the next start; until then each record commits
                # before the next send, and what the journal held may be sent once more.
                log.error("could not record the deliveries in the sent-journal: {error}",
                          error=str(error).splitlines()[0] if str(error) else type(error).__name__)
                return
            if missing:
                log.info("recorded {count} deliveries confirmed downstream before the engine stopped",
                         count=missing)
        self.journal.open()

    def set_paused(self, paused: set[tuple[str, str]]):
        """Take up what is paused now: resumed queues are read at once, a resumed channel's waiting messages too."""
        before, self.paused = self.paused, frozenset(paused)
        resumed = before - self.paused
        for channel, destination in resumed:
            worker = self.workers.get((channel, destination))
            if worker is not None:
                worker.wake()
        if self._running and any(destination == "" for _, destination in resumed):
            self._resume().addErrback(lambda f: log.failure("resuming a channel failed", f))

    def wake_all(self):
        """Deliveries were queued from outside the runtime (a replay): read the queues now."""
        for worker in self.workers.values():
            worker.wake()

    @defer.inlineCallbacks
    def stop(self):
        self._running = False
        yield defer.DeferredList([w.stop() for w in self.workers.values()])
        yield self.ownership.stop()
        yield threads.deferToThreadPool(self.reactor, self._pool, self._processor.close)
        yield threads.deferToThread(self._pool.stop)
        if self.journal is not None:
            self.journal.close()
        for waiter in list(self._waiters.values()):
            waiter.finish(False, "engine stopping before the destinations confirmed")

    def reload(self, channels: list[ChannelConfig], mappings: Mappings):
        """Apply new channel configs: unchanged destinations keep their worker and connection."""
        self.mappings = mappings
        self._apply(channels)
        if self._running:
            self._resume()  # messages of a channel that is back, left `received` meanwhile

    def _apply(self, channels: list[ChannelConfig]):
        self.channels = {c.name: c for c in channels if c.enabled}
        self._snapshot = Snapshot.of(self.channels, self.mappings)
        wanted = {(c.name, d.name): (c, d) for c in self.channels.values() for d in c.destinations}
        stopping: dict[tuple[str, str], defer.Deferred] = {}
        for key in list(self.workers):
            worker = self.workers[key]
            if key not in wanted or wanted[key][1] != worker.config:
                del self.workers[key]
                stopping[key] = worker.stop()
        for key, (channel, destination) in wanted.items():
            if key in self.workers:
                self.workers[key].channel = channel
                continue
            try:
                made = make_destination(destination, self.reactor)
            except (SecretError, ValueError) as e:
                raise ConfigError(f"{channel.file}: destination {destination.name}: {e}") from None
            worker = DestinationWorker(self, channel, destination, made)
            self.workers[key] = worker
            if self._running:
                # Never two workers on one queue: the new one waits for the old one's attempt.
                after = stopping.get(key)
                if after is None:
                    worker.start()
                else:
                    after.addBoth(lambda _, w=worker: w.start() if w is self.workers.get(key) else None)

    @defer.inlineCallbacks
    def _resume(self, own: bool = True):
        """Messages stored for a channel before a stop or crash but not yet processed.

        Ours (`own`) and those of engines gone from a shared store; never those another
        live engine has in hand.
        """
        after, resumed = 0, 0
        ownership = self.ownership
        while self._running:
            rows = yield threads.deferToThread(ownership.leases.waiting, ownership.node.name,
                                               tuple(self.channels), ownership.stale_after, after,
                                               own=own)
            if not rows:
                break
            for message_id, channel, raw, unreadable in rows:
                if unreadable:
                    log.error("message {id} stays received: {error}", id=message_id, error=unreadable)
                elif channel in self.channels and message_id not in self._in_hand:
                    self.received(message_id, raw, channel)
                    resumed += 1
                after = message_id
        if resumed:
            log.info("resumed {count} stored messages that had not been through their channel",
                     count=resumed)

    # -- processing -----------------------------------------------------------------

    def received(self, message_id: int, raw: bytes, channel: str) -> defer.Deferred | None:
        """A message is committed for `channel`: filter and transform it, in arrival order."""
        if self._incoming is None:
            self._incoming = []
            self.reactor.callLater(0, self._process)
        self._incoming.append((message_id, raw, channel))
        self._in_hand.add(message_id)

    def outcome(self, message_id: int, timeout: float) -> defer.Deferred:
        """For ack_mode = "processed": fires (ok, error) once the destinations have answered."""
        waiter = self._waiters.get(message_id)
        if waiter is None:
            waiter = self._waiters[message_id] = _Waiter(self, message_id)
        waiter.arm(timeout, self.reactor)
        return waiter.deferred

    def _process(self):
        batch, self._incoming = self._incoming, None
        paused = self.paused
        # A paused channel's messages stay `received`; resuming it reads them again.
        taken = [item for item in batch if (item[2], "") not in paused]
        d = threads.deferToThreadPool(self.reactor, self._pool, self._processor, taken, self._snapshot)
        d.addCallback(self._save)
        d.addErrback(lambda f: log.failure("channel processing failed", f))
        # Once their results are committed (or failed), a resume may hand these over again.
        d.addBoth(lambda _: self._in_hand.difference_update(item[0] for item in batch))

    def _save(self, results: list[Processed]) -> defer.Deferred:
        saved = []
        for processed in results:
            d = self.committer.submit(processed, self.store.save_processing)
            d.addCallback(self._saved, processed)
            d.addErrback(lambda f, p=processed: log.error(
                "could not record processing of message {id}: {error}; it stays received and is "
                "processed again at the next start", id=p.message_id, error=f.getErrorMessage()))
            saved.append(d)
        return defer.DeferredList(saved)

    def _saved(self, moved: bool, processed: Processed):
        if not moved:
            return
        waiter = self._waiters.get(processed.message_id)
        if processed.filter_reason:
            if waiter:
                waiter.finish(True, None)
            return
        for delivery in processed.deliveries:
            if delivery.state == ERROR:
                self.metrics.error(TEMPLATE, processed.channel, delivery.destination)
            if delivery.state in (QUEUED, ERROR):
                worker = self.workers.get((processed.channel, delivery.destination))
                if worker:
                    worker.wake()
        if waiter:
            waiter.expect(processed.deliveries)

    def attempted(self, message_id: int, destination: str, ok: bool, error: str | None):
        waiter = self._waiters.get(message_id)
        if waiter:
            waiter.attempted(destination, ok, error)


class _Waiter:
    """The sender of an ack_mode = "processed" message, waiting for its destinations."""

    def __init__(self, runtime: ChannelRuntime, message_id: int):
        self.runtime, self.message_id = runtime, message_id
        self.deferred = defer.Deferred()
        self.remaining: set[str] | None = None
        self._timer = None

    def arm(self, timeout: float, reactor):
        if self._timer is None and not self.deferred.called:
            self._timer = reactor.callLater(timeout, self.finish, False,
                                            f"destinations did not confirm within {timeout:g}s")

    def expect(self, deliveries):
        failed = next((d for d in deliveries if d.state == ERROR), None)
        if failed:
            self.finish(False, f"{failed.destination}: {failed.error}")
            return
        self.remaining = {d.destination for d in deliveries if d.state == QUEUED}
        if not self.remaining:
            self.finish(True, None)

    def attempted(self, destination: str, ok: bool, error: str | None):
        if self.remaining is None or destination not in self.remaining:
            return
        if not ok:
            self.finish(False, f"{destination}: {error}")
            return
        self.remaining.discard(destination)
        if not self.remaining:
            self.finish(True, None)

    def finish(self, ok: bool, error: str | None):
        self.runtime._waiters.pop(self.message_id, None)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if not self.deferred.called:
            self.deferred.callback((ok, error))


class DestinationWorker:
    """One destination's FIFO queue: one delivery at a time, in id order, retried per policy."""

    def __init__(self, runtime: ChannelRuntime, channel: ChannelConfig, config: DestinationConfig,
                 destination: Destination):
        self.runtime = runtime
        self.channel = channel
        self.config = config
        self.destination = destination
        self._running = False
        self._wakeup: defer.Deferred | None = None
        self._loop: defer.Deferred | None = None
        self.sent = 0
        self.failed = 0
        metrics, labels = runtime.metrics, (channel.name, config.name)
        self._latency = metrics.delivery_latency.labels(*labels)
        self._failures = metrics.errors.labels(DELIVERY_FAILED, *labels)
        self._dead = metrics.errors.labels(DEAD_LETTERED, *labels)
        self._template_errors = metrics.errors.labels(TEMPLATE, *labels)

    @property
    def key(self) -> str:
        return f"{self.channel.name}/{self.config.name}"

    def start(self):
        self._running = True
        self._loop = self._run()

    def wake(self):
        if self._wakeup is not None and not self._wakeup.called:
            self._wakeup.callback(None)

    @defer.inlineCallbacks
    def stop(self):
        self._running = False
        self.wake()
        if self._loop is not None:
            yield self._loop
        yield self.destination.close()

    def _pause(self, seconds: float) -> defer.Deferred:
        """Sleep until `seconds` pass or wake() is called, whichever comes first."""
        self._wakeup = defer.Deferred()
        timer = self.runtime.reactor.callLater(max(0.0, seconds), self.wake)
        self._wakeup.addBoth(lambda _: timer.cancel() if timer.active() else None)
        return self._wakeup

    @defer.inlineCallbacks
    def _run(self):
        store, committer = self.runtime.store, self.runtime.committer
        ownership, queue = self.runtime.ownership, (self.channel.name, self.config.name)
        while self._running:
            if not ownership.holds(queue):
                ownership.idle(queue)
                yield self._pause(IDLE_POLL)   # woken when the lease is ours
                continue
            if queue in self.runtime.paused:
                yield self._pause(IDLE_POLL)   # woken when resumed
                continue
            try:
                heads = yield committer.submit((self.channel.name, self.config.name, QUEUE_READ),
                                               store.queue)
                if not heads:
                    yield self._pause(IDLE_POLL)
                    continue
                wait = yield self._work(heads)
                if wait:
                    yield self._pause(wait)
            except Exception as error:  # a store or programming error must not end the queue
                log.error("destination {key}: {error}; trying again shortly", key=self.key,
                          error=str(error).splitlines()[0] if str(error) else type(error).__name__)
                yield self._pause(1.0)

    @defer.inlineCallbacks
    def _work(self, heads: list[QueuedDelivery]):
        """Deliver from the head of the queue; returns seconds to wait before reading it again.

        A crash may make a destination see again only the one message that was in
        flight: before the next delivery starts, the last one's success is either
        committed or noted in the sent-journal (store/journal.py), which the next start
        records. An idempotent destination (see Destination.idempotent) goes on while
        records commit: what a crash repeats there changes nothing.
        """
        records = []
        queue = (self.channel.name, self.config.name)
        position = 0
        try:
            while position < len(heads):
                if not self._running or not self.runtime.ownership.holds(queue) or queue in self.runtime.paused:
                    break
                now = utcnow()
                delivery = heads[position]
                if delivery.next_attempt_at is not None and delivery.next_attempt_at > now:
                    return (delivery.next_attempt_at - now).total_seconds()
                run = self._run_from(heads, position, now)
                if len(run) > 1:
                    done = yield self._attempt_batch(run)
                else:
                    done = [(yield self._attempt(delivery))]
                position += len(done)
                for attempt in done:
                    self._latency.observe(attempt.duration_ms / 1000)
                    noted = self._note_sent(attempt)
                    record = self.runtime.committer.submit(attempt, self.runtime.store.record_attempts)
                    records.append(record)
                    if noted is not None:
                        record.addBoth(self._recorded, noted)
                    elif attempt.new_state == ERROR or not self.destination.idempotent:
                        yield record
                    self.runtime.attempted(attempt.message_id, self.config.name, attempt.ok, attempt.error)
                    if attempt.new_state == ERROR:
                        return max(0.0, (attempt.next_attempt_at - utcnow()).total_seconds())
        finally:
            # The next read of the queue must see every outcome of this one.
            yield defer.DeferredList(records, consumeErrors=True)
        return 0

    def _run_from(self, heads: list[QueuedDelivery], position: int, now) -> list[QueuedDelivery]:
        """The deliveries from `position` that can go to the destination together: rendered and due."""
        size = self.destination.batch
        run = heads[position:position + size]
        for i, delivery in enumerate(run):
            if delivery.output is None or (delivery.next_attempt_at is not None
                                           and delivery.next_attempt_at > now):
                return run[:max(i, 1)]
        return run

    @defer.inlineCallbacks
    def _attempt_batch(self, run: list[QueuedDelivery]):
        """Deliveries handed over together (see FileDestination.deliver_batch); one attempt each, up
        to the first that failed. Each attempt's duration is the batch's."""
        started_at, started = utcnow(), time.perf_counter()
        results = yield self.destination.deliver_batch([(d.output, d.target) for d in run])
        done = []
        for delivery, result in zip(run, results):
            if result.ok:
                self.sent += 1
                done.append(self._record(delivery, started_at, started, result, SENT))
            else:
                done.append(self._failed(delivery, started_at, started, result))
        return done

    def _note_sent(self, attempt: Attempt) -> int | None:
        """Journal a confirmed send of a destination that is not idempotent, so the next may go
        before this record commits; the journal's generation, or None when the record must come first."""
        journal = self.runtime.journal
        if journal is None or self.destination.idempotent or attempt.new_state != SENT:
            return None
        return journal.sent(attempt.delivery_id)

    def _recorded(self, result, generation: int):
        self.runtime.journal.recorded(generation)
        return result

    @defer.inlineCallbacks
    def _attempt(self, delivery: QueuedDelivery):
        started_at, started = utcnow(), time.perf_counter()
        output, target, rendered = delivery.output, delivery.target, None
        if output is None:
            prepared = yield self._prepare(delivery.message_id)
            if prepared.state == FILTERED:
                return self._record(delivery, started_at, started, Result(True, None, None), FILTERED)
            if prepared.state == ERROR:
                self._template_errors.inc()
                return self._failed(delivery, started_at, started,
                                    Result(False, None, prepared.error, retry=True))
            output = rendered = prepared.output
            target = prepared.target
        result = yield self.destination.deliver(output, target)
        if result.ok:
            self.sent += 1
            return self._record(delivery, started_at, started, result, SENT, output=rendered)
        return self._failed(delivery, started_at, started, result, output=rendered)

    def _prepare(self, message_id: int):
        """Render again a delivery whose first rendering failed: the template may be fixed since."""
        channel, mappings, charsets = self.channel, self.runtime.mappings, self.runtime.charsets
        store = self.runtime.store

        def work():
            row = store.get_message(message_id)
            msg = hl7.parse(row["raw"], **charsets)
            return prepare_again(channel, self.config, mappings, msg, row["raw"])
        return threads.deferToThreadPool(self.runtime.reactor, self.runtime._pool, work)

    def _failed(self, delivery, started_at, started, result: Result, output=None) -> Attempt:
        self.failed += 1
        self._failures.inc()
        failures = delivery.attempts + 1
        retry = self.config.retry
        give_up = retry.on_failure == "skip" and (failures >= retry.attempts or not result.retry)
        log.warn("destination {key}: delivery {id} failed (attempt {n}): {error}{then}",
                 key=self.key, id=delivery.id, n=failures, error=loggable(result.error),
                 then="; dead-lettered, the queue moves on" if give_up else "")
        if give_up:
            self._dead.inc()
            return self._record(delivery, started_at, started, result, DEAD, output=output)
        # The far side's Retry-After is honoured, up to an hour: a hostile or broken
        # header must not hold a queue for years.
        wait = max(retry.delay(failures), min(result.retry_after or 0.0, RETRY_AFTER_CAP))
        next_at = utcnow() + timedelta(seconds=wait)
        attempt = self._record(delivery, started_at, started, result, ERROR, next_at, output)
        if not result.retry:
            # Trying the same payload again cannot help: the next attempt renders it anew,
            # with the mapping as it is then (fixed and reloaded, one hopes).
            attempt = replace(attempt, output=None, rerender=True)
        return attempt

    @staticmethod
    def _record(delivery, started_at, started, result: Result, state, next_at=None, output=None):
        return Attempt(delivery_id=delivery.id, message_id=delivery.message_id, started_at=started_at,
                       duration_ms=(time.perf_counter() - started) * 1000, ok=result.ok,
                       new_state=state, error=result.error, response=result.response,
                       next_attempt_at=next_at, output=output)
