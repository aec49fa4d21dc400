"""The test receiver itself: each mode, scripts, restarts on the same port."""

import socket
import time

import pytest

from interface_engine import hl7
from interface_engine.mllp import MLLPClient, MLLPError
from tests.messages import adt_a01
from tests.receiver import Receiver


def msa(answer: bytes):
    ack = hl7.parse(answer)
    return ack["MSA-1"], ack["MSA-2"], ack["MSA-3"]


def test_answers_aa_naming_the_message_and_records_it():
    with Receiver() as receiver, MLLPClient("127.0.0.1", receiver.port, timeout=5) as client:
        assert msa(client.send(adt_a01("R1"))) == ("AA", "R1", "")
        assert msa(client.send(adt_a01("R2"))) == ("AA", "R2", "")
    assert receiver.received == [adt_a01("R1"), adt_a01("R2")]
    assert receiver.control_ids() == ["R1", "R2"]
    assert receiver.connections == 1


def test_mode_changes_while_running_and_a_script_comes_first():
    with Receiver(reason="no such patient") as receiver, \
            MLLPClient("127.0.0.1", receiver.port, timeout=5) as client:
        receiver.mode = "AE"
        assert msa(client.send(adt_a01("E1"))) == ("AE", "E1", "no such patient")
        receiver.script(["AR", "wrong-id", "not-ack"])
        assert msa(client.send(adt_a01("E2")))[0] == "AR"
        assert msa(client.send(adt_a01("E3"))) == ("AA", "NOT-E3", "")
        assert client.send(adt_a01("E4")) == b"this is not an HL7 message"
        assert msa(client.send(adt_a01("E5")))[0] == "AE"


def test_rejects_an_unknown_mode():
    receiver = Receiver()
    with pytest.raises(ValueError):
        receiver.mode = "maybe"
    with pytest.raises(ValueError):
        receiver.script(["AA", "maybe"])


def test_silent_and_close_record_but_do_not_answer():
    with Receiver("silent") as receiver:
        with MLLPClient("127.0.0.1", receiver.port, timeout=0.3) as client:
            with pytest.raises(MLLPError, match="no answer"):
                client.send(adt_a01("S1"))
        receiver.mode = "close"
        with MLLPClient("127.0.0.1", receiver.port, timeout=5) as client:
            with pytest.raises(MLLPError, match="closed"):
                client.send(adt_a01("C1"))
        assert receiver.wait_for(2)
        assert receiver.control_ids() == ["S1", "C1"]


def test_serves_several_connections_at_once():
    with Receiver() as receiver:
        with MLLPClient("127.0.0.1", receiver.port, timeout=5) as a, \
                MLLPClient("127.0.0.1", receiver.port, timeout=5) as b:
            assert msa(a.send(adt_a01("A1")))[1] == "A1"
            assert msa(b.send(adt_a01("B1")))[1] == "B1"
            assert msa(a.send(adt_a01("A2")))[1] == "A2"
        assert receiver.connections == 2


def test_stop_closes_connections_and_start_reopens_the_same_port():
    receiver = Receiver().start()
    try:
        port = receiver.port
        client = MLLPClient("127.0.0.1", port, timeout=5)
        client.connect()
        assert msa(client.send(adt_a01("B1")))[0] == "AA"
        receiver.stop()
        with pytest.raises(MLLPError):
            client.send(adt_a01("B2"))
        client.close()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        receiver.start()
        assert receiver.port == port
        with MLLPClient("127.0.0.1", port, timeout=5) as client:
            assert msa(client.send(adt_a01("B3")))[1] == "B3"
    finally:
        receiver.stop()


def test_delay_holds_answers_back():
    with Receiver(delay=0.3) as receiver, MLLPClient("127.0.0.1", receiver.port, timeout=5) as client:
        started = time.monotonic()
        assert msa(client.send(adt_a01("D1")))[1] == "D1"
        assert time.monotonic() - started >= 0.3


def test_wait_for_times_out():
    with Receiver() as receiver:
        assert not receiver.wait_for(1, timeout=0.1)
