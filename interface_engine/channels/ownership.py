"""Which destination queues this engine delivers for, when several engines share one store.

Each queue has a lease in the store. One LoopingCall per engine renews all of its
leases in one transaction every fifth of the lease, and takes free or expired ones up
to its share (the queues divided among the live engines), so that a second engine
started beside a first gets half the queues within a few seconds. A worker delivers
only while `holds` says yes, which it checks before each delivery: an in-memory
lookup, nothing on the per-delivery path touches the store.

`holds` turns false a third of a lease before the lease ends in the store, whether
the renewals failed (store unreachable) or another engine took the queue after it
expired: the worker finishes its attempt in flight and stops. A queue given up
(over the share, or at stop) is released only once its worker is idle, so two
engines never deliver for one queue at once. When an engine dies, its leases
expire and another engine takes them: the takeover time is one lease plus one
renewal. Messages it stored but had not processed are picked up by a live engine
once its heartbeat is three leases old.
"""

from __future__ import annotations

import os
import secrets
import socket
import time

from twisted.internet import defer, task, threads
from twisted.python.threadpool import ThreadPool
from twisted.logger import Logger

from ..store import utcnow
from ..store.leases import Claim, Leases, Node, Queue, Renewal

log = Logger()


class QueueOwnership:
    def __init__(self, committer, reactor, node: str, lease: float):
        self.committer = committer
        self.reactor = reactor
        self.leases = Leases(committer.store)
        self.node = Node(node, secrets.token_hex(16), os.getpid(), socket.gethostname()[:255], utcnow())
        self.lease = lease
        self.margin = lease / 3
        self.stale_after = 3 * lease
        self.runtime = None   # the ChannelRuntime, which sets itself here
        self._held: dict[Queue, float] = {}   # queue -> monotonic time until which we may deliver
        self._shedding: set[Queue] = set()
        self._releasing: set[Queue] = set()
        self._adopting: defer.Deferred | None = None
        self._loop = task.LoopingCall(self._renew)
        self._loop.clock = reactor
        self._pool = None if self.leases.through_committer else ThreadPool(1, 1, name="queue-leases")

    def _call(self, method, item) -> defer.Deferred:
        """One lease transaction, where Leases says it belongs: the committer or our own thread."""
        if self._pool is None:
            return self.committer.submit(item, method)
        d = threads.deferToThreadPool(self.reactor, self._pool, method, [item])
        return d.addCallback(lambda results: results[0])

    def holds(self, queue: Queue) -> bool:
        until = self._held.get(queue)
        return until is not None and time.monotonic() < until

    def start(self):
        if self._pool is not None:
            self._pool.start()
        self._loop.start(self.lease / 5, now=True)

    @defer.inlineCallbacks
    def stop(self):
        """After the workers have stopped: free every lease and the node's row, for a takeover at once."""
        if self._loop.running:
            self._loop.stop()
        self._held.clear()
        try:
            yield self._call(self.leases.leave, self.node)
        except Exception as error:
            log.warn("could not release the queue leases at stop ({error}); other engines take "
                     "them when they expire", error=str(error).splitlines()[0] if str(error) else
                     type(error).__name__)
        if self._pool is not None:
            yield threads.deferToThread(self._pool.stop)

    def idle(self, queue: Queue):
        """A worker is not delivering: if its queue is being given up, release it now."""
        if queue not in self._shedding:
            return
        self._shedding.discard(queue)
        self._releasing.add(queue)
        d = self._call(self.leases.release, (self.node, (queue,)))
        d.addErrback(lambda f: log.warn("could not release queue {q}: {error}; it is free when "
                                        "its lease ends", q="/".join(queue), error=f.getErrorMessage()))
        d.addBoth(lambda _: self._releasing.discard(queue))

    def _renew(self) -> defer.Deferred:
        claim = Claim(self.node, tuple(self.runtime.workers), self.lease, self.stale_after,
                      tuple(self.runtime.channels))
        d = self._call(self.leases.renew, claim)
        d.addCallback(self._renewed)
        d.addErrback(lambda f: log.warn(
            "could not renew the queue leases: {error}; delivery stops when they end",
            error=f.getErrorMessage().splitlines()[0] if f.getErrorMessage() else "store error"))
        return d

    def _renewed(self, renewal: Renewal):
        until = renewal.began + self.lease - self.margin
        held = [q for q in sorted(renewal.held) if q not in self._releasing]
        keep, shed = held[:renewal.share], held[renewal.share:]
        gained = [q for q in keep if not self.holds(q)]
        # A lease row another engine was locking right then is still ours until it ends.
        kept = {q: self._held[q] for q in renewal.skipped if q in self._held}
        lost = [q for q in self._held if q not in renewal.held and q not in kept]
        newly_shed = [q for q in shed if q not in self._shedding]
        self._held = {q: until for q in keep} | kept
        self._shedding = set(shed)
        workers = self.runtime.workers
        for q in gained + shed:
            if q in workers:
                workers[q].wake()   # to start delivering, or to notice it should stop
        if gained:
            log.info("node {node} now delivers for {queues}", node=self.node.name,
                     queues=", ".join("/".join(q) for q in gained))
        if lost or newly_shed:
            log.info("node {node} gives up {queues}", node=self.node.name,
                     queues=", ".join("/".join(q) for q in lost + newly_shed))
        if renewal.absent_waiting and self._adopting is None:
            self._adopting = self.runtime._resume(own=False)
            self._adopting.addBoth(self._adopted)

    def _adopted(self, _):
        self._adopting = None
