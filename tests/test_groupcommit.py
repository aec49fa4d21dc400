"""The group committer on a real SQLite store: each kind of work in its own transaction."""

import shutil
import tempfile
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.trial import unittest

from interface_engine.store import RECEIVED, STORED, Attempt, GroupCommitter, Incoming, Store, utcnow
from tests.messages import adt_a01


def incoming(control_id: str) -> Incoming:
    return Incoming(raw=adt_a01(control_id), listener="l", peer="127.0.0.1", state=RECEIVED, ack=b"AA",
                    message_type="ADT", trigger_event="A01", control_id=control_id, channel="adt")


class GroupCommitterTests(unittest.TestCase):
    def setUp(self):
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.dir)
        self.store = Store(f"sqlite:///{self.dir / 'store.db'}")
        self.store.check_schema()
        self.addCleanup(self.store.close)
        self.committer = GroupCommitter(self.store, reactor)
        self.committer.start()
        self.addCleanup(self.committer.stop)

    @defer.inlineCallbacks
    def test_a_failing_kind_is_undone_alone_and_the_others_commit(self):
        stray = Attempt(delivery_id=999_999, message_id=1, started_at=utcnow(), duration_ms=1.0, ok=True,
                        new_state="sent")   # no such delivery: the foreign key refuses it
        stored = self.committer.submit(incoming("GC1"))
        recorded = self.committer.submit(stray, self.store.record_attempts)
        outcome = yield stored
        self.assertEqual(outcome.kind, STORED)
        yield self.assertFailure(recorded, Exception)
        reader = Store(self.store.url)   # another connection: what is committed
        self.addCleanup(reader.close)
        self.assertEqual(reader.count_messages(), 1)
        self.assertEqual(reader.get_message(outcome.message_id)["control_id"], "GC1")

    @defer.inlineCallbacks
    def test_messages_commit_first_in_a_cycle_whatever_was_asked_before_them(self):
        (stored,) = self.store.write([incoming("GC2")])
        order = []
        heads = self.committer.submit(("adt", "out", 10), self.store.queue)
        heads.addCallback(lambda r: order.append("queue read") or r)
        message = self.committer.submit(incoming("GC3"))
        message.addCallback(lambda r: order.append("message") or r)
        yield defer.gatherResults([heads, message])
        self.assertEqual(order, ["message", "queue read"])
