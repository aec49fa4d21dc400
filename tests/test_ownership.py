"""Queue ownership in one engine: leases taken at start, given up when they cannot be renewed,
shed to a second engine only once the worker is idle, released at stop. Real store, real
group committer, real reactor; the runtime is reduced to the two things ownership reads."""

import shutil
import tempfile

import sqlalchemy as sa
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from interface_engine.channels.ownership import QueueOwnership
from interface_engine.config import ConfigError, parse
from interface_engine.store import GroupCommitter, Store, utcnow
from interface_engine.store.leases import Claim, Leases, Node
from interface_engine.store.schema import nodes, queue_leases

QUEUES = [("adt", "one"), ("adt", "two")]
LEASE = 1.5


class Worker:
    def __init__(self):
        self.woken = 0

    def wake(self):
        self.woken += 1


class Runtime:
    """What QueueOwnership reads of the ChannelRuntime: its workers and channels."""

    def __init__(self):
        self.workers = {q: Worker() for q in QUEUES}
        self.channels = {"adt": None}

    def _resume(self, own):
        return defer.succeed(None)


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def until(condition, timeout=10.0):
    """Poll until `condition()` holds: the first claim's commit can take a while on a busy disk."""
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError("timed out waiting for the queues to be claimed")
        yield sleep(0.02)


class OwnershipTests(unittest.TestCase):
    def setUp(self):
        folder = tempfile.mkdtemp(prefix="ie-ownership-")
        self.addCleanup(shutil.rmtree, folder, ignore_errors=True)
        self.store = Store(f"sqlite:///{folder}/store.db")
        self.store.check_schema()
        self.committer = GroupCommitter(self.store, reactor)
        self.committer.start()
        self.ownership = QueueOwnership(self.committer, reactor, "a", LEASE)
        self.runtime = self.ownership.runtime = Runtime()

    @defer.inlineCallbacks
    def tearDown(self):
        if self.ownership._loop.running:
            self.ownership._loop.stop()
        yield self.committer.stop()
        self.store.close()

    def owners(self):
        with self.store.engine.connect() as conn:
            return dict(((c, d), o) for c, d, o in conn.execute(
                sa.select(queue_leases.c.channel, queue_leases.c.destination, queue_leases.c.owner)))

    @defer.inlineCallbacks
    def test_queues_are_taken_at_start_and_their_workers_woken(self):
        self.ownership.start()
        yield until(lambda: all(self.ownership.holds(q) for q in QUEUES))
        self.assertTrue(all(w.woken == 1 for w in self.runtime.workers.values()))
        self.assertEqual(self.owners(), {q: "a" for q in QUEUES})

    @defer.inlineCallbacks
    def test_delivery_stops_before_the_lease_ends_when_it_cannot_be_renewed(self):
        self.ownership.start()
        yield until(lambda: self.ownership.holds(QUEUES[0]))
        with self.store.engine.begin() as conn:   # the store refuses every renewal from now on
            conn.execute(sa.text("DROP TABLE queue_leases"))
        # The last renewal that worked began at most a fifth of a lease ago: the queue is
        # held until two thirds of a lease after it, no longer.
        yield sleep(LEASE * 2 / 3 - LEASE / 5 - 0.2)
        self.assertTrue(self.ownership.holds(QUEUES[0]))
        yield sleep(LEASE / 5 + 0.4)
        self.assertFalse(self.ownership.holds(QUEUES[0]))

    @defer.inlineCallbacks
    def test_a_queue_over_the_share_is_released_once_its_worker_is_idle(self):
        self.ownership.start()
        yield until(lambda: all(self.ownership.holds(q) for q in QUEUES))
        leases = Leases(self.store)
        b = Node("b", "run", 2, "other", utcnow())
        claim = Claim(b, tuple(QUEUES), LEASE, 3 * LEASE, ("adt",))
        yield self.committer.submit(claim, leases.renew)   # a second engine: one queue each
        yield sleep(LEASE / 5 + 0.2)
        shed = QUEUES[1]
        self.assertFalse(self.ownership.holds(shed))
        self.assertEqual(self.owners()[shed], "a")   # its worker has not said it is idle
        self.ownership.idle(shed)
        yield sleep(0.2)
        self.assertIsNone(self.owners()[shed])
        renewal = yield self.committer.submit(claim, leases.renew)
        self.assertEqual(renewal.held, {shed})
        self.assertTrue(self.ownership.holds(QUEUES[0]))

    @defer.inlineCallbacks
    def test_stop_releases_the_queues_and_the_node(self):
        self.ownership.start()
        yield until(lambda: all(self.ownership.holds(q) for q in QUEUES))
        yield self.ownership.stop()
        self.assertEqual(self.owners(), {q: None for q in QUEUES})
        with self.store.engine.connect() as conn:
            self.assertEqual(conn.execute(sa.select(nodes.c.name)).all(), [])


def test_queue_lease_is_read_and_checked():
    assert parse({"engine": {"queue_lease": "20s"}}, "e.toml").queue_lease == 20.0
    assert parse({}, "e.toml").queue_lease == 15.0
    try:
        parse({"engine": {"queue_lease": "500ms"}}, "e.toml")
    except ConfigError as e:
        assert str(e) == "e.toml: engine.queue_lease: expected a duration of at least 1s, got 0.5s"
    else:
        raise AssertionError("a lease under 1s was accepted")
