"""End-to-end benchmark: MLLP in, through the sample ADT channel, out to a file archive and a downstream system.

The engine runs as a subprocess on a fresh SQLite store with one channel
shaped like the sample `channels/adt.toml`: messages are received, stored,
filtered, transformed (`mappings/hl7/adt-forward.hl7.j2`) and delivered to
an archive folder (`file` destination: one file per message, written
atomically and fsynced) and to a downstream MLLP system (`mllp`
destination: one message in flight, each waiting for its ACK).  The
downstream system is `receiver.py`, a separate lean asyncio process that
ACKs every frame and records when each control id arrived.

Each channel variant (file only, MLLP only, both as in the sample) gets
its own engine and store and is loaded by the ingest benchmark's sender
(C connections, each waiting for its ACK before the next message):

- closed loop: every connection sends N messages as fast as ACKs allow;
  the shape ends when the receiver has every message and every archive
  file exists; delivered msg/s = messages / (last delivery - first send);
- paced: a fixed offered rate, for delivery latency (send -> arrival at
  the receiver) and ingest ACK latency while deliveries run;
- sustained: a paced run at a higher rate, to see whether the delivery
  backlog stays bounded.

Every shape is checked: each message delivered at least once, duplicates
counted, and the arrival order checked per connection against the send
order and, overall, against the store's order (a destination's queue is
FIFO).  CPU is measured for the engine, the receiver, this harness and
the whole machine.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import tomllib
from datetime import datetime, timezone
from pathlib import Path

from ingest import (FRAME_BYTES, FRAME_TEMPLATE, HOST, REPO, Sender, TargetFailed, children_of, code_version,
                    fmt, free_port, host_cpu_ticks, log_tail, machine_info, own_files, percentile,
                    process_cpu_seconds, stat_cpu_seconds, subprocess_target, text_table, toml_string)

HERE = Path(__file__).resolve().parent
SAMPLE_CHANNEL = REPO / "channels" / "adt.toml"
SAMPLE_MAPPINGS = REPO / "mappings"
LISTENER = "bench"
#: Which of the sample's destinations each variant keeps, by destination type.
VARIANTS = {"file": ("file",), "mllp": ("mllp",), "both": ("file", "mllp")}
POLL = 0.05             # seconds between checks for the last deliveries
STALL_TIMEOUT = 60.0    # no delivery progress for this long ends a shape as failed
BACKLOG_STEP = 0.25     # seconds between points of the backlog curve
SAMPLE_FACILITY = "|BENCHSEND|BENCHFAC|"


# --------------------------------------------------------------------------
# Load: the ingest benchmark's sender, remembering when each message went out


class TimedSender(Sender):
    """Sender that keeps each message's send time and which messages were ACKed AA/CA."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.send_times: list[float] = []     # index: sequence number
        self.acked: list[int] = []            # sequence numbers positively acknowledged
        self.ack_times: list[float] = []

    def _send(self) -> None:
        super()._send()
        if self.in_flight is not None and len(self.send_times) == self.seq:
            self.send_times.append(self.sent_at)

    def _on_ack(self, frame: bytes, now: float) -> None:
        seq, ok = self.seq, self.ok
        super()._on_ack(frame, now)
        if self.ok > ok:
            self.acked.append(seq)
            self.ack_times.append(now)


class ReceiverControl:
    """The harness's line of commands to receiver.py."""

    def __init__(self, port: int):
        self.port = port
        self.reader = self.writer = None

    async def open(self) -> ReceiverControl:
        self.reader, self.writer = await asyncio.open_connection(HOST, self.port, limit=1 << 28)
        return self

    async def ask(self, command: str):
        self.writer.write(command.encode() + b"\n")
        return json.loads(await self.reader.readline())

    def close(self):
        self.writer.close()


# --------------------------------------------------------------------------
# The channel, the engine and the receiver


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {type(value).__name__}")


def toml_text(data: dict, path: tuple[str, ...] = ()) -> str:
    """Enough of a TOML writer for a channel file: scalars, arrays, tables, arrays of tables."""
    def is_tables(value):
        return isinstance(value, list) and value and all(isinstance(v, dict) for v in value)

    lines = [f"{key} = {toml_value(value)}" for key, value in data.items()
             if not isinstance(value, dict) and not is_tables(value)]
    for key, value in data.items():
        name = ".".join((*path, key))
        if isinstance(value, dict):
            lines += ["", f"[{name}]", toml_text(value, (*path, key))]
        elif is_tables(value):
            for item in value:
                lines += ["", f"[[{name}]]", toml_text(item, (*path, key))]
    return "\n".join(lines).strip("\n")


def channel_for(variant: str, archive: Path, receiver_port: int) -> tuple[dict, list[str]]:
    """The sample ADT channel with the variant's destinations, pointed at the benchmark's folder and receiver."""
    data = tomllib.loads(SAMPLE_CHANNEL.read_text())
    data["source"]["listener"] = LISTENER
    destinations = []
    for destination in data["destinations"]:
        if destination["type"] not in VARIANTS[variant]:
            continue
        destination = dict(destination)
        if destination["type"] == "file":
            # Keep the sample's file naming (by sending facility, then control id) under a temp folder.
            path = destination["path"]
            destination["path"] = f"{archive.as_posix()}/{path[path.index('{'):]}"
        else:
            destination["host"], destination["port"] = HOST, receiver_port
        destinations.append(destination)
    found = {d["type"] for d in destinations}
    if found != set(VARIANTS[variant]):
        raise TargetFailed(f"{SAMPLE_CHANNEL.relative_to(REPO)} has no "
                           f"{' or '.join(sorted(set(VARIANTS[variant]) - found))} destination")
    data["destinations"] = destinations
    return data, [d["template"] for d in destinations if d.get("template")]


@contextlib.contextmanager
def channel_engine(variant: str, workdir: Path, receiver_port: int, store_writer: str | None = None):
    """Run the engine with the variant's channel; yields (pid, port, store file, archive folder)."""
    port = free_port()
    channels, mappings, archive = workdir / "channels", workdir / "mappings", workdir / "archive"
    channels.mkdir()
    data, templates = channel_for(variant, archive, receiver_port)
    (channels / "adt.toml").write_text(toml_text(data) + "\n")
    for template in templates:
        (mappings / template).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SAMPLE_MAPPINGS / template, mappings / template)
    store = workdir / "store.db"
    config = workdir / "engine.toml"
    config.write_text(
        "[engine]\n"
        'log_level = "warn"\n'
        + own_files(workdir) +
        "[admin]\nport = 0\n[store]\n"
        f"url = {toml_string(f'sqlite:///{store}')}\n"
        + (f"writer = {toml_string(store_writer)}\n" if store_writer else "") +
        "[channels]\n"
        f"directory = {toml_string(str(channels))}\n"
        f"mappings = {toml_string(str(mappings))}\n"
        "[[listeners]]\n"
        f"name = {toml_string(LISTENER)}\n"
        f"host = {toml_string(HOST)}\n"
        f"port = {port}\n"
        'ack_mode = "stored"\n'
        # Room for the next shape's connections while the last shape's are still closing.
        "max_connections_per_peer = 1000\n"
    )
    argv = [sys.executable, "-m", "interface_engine", "run", "--config", str(config)]
    with subprocess_target(f"engine-{variant}", argv, port, workdir) as pid:
        yield pid, port, store, archive


@contextlib.contextmanager
def receiver(workdir: Path):
    """Start receiver.py; yields (pid, MLLP port, control port)."""
    port, control_port = free_port(), free_port()
    argv = [sys.executable, str(HERE / "receiver.py"), "--port", str(port), "--control-port", str(control_port)]
    with subprocess_target("receiver", argv, port, workdir) as pid:
        yield pid, port, control_port


@contextlib.contextmanager
def profiler(pid: int, output: Path | None, mode: str = "gil", rate: int = 500):
    """py-spy on the engine for the duration of the block, `rate` Hz, raw stacks with thread names,
    sampled without stopping the engine (--nonblocking: stopping it at each sample halved its speed).

    mode "gil": only the thread holding the GIL (where CPU goes in Python); "idle": every
    thread, waiting or not (where each thread's wall time goes, e.g. in fsync).
    """
    if output is None:
        yield None
        return
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    output.parent.mkdir(parents=True, exist_ok=True)
    log = open(output.with_suffix(".log"), "wb")
    proc = subprocess.Popen([py_spy, "record", "--pid", str(pid), f"--{mode}", "-r", str(rate), "--nonblocking",
                             "-f", "raw", "--threads",
                             "-o", str(output)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    time.sleep(1.0)  # attaching takes a moment
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def memory_mb(pid: int) -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


# --------------------------------------------------------------------------
# One shape


class Variant:
    """A running engine with one channel variant, the receiver, and what the shapes need of both."""

    def __init__(self, name: str, engine_pid: int, port: int, store: Path, archive: Path,
                 receiver_pid: int, control: ReceiverControl, run_tag: str, args):
        self.name, self.engine_pid, self.port, self.store, self.archive = name, engine_pid, port, store, archive
        self.log = store.parent / f"engine-{name}.log"
        self.receiver_pid, self.control, self.run_tag, self.args = receiver_pid, control, run_tag, args
        self.to_receiver = "mllp" in VARIANTS[name]
        self.to_files = "file" in VARIANTS[name]
        self.profiler_pid: int | None = None


async def run_shape(v: Variant, shape: str, letter: str, *, per_conn: int, rate: float | None) -> dict:
    """Send, wait until everything is delivered, and analyse what arrived where and when."""
    loop = asyncio.get_running_loop()
    prefix = f"E{v.run_tag}{v.name[0]}{letter}"
    facility = f"BF{v.run_tag}{v.name[0]}{letter}"   # the sample archives by facility: one folder a shape
    folder = v.archive / facility
    assert SAMPLE_FACILITY in FRAME_TEMPLATE
    template = (FRAME_TEMPLATE.replace(SAMPLE_FACILITY, f"|BENCHSEND|{facility}|")
                .replace("{ts}", datetime.now().strftime("%Y%m%d%H%M%S")))
    connections = v.args.connections
    interval = connections / rate if rate else None
    if v.to_receiver:
        await v.control.ask("reset")
    senders = [TimedSender(loop, template, f"{prefix}-{i:02d}-", per_conn, interval) for i in range(connections)]
    await asyncio.gather(*(loop.create_connection(lambda s=s: s, HOST, v.port) for s in senders))

    cpu = Cpu(v)
    started = loop.time()
    for i, sender in enumerate(senders):
        sender.start(started + (i / rate if rate else 0.0), None)
    stages = StageSampler(v.store, started)
    sampling = asyncio.create_task(stages.run())
    pending = {sender.done for sender in senders}
    while pending:
        _, pending = await asyncio.wait(pending, timeout=0.5)
        now = loop.time()
        for sender in senders:
            sender.check_timeout(now)
    expected = sum(sender.ok for sender in senders)
    # Each connection's last message is stored after all its others, so with FIFO queues its file
    # existing means the others' do too: a cheap test before counting the folder.
    last_files = [folder / f"{s.id_prefix}{s.acked[-1]}.hl7" for s in senders if s.acked]
    stalled, progress, progress_at, listed, listed_at = False, None, loop.time(), 0, float("-inf")
    while True:
        now = loop.time()
        at_receiver = (await v.control.ask("stats"))["unique"] if v.to_receiver else expected
        if v.to_files and now - listed_at >= (0.1 if all(p.exists() for p in last_files) else 1.0):
            listed, listed_at = count_files(folder), now
        if at_receiver >= expected and (listed >= expected or not v.to_files):
            break
        if (at_receiver, listed) != progress:
            progress, progress_at = (at_receiver, listed), now
        elif now - progress_at > STALL_TIMEOUT:
            stalled = True
            break
        await asyncio.sleep(POLL)
    finished = loop.time()
    usage = cpu.stop(finished - started)
    sampling.cancel()
    for sender in senders:
        sender.transport.close()

    arrivals = (await v.control.ask("dump")) if v.to_receiver else None
    files = file_times(folder) if v.to_files else None
    store_ids = read_store_ids(v.store, prefix)
    result = analyse(senders, arrivals, files, store_ids, started=started, finished=finished)
    result.update(usage)
    result.update({"variant": v.name, "shape": shape, "connections": connections, "offered_rate": rate,
                   "stalled": stalled, "engine_rss_mb": memory_mb(v.engine_pid),
                   "store_states": read_store_states(v.store, prefix)})
    result.update(stages.summary(result["send_seconds"] + (result["first_send"] - started)))
    delivered = result["delivered"]
    result["engine_cpu_ms_per_msg"] = (usage["engine_cpu_s"] * 1e3 / delivered
                                       if delivered and usage["engine_cpu_s"] is not None else None)
    result["receiver_us_per_frame"] = (usage["receiver_cpu_s"] * 1e6 / result["receiver_frames"]
                                       if result.get("receiver_frames") and usage["receiver_cpu_s"] else None)
    return result


class Cpu:
    """CPU used by the engine, the receiver, this harness (and a profiler), and the machine, over a shape."""

    def __init__(self, v: Variant):
        self.pids = {"engine": v.engine_pid, "receiver": v.receiver_pid, "profiler": v.profiler_pid}
        self.start = {name: process_cpu_seconds(pid) if pid else None for name, pid in self.pids.items()}
        self.parts = engine_parts(v.engine_pid)
        self.own = time.process_time()
        self.host = host_cpu_ticks()
        self.fields = cpu_fields()

    def stop(self, seconds: float) -> dict:
        result = {}
        for name, pid in self.pids.items():
            end = process_cpu_seconds(pid) if pid else None
            used = end - self.start[name] if end is not None and self.start[name] is not None else None
            result[f"{name}_cpu_s"] = round(used, 3) if used is not None else None
            result[f"{name}_cpu_pct"] = 100 * used / seconds if used is not None and seconds > 0 else None
        parts = engine_parts(self.pids["engine"])
        result["engine_parts_cpu_pct"] = {
            name: round(100 * (used - self.parts.get(name, 0.0)) / seconds, 1)
            for name, used in parts.items()} if seconds > 0 else {}
        own = time.process_time() - self.own
        result["generator_cpu_s"] = round(own, 3)
        result["generator_cpu_pct"] = 100 * own / seconds if seconds > 0 else None
        host = host_cpu_ticks()
        result["host_cpu_pct"] = (100 * (host[0] - self.host[0]) / (host[1] - self.host[1])
                                  if host and self.host and host[1] > self.host[1] else None)
        fields = cpu_fields()
        if fields and self.fields and sum(fields) > sum(self.fields):
            spent = [b - a for a, b in zip(self.fields, fields)]
            result["host_cpu_breakdown_pct"] = {k: round(100 * v / sum(spent), 1) for k, v in zip(CPU_FIELDS, spent)}
        parts = [result[k] for k in ("engine_cpu_pct", "receiver_cpu_pct", "generator_cpu_pct", "profiler_cpu_pct")]
        if result["host_cpu_pct"] is not None and None not in parts[:3]:
            result["outside_cpu_pct"] = max(0.0, result["host_cpu_pct"] - sum(p or 0 for p in parts)
                                            / (os.cpu_count() or 1))
        else:
            result["outside_cpu_pct"] = None
        return result


def engine_parts(pid: int) -> dict[str, float]:
    """CPU seconds of the engine's reactor thread, its other threads, and its children by role,
    to tell which of them a shape is waiting for."""
    parts = {"reactor thread": stat_cpu_seconds(Path(f"/proc/{pid}/task/{pid}/stat")) or 0.0}
    parts["other threads"] = (process_cpu_seconds(pid, children=False) or 0.0) - parts["reactor thread"]
    for child in children_of(pid):
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        role = ("writer" if b"store.writer" in command else
                "processor" if b"channels.processor" in command else "other children")
        parts[role] = parts.get(role, 0.0) + (process_cpu_seconds(child) or 0.0)
    return parts


CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def cpu_fields() -> list[int] | None:
    """The machine's jiffies by kind (user, system, iowait, steal, ...), to tell what the busy share was."""
    try:
        return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None


def count_files(folder: Path) -> int:
    try:
        return sum(1 for name in os.listdir(folder) if name.endswith(".hl7") and not name.startswith("."))
    except FileNotFoundError:
        return 0


def file_times(folder: Path) -> dict[str, float]:
    """Control id -> when its archive file got its name, on the monotonic clock.

    The file destination links the fsynced temp file to its name and then
    unlinks the temp name, which sets the inode's change time: that is the
    moment the file appeared whole (to the filesystem timestamp's granularity).
    """
    offset = time.time_ns() - time.monotonic_ns()
    times = {}
    with contextlib.suppress(FileNotFoundError), os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.endswith(".hl7") and not entry.name.startswith("."):
                times[entry.name[:-4]] = (entry.stat().st_ctime_ns - offset) / 1e9
    return times


class StageSampler:
    """Once a second, how many messages wait for their channel (`received`) and for delivery (`queued`).

    Read from the store (read-only, off the event loop, through the state index), so
    a backlog can be placed: in the channel processor, or in the destination queues.
    """

    QUERY = "SELECT state, count(*) FROM messages WHERE state IN ('received', 'queued') GROUP BY state"

    def __init__(self, store: Path, started: float):
        self.store, self.started = store, started
        self.curve: list[tuple[float, int, int]] = []

    def _sample(self) -> dict:
        with contextlib.closing(sqlite3.connect(f"file:{self.store}?mode=ro", uri=True, timeout=5)) as db:
            return dict(db.execute(self.QUERY).fetchall())

    async def run(self):
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            with contextlib.suppress(sqlite3.Error):
                counts = await asyncio.to_thread(self._sample)
                self.curve.append((round(loop.time() - self.started, 2), counts.get("received", 0),
                                   counts.get("queued", 0)))

    def summary(self, sends_end: float) -> dict:
        before = [point for point in self.curve if point[0] <= sends_end]
        last = before[-1] if before else (0.0, None, None)
        return {"stage_curve": self.curve,
                "waiting_for_channel_at_sends_end": last[1], "waiting_for_delivery_at_sends_end": last[2],
                "waiting_for_channel_max": max((p[1] for p in self.curve), default=None),
                "waiting_for_delivery_max": max((p[2] for p in self.curve), default=None)}


def _read_store(store: Path, query: str, prefix: str) -> list:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=10)) as db:
            return db.execute(query, (prefix + "*",)).fetchall()
    except sqlite3.Error:
        return []


def read_store_ids(store: Path, prefix: str) -> dict[str, int]:
    return dict(_read_store(store, "SELECT control_id, id FROM messages WHERE control_id GLOB ?", prefix))


def read_store_states(store: Path, prefix: str) -> dict[str, int]:
    return dict(_read_store(store, "SELECT state, count(*) FROM messages WHERE control_id GLOB ? GROUP BY state",
                            prefix))


# --------------------------------------------------------------------------
# Analysis


def split_id(control_id: str) -> tuple[str, int]:
    """(connection prefix, sequence number) of a control id made by TimedSender."""
    head, _, seq = control_id.rpartition("-")
    return head, int(seq)


def order_violations(sequence: list[str], store_ids: dict[str, int]) -> tuple[int, int | None]:
    """In an arrival order: messages arriving after a later one of their connection, and after one stored later."""
    newest: dict[str, int] = {}
    per_connection = 0
    for control_id in sequence:
        conn, seq = split_id(control_id)
        if seq < newest.get(conn, -1):
            per_connection += 1
        newest[conn] = max(seq, newest.get(conn, -1))
    if not store_ids:
        return per_connection, None
    ids = [store_ids.get(c) for c in sequence]
    ids = [i for i in ids if i is not None]
    return per_connection, sum(1 for a, b in zip(ids, ids[1:]) if b < a)


def latency_summary(latencies: list[float]) -> dict:
    latencies = sorted(latencies)
    if not latencies:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    return {"p50_ms": percentile(latencies, 0.50) * 1e3, "p99_ms": percentile(latencies, 0.99) * 1e3,
            "max_ms": latencies[-1] * 1e3}


def analyse(senders: list[TimedSender], arrivals: dict | None, files: dict[str, float] | None,
            store_ids: dict[str, int], *, started: float, finished: float) -> dict:
    sent = {f"{s.id_prefix}{seq}": t for s in senders for seq, t in enumerate(s.send_times)}
    acked = {f"{s.id_prefix}{seq}": t for s in senders for seq, t in zip(s.acked, s.ack_times)}
    ack_latencies = sorted(lat for s in senders for lat in s.latencies)
    failures = collections.Counter()
    for s in senders:
        failures.update(s.failures)
    first_send = min(sent.values()) if sent else started
    sends_end = max(acked.values()) if acked else finished

    destinations: dict[str, dict[str, float]] = {}
    result: dict = {}
    if arrivals is not None:
        first: dict[str, float] = {}
        sequence = []
        for control_id, t in zip(arrivals["ids"], arrivals["t"]):
            if control_id not in first:
                first[control_id] = t
                sequence.append(control_id)
        in_shape = [c for c in sequence if c in sent]
        per_conn, vs_store = order_violations(in_shape, store_ids)
        result.update({
            "receiver_frames": len(arrivals["ids"]),
            "receiver_duplicates": len(arrivals["ids"]) - len(sequence),
            "receiver_unknown": len(sequence) - len(in_shape),
            "receiver_order_violations": per_conn,
            "receiver_store_order_violations": vs_store,
        })
        destinations["mllp"] = {c: first[c] for c in in_shape}
    if files is not None:
        in_shape = {c: t for c, t in files.items() if c in sent}
        by_seq = sorted(in_shape, key=lambda c: split_id(c))
        by_conn = collections.defaultdict(list)
        for c in by_seq:
            by_conn[split_id(c)[0]].append(in_shape[c])
        per_conn = sum(1 for ts in by_conn.values() for a, b in zip(ts, ts[1:]) if b < a)
        stored = sorted((store_ids[c], t) for c, t in in_shape.items() if c in store_ids)
        vs_store = sum(1 for (_, a), (_, b) in zip(stored, stored[1:]) if b < a) if store_ids else None
        result.update({"file_unknown": len(files) - len(in_shape),
                       "file_order_violations": per_conn, "file_store_order_violations": vs_store})
        destinations["file"] = in_shape

    # A message is delivered when it has reached every destination of the channel.
    delivered_at = {}
    for control_id in acked:
        times = [d.get(control_id) for d in destinations.values()]
        if all(t is not None for t in times):
            delivered_at[control_id] = max(times)
    last_delivery = max(delivered_at.values()) if delivered_at else finished
    span = last_delivery - first_send
    ingest_span = sends_end - first_send
    result.update({
        "messages": len(sent),
        "acked_ok": len(acked),
        "failures": sum(failures.values()),
        "failure_reasons": dict(failures),
        "late_sends": sum(s.late for s in senders),
        "delivered": len(delivered_at),
        "missing": len(acked) - len(delivered_at),
        "seconds": round(span, 3),
        "send_seconds": round(ingest_span, 3),
        "first_send": first_send,
        "ingest_msg_per_s": len(acked) / ingest_span if ingest_span > 0 else None,
        "delivered_msg_per_s": len(delivered_at) / span if span > 0 else None,
        "ack": latency_summary(ack_latencies),
        "delivery": latency_summary([t - sent[c] for c, t in delivered_at.items()]),
        "per_destination": {name: {"delivered": len(d), **latency_summary([t - sent[c] for c, t in d.items()])}
                            for name, d in destinations.items()},
    })
    result.update(backlog(sorted(acked.values()), sorted(delivered_at.values()), first_send, sends_end,
                          last_delivery))
    return result


def backlog(acked: list[float], delivered: list[float], start: float, sends_end: float, last: float) -> dict:
    """Messages ACKed but not yet delivered everywhere, over time; whether it kept growing while sending."""
    def at(t):
        return bisect.bisect_right(acked, t) - bisect.bisect_right(delivered, t)

    steps = int((last - start) / BACKLOG_STEP) + 1
    curve = [(round(i * BACKLOG_STEP, 3), at(start + i * BACKLOG_STEP)) for i in range(steps + 1)]
    sending = [(t, b) for t, b in curve if t <= sends_end - start]
    half = sending[len(sending) // 2:]
    growth = None
    if len(half) >= 4:  # least-squares slope over the second half of the sending time
        mean_t = sum(t for t, _ in half) / len(half)
        mean_b = sum(b for _, b in half) / len(half)
        var = sum((t - mean_t) ** 2 for t, _ in half)
        growth = sum((t - mean_t) * (b - mean_b) for t, b in half) / var if var else None
    window = sends_end - start
    return {
        "backlog_at_sends_end": at(sends_end),
        "backlog_max": max([at(sends_end), *(b for _, b in curve)]),
        "backlog_growth_per_s": growth,
        "delivered_during_sends_msg_per_s": bisect.bisect_right(delivered, sends_end) / window if window > 0 else None,
        "delivered_after_sends_msg_per_s": ((len(delivered) - bisect.bisect_right(delivered, sends_end))
                                            / (last - sends_end) if last > sends_end else None),
        "drain_seconds": round(max(0.0, last - sends_end), 3),
        "backlog_curve": curve,
    }


def bounded(r: dict) -> bool | None:
    """Paced shapes: did deliveries keep up, i.e. no lasting growth and under a second of traffic left at the end?"""
    if not r["offered_rate"] or r["backlog_growth_per_s"] is None:
        return None
    rate = r["offered_rate"]
    return r["backlog_growth_per_s"] < 0.02 * rate and r["backlog_at_sends_end"] <= rate * 1.0


# --------------------------------------------------------------------------
# Profile summary


def thread_role(name: str) -> str:
    if name == "MainThread":
        return "reactor"
    if name.startswith("PoolThread-channel-processor"):
        return "channel-processor"
    if name.startswith("PoolThread-twisted.internet.reactor"):
        return "reactor-threadpool"
    return name


def function_of(frame: str) -> str:
    """`name (file.py:123)` -> `name (file.py)`: samples of a function add up across its lines."""
    name, sep, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if sep and ":" in where else frame


WRAPPERS = ("(interface_engine/cli.py)", "(interface_engine/__main__.py)")


def summarise_profile(path: Path, top: int = 10) -> dict:
    """py-spy raw stacks (with --threads) -> samples per thread role, top functions by self time, and
    top engine functions (this package's, not its entry points) by total time, callees included."""
    roles: collections.Counter = collections.Counter()
    own: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    inclusive: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[1] if frames[0].startswith("thread (") and ": " in frames[0] else "?"
        role = thread_role(thread)
        functions = [function_of(f) for f in frames[1:]]
        roles[role] += n
        if functions:
            own[role][functions[-1]] += n
            own["all"][functions[-1]] += n
        for f in set(functions):
            if f.endswith(".py)") and "(interface_engine/" in f and not f.endswith(WRAPPERS):
                inclusive[role][f] += n
                inclusive["all"][f] += n
    total = sum(roles.values())
    return {
        "samples": total,
        "threads": {role: n for role, n in roles.most_common()},
        "self": {role: counter.most_common(top) for role, counter in own.items()},
        "total": {role: counter.most_common(top) for role, counter in inclusive.items()},
    }


def print_profile(summary: dict, seconds: float | None = None, mode: str = "gil", rate: int = 500) -> None:
    """Shares of all samples; with `seconds`, also how much of the shape's time the samples cover."""
    total = summary["samples"] or 1
    if mode == "gil":
        held = f", about {100 * total / (rate * seconds):.0f}% of the shape's time" if seconds else ""
        print(f"  py-spy --gil: {total} samples with the GIL held{held}; by thread: " +
              ", ".join(f"{role} {100 * n / total:.0f}%" for role, n in summary["threads"].items()))
    else:
        print(f"  py-spy --idle: {total} samples of all threads; by thread: " +
              ", ".join(f"{role} {n}" for role, n in summary["threads"].items()))
    for kind, what in (("self", "top self (all code)"), ("total", "top total (engine functions, callees included)")):
        print(f"  {what}:")
        for function, n in summary[kind].get("all", []):
            print(f"    {100 * n / total:5.1f}%  {function}")
    for role in summary["threads"]:
        print(f"  {role}: self " + "; ".join(f"{f.split(' (')[0]} {100 * n / total:.1f}%"
                                              for f, n in summary["self"].get(role, [])[:5]))


# --------------------------------------------------------------------------
# Running it all


def report_shape(v: Variant, r: dict) -> None:
    verdict = bounded(r)
    print(f"  {r['shape']}: {r['messages']:,} messages, ingest {fmt(r['ingest_msg_per_s'], ',.0f')} msg/s, "
          f"delivered {fmt(r['delivered_msg_per_s'], ',.0f')} msg/s ("
          f"{fmt(r['delivered_during_sends_msg_per_s'], ',.0f')} while sending, "
          f"{fmt(r['delivered_after_sends_msg_per_s'], ',.0f')} after), delivery p99 "
          f"{fmt(r['delivery']['p99_ms'], '.1f')} ms, ACK p99 {fmt(r['ack']['p99_ms'], '.2f')} ms, "
          f"backlog at end of sends {r['backlog_at_sends_end']:,}"
          + ("" if verdict is None else f" ({'bounded' if verdict else 'GROWING'})")
          + (f" [{r['waiting_for_channel_at_sends_end']:,} waiting for the channel, "
             f"{r['waiting_for_delivery_at_sends_end']:,} for delivery]"
             if r.get("waiting_for_channel_at_sends_end") is not None else "")
          + f", engine CPU {pct(r['engine_cpu_pct'])} ("
          + ", ".join(f"{name} {share:.0f}%" for name, share in r.get("engine_parts_cpu_pct", {}).items())
          + f"), receiver CPU {pct(r['receiver_cpu_pct'])}")
    for problem in problems(r):
        print(f"  !! {problem}")
    if r["stalled"]:
        print(f"  engine log:\n{log_tail(v.log)}")
    if r.get("profile"):
        print_profile(r["profile_summary"], r["seconds"], r["profile_mode"], r["profile_rate"])


async def load_variant(v: Variant, args) -> list[dict]:
    """Warm up, then the closed-loop shape and whichever paced shapes the variant gets."""
    v.control = await ReceiverControl(v.control.port).open()
    results = []

    async def shape(name, letter, per_conn, rate=None, profile=None):
        with profiler(v.engine_pid, profile, args.profile_mode, args.profile_rate) as spy:
            v.profiler_pid = spy.pid if spy else None
            r = await run_shape(v, name, letter, per_conn=per_conn, rate=rate)
            v.profiler_pid = None
        if profile:
            r.update(profiled=True, profile=str(profile), profile_mode=args.profile_mode, profile_rate=args.profile_rate,
                     profile_summary=summarise_profile(profile))
        results.append(r)
        report_shape(v, r)
        return r

    try:
        warm = await shape("warm-up", "w", args.warmup)
        if warm["failures"] or warm["missing"]:
            if v.to_files and not (v.archive / f"BF{v.run_tag}{v.name[0]}w").is_dir():
                print(f"  !! no archive folder where expected: has the archive path of "
                      f"{SAMPLE_CHANNEL.relative_to(REPO)} changed shape?")
            return results
        await shape("closed", "c", args.messages, profile=(args.profile / f"{v.run_tag}-{v.name}-closed-"
                                                            f"{args.profile_mode}.txt") if args.profile else None)
        if v.name in args.paced_variants:
            await shape(f"paced {args.rate:g}/s", "p", max(1, round(args.rate * args.duration / args.connections)),
                        args.rate)
        if v.name in args.sustained_variants:
            per_conn = max(1, round(args.sustained_rate * args.sustained_duration / args.connections))
            await shape(f"sustained {args.sustained_rate:g}/s", "s", per_conn, args.sustained_rate)
        return results
    finally:
        v.control.close()


def pct(value) -> str:
    return fmt(value, ".0f") + "%"


def render_tables(results: list[dict]) -> str:
    first = [("variant", "shape", "conns", "messages", "offered/s", "ingest msg/s", "delivered msg/s",
              "ACK p50", "ACK p99", "deliv p50", "deliv p99", "deliv max", "backlog end", "backlog max")]
    second = [("variant", "shape", "missing", "dups", "order", "vs store", "failures", "engine CPU",
               "engine ms/msg", "recv CPU", "recv us/frame", "gen CPU", "host CPU")]
    for r in results:
        first.append((
            r["variant"], r["shape"], str(r["connections"]), f"{r['messages']:,}",
            fmt(r["offered_rate"], ",.0f"), fmt(r["ingest_msg_per_s"], ",.0f"), fmt(r["delivered_msg_per_s"], ",.0f"),
            fmt(r["ack"]["p50_ms"], ".2f"), fmt(r["ack"]["p99_ms"], ".2f"),
            fmt(r["delivery"]["p50_ms"], ".1f"), fmt(r["delivery"]["p99_ms"], ".1f"),
            fmt(r["delivery"]["max_ms"], ".1f"), f"{r['backlog_at_sends_end']:,}", f"{r['backlog_max']:,}",
        ))
        order = sum(r.get(k) or 0 for k in ("receiver_order_violations", "file_order_violations"))
        vs_store = [r.get(k) for k in ("receiver_store_order_violations", "file_store_order_violations")
                    if k in r]
        second.append((
            r["variant"], r["shape"], str(r["missing"]), str(r.get("receiver_duplicates", "-")),
            "ok" if order == 0 else f"{order} late", "-" if None in vs_store else
            ("ok" if sum(vs_store) == 0 else f"{sum(vs_store)} late"), str(r["failures"]),
            pct(r["engine_cpu_pct"]), fmt(r["engine_cpu_ms_per_msg"], ".2f"), pct(r["receiver_cpu_pct"]),
            fmt(r["receiver_us_per_frame"], ".0f"), pct(r["generator_cpu_pct"]), pct(r["host_cpu_pct"]),
        ))
    return text_table(first) + "\n\n" + text_table(second)


def problems(r: dict) -> list[str]:
    found = []
    if r["failures"]:
        found.append(f"{r['failures']} messages not ACKed AA: " +
                     "; ".join(f"{n} x {reason}" for reason, n in r["failure_reasons"].items()))
    if r["missing"]:
        found.append(f"{r['missing']} ACKed messages never delivered"
                     + (f" (no progress for {STALL_TIMEOUT:g} s)" if r["stalled"] else ""))
    for key, what in (("receiver_order_violations", "arrived at the receiver after a later message of their "
                                                    "connection"),
                      ("receiver_store_order_violations", "arrived at the receiver out of the store's order"),
                      ("file_order_violations", "archive files appeared after a later message of their connection"),
                      ("file_store_order_violations", "archive files appeared out of the store's order")):
        if r.get(key):
            found.append(f"{r[key]} messages {what}")
    return found


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated channel variants, from: %(default)s")
    parser.add_argument("--connections", "-C", type=int, default=16, help="concurrent MLLP connections (default 16)")
    parser.add_argument("--messages", "-N", type=int, default=1000,
                        help="messages per connection in the closed-loop shape (default 1000)")
    parser.add_argument("--warmup", type=int, default=50,
                        help="messages per connection of unrecorded closed-loop load first (default 50)")
    parser.add_argument("--rate", type=float, default=1000.0, help="offered msg/s of the paced shape (default 1000)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of the paced shape (default 10)")
    parser.add_argument("--paced-variants", default="mllp",
                        help="variants that also get the paced shape (default mllp; '' for none)")
    parser.add_argument("--sustained-rate", type=float, default=1500.0,
                        help="offered msg/s of the sustained shape (default 1500)")
    parser.add_argument("--sustained-duration", type=float, default=20.0,
                        help="seconds of the sustained shape (default 20)")
    parser.add_argument("--sustained-variants", default="both",
                        help="variants that also get the sustained shape (default both; '' for none)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="record the engine with py-spy (--gil, 500 Hz, raw) during each closed-loop shape, "
                             "into DIR; the profiler's cost distorts those shapes' figures")
    parser.add_argument("--profile-rate", type=int, default=500, help="py-spy samples per second (default 500)")
    parser.add_argument("--profile-mode", choices=("gil", "idle"), default="gil",
                        help="py-spy --gil (default: threads holding the GIL) or --idle (all threads, waits "
                             "included)")
    parser.add_argument("--summarise-profile", type=Path, metavar="FILE",
                        help="only summarise an earlier py-spy raw file and exit")
    parser.add_argument("--store-writer", choices=("process", "thread"),
                        help="the engine's [store] writer (default: the engine's default, a process)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (stores, archive files, logs) and print its path")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    for key in ("variants", "paced_variants", "sustained_variants"):
        names = [n.strip() for n in getattr(args, key).split(",") if n.strip()]
        unknown = set(names) - set(VARIANTS)
        if unknown:
            parser.error(f"--{key.replace('_', '-')}: unknown variant(s): {', '.join(sorted(unknown))}")
        setattr(args, key, names)
    if min(args.connections, args.messages, args.warmup) < 1 or min(args.rate, args.duration,
                                                                     args.sustained_rate,
                                                                     args.sustained_duration) <= 0:
        parser.error("counts, rates and durations must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.summarise_profile:
        print_profile(summarise_profile(args.summarise_profile))
        return 0
    run_tag = secrets.token_hex(3)
    machine = machine_info()
    machine["loadavg_at_start"] = os.getloadavg()
    code = code_version()
    print(f"machine: nproc={machine['nproc']}  cpu={machine['cpu']}  python={machine['python']}  "
          f"sqlite={machine['sqlite']}  load average {' '.join(f'{x:.2f}' for x in machine['loadavg_at_start'])}")
    print(f"         {machine['platform']}; store and archive under {machine['tempdir']} "
          f"({machine['tempdir_fs'] or 'unknown filesystem'})")
    if machine["tempdir_fs"] in ("tmpfs", "ramfs"):
        print("!! the temporary directory is in memory, so neither SQLite commits nor archive files reach a "
              "disk: set TMPDIR to a directory on disk")
    print(f"code: {code}" + (f"; store writer: {args.store_writer}" if args.store_writer else ""))
    print(f"run {run_tag}: {args.connections} connections, {FRAME_BYTES} byte ADT^A01 frames, channel shaped like "
          f"{SAMPLE_CHANNEL.relative_to(REPO)}; variants {', '.join(args.variants)}")

    results: list[dict] = []
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="ie-e2e-") as tmp:
        if args.keep:
            tmp = tempfile.mkdtemp(prefix="ie-e2e-")
            print(f"keeping stores, archives and logs in {tmp}")
        tmp = Path(tmp)
        (tmp / "receiver").mkdir()
        print("\n== receiver")
        with receiver(tmp / "receiver") as (receiver_pid, receiver_port, control_port):
            for name in args.variants:
                print(f"\n== {name}")
                workdir = tmp / name
                workdir.mkdir()
                try:
                    with channel_engine(name, workdir, receiver_port, args.store_writer) as (pid, port, store, archive):
                        v = Variant(name, pid, port, store, archive, receiver_pid,
                                    ReceiverControl(control_port), run_tag, args)
                        results += asyncio.run(load_variant(v, args))
                except (TargetFailed, OSError) as exc:
                    errors[name] = str(exc)
                    print(f"  !! FAILED: {exc}")

    measured = [r for r in results if r["shape"] != "warm-up"]
    if measured:
        print("\n" + render_tables(measured))
        print("  (msg/s over first send -> last ACK (ingest) and first send -> last delivery (delivered); latencies in"
              " ms: ACK = send -> ACK, deliv = send -> at every destination; backlog = ACKed, not yet delivered;"
              " order/vs store: messages arriving after a later one of their connection / of the store's order;"
              " CPU: engine, receiver and this harness as % of one core, host as % of all CPUs)")
    for r in measured:
        if r["offered_rate"]:
            verdict = bounded(r)
            print(f"{r['variant']} {r['shape']}: delivered {fmt(r['delivered_during_sends_msg_per_s'], ',.0f')} msg/s "
                  f"while sending at {fmt(r['ingest_msg_per_s'], ',.0f')} msg/s ({r['late_sends']:,} sends behind "
                  f"schedule); backlog at the end of sending "
                  f"{r['backlog_at_sends_end']:,}, max {r['backlog_max']:,}, trend "
                  f"{fmt(r['backlog_growth_per_s'], '+,.0f')} msg/s over the second half, drained "
                  f"{r['drain_seconds']:.1f} s after: {'bounded' if verdict else 'NOT bounded'}")
        if (r["outside_cpu_pct"] or 0) > 10:
            kinds = r.get("host_cpu_breakdown_pct", {})
            print(f"note: {r['variant']} {r['shape']}: {r['outside_cpu_pct']:.0f}% of the machine was busy outside "
                  "the engine, the receiver and this harness (machine: " +
                  ", ".join(f"{k} {kinds[k]:.0f}%" for k in ("user", "system", "softirq", "steal", "iowait")
                            if k in kinds) + ")")
        if r.get("profiled"):
            print(f"note: {r['variant']} {r['shape']} ran under py-spy: its figures are not representative")
    bad = [(r, problems(r)) for r in results]
    bad = [(r, p) for r, p in bad if p]
    for r, found in bad:
        for problem in found:
            print(f"!! {r['variant']} {r['shape']}: {problem}")
    for name in errors:
        print(f"!! {name} did not complete (see above)")
    if bad or errors:
        print("!! THIS RUN HAD FAILURES: its figures do not describe a healthy engine")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "run": run_tag,
            "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(["benchmarks/e2e.py", *(sys.argv[1:] if argv is None else argv)]),
            "code": code,
            "machine": machine,
            "results": results,
            "errors": errors,
        }, indent=2, default=str) + "\n")
    return 1 if bad or errors else 0


if __name__ == "__main__":
    sys.exit(main())
