"""Flood benchmark: a well-behaved sender's ACK latency while others hold and abuse connections.

The engine (SQLite store, one listener capped at `--cap` connections, a 2 s
frame deadline) is measured twice with the same well-behaved sender (one
connection, one message at a time, `--duration` seconds):

1. quiet: nothing else connected;
2. flood: `--idle` connections opened and left idle, `--slow` connections that
   start a frame and trickle one byte every 100 ms (closed by the engine at the
   frame deadline, then opened again), and a loop opening connections over the
   cap (refused on accept) as fast as it can.

It reports the good sender's msg/s and ACK p50/p99/max for both, how many
slow connections the engine closed, and how many over-cap connections it
refused. Target: ACK p99 under 200 ms during the flood.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from ingest import (FRAME_TEMPLATE, HOST, code_version, free_port, machine_info, own_files,
                    percentile, subprocess_target, toml_string)

SLOW_FRAME_START = b"\x0bMSH|^~\\&|"


def engine_config(workdir: Path, port: int, cap: int) -> Path:
    (workdir / "no-channels").mkdir()
    config = workdir / "engine.toml"
    config.write_text(
        '[engine]\nlog_level = "warn"\n'
        + own_files(workdir) +
        f"[admin]\nport = 0\n[store]\nurl = {toml_string('sqlite:///' + str(workdir / 'store.db'))}\n"
        f"[channels]\ndirectory = {toml_string(str(workdir / 'no-channels'))}\n"
        f'[[listeners]]\nname = "flood"\nhost = "{HOST}"\nport = {port}\n'
        f'max_connections = {cap}\nmax_connections_per_peer = {cap}\nframe_timeout = "2s"\nidle_timeout = "10m"\n')
    return config


def good_sender(port: int, seconds: float, tag: str) -> dict:
    frame = FRAME_TEMPLATE.replace("{ts}", time.strftime("%Y%m%d%H%M%S"))
    latencies, failures = [], 0
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        end, n, buffer = time.monotonic() + seconds, 0, b""
        while time.monotonic() < end:
            started = time.perf_counter()
            s.sendall(frame.format(cid=f"{tag}-{n:07d}").encode())
            while b"\x1c\r" not in buffer:
                chunk = s.recv(65536)
                if not chunk:
                    raise RuntimeError("the engine closed the good sender's connection")
                buffer += chunk
            answer, _, buffer = buffer.partition(b"\x1c\r")
            latencies.append(time.perf_counter() - started)
            failures += b"MSA|AA|" not in answer and b"MSA|CA|" not in answer
            n += 1
    latencies.sort()
    return {"messages": n, "msg_per_s": n / seconds, "failures": failures,
            "p50_ms": percentile(latencies, 0.5) * 1e3, "p99_ms": percentile(latencies, 0.99) * 1e3,
            "max_ms": latencies[-1] * 1e3}


class Flood:
    """The abusive side, on threads of its own: idle holders, slow tricklers, over-cap knockers."""

    def __init__(self, port: int, idle: int, slow: int):
        self.port, self.idle_count, self.slow_count = port, idle, slow
        self.stop = threading.Event()
        self.held: list[socket.socket] = []
        self.slow_closed = 0
        self.refused = 0
        self.let_in = 0
        self.threads = [threading.Thread(target=self._slow, daemon=True),
                        threading.Thread(target=self._knock, daemon=True)]

    def _connect(self, source: str) -> socket.socket:
        s = socket.socket()
        s.bind((source, 0))
        s.connect((HOST, self.port))
        return s

    def start(self):
        self.held = [self._connect(f"127.0.1.{1 + i // 200}") for i in range(self.idle_count)]
        for t in self.threads:
            t.start()

    def _slow(self):
        conns = [None] * self.slow_count
        while not self.stop.is_set():
            for i, s in enumerate(conns):
                if s is None:
                    s = conns[i] = self._connect(f"127.0.2.{1 + i % 250}")
                    s.sendall(SLOW_FRAME_START)
                try:
                    s.send(b"A")
                except OSError:  # closed at the frame deadline: count it and come back
                    self.slow_closed += 1
                    s.close()
                    conns[i] = None
            time.sleep(0.1)
        for s in conns:
            if s is not None:
                s.close()

    def _knock(self):
        while not self.stop.is_set():
            try:
                s = self._connect("127.0.3.1")
            except OSError:
                continue
            s.settimeout(1)
            try:
                if s.recv(1) == b"":
                    self.refused += 1
            except ConnectionResetError:
                self.refused += 1
            except OSError:
                self.let_in += 1  # a slow sender's slot was free for a moment
            finally:
                s.close()

    def end(self):
        self.stop.set()
        for t in self.threads:
            t.join(5)
        for s in self.held:
            s.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=int, default=1000, help="idle connections (default 1000)")
    parser.add_argument("--slow", type=int, default=50, help="slow senders (default 50)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase (default 10)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * (args.idle + args.slow))), hard))
    cap = args.idle + args.slow + 1
    results = {"code": code_version(), "machine": machine_info(), "cap": cap, "idle": args.idle,
               "slow": args.slow}
    with tempfile.TemporaryDirectory(prefix="flood-") as tmp:
        workdir, port = Path(tmp), free_port()
        argv = [sys.executable, "-m", "interface_engine", "run", "--config", str(engine_config(workdir, port, cap))]
        with subprocess_target("engine-flood", argv, port, workdir):
            good_sender(port, 2.0, "W")  # warm-up
            results["quiet"] = good_sender(port, args.duration, "Q")
            flood = Flood(port, args.idle, args.slow)
            flood.start()
            try:
                results["flood"] = good_sender(port, args.duration, "F")
            finally:
                flood.end()
            results["slow_closed"], results["over_cap_refused"] = flood.slow_closed, flood.refused
            results["over_cap_let_in"] = flood.let_in
    for phase in ("quiet", "flood"):
        r = results[phase]
        print(f"{phase:6} {r['messages']:6d} msgs  {r['msg_per_s']:7.0f} msg/s  p50 {r['p50_ms']:6.2f} ms  "
              f"p99 {r['p99_ms']:6.2f} ms  max {r['max_ms']:7.2f} ms  failures {r['failures']}")
    print(f"slow connections closed at the frame deadline: {results['slow_closed']}; "
          f"over-cap connections refused: {results['over_cap_refused']} "
          f"(let in while a slow sender's slot was free: {results['over_cap_let_in']})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if results["flood"]["failures"] == 0 and results["quiet"]["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
