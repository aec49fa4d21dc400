"""The group committer on a real SQLite store: each kind of work in its own transaction."""

import shutil
import tempfile
from pathlib import Path

from sqlalchemy import event
from twisted.internet import defer, reactor
from twisted.trial import unittest

from interface_engine import keys
from interface_engine.store import (QUEUED, RECEIVED, STORED, Attempt, GroupCommitter, Incoming, NewDelivery,
                                    Processed, Store, utcnow)
from interface_engine.store.writer import OwnProcess, WriterSpec
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
        self.committer = GroupCommitter(self.store, reactor, process=self.writer_process())
        self.committer.start()
        self.addCleanup(self.committer.stop)

    def writer_process(self):
        return None   # the committer's own thread writes

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
        self.assertEqual([m["control_id"] for m in reader.list_messages()], ["GC1"])

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

    @defer.inlineCallbacks
    def test_processing_and_attempts_share_a_commit_and_a_failing_kind_is_undone_alone(self):
        (stored,) = self.store.write([incoming("GC5")])
        processed = Processed(stored.message_id, "adt", deliveries=(NewDelivery("out", QUEUED, b"x"),))
        stray = Attempt(delivery_id=999_999, message_id=stored.message_id, started_at=utcnow(), duration_ms=1.0,
                        ok=True, new_state="sent")
        saved = self.committer.submit(processed, self.store.save_processing)
        recorded = self.committer.submit(stray, self.store.record_attempts)
        self.assertEqual((yield saved), True)
        yield self.assertFailure(recorded, Exception)
        reader = Store(self.store.url)
        self.addCleanup(reader.close)
        self.assertEqual(reader.count_deliveries(message_id=stored.message_id), 1)
        self.assertEqual(reader.get_message(stored.message_id)["state"], QUEUED)

    @defer.inlineCallbacks
    def test_processing_and_attempts_of_a_cycle_commit_once(self):
        first, second = self.store.write([incoming("GC6"), incoming("GC7")])
        self.store.save_processing([Processed(first.message_id, "adt", deliveries=(NewDelivery("out", QUEUED, b"x"),))])
        ((delivery,),) = self.store.queue([("adt", "out", 10)])
        commits = []

        def committed(conn):
            commits.append(conn)
        event.listen(self.store.engine, "commit", committed)
        self.addCleanup(event.remove, self.store.engine, "commit", committed)
        yield defer.gatherResults([
            self.committer.submit(Processed(second.message_id, "adt", deliveries=(NewDelivery("out", QUEUED, b"y"),)),
                                  self.store.save_processing),
            self.committer.submit(Attempt(delivery_id=delivery.id, message_id=first.message_id, started_at=utcnow(),
                                          duration_ms=1.0, ok=True, new_state="sent"), self.store.record_attempts)])
        self.assertEqual(len(commits), 1)
        self.assertEqual(self.store.get_message(first.message_id)["state"], "sent")
        self.assertEqual(self.store.get_message(second.message_id)["state"], QUEUED)


class WriterProcessTests(GroupCommitterTests):
    """The same, with the store written by the writer process (the engine's default)."""

    def writer_process(self):
        keys.create(self.dir / "keys.json")
        return OwnProcess(WriterSpec(self.store.url, 86400.0, "test-node", str(self.dir / "keys.json")))

    # Commits are counted in this process only.
    test_processing_and_attempts_of_a_cycle_commit_once = None
