"""The listener over real sockets on 127.0.0.1, against a real engine process and store."""

import socket
import threading
import time

import pytest

from interface_engine import hl7
from interface_engine.mllp import MLLPClient, MLLPError
from tests.messages import adt_a01

FAST = {"frame_timeout": 1, "idle_timeout": 2, "max_frame": 4096,
        "max_connections": 6, "max_connections_per_peer": 4}


@pytest.fixture
def engine(engine_factory):
    return engine_factory(listener=FAST)


def msa(answer: bytes):
    ack = hl7.parse(answer)
    return ack["MSA-1"], ack["MSA-2"], ack["MSA-3"]


def raw_socket(engine):
    s = socket.create_connection(("127.0.0.1", engine.port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_frames(sock, count, timeout=5.0):
    sock.settimeout(timeout)
    data = b""
    while data.count(b"\x1c\x0d") < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return [f.lstrip(b"\x0b") for f in data.split(b"\x1c\x0d") if f]


def closed_by_peer(sock, timeout=5.0) -> bool:
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


class Steady:
    """A well-behaved sender running beside each abuse, to show the listener keeps serving it."""

    def __init__(self, engine):
        self.engine, self.answers, self.errors = engine, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        i = 0
        try:
            with MLLPClient("127.0.0.1", self.engine.port, timeout=5) as c:
                while not self._stop.is_set():
                    i += 1
                    cid = f"STEADY{i}"
                    self.answers.append((cid, msa(c.send(adt_a01(cid)))))
                    time.sleep(0.02)
        except Exception as e:  # recorded and asserted on by the test
            self.errors.append(e)

    def __enter__(self):
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.answers and not self.errors and time.monotonic() < deadline:
            time.sleep(0.01)  # connected and served before the abuse starts
        assert self.answers, self.errors
        return self

    def __exit__(self, *exc):
        after_abuse = len(self.answers) + 3
        deadline = time.monotonic() + 10
        while len(self.answers) < after_abuse and not self.errors and time.monotonic() < deadline:
            time.sleep(0.02)
        self._stop.set()
        self._thread.join(10)
        assert not self.errors, self.errors
        assert len(self.answers) >= after_abuse, "the well-behaved sender stopped being served"
        assert all(a == ("AA", cid, "") for cid, a in self.answers), self.answers


def test_ack_only_after_the_message_is_committed(engine):
    store = engine.open_store()
    with MLLPClient("127.0.0.1", engine.port) as c:
        for i in range(20):
            raw = adt_a01(f"C{i}")
            assert msa(c.send(raw)) == ("AA", f"C{i}", "")
            rows = store.list_messages(limit=1)
            assert rows[0]["control_id"] == f"C{i}"
            assert store.get_message(rows[0]["id"])["raw"] == raw


def test_ack_is_addressed_back_to_the_sender(engine):
    with MLLPClient("127.0.0.1", engine.port) as c:
        ack = hl7.parse(c.send(adt_a01("X1", sender="LABSYS", facility="LABFAC", version="2.4")))
    assert (ack["MSH-3"], ack["MSH-4"], ack["MSH-5"], ack["MSH-6"]) == ("ENGINE", "HUB", "LABSYS", "LABFAC")
    assert ack["MSH-12"] == "2.4" and ack["MSH-9.1"] == "ACK"


def test_frame_split_byte_by_byte(engine):
    with Steady(engine), raw_socket(engine) as s:
        for b in b"\x0b" + adt_a01("BYTES") + b"\x1c\x0d":
            s.sendall(bytes([b]))
        assert msa(read_frames(s, 1)[0]) == ("AA", "BYTES", "")


def test_ten_frames_in_one_write_are_answered_in_order(engine):
    with raw_socket(engine) as s:
        s.sendall(b"".join(b"\x0b" + adt_a01(f"TEN{i}") + b"\x1c\x0d" for i in range(10)))
        answers = read_frames(s, 10)
    assert [msa(a)[1] for a in answers] == [f"TEN{i}" for i in range(10)]


def test_garbage_before_the_start_block_is_discarded(engine):
    with raw_socket(engine) as s:
        s.sendall(b"GET / HTTP/1.1\r\n\r\n" + b"\x0b" + adt_a01("AFTERJUNK") + b"\x1c\x0d")
        assert msa(read_frames(s, 1)[0]) == ("AA", "AFTERJUNK", "")
    engine.stop()
    assert "discarded 18 bytes outside MLLP frames" in engine.log()


def test_unfinished_frame_is_closed_at_the_deadline_and_nothing_is_stored(engine):
    with Steady(engine), raw_socket(engine) as s:
        s.sendall(b"\x0b" + adt_a01("NEVERENDS")[:50])
        started = time.monotonic()
        assert closed_by_peer(s)
        assert 0.8 < time.monotonic() - started < 3
    assert engine.open_store().count_messages(control_id="NEVERENDS") == 0


def test_frame_without_end_block_then_close(engine):
    with Steady(engine):
        with raw_socket(engine) as s:
            s.sendall(b"\x0b" + adt_a01("HALF"))
        time.sleep(0.3)
    assert engine.open_store().count_messages(control_id="HALF") == 0


def test_oversized_frame_gets_ar_and_the_connection_is_closed(engine):
    big = adt_a01("HUGE", extra_segments="NTE|1||" + "x" * 10_000)
    with Steady(engine), raw_socket(engine) as s:
        s.sendall(b"\x0b" + big + b"\x1c\x0d")
        code, control_id, reason = msa(read_frames(s, 1)[0])
        assert (code, control_id) == ("AR", "HUGE") and "4096-byte limit" in reason
        assert closed_by_peer(s)


def test_idle_connection_is_closed(engine):
    with raw_socket(engine) as s:
        started = time.monotonic()
        assert closed_by_peer(s, timeout=6)
        assert 1.5 < time.monotonic() - started < 5


def test_connections_over_the_per_peer_cap_are_refused(engine):
    with Steady(engine):  # holds one of the four
        held = [raw_socket(engine) for _ in range(3)]
        extra = raw_socket(engine)
        assert closed_by_peer(extra, timeout=3)
        for s in held:
            s.sendall(b"\x0b" + adt_a01(f"HELD{held.index(s)}") + b"\x1c\x0d")
            assert msa(read_frames(s, 1)[0])[0] == "AA"
            s.close()
        extra.close()


def test_not_hl7_is_rejected_with_a_reason_and_still_stored(engine):
    junk = b"this is not HL7 \xff\xfe"
    with MLLPClient("127.0.0.1", engine.port) as c:
        code, _, reason = msa(c.send(junk))
    assert code == "AR" and "MSH" in reason
    store = engine.open_store()
    row = store.list_messages(limit=1)[0]
    assert row["state"] == "rejected" and store.get_message(row["id"])["raw"] == junk


def test_duplicates_are_answered_from_the_store_and_conflicts_get_ae(engine):
    with MLLPClient("127.0.0.1", engine.port) as c:
        first = c.send(adt_a01("DUP1"))
        again = c.send(adt_a01("DUP1"))
        conflict = msa(c.send(adt_a01("DUP1", family="OTHER")))
    assert again == first
    assert conflict[0] == "AE" and "different content" in conflict[2]
    store = engine.open_store()
    assert store.count_messages(control_id="DUP1", state="received") == 1
    assert store.count_messages(control_id="DUP1", state="rejected") == 1
    assert engine.stop() == 0
    assert "conflicts=1" in engine.log() and "duplicates=1" in engine.log()


def test_enhanced_mode_gets_a_commit_ack(engine):
    with MLLPClient("127.0.0.1", engine.port) as c:
        assert msa(c.send(adt_a01("ENH1", accept_ack="AL", app_ack="NE")))[0] == "CA"
        assert msa(c.send(adt_a01("ENH2", accept_ack="NE", app_ack="AL")))[0] == "AA"
        assert msa(c.send(adt_a01("ENH3", accept_ack="ER", app_ack="AL")))[0] == "AA"


def test_batch_gets_one_answer_per_message(engine):
    batch = (b"FHS|^~\\&|LAB|LABFAC\rBHS|^~\\&|LAB|LABFAC\r" + adt_a01("B1") + adt_a01("B2")
             + b"BTS|2\rFTS|1\r")
    with MLLPClient("127.0.0.1", engine.port) as c:
        answer = c.send(batch)
    assert [msa(part)[:2] for part in hl7.split_messages(answer)] == [("AA", "B1"), ("AA", "B2")]
    store = engine.open_store()
    assert store.count_messages(control_id="B1") == store.count_messages(control_id="B2") == 1


def test_sigterm_answers_what_is_stored_and_exits_zero(engine):
    with MLLPClient("127.0.0.1", engine.port) as c:
        assert msa(c.send(adt_a01("LAST")))[0] == "AA"
        assert engine.stop() == 0
        with pytest.raises(MLLPError):
            c.send(adt_a01("AFTER"))
    assert "engine stopped" in engine.log()


def test_connections_over_the_listener_cap_are_refused(engine_factory):
    engine = engine_factory(listener={"max_connections": 3, "max_connections_per_peer": 2})

    def from_address(host):
        s = socket.socket()
        s.bind((host, 0))  # distinct loopback addresses are distinct peers
        s.connect(("127.0.0.1", engine.port))
        return s

    held = [from_address("127.0.0.1"), from_address("127.0.0.2"), from_address("127.0.0.3")]
    extra = from_address("127.0.0.4")
    assert closed_by_peer(extra, timeout=3)
    for i, s in enumerate(held):
        s.sendall(b"\x0b" + adt_a01(f"CAP{i}") + b"\x1c\x0d")
        assert msa(read_frames(s, 1)[0])[:2] == ("AA", f"CAP{i}")
        s.close()
    extra.close()
    assert engine.stop() == 0
    assert "is at its cap of 3" in engine.log()
