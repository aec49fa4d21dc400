"""A flood of idle and slow connections: the cap holds, slow senders go, a good sender is still served.

The latency figure (ACK p99 under the flood) is measured by benchmarks/flood.py;
here the behaviours are checked.
"""

from __future__ import annotations

import resource
import socket
import time

from interface_engine import hl7
from interface_engine.mllp import MLLPClient
from tests.messages import adt_a01

IDLE = 1000
SLOW = 20


def connect(port: int, source: str) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def closed(s: socket.socket, timeout: float) -> bool:
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_idle_and_slow_connections_do_not_starve_a_good_sender(engine_factory):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))  # the engine inherits it
    cap = IDLE + SLOW + 1
    engine = engine_factory(listener={"max_connections": cap, "max_connections_per_peer": 100,
                                      "frame_timeout": "1s", "idle_timeout": "10m"})
    good = MLLPClient("127.0.0.1", engine.port, timeout=10).__enter__()
    held = []
    try:
        # Idle ones from many loopback addresses (100 a peer), slow ones start frames and trickle.
        held += [connect(engine.port, f"127.0.1.{1 + i // 100}") for i in range(IDLE)]
        slow = [connect(engine.port, f"127.0.2.{1 + i}") for i in range(SLOW)]
        held += slow
        over = [connect(engine.port, f"127.0.3.{1 + i}") for i in range(5)]
        held += over
        assert all(closed(s, 5) for s in over), "connections over the cap were not refused"
        # Frames start only now: started earlier, their 1 s deadline could free slots under the cap
        # before a loaded engine had accepted the connections over it.
        for s in slow:
            s.sendall(b"\x0bMSH|^~\\&|")

        answers = []
        trickle_until = time.monotonic() + 2.5
        i = 0
        while time.monotonic() < trickle_until:
            for s in slow:
                try:
                    s.send(b"A")
                except OSError:
                    pass  # already closed by the engine, as it should be
            answers.append(hl7.parse(good.send(adt_a01(f"GOOD{i}")))["MSA-1"])
            i += 1
        assert set(answers) == {"AA"} and len(answers) >= 10
        assert all(closed(s, 5) for s in slow), "slow senders outlived the frame deadline"
        assert not any(closed(s, 0.01) for s in held[:IDLE:50]), "idle connections were dropped early"
    finally:
        good.close()
        for s in held:
            s.close()
    log = engine.log()
    assert "a frame did not end within 1.0s" in log
    assert f"is at its cap of {cap}" in log
