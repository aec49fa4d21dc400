"""Abuse limits on a listener: peers not on its allow-list, and messages built to be expensive."""

from __future__ import annotations

import socket
import time

import sqlalchemy as sa

import pytest

from interface_engine import hl7
from interface_engine.ingest import over_limits
from interface_engine.mllp import MLLPClient
from tests.messages import adt_a01

SEVEN_SEGMENTS = adt_a01("SEG-OK")  # MSH EVN PID NK1 PV1 AL1 DG1


def limits_message(control_id: str, *, extra: int = 0, repetitions: int = 1) -> bytes:
    names = "~".join(f"DOE^JANE{i}" for i in range(repetitions))
    body = adt_a01(control_id, family=names.split("^")[0]).replace(b"DOE^JANE^Q", names.encode() + b"^Q", 1)
    return body + b"".join(b"NTE|%d||note\r" % i for i in range(extra))


def test_the_fast_path_and_the_field_scan_agree_at_the_boundary():
    for reps in range(1, 8):
        raw = limits_message("B", repetitions=reps)
        refused = over_limits(raw, hl7.peek(raw), (100, 5))
        assert (refused is not None) == (reps > 5), reps
    raw = limits_message("B", extra=3)  # 10 segments
    assert over_limits(raw, hl7.peek(raw), (10, 5)) is None
    assert "more than 9 segments" in over_limits(raw, hl7.peek(raw), (9, 5)).reason


def answer(port: int, message: bytes) -> tuple[str, str]:
    with MLLPClient("127.0.0.1", port, timeout=10) as client:
        ack = hl7.parse(client.send(message))
    return ack["MSA-1"], ack["MSA-3"] or ack["ERR-8"]


def test_too_many_segments_or_repetitions_is_refused_and_kept(engine_factory):
    engine = engine_factory(listener={"max_segments": 10, "max_repetitions": 5})
    assert answer(engine.port, limits_message("OK-10", extra=3))[0] == "AA"
    code, reason = answer(engine.port, limits_message("TOO-MANY-SEGS", extra=4))
    assert (code, reason) == ("AR", "message has more than 10 segments")
    assert answer(engine.port, limits_message("OK-REPS", repetitions=5))[0] == "AA"
    code, reason = answer(engine.port, limits_message("TOO-MANY-REPS", repetitions=6))
    assert (code, reason) == ("AR", "a field of PID has more than 5 repetitions")
    store = engine.open_store()
    rows = {r["control_id"]: r["state"] for r in store.list_messages()}
    assert rows == {"OK-10": "received", "TOO-MANY-SEGS": "rejected", "OK-REPS": "received",
                    "TOO-MANY-REPS": "rejected"}
    store.close()


def from_address(source: str, port: int) -> socket.socket:
    s = socket.socket()
    s.settimeout(5)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def test_a_peer_not_on_the_allow_list_is_closed_on_accept(engine_factory):
    engine = engine_factory(listener={"allowed_peers": ["127.0.0.2", "10.0.0.0/8"]})
    refused = from_address("127.0.0.1", engine.port)
    try:
        refused.sendall(b"\x0b" + adt_a01("NOT-ALLOWED") + b"\x1c\r")
        assert refused.recv(100) == b""
    except ConnectionResetError:
        pass
    finally:
        refused.close()
    allowed = from_address("127.0.0.2", engine.port)
    allowed.sendall(b"\x0b" + adt_a01("ALLOWED") + b"\x1c\r")
    assert b"MSA|AA|ALLOWED" in allowed.recv(65536)
    allowed.close()
    assert "refused connection from 127.0.0.1: not on the allowed_peers of listener test" in engine.log()
    assert "NOT-ALLOWED" not in engine.log()
    store = engine.open_store()
    query = sa.text("SELECT object_id, source, detail FROM audit_events WHERE action = 'auth.failed'")
    deadline = time.monotonic() + 5
    while True:
        with store.engine.connect() as conn:
            events = conn.execute(query).all()
        if events:
            break
        assert time.monotonic() < deadline, "no auth.failed event"
        time.sleep(0.05)
    assert [tuple(e[:2]) for e in events] == [("test", "127.0.0.1")]
    assert "address not on allowed_peers" in events[0][2]
    store.close()


@pytest.mark.parametrize("value, error", [
    (["10.0.0.300"], "listeners[0].allowed_peers: expected IP addresses or networks"),
    ([], "listeners[0].allowed_peers: expected a list of strings"),
    (0, "listeners[0].allowed_peers: expected a list of strings"),
])
def test_a_bad_allow_list_names_the_key(value, error):
    from interface_engine.config import ConfigError, parse

    with pytest.raises(ConfigError) as raised:
        parse({"listeners": [{"name": "x", "allowed_peers": value}]}, "engine.toml")
    assert error in str(raised.value)
