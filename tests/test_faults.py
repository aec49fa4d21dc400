"""The store falling behind or failing: reads pause, nothing unstored is acknowledged."""

import json
import socket
import sqlite3
import threading
import time

import pytest

from interface_engine import hl7
from interface_engine.mllp import MLLPClient, MLLPError
from interface_engine.store import Store
from tests.messages import adt_a01


def pipeline(port, prefix, count):
    """Send `count` frames without waiting, then read every answer; returns MSA-2s in order."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"".join(b"\x0b" + adt_a01(f"{prefix}-{i}") + b"\x1c\x0d" for i in range(count)))
        data = b""
        while data.count(b"\x1c\x0d") < count:
            chunk = s.recv(65536)
            assert chunk, "connection closed before every frame was answered"
            data += chunk
    return [hl7.parse(f.lstrip(b"\x0b"))["MSA-2"] for f in data.split(b"\x1c\x0d") if f]


def test_reads_pause_while_the_store_is_locked_and_everything_is_answered_after(engine_factory, tmp_path):
    engine = engine_factory(listener={"max_pending_per_connection": 16}, extra="max_backlog = 32")
    engine.stop()  # the store file exists now; lock it, then start again
    engine.start()
    lock = sqlite3.connect(tmp_path / "store.db", timeout=5)
    lock.execute("BEGIN EXCLUSIVE")
    results = {}
    senders = [threading.Thread(target=lambda n=n: results.__setitem__(n, pipeline(engine.port, f"P{n}", 100)))
               for n in range(4)]
    for t in senders:
        t.start()
    time.sleep(1.5)
    assert not results, "nothing may be answered while the store cannot commit"
    lock.rollback()
    lock.close()
    for t in senders:
        t.join(60)
    assert all(results[n] == [f"P{n}-{i}" for i in range(100)] for n in range(4))
    assert engine.open_store().count_messages(state="received") == 400
    assert engine.stop() == 0
    assert "pausing reads" in engine.log()


@pytest.mark.postgres
def test_a_failed_commit_gets_no_ack_and_the_resend_is_stored_once(engine_factory, postgres_url):
    import psycopg

    engine = engine_factory(store_url=postgres_url)
    with MLLPClient("127.0.0.1", engine.port) as c:
        assert hl7.parse(c.send(adt_a01("BEFORE")))["MSA-1"] == "AA"
    # Cut the engine's database connections under it, as a database restart would.
    dsn = postgres_url.split("?")[0].replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'interface-engine' AND pid <> pg_backend_pid()").fetchone()[0]
    assert killed >= 1
    with MLLPClient("127.0.0.1", engine.port) as c:
        with pytest.raises(MLLPError):
            c.send(adt_a01("DURING"))  # the commit fails: the connection closes, no answer
    with MLLPClient("127.0.0.1", engine.port) as c:
        assert hl7.parse(c.send(adt_a01("DURING")))["MSA-1"] == "AA"  # the resend is stored
    assert Store(postgres_url).count_messages(control_id="DURING") == 1
    assert "none of them is acknowledged" in engine.log()


def test_logs_carry_no_message_content(engine_factory, tmp_path):
    engine = engine_factory(extra="")
    canary = "ZZCANARYFAMILY"
    with MLLPClient("127.0.0.1", engine.port) as c:
        c.send(adt_a01("LOG1", family=canary, mrn="ZZCANARYMRN"))
        c.send(adt_a01("LOG1", family=canary + "X", mrn="ZZCANARYMRN"))  # conflict: logged at warn
        c.send(b"PID|1||ZZCANARYMRN||" + canary.encode() + b"\r")  # rejected: logged with reason
    engine.stop()
    log = engine.log()
    assert "LOG1" in log and "rejected message" in log
    assert canary not in log and "ZZCANARYMRN" not in log


def test_json_log_format(engine_factory, tmp_path):
    workdir = tmp_path / "json"
    workdir.mkdir()
    engine = engine_factory(workdir=workdir, extra="")
    engine.stop()
    engine.config_path.write_text(engine.config_path.read_text().replace(
        'log_level = "debug"', 'log_level = "debug"\nlog_format = "json"'))
    offset = len(engine.log())
    engine.start()
    with MLLPClient("127.0.0.1", engine.port) as c:
        c.send(adt_a01("JSON1"))
    engine.stop()
    records = [json.loads(line) for line in engine.log()[offset:].splitlines() if line.strip()]
    assert any("JSON1" in r["message"] and r["level"] == "debug" for r in records)
    assert {"time", "level", "system", "message"} <= set(records[0])
