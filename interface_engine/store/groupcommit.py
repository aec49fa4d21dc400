"""Group commit: everything that arrives while a commit is in flight shares the next one.

One writer thread owns the store's write path. The reactor hands it messages and
gets Deferreds back; the thread takes all that is waiting, writes it in one
transaction (one fsync), and fires the Deferreds from the reactor thread. If the
transaction fails, every Deferred of that batch fails: the listener then sends no
positive ACK for anything in it.

The reactor passes on what it received in one loop iteration as one hand-over, at
the end of the iteration: woken by the first frame of sixteen, the writer would
otherwise commit that one alone and the other fifteen in a second transaction.

Other work on the store (a channel's processing results, delivery attempts, queue
reads) goes through the same thread: `submit(item, store.method)` queues `item` for
a store method that takes a list and returns one result per item. Messages go
first, in a transaction of their own, so their ACKs never wait for the other kinds
(sharing one transaction among all kinds was measured slower for that reason).
On SQLite, processing results and attempts then share one transaction (Store.joined): a page
that both change is written to the log once, and the log is synced once. If one
kind fails there, each is written again in its own transaction, so that a failure
in one kind never costs another its commit.

With a writer process (store/writer.py, the engine's default), the thread hands
each cycle to that process and waits on its pipe instead of writing itself: the
store's work then runs on another core, without the engine's GIL.
"""

from __future__ import annotations

import queue
import threading
import time

from twisted.internet import defer
from twisted.logger import Logger

from ..metrics import Metrics
from .store import Store
from .writer import OwnProcess, WriteFailed, WriterGone, grouped

log = Logger()

_STOP = object()
#: the objects whose methods the writer process runs, by the name it knows them by
_OWNERS = {"Store": "store", "Leases": "leases"}


class GroupCommitter:
    def __init__(self, store: Store, reactor, *, max_batch: int = 512, metrics: Metrics | None = None,
                 process: OwnProcess | None = None):
        self.store = store
        #: where the batches are written: this process's thread, or the writer process (store/writer.py)
        self.process = process
        self._commit_latency = (metrics or Metrics()).commit_latency
        self._latency_of: dict = {}   # store method -> its histogram child, taken once
        self.reactor = reactor
        self.max_batch = max_batch
        self.pending = 0
        self.batches = 0
        self.commit_seconds = 0.0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopped: defer.Deferred | None = None
        self._drained: list[defer.Deferred] = []
        self._gathering: list | None = None

    def start(self):
        if self.process is not None:
            self.process.start()   # raises WriteFailed if it cannot open the store
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    def submit(self, item, method=None) -> defer.Deferred:
        """Queue one item for `method` (default: store.write); fires with its result after commit."""
        if self._stopped is not None:
            return defer.fail(RuntimeError("the store writer is stopping"))
        d = defer.Deferred()
        self.pending += 1
        if self._gathering is None:
            self._gathering = []
            self.reactor.callLater(0, self._handOver)
        self._gathering.append((method or self.store.write, item, d))
        return d

    def _handOver(self):
        gathered, self._gathering = self._gathering, None
        self._queue.put(gathered)

    def stop(self) -> defer.Deferred:
        """Commit what is queued, then end the writer thread."""
        if self._stopped is None:
            self._stopped = defer.Deferred()
            if self._gathering:
                self._handOver()
            self._queue.put(_STOP)
            if self._thread is None:
                self._stopped.callback(None)
        return self._stopped

    def drained(self) -> defer.Deferred:
        """Fires when nothing submitted so far is still waiting for its commit."""
        d = defer.Deferred()
        if self.pending == 0:
            d.callback(None)
        else:
            self._drained.append(d)
        return d

    def _run(self):
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            batch = list(first)
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stopping = True
                    break
                batch.extend(more)
            # Messages first: their senders wait for the commit, the rest of the cycle can wait.
            # Then the kinds that share a transaction, side by side (see Store.joined).
            kinds: dict = {self.store.write: []}
            for method, item, d in batch:
                kinds.setdefault(method, []).append((item, d))
            kinds = sorted(((method, entries) for method, entries in kinds.items() if entries),
                           key=lambda kind: (kind[0] != self.store.write, not self._joinable(kind[0])))
            if self.process is None:
                self._write_here(kinds)
            else:
                self._write_elsewhere(kinds)
        if self.process is not None:
            self.process.close()
        self.reactor.callFromThread(self._finished)

    def _joinable(self, method) -> bool:
        return (self.store.joins and getattr(method, "__self__", None) is self.store
                and method.__name__ in Store.JOINABLE)

    def _write_here(self, kinds):
        for group in grouped(kinds, lambda kind: self._joinable(kind[0])):
            if len(group) == 1:
                self._write_one(*group[0])
            else:
                self._write_joined(group)

    def _write_one(self, method, entries):
        started = time.perf_counter()
        try:
            results = method([item for item, _ in entries])
        except Exception as error:  # any failure means nothing in this group is durable
            self.reactor.callFromThread(self._fail, entries, error, method)
        else:
            self._done(method, entries, results, time.perf_counter() - started)

    def _write_joined(self, group):
        """Kinds in one transaction, each answered after its commit; if one fails, each again
        in its own, so that only that one fails."""
        started = time.perf_counter()
        results = self.store.run_joined([(method, [item for item, _ in entries]) for method, entries in group])
        if results is None:
            for method, entries in group:
                self._write_one(method, entries)
            return
        seconds = time.perf_counter() - started
        for (method, entries), value in zip(group, results):
            self._done(method, entries, value, seconds)

    def _write_elsewhere(self, kinds, retry: bool = True):
        requests = [(_OWNERS[type(method.__self__).__name__], method.__name__, [item for item, _ in entries])
                    for method, entries in kinds]
        answered = 0
        try:
            for ok, value, seconds in self.process.cycle(requests):
                method, entries = kinds[answered]
                answered += 1
                if ok:
                    self._done(method, entries, value, seconds)
                else:
                    self.reactor.callFromThread(self._fail, entries, value, method)
            return
        except WriterGone as gone:
            self.process.close()
            if retry and not gone.sent:   # it had ended while idle: nothing of this cycle reached it
                self.reactor.callFromThread(log.warn, "the store writer process had ended; starting a new one")
                self._write_elsewhere(kinds, retry=False)
                return
            error = WriteFailed(str(gone))
        except WriteFailed as failed:   # a new writer process could not open the store
            self.process.close()
            error = failed
        # Whether the kinds not answered were committed is unknown: they fail, as a failed
        # transaction does (no ACK; processing and attempts are retried), and the next
        # cycle starts a new writer process.
        self.reactor.callFromThread(log.error, "{error} with {count} batches in hand; they failed, and a "
                                    "new writer process takes the next", error=str(error),
                                    count=len(kinds) - answered)
        for method, entries in kinds[answered:]:
            self.reactor.callFromThread(self._fail, entries, error, method)

    def _done(self, method, entries, results, seconds: float):
        self._observe(method, seconds)
        self.reactor.callFromThread(self._deliver, entries, results, seconds)

    def _observe(self, method, seconds: float):
        child = self._latency_of.get(method)
        if child is None:
            child = self._latency_of[method] = self._commit_latency.labels(method.__name__)
        child.observe(seconds)

    def _deliver(self, entries, results: list, seconds: float):
        self.batches += 1
        self.commit_seconds += seconds
        self.pending -= len(entries)
        for (_, d), result in zip(entries, results):
            d.callback(result)
        self._check_drained()

    def _fail(self, entries, error: Exception, method):
        self.pending -= len(entries)
        if method == self.store.write:
            log.error("store commit failed for {count} messages: {error}; none of them is acknowledged",
                      count=len(entries), error=_describe(error))
        else:
            log.error("store {what} failed for {count} items: {error}", what=method.__name__,
                      count=len(entries), error=_describe(error))
        for _, d in entries:
            d.errback(error)
        self._check_drained()

    def _check_drained(self):
        if self.pending == 0 and self._drained:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

    def _finished(self):
        if self._stopped is not None and not self._stopped.called:
            self._stopped.callback(None)


def _describe(error: Exception) -> str:
    text = str(getattr(error, "orig", None) or error).strip()
    return text.splitlines()[0] if text else type(error).__name__
