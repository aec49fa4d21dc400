"""Channels end to end: a real engine process, real sockets, a real downstream receiver, real files."""

import os
import time
from pathlib import Path

import pytest

from interface_engine import hl7
from interface_engine.mllp import MLLPClient
from interface_engine.mllp.client import MLLPError
from interface_engine.store import Store
from tests.conftest import children, ended
from tests.messages import adt_a01
from tests.receiver import Receiver

FORWARD = "{{ msg | hl7_set('MSH-5', 'DOWNSTREAM') | hl7_drop('Z*') }}\n"


class Setup:
    """A channels folder, a mappings folder and an engine config that uses them."""

    def __init__(self, tmp_path: Path, engine_factory):
        self.root = tmp_path
        self.channels = tmp_path / "channels"
        self.mappings = tmp_path / "mappings"
        self.channels.mkdir()
        (self.mappings / "hl7").mkdir(parents=True)
        (self.mappings / "hl7" / "forward.hl7.j2").write_text(FORWARD)
        self.engine_factory = engine_factory

    def channel(self, name: str, text: str):
        (self.channels / f"{name}.toml").write_text(text)

    def start(self, **listener):
        extra = f'[channels]\ndirectory = "{self.channels}"\nmappings = "{self.mappings}"\n'
        self.engine = self.engine_factory(listener=listener or None, extra=extra)
        self.store = self.engine.open_store()
        return self.engine

    def send(self, *messages: bytes) -> list[tuple[str, str, str]]:
        answers = []
        with MLLPClient("127.0.0.1", self.engine.port, timeout=15) as c:
            for m in messages:
                ack = hl7.parse(c.send(m))
                answers.append((ack["MSA-1"], ack["MSA-2"], ack["MSA-3"]))
        return answers

    def wait(self, condition, timeout=20.0, what="condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}\n{self.engine.log()[-3000:]}")


def adt_channel(port: int, *, on_failure="block", attempts=3, ack_mode="stored", extra="",
                archive: Path | None = None) -> str:
    text = f"""
name = "adt"
[source]
type = "mllp"
listener = "test"
message_types = ["ADT"]
ack_mode = "{ack_mode}"
processed_timeout = "5s"
{extra}
[[destinations]]
name = "downstream"
type = "mllp"
host = "127.0.0.1"
port = {port}
template = "hl7/forward.hl7.j2"
ack_timeout = "1s"
connect_timeout = "1s"
[destinations.retry]
attempts = {attempts}
backoff = "100ms"
max_backoff = "300ms"
on_failure = "{on_failure}"
"""
    if archive is not None:
        text += f"""
[[destinations]]
name = "archive"
type = "file"
path = "{archive}/{{{{ msg['MSH-10'] }}}}.hl7"
"""
    return text


@pytest.fixture
def setup(tmp_path, engine_factory):
    return Setup(tmp_path, engine_factory)


def test_messages_are_filtered_transformed_and_delivered_in_order(setup, tmp_path):
    archive = tmp_path / "archive"
    with Receiver() as downstream:
        setup.channel("adt", adt_channel(downstream.port, archive=archive))
        setup.start()
        ids = [f"E2E{i}" for i in range(20)]
        assert setup.send(*[adt_a01(cid, extra_segments="ZPI|1|LOCAL") for cid in ids]) == \
            [("AA", cid, "") for cid in ids]
        assert downstream.wait_for(20, timeout=20)
        assert downstream.control_ids() == ids
        forwarded = hl7.parse(downstream.received[0])
        assert forwarded["MSH-5"] == "DOWNSTREAM" and forwarded.segment("ZPI") is None
        assert forwarded["PID-5.1"] == "DOE"
        setup.wait(lambda: setup.store.count_messages(state="sent") == 20, what="all sent")
    for cid in ids:
        assert (archive / f"{cid}.hl7").read_bytes() == adt_a01(cid, extra_segments="ZPI|1|LOCAL")
    assert setup.store.count_deliveries(state="sent") == 40


def test_a_file_in_the_way_holds_the_archive_queue_and_no_later_file_appears(setup, tmp_path):
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "ARC3.hl7").write_bytes(b"another system's file")
    with Receiver() as downstream:
        setup.channel("adt", adt_channel(downstream.port, archive=archive))
        setup.start()
        ids = [f"ARC{i}" for i in range(8)]
        assert [a[0] for a in setup.send(*[adt_a01(cid) for cid in ids])] == ["AA"] * 8
        setup.wait(lambda: setup.store.count_deliveries(destination="archive", state="error") == 1,
                   what="the archive blocked")
        time.sleep(0.5)
        assert sorted(os.listdir(archive)) == [f"ARC{i}.hl7" for i in range(4)]
        (archive / "ARC3.hl7").unlink()
        setup.wait(lambda: setup.store.count_deliveries(destination="archive", state="sent") == 8,
                   timeout=30, what="the archive written")
    assert sorted(os.listdir(archive)) == [f"{cid}.hl7" for cid in ids]
    assert (archive / "ARC3.hl7").read_bytes() == adt_a01("ARC3")


def test_downstream_down_queue_holds_source_keeps_acking_then_all_arrive_once_in_order(setup):
    downstream = Receiver()
    downstream.start()
    port = downstream.port
    downstream.stop()
    setup.channel("adt", adt_channel(port))
    setup.start()
    ids = [f"DOWN{i}" for i in range(30)]
    assert [a[0] for a in setup.send(*[adt_a01(cid) for cid in ids])] == ["AA"] * 30
    setup.wait(lambda: setup.store.count_messages(state="error") == 1, what="the head failing")
    time.sleep(0.5)
    assert setup.store.count_messages(state="error") == 1  # the head is failing ...
    assert setup.store.count_messages(state="queued") == 29  # ... the rest wait behind it
    downstream = Receiver(port=port).start()
    try:
        assert downstream.wait_for(30, timeout=20)
        time.sleep(0.5)
        assert downstream.control_ids() == ids
    finally:
        downstream.stop()


def test_ae_is_retried_and_block_holds_the_queue(setup):
    with Receiver() as downstream:
        downstream.script(["AE", "AE", "AE", "AE"])
        setup.channel("adt", adt_channel(downstream.port, on_failure="block", attempts=2))
        setup.start()
        setup.send(adt_a01("BLK1"), adt_a01("BLK2"))
        assert downstream.wait_for(6, timeout=15)
        time.sleep(0.3)
        assert downstream.control_ids() == ["BLK1"] * 5 + ["BLK2"]
        setup.wait(lambda: setup.store.count_messages(state="sent") == 2, what="both sent")
    first = setup.store.list_messages(limit=10)[-1]
    deliveries = setup.store.deliveries_of(first["id"])
    outcomes = [a["outcome"] for a in deliveries[0]["attempt_log"]]
    assert outcomes == ["error"] * 4 + ["sent"]
    assert deliveries[0]["attempt_log"][0]["response"].startswith(b"MSH")  # the AE is stored
    assert "AE from downstream" in deliveries[0]["attempt_log"][0]["error"]


def test_ae_with_skip_dead_letters_and_the_queue_moves_on(setup):
    with Receiver() as downstream:
        downstream.script(["AE", "AE"])
        setup.channel("adt", adt_channel(downstream.port, on_failure="skip", attempts=2))
        setup.start()
        setup.send(adt_a01("SKIP1"), adt_a01("SKIP2"))
        assert downstream.wait_for(3, timeout=15)
        assert downstream.control_ids() == ["SKIP1", "SKIP1", "SKIP2"]
        setup.wait(lambda: setup.store.count_messages(state="dead") == 1, what="dead-lettered")
        setup.wait(lambda: setup.store.count_messages(state="sent") == 1, what="next one sent")


def test_no_answer_times_out_and_the_same_bytes_are_sent_again(setup):
    with Receiver() as downstream:
        downstream.script(["silent"])
        setup.channel("adt", adt_channel(downstream.port))
        setup.start()
        setup.send(adt_a01("QUIET1"))
        assert downstream.wait_for(2, timeout=15)
        first, second = downstream.received[:2]
        assert first == second
        setup.wait(lambda: setup.store.count_messages(state="sent") == 1, what="sent")
    attempts = setup.store.deliveries_of(setup.store.list_messages(limit=1)[0]["id"])[0]["attempt_log"]
    assert "no ACK within 1s" in attempts[0]["error"]


def test_filtered_messages_are_stored_with_the_rule(setup):
    with Receiver() as downstream:
        setup.channel("adt", adt_channel(downstream.port, extra="") +
                      "\n[filter]\nwhen = \"msg['MSH-9.2'] != 'A08'\"\n")
        setup.start()
        a08 = adt_a01("FILT1").replace(b"ADT^A01^ADT_A01", b"ADT^A08^ADT_A01")
        assert setup.send(a08, adt_a01("FILT2"))[0][0] == "AA"
        assert downstream.wait_for(1, timeout=10)
        setup.wait(lambda: setup.store.count_messages(state="filtered") == 1, what="filtered")
    row = next(r for r in setup.store.list_messages() if r["control_id"] == "FILT1")
    assert row["state"] == "filtered" and "MSH-9.2" in row["filter_reason"]
    assert downstream.control_ids() == ["FILT2"]


def test_unrouted_message_type_is_rejected_with_code_200_and_kept(setup):
    with Receiver() as downstream:
        setup.channel("adt", adt_channel(downstream.port))
        setup.start()
        oru = adt_a01("ORU1").replace(b"ADT^A01^ADT_A01", b"ORU^R01^ORU_R01")
        code, _, reason = setup.send(oru)[0]
    assert code == "AR" and "no channel" in reason and "ORU^R01" in reason
    assert setup.store.count_messages(state="rejected") == 1


def test_processed_ack_mode_reports_the_destinations(setup):
    with Receiver() as downstream:
        setup.channel("adt", adt_channel(downstream.port, ack_mode="processed"))
        setup.start()
        assert setup.send(adt_a01("PROC1"))[0] == ("AA", "PROC1", "")
        downstream.script(["AE"])
        code, control_id, reason = setup.send(adt_a01("PROC2"))[0]
        assert (code, control_id) == ("AE", "PROC2") and "downstream" in reason


@pytest.mark.parametrize("escape, attribute", [
    ("''.__class__.__mro__[1].__subclasses__()", "__class__"),
    ("cycler.__init__.__globals__", "__init__"),
    ("self._TemplateReference__context", "_TemplateReference__context"),
])
def test_malicious_template_fails_that_delivery_only(setup, tmp_path, escape, attribute):
    (setup.mappings / "hl7" / "evil.hl7.j2").write_text("{{ %s }}\n" % escape)
    archive = tmp_path / "archive"
    with Receiver() as downstream:
        channel = adt_channel(downstream.port, archive=archive, on_failure="skip", attempts=1)
        setup.channel("adt", channel.replace("hl7/forward.hl7.j2", "hl7/evil.hl7.j2"))
        setup.start()
        assert setup.send(adt_a01("EVIL1"))[0][0] == "AA"
        setup.wait(lambda: (archive / "EVIL1.hl7").exists(), what="the other destination")
        setup.wait(lambda: setup.store.count_deliveries(state="dead") == 1, what="dead-lettered")
        assert downstream.received == []
    delivery = next(d for d in setup.store.deliveries_of(setup.store.list_messages()[0]["id"])
                    if d["destination"] == "downstream")
    assert delivery["state"] == "dead"
    assert "evil.hl7.j2 line 1" in delivery["last_error"] and f"'{attribute}'" in delivery["last_error"]
    assert "not allowed" in delivery["last_error"]


def test_values_cannot_inject_fields_segments_or_frames(setup):
    (setup.mappings / "hl7" / "copy.hl7.j2").write_text(
        "MSH|^~\\&|ENGINE|HUB|DOWN|STREAM|20260101||ADT^A01|{{ msg['MSH-10'] }}|P|2.5.1\n"
        "NTE|1||{{ msg['PID-5.1'] }}\n")
    with Receiver() as downstream:
        setup.channel("adt", adt_channel(downstream.port).replace("hl7/forward.hl7.j2", "hl7/copy.hl7.j2"))
        setup.start()
        nasty = "EVIL\\F\\X\\S\\Y\\X0D\\ZZZ\\F\\9\\X1C\\"  # decodes to EVIL|X^Y<CR>ZZZ|9<FS>
        setup.send(adt_a01("INJ1", family=nasty))
        assert downstream.wait_for(1, timeout=10)
    out = hl7.parse(downstream.received[0])
    assert [s.name for s in out.segments()] == ["MSH", "NTE"]
    assert out["NTE-3"] == "EVIL|X^Y\rZZZ|9\x1c"
    assert out["NTE-4"] == ""


def test_directory_source_stores_every_message_then_moves_the_file(setup, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    setup.channel("files", f"""
name = "files"
[source]
type = "directory"
path = "{inbox}"
pattern = "*.hl7"
interval = "200ms"
[[destinations]]
name = "out"
type = "file"
path = "{tmp_path}/out/{{{{ msg['MSH-10'] }}}}.hl7"
""")
    (inbox / "two.hl7").write_bytes(adt_a01("DIR1") + adt_a01("DIR2"))
    (inbox / "junk.hl7").write_bytes(b"this is not HL7\n")
    old = time.time() - 5
    for name in ("two.hl7", "junk.hl7"):
        os.utime(inbox / name, (old, old))
    setup.start()
    setup.wait(lambda: (inbox / "done" / "two.hl7").exists() and (inbox / "error" / "junk.hl7").exists(),
               what="files moved")
    setup.wait(lambda: (tmp_path / "out" / "DIR2.hl7").exists(), what="delivered")
    assert (tmp_path / "out" / "DIR1.hl7").read_bytes() == adt_a01("DIR1")
    assert setup.store.count_messages(state="rejected") == 1
    assert not (inbox / "two.hl7").exists()


def test_reload_applies_a_valid_change_keeps_connections_and_refuses_a_bad_one(setup, tmp_path):
    with Receiver() as downstream:
        setup.channel("adt", adt_channel(downstream.port))
        engine = setup.start()
        with MLLPClient("127.0.0.1", engine.port) as c:
            assert hl7.parse(c.send(adt_a01("REL1")))["MSA-1"] == "AA"
            setup.channel("adt", adt_channel(downstream.port) + "\n[filter]\nwhen = \"false\"\n")
            engine.proc.send_signal(1)  # SIGHUP
            setup.wait(lambda: "reloaded: 1 channel" in engine.log(), what="reload")
            assert hl7.parse(c.send(adt_a01("REL2")))["MSA-1"] == "AA"  # same connection
            setup.channel("adt", "name = 'adt'\n[source]\ntype = 'nonsense'\n")
            engine.proc.send_signal(1)
            setup.wait(lambda: "reload refused" in engine.log(), what="refusal")
            assert hl7.parse(c.send(adt_a01("REL3")))["MSA-1"] == "AA"
        setup.wait(lambda: setup.store.count_messages(state="filtered") == 2, what="filtered")
        assert downstream.control_ids() == ["REL1"]
    assert "source.type" in engine.log()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_sigkill_during_delivery_loses_nothing_and_repeats_at_most_the_one_in_flight(
        backend, tmp_path, engine_factory, request):
    setup = Setup(tmp_path, engine_factory)
    store_url = request.getfixturevalue("postgres_url") if backend == "postgres" else None
    count = 300
    ids = [f"KILL{i:03d}" for i in range(count)]
    with Receiver(delay=0.005) as downstream:  # a slow downstream: the queue builds up
        setup.channel("adt", adt_channel(downstream.port))
        extra = f'[channels]\ndirectory = "{setup.channels}"\nmappings = "{setup.mappings}"\n'
        engine = engine_factory(store_url=store_url, extra=extra)
        setup.engine, setup.store = engine, engine.open_store()
        assert [a[0] for a in setup.send(*[adt_a01(cid) for cid in ids])] == ["AA"] * count
        setup.wait(lambda: len(downstream.received) >= count // 3, what="deliveries under way")
        engine.kill()
        delivered_before = len(downstream.received)
        assert delivered_before < count, "the kill must land while deliveries are under way"
        engine.start()
        setup.wait(lambda: len(set(downstream.control_ids())) == count, timeout=60, what="all delivered")
        time.sleep(0.5)
        engine.stop()
    arrived = downstream.control_ids()
    repeats = len(arrived) - len(set(arrived))
    assert repeats <= 1, f"{repeats} messages were delivered twice"
    first_seen = list(dict.fromkeys(arrived))
    assert first_seen == ids, "the queue's order was not kept"
    assert setup.store.count_messages(state="sent") == count


def test_sends_in_the_sent_journal_are_recorded_at_start_and_not_sent_again(setup, tmp_path,
                                                                            engine_factory):
    """A crash between a confirmed send and its record leaves the send in the sent-journal only."""
    import struct

    downstream = Receiver()
    downstream.start()
    port = downstream.port
    downstream.stop()   # down: the deliveries wait in their queue
    setup.channel("adt", adt_channel(port))
    extra = f'[channels]\ndirectory = "{setup.channels}"\nmappings = "{setup.mappings}"\n'
    engine = engine_factory(extra=extra, engine={"node": "j1"})
    setup.engine, store = engine, engine.open_store()
    ids = [f"JRN{i}" for i in range(5)]
    assert [a[0] for a in setup.send(*[adt_a01(cid) for cid in ids])] == ["AA"] * 5
    setup.wait(lambda: store.count_deliveries() == 5, what="deliveries queued")
    engine.stop()
    journaled = sorted(d["id"] for m in store.list_messages(limit=10) for d in store.deliveries_of(m["id"]))[:3]
    # As a killed engine leaves it: three sends confirmed, the third in the older generation.
    (tmp_path / "store.db-sent-j1.1").write_bytes(b"".join(struct.pack("<Q", i) for i in journaled[:2]))
    (tmp_path / "store.db-sent-j1.0").write_bytes(struct.pack("<Q", journaled[2]) + b"\x07\x00")
    with Receiver(port=port) as downstream:
        engine.start()
        assert downstream.wait_for(2, timeout=20)
        setup.wait(lambda: store.count_messages(state="sent") == 5, what="all sent")
        time.sleep(0.3)
        assert downstream.control_ids() == ids[3:]
    assert "recorded 3 deliveries confirmed downstream before the engine stopped" in engine.log()
    for message in store.list_messages(limit=10):
        (delivery,) = store.deliveries_of(message["id"])
        assert delivery["state"] == "sent"
        assert delivery["attempt_log"][-1]["outcome"] == "sent"
    engine.stop()
    # Once recorded, the journal starts empty.
    assert (tmp_path / "store.db-sent-j1.0").stat().st_size == 0
    assert (tmp_path / "store.db-sent-j1.1").stat().st_size == 0
    assert oct((tmp_path / "store.db-sent-j1.0").stat().st_mode & 0o777) == "0o600"


PROCESSOR, WRITER = b"interface_engine.channels.processor", b"interface_engine.store.writer"


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])   # utime + stime


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads child processes from /proc (Linux)")
def test_channels_run_in_a_child_process_that_is_replaced_when_it_dies(setup, tmp_path):
    import signal

    with Receiver() as downstream:
        setup.channel("adt", adt_channel(downstream.port))
        engine = setup.start()
        setup.wait(lambda: len(children(engine.proc.pid, PROCESSOR)) == 1, what="the processor process")
        (child,) = children(engine.proc.pid, PROCESSOR)
        before = cpu_ticks(child)
        ids = [f"CHILD{i}" for i in range(200)]
        assert [a[0] for a in setup.send(*[adt_a01(cid) for cid in ids])] == ["AA"] * 200
        assert downstream.wait_for(200, timeout=30)
        assert cpu_ticks(child) > before, "the templates did not run in the child"
        os.kill(child, signal.SIGKILL)
        setup.wait(lambda: child not in children(engine.proc.pid), what="the child gone")
        assert [a[0] for a in setup.send(adt_a01("AFTER1"), adt_a01("AFTER2"))] == ["AA", "AA"]
        assert downstream.wait_for(202, timeout=30)
        assert downstream.control_ids() == ids + ["AFTER1", "AFTER2"]
        (child,) = children(engine.proc.pid, PROCESSOR)
    assert "the channel processor process ended unexpectedly; starting a new one" in engine.log()
    engine.kill()   # a killed engine cannot stop its child: the child must notice and end
    setup.wait(lambda: not os.path.exists(f"/proc/{child}"), timeout=10, what="the orphaned child's end")


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads child processes from /proc (Linux)")
def test_processor_thread_keeps_channels_in_the_engine_process(setup, tmp_path, engine_factory):
    with Receiver() as downstream:
        setup.channel("adt", adt_channel(downstream.port))
        extra = (f'[channels]\ndirectory = "{setup.channels}"\nmappings = "{setup.mappings}"\n'
                 'processor = "thread"\n')
        engine = setup.engine = engine_factory(extra=extra)
        setup.store = engine.open_store()
        assert setup.send(adt_a01("THR1")) == [("AA", "THR1", "")]
        assert downstream.wait_for(1, timeout=10)
        assert children(engine.proc.pid, PROCESSOR) == []


def engine_with_writer(setup, downstream):
    """An engine with the ADT channel to `downstream`, and the pid of its store writer process."""
    setup.channel("adt", adt_channel(downstream.port))
    engine = setup.start()
    setup.wait(lambda: len(children(engine.proc.pid, WRITER)) == 1, what="the writer process")
    return engine, children(engine.proc.pid, WRITER)[0]


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads child processes from /proc (Linux)")
def test_the_store_is_written_by_a_child_process_that_is_replaced_when_it_dies(setup, tmp_path):
    import signal

    with Receiver() as downstream:
        engine, writer = engine_with_writer(setup, downstream)
        before = cpu_ticks(writer)
        ids = [f"WRITER{i}" for i in range(200)]
        assert [a[0] for a in setup.send(*[adt_a01(cid) for cid in ids])] == ["AA"] * 200
        assert downstream.wait_for(200, timeout=30)
        setup.wait(lambda: setup.store.count_messages(state="sent") == 200, what="200 recorded sent")
        assert cpu_ticks(writer) > before, "the store was not written in the writer process"
        os.kill(writer, signal.SIGKILL)
        setup.wait(lambda: ended(writer), what="the writer's end")
        # Found dead at the next cycle, before anything reached it: a new writer process takes that cycle.
        assert [a[0] for a in setup.send(adt_a01("AFTER1"), adt_a01("AFTER2"))] == ["AA", "AA"]
        assert downstream.wait_for(202, timeout=30)
        assert downstream.control_ids() == ids + ["AFTER1", "AFTER2"]
        setup.wait(lambda: setup.store.count_messages(state="sent") == 202, what="202 recorded sent")
        (writer,) = children(engine.proc.pid, WRITER)
    # Noticed by the message's cycle, or by an idle queue read's just before it.
    assert "the store writer process had ended; starting a new one" in engine.log() or \
        "the store writer process ended with 1 batches in hand" in engine.log()
    engine.kill()   # a killed engine cannot stop its writer: the writer must notice and end
    setup.wait(lambda: not os.path.exists(f"/proc/{writer}"), timeout=10, what="the orphaned writer's end")


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads child processes from /proc (Linux)")
def test_a_writer_killed_with_a_cycle_in_hand_loses_no_acknowledged_message(setup, tmp_path):
    import signal
    import threading

    with Receiver() as downstream:
        engine, writer = engine_with_writer(setup, downstream)
        acked: list[str] = []
        refused: list[str] = []

        def feed(n: int):
            with MLLPClient("127.0.0.1", engine.port, timeout=15) as c:
                for i in range(300):
                    cid = f"K{n}-{i}"
                    try:
                        ack = hl7.parse(c.send(adt_a01(cid)))
                    except (OSError, MLLPError):   # no answer: a sender resends it
                        refused.append(cid)
                        return
                    (acked if ack["MSA-1"] == "AA" else refused).append(cid)

        feeders = [threading.Thread(target=feed, args=(n,)) for n in range(4)]
        for t in feeders:
            t.start()
        setup.wait(lambda: len(acked) >= 100, what="messages flowing")
        os.kill(writer, signal.SIGKILL)
        for t in feeders:
            t.join(60)
        assert setup.send(adt_a01("LATER")) == [("AA", "LATER", "")]
        acked.append("LATER")
        stored = {m["control_id"] for m in setup.store.list_messages(limit=2000)}
        assert set(acked) <= stored, "an acknowledged message is missing from the store"
        setup.wait(lambda: set(acked) <= set(downstream.control_ids()), timeout=60,
                   what="every acknowledged message delivered")
        setup.wait(lambda: len(children(engine.proc.pid, WRITER)) == 1, what="a new writer process")


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads child processes from /proc (Linux)")
def test_writer_thread_keeps_the_store_in_the_engine_process(setup, tmp_path, engine_factory):
    with Receiver() as downstream:
        setup.channel("adt", adt_channel(downstream.port))
        extra = ('writer = "thread"\n'   # in the [store] table the engine config ends with here
                 f'[channels]\ndirectory = "{setup.channels}"\nmappings = "{setup.mappings}"\n')
        engine = setup.engine = engine_factory(extra=extra)
        setup.store = engine.open_store()
        assert setup.send(adt_a01("THR1")) == [("AA", "THR1", "")]
        assert downstream.wait_for(1, timeout=10)
        assert children(engine.proc.pid, WRITER) == []


def test_a_message_left_received_by_a_crash_is_processed_at_start(setup, tmp_path):
    from interface_engine.store import RECEIVED, Incoming

    with Receiver() as downstream:
        setup.channel("adt", adt_channel(downstream.port))
        store = Store(f"sqlite:///{tmp_path / 'store.db'}")
        store.check_schema()
        raw = adt_a01("LEFT1")
        store.write([Incoming(raw=raw, listener="test", peer="127.0.0.1", state=RECEIVED, ack=b"",
                              message_type="ADT", trigger_event="A01", control_id="LEFT1",
                              channel="adt")])
        store.close()
        setup.start()
        assert downstream.wait_for(1, timeout=10)
        assert downstream.control_ids() == ["LEFT1"]
        setup.wait(lambda: setup.store.count_messages(state="sent") == 1, what="sent")
    assert "resumed 1 stored messages" in setup.engine.log()
