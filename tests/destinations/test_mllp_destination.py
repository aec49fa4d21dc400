"""MLLPDestination against the test receiver over real sockets, in each of its modes."""

import socket
import time

from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from interface_engine import hl7
from interface_engine.destinations import MLLPDestination, Result
from tests.messages import adt_a01
from tests.receiver import Receiver

peek = hl7.peek


def broken_peek(raw):
    raise ZeroDivisionError("a bug whose message quotes SECRETFAMILY")

ACK_TIMEOUT = 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MLLPDestinationTests(unittest.TestCase):
    def setUp(self):
        self.receiver = Receiver().start()
        self.addCleanup(self.receiver.stop)
        self.dest = self.destination(self.receiver.port)

    def destination(self, port: int) -> MLLPDestination:
        dest = MLLPDestination("downstream", "127.0.0.1", port, ack_timeout=ACK_TIMEOUT,
                               connect_timeout=2.0)
        self.addCleanup(dest.close)  # cleanups run last-added first: before the receiver stops
        return dest

    async def test_aa_is_ok_and_the_ack_is_returned(self):
        result = await self.dest.deliver(adt_a01("M1"))
        self.assertTrue(result.ok)
        self.assertIsNone(result.error)
        ack = hl7.parse(result.response)
        self.assertEqual((ack["MSA-1"], ack["MSA-2"]), ("AA", "M1"))
        self.assertEqual(self.receiver.received, [adt_a01("M1")])

    async def test_one_connection_carries_many_messages(self):
        for i in range(5):
            result = await self.dest.deliver(adt_a01(f"K{i}"))
            self.assertTrue(result.ok, result.error)
        self.assertEqual(self.receiver.control_ids(), [f"K{i}" for i in range(5)])
        self.assertEqual(self.receiver.connections, 1)

    async def test_ae_and_ar_fail_with_the_downstream_reason_and_keep_the_connection(self):
        self.receiver.reason = "unknown patient"
        self.receiver.script(["AE", "AR"])
        result = await self.dest.deliver(adt_a01("E1"))
        self.assertEqual((result.ok, result.error), (False, "AE from downstream: unknown patient"))
        self.assertEqual(hl7.parse(result.response)["MSA-1"], "AE")
        result = await self.dest.deliver(adt_a01("E2"))
        self.assertEqual(result.error, "AR from downstream: unknown patient")
        self.assertTrue((await self.dest.deliver(adt_a01("E3"))).ok)
        self.assertEqual(self.receiver.connections, 1)

    async def test_a_long_reason_is_cut_to_one_line(self):
        self.receiver.mode = "AE"
        self.receiver.reason = "line one\nline two " + "x" * 300
        result = await self.dest.deliver(adt_a01("E4"))
        self.assertNotIn("\n", result.error)
        self.assertLessEqual(len(result.error), len("AE from downstream: ") + 200)
        self.assertTrue(result.error.startswith("AE from downstream: line one line two xxx"))

    async def test_silence_times_out_drops_the_connection_and_the_next_message_reconnects(self):
        self.receiver.mode = "silent"
        started = time.monotonic()
        result = await self.dest.deliver(adt_a01("T1"))
        elapsed = time.monotonic() - started
        self.assertEqual(result, Result(ok=False, error=f"no ACK within {ACK_TIMEOUT:g}s"))
        self.assertTrue(ACK_TIMEOUT <= elapsed < ACK_TIMEOUT + 1.0, elapsed)
        self.receiver.mode = "AA"
        result = await self.dest.deliver(adt_a01("T2"))
        self.assertTrue(result.ok, result.error)
        self.assertEqual(self.receiver.connections, 2)

    async def test_a_late_ack_is_never_taken_for_the_next_message(self):
        self.receiver.delay = ACK_TIMEOUT * 2
        result = await self.dest.deliver(adt_a01("L1"))
        self.assertEqual(result.error, f"no ACK within {ACK_TIMEOUT:g}s")
        result = await self.dest.deliver(adt_a01("L2"))  # the ACK for L1 is due meanwhile
        self.assertEqual(result.error, f"no ACK within {ACK_TIMEOUT:g}s")
        self.receiver.delay = 0
        result = await self.dest.deliver(adt_a01("L3"))
        self.assertTrue(result.ok, result.error)
        self.assertEqual(hl7.parse(result.response)["MSA-2"], "L3")
        self.assertEqual(self.receiver.connections, 3)

    async def test_an_ack_for_another_message_fails_and_drops_the_connection(self):
        self.receiver.script(["wrong-id"])
        result = await self.dest.deliver(adt_a01("W1"))
        self.assertFalse(result.ok)
        self.assertEqual(result.error, "ACK MSA-2 'NOT-W1' does not match MSH-10 'W1'")
        self.assertEqual(hl7.parse(result.response)["MSA-2"], "NOT-W1")
        self.assertTrue((await self.dest.deliver(adt_a01("W2"))).ok)
        self.assertEqual(self.receiver.connections, 2)

    async def test_an_answer_that_is_not_an_ack_fails_and_drops_the_connection(self):
        self.receiver.script(["not-ack"])
        result = await self.dest.deliver(adt_a01("N1"))
        self.assertEqual(result, Result(ok=False, response=b"this is not an HL7 message",
                                        error="answer is not an HL7 ACK"))
        self.assertTrue((await self.dest.deliver(adt_a01("N2"))).ok)
        self.assertEqual(self.receiver.connections, 2)

    async def test_closed_without_an_answer(self):
        self.receiver.script(["close"])
        result = await self.dest.deliver(adt_a01("C1"))
        self.assertFalse(result.ok)
        self.assertIn("before the ACK", result.error)
        self.assertTrue((await self.dest.deliver(adt_a01("C2"))).ok)

    async def test_nobody_listening_is_connection_refused(self):
        dest = self.destination(free_port())
        result = await dest.deliver(adt_a01("R1"))
        self.assertFalse(result.ok)
        self.assertTrue(result.retry)
        self.assertIn("connection refused", result.error)

    async def test_a_connection_that_never_completes_times_out(self):
        # A listener that never accepts: once its queue is full, new connections hang.
        server = socket.socket()
        self.addCleanup(server.close)
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        for _ in range(3):
            filler = socket.socket()
            self.addCleanup(filler.close)
            filler.setblocking(False)
            filler.connect_ex(server.getsockname())
        dest = self.destination(server.getsockname()[1])
        dest.connect_timeout = 0.3
        started = time.monotonic()
        result = await dest.deliver(adt_a01("H1"))
        self.assertEqual(result.error, f"no connection to 127.0.0.1:{server.getsockname()[1]} within 0.3s")
        self.assertLess(time.monotonic() - started, 2.5)

    async def test_a_restarted_receiver_is_reconnected_to(self):
        self.assertTrue((await self.dest.deliver(adt_a01("S1"))).ok)
        self.receiver.stop()
        result = await self.dest.deliver(adt_a01("S2"))
        self.assertFalse(result.ok)
        self.receiver.start()
        result = await self.dest.deliver(adt_a01("S2"))
        self.assertTrue(result.ok, result.error)
        self.assertEqual(self.receiver.control_ids(), ["S1", "S2"])

    async def test_a_retry_sends_the_same_bytes(self):
        payload = adt_a01("Y1", extra_segments="ZZZ|1|\u00e9")
        self.receiver.script(["AE"])
        self.assertFalse((await self.dest.deliver(payload)).ok)
        self.assertTrue((await self.dest.deliver(payload)).ok)
        self.assertEqual(self.receiver.received, [payload, payload])

    async def test_an_oversized_answer_fails_and_drops_the_connection(self):
        dest = self.destination(self.receiver.port)
        dest.max_frame = 64
        result = await dest.deliver(adt_a01("O1"))
        self.assertEqual(result.error, "answer longer than 64 bytes")
        self.assertIsNone(result.response)

    async def test_a_payload_that_would_break_the_framing_is_refused(self):
        result = await self.dest.deliver(adt_a01("F1") + b"\x1c\x0d")
        self.assertEqual((result.ok, result.retry), (False, False))
        self.assertEqual(self.receiver.received, [])

    async def test_an_unexpected_error_is_a_failed_result_not_an_errback(self):
        self.patch(hl7, "peek", broken_peek)
        result = await self.dest.deliver(adt_a01("X1"))
        self.assertEqual(result, Result(ok=False, error="internal error (ZeroDivisionError)"))
        self.patch(hl7, "peek", peek)
        self.assertTrue((await self.dest.deliver(adt_a01("X2"))).ok)

    async def test_logs_name_control_ids_but_never_content(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.receiver.script(["wrong-id", "not-ack", "silent", "close", "AE", "AA"])
        for i in range(6):
            await self.dest.deliver(adt_a01(f"G{i}", family="SECRETFAMILY", given="SECRETGIVEN"))
        self.patch(hl7, "peek", broken_peek)
        await self.dest.deliver(adt_a01("G9", family="SECRETFAMILY"))
        logged = "\n".join(formatEvent(e) for e in events)
        self.assertIn("G0", logged)
        self.assertNotIn("SECRET", logged)
        self.assertNotIn("rejected by the test receiver", logged)

    def test_one_message_in_flight_at_a_time(self):
        self.receiver.mode = "silent"
        d = self.dest.deliver(adt_a01("P1"))
        self.assertRaises(RuntimeError, self.dest.deliver, adt_a01("P2"))
        return d

    async def test_close_is_idempotent_and_a_later_deliver_reconnects(self):
        self.assertTrue((await self.dest.deliver(adt_a01("Z1"))).ok)
        await self.dest.close()
        await self.dest.close()
        self.assertTrue((await self.dest.deliver(adt_a01("Z2"))).ok)
        self.assertEqual(self.receiver.connections, 2)
