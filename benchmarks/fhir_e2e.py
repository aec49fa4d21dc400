"""End-to-end FHIR benchmark: MLLP in, through the sample channel `adt-lab-to-fhir`, to a FHIR server's 2xx.

The engine runs as a subprocess on a fresh SQLite store with the sample
channel `channels/adt-lab-to-fhir.toml` as shipped, except for its port and
the server's base URL. C connections send N synthetic ADT^A01 (the ingest
benchmark's message, each with its own MSH-10 and patient identifier) as fast
as the engine ACKs them (ACK on store); the run ends when the store says every
delivery is `sent`, i.e. the server answered 2xx to every transaction Bundle.

Two servers, each with its own engine and store:

- `sink`: `fhir_sink.py`, which answers every POST at once without reading
  it: the engine's own ceiling;
- `server`: the real FHIR R4 test server from the shared tools folder, which
  validates and stores every resource (skipped, with the reason, where the
  folder is absent).

For each: delivered msg/s (messages / (all sent - first send)); ingest ACK
latency; the network share per message from the store's attempt records
(`duration_ms`: the HTTP exchange, the server's work included); and the
template share per message, measured in this process on the same messages
(parse + render + post-process, as the engine's processor thread does them).
The FHIR destination delivers one Bundle at a time, in order, so each
message costs its template (on the processor thread) and its exchange (on the
destination's queue); the two overlap between messages, and the slower of the
two bounds the rate. The shares say which to make faster first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from datetime import datetime
from pathlib import Path

from ingest import (FRAME_TEMPLATE, HOST, REPO, TargetFailed, TargetSkipped, code_version, fmt,
                    free_port, host_cpu_ticks, machine_info, own_files, process_cpu_seconds,
                    run_phase, subprocess_target, text_table, toml_string)
from e2e import toml_text

sys.path.insert(0, str(REPO))
from interface_engine import hl7  # noqa: E402
from interface_engine.channels.pipeline import fhir_bundle  # noqa: E402
from interface_engine.channels.templating import Mappings  # noqa: E402

HERE = Path(__file__).resolve().parent
SAMPLE_CHANNEL = REPO / "channels" / "adt-lab-to-fhir.toml"
SHARED_SERVER = REPO.parent / "shared" / "tools" / "fhir-test-server" / "start.sh"
TARGETS = ("sink", "server")
POLL = 0.05
STALL_TIMEOUT = 60.0
READY = re.compile(r"ready at (http://\S+)")


@contextlib.contextmanager
def fhir_target(name: str, workdir: Path):
    """Start the sink or the shared server; yields (pid, base URL)."""
    if name == "sink":
        argv = [sys.executable, str(HERE / "fhir_sink.py")]
    else:
        if not SHARED_SERVER.exists():
            raise TargetSkipped("the shared FHIR test server is not beside this checkout")
        argv = ["bash", str(SHARED_SERVER), "0"]
    log = open(workdir / f"fhir-{name}.log", "w+")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 300
        base = None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise TargetFailed(f"FHIR {name} exited before it was ready (see {log.name})")
            if m := READY.search(line):
                base = m.group(1).rstrip("/")
                break
        if base is None:
            raise TargetFailed(f"FHIR {name} was not ready within 300 s")
        print(f"  FHIR {name} ready at {base} (pid {proc.pid})")
        yield proc.pid, base
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(15)
        if proc.poll() is None:
            proc.kill()
        log.close()


@contextlib.contextmanager
def fhir_engine(workdir: Path, base: str):
    """The engine with the sample channel, pointed at `base`; yields (pid, port, store file)."""
    port = free_port()
    channels = workdir / "channels"
    channels.mkdir()
    data = tomllib.loads(SAMPLE_CHANNEL.read_text())
    data["source"]["port"] = port
    data["destinations"][0]["url"] = base
    (channels / SAMPLE_CHANNEL.name).write_text(toml_text(data) + "\n")
    store = workdir / "store.db"
    config = workdir / "engine.toml"
    config.write_text(
        '[engine]\nlog_level = "warn"\n'
        + own_files(workdir) +
        f"[admin]\nport = 0\n[store]\nurl = {toml_string(f'sqlite:///{store}')}\n"
        f"[channels]\ndirectory = {toml_string(str(channels))}\n"
        f"mappings = {toml_string(str(REPO / 'mappings'))}\n")
    argv = [sys.executable, "-m", "interface_engine", "run", "--config", str(config)]
    with subprocess_target("engine-fhir", argv, port, workdir) as pid:
        yield pid, port, store


def sent_count(store: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5)) as db:
        return db.execute("SELECT count(*) FROM deliveries WHERE state = 'sent'").fetchone()[0]


def attempt_durations(store: Path) -> list[float]:
    with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5)) as db:
        return sorted(row[0] for row in db.execute("SELECT duration_ms FROM attempts WHERE outcome = 'sent'"))


async def wait_delivered(store: Path, expected: int) -> float:
    """Wall-clock time at which every delivery was sent; raises if progress stalls."""
    last, last_change = -1, time.monotonic()
    while True:
        count = await asyncio.to_thread(sent_count, store)
        if count >= expected:
            return time.time()
        if count != last:
            last, last_change = count, time.monotonic()
        elif time.monotonic() - last_change > STALL_TIMEOUT:
            raise TargetFailed(f"deliveries stalled at {count} of {expected} sent")
        await asyncio.sleep(POLL)


def template_ms(template: str, zone: str, channel: dict, count: int) -> list[float]:
    """Per-message cost of what the processor thread does for a fhir destination, in ms."""
    mappings = Mappings(str(REPO / "mappings"))
    variables = {"channel": {"name": channel["name"], "timezone": zone},
                 "destination": {"name": "fhir", "type": "fhir"}}
    frame = FRAME_TEMPLATE.replace("{ts}", datetime.now().strftime("%Y%m%d%H%M%S"))
    times = []
    for n in range(count):
        raw = frame.format(cid=f"T-{n:06d}").strip("\x0b\x1c\r").encode() + b"\r"
        started = time.perf_counter()
        msg = hl7.parse(raw)
        fhir_bundle(mappings.render(template, msg, kind="json", timezone=zone, variables=variables), msg, zone)
        times.append((time.perf_counter() - started) * 1000)
    return sorted(times[count // 10:])  # the first tenth warms caches


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


async def run_target(name: str, args, workdir: Path) -> dict:
    channel = tomllib.loads(SAMPLE_CHANNEL.read_text())
    template = channel["destinations"][0]["template"]
    with fhir_target(name, workdir) as (server_pid, base), fhir_engine(workdir, base) as (pid, port, store):
        warm = await run_phase(port, pid, id_prefix=f"F{name[0]}w", connections=args.connections,
                               count=max(1, args.warmup // args.connections))
        await wait_delivered(store, warm["acked_ok"])
        engine_cpu, server_cpu = process_cpu_seconds(pid), process_cpu_seconds(server_pid)
        host = host_cpu_ticks()
        began = time.time()
        ingest = await run_phase(port, pid, id_prefix=f"F{name[0]}c", connections=args.connections,
                                 count=args.messages // args.connections)
        done = await wait_delivered(store, warm["acked_ok"] + ingest["acked_ok"])
        wall = done - began
        engine_cpu = process_cpu_seconds(pid) - engine_cpu
        server_cpu = process_cpu_seconds(server_pid) - server_cpu
        host_end = host_cpu_ticks()
        network = attempt_durations(store)[warm["acked_ok"]:] or attempt_durations(store)
    templates = template_ms(template, channel.get("timezone", "UTC"), channel, args.template_samples)
    t_ms, n_ms = median(templates), median(network)
    return {
        "target": name, "messages": ingest["acked_ok"], "connections": args.connections,
        "delivered_msg_per_s": ingest["acked_ok"] / wall if wall > 0 else None,
        "ingest_msg_per_s": ingest["msg_per_s"], "ack_p99_ms": ingest["p99_ms"],
        "template_ms_p50": t_ms, "template_ms_p90": templates[int(len(templates) * 0.9)] if templates else None,
        "network_ms_p50": n_ms, "network_ms_p90": network[int(len(network) * 0.9)] if network else None,
        "template_share": t_ms / (t_ms + n_ms) if t_ms and n_ms else None,
        "engine_cpu_pct": 100 * engine_cpu / wall if engine_cpu is not None and wall > 0 else None,
        "server_cpu_pct": 100 * server_cpu / wall if server_cpu is not None and wall > 0 else None,
        "host_cpu_pct": (100 * (host_end[0] - host[0]) / (host_end[1] - host[1])
                         if host and host_end and host_end[1] > host[1] else None),
        "failures": ingest["failures"],
    }


def render(results: list[dict]) -> str:
    rows = [("target", "messages", "delivered msg/s", "ACK p99 ms", "template ms p50/p90",
             "exchange ms p50/p90", "template share", "engine CPU", "server CPU", "host CPU")]
    for r in results:
        rows.append((
            r["target"], str(r["messages"]), fmt(r["delivered_msg_per_s"], ",.0f"), fmt(r["ack_p99_ms"], ".2f"),
            f"{fmt(r['template_ms_p50'], '.2f')}/{fmt(r['template_ms_p90'], '.2f')}",
            f"{fmt(r['network_ms_p50'], '.2f')}/{fmt(r['network_ms_p90'], '.2f')}",
            fmt(r["template_share"] and 100 * r["template_share"], ".0f") + "%",
            fmt(r["engine_cpu_pct"], ".0f") + "%", fmt(r["server_cpu_pct"], ".0f") + "%",
            fmt(r["host_cpu_pct"], ".0f") + "%"))
    return text_table(rows, left=1)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(TARGETS), help="sink, server, or both (default)")
    parser.add_argument("--connections", "-C", type=int, default=4, help="MLLP connections (default 4)")
    parser.add_argument("--messages", "-N", type=int, default=2000, help="ADT^A01 messages per target (default 2000)")
    parser.add_argument("--warmup", type=int, default=200, help="messages sent and delivered first (default 200)")
    parser.add_argument("--template-samples", type=int, default=500,
                        help="messages mapped in this process for the template figures (default 500)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"code {code_version()}; machine {json.dumps(machine_info())}")
    results, failed = [], False
    for name in args.targets.split(","):
        print(f"{name}:")
        with tempfile.TemporaryDirectory(prefix=f"fhir-e2e-{name}-") as tmp:
            try:
                results.append(asyncio.run(run_target(name, args, Path(tmp))))
            except TargetSkipped as e:
                print(f"  skipped: {e}")
            except TargetFailed as e:
                print(f"  FAILED: {e}")
                failed = True
    if results:
        print(render(results))
    if args.json:
        args.json.write_text(json.dumps({"code": code_version(), "machine": machine_info(),
                                         "results": results}, indent=2))
    return 1 if failed or any(r["failures"] for r in results) else 0


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
