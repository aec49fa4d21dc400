"""Ingest benchmark: MLLP senders against the engine and a bare python-hl7 server.

Each target is started as a subprocess on a free local port, loaded with
C connections that each send one message and wait for its ACK before the
next (as HL7 senders do), then stopped.  Two load shapes are measured:
closed loop (as fast as the target answers) and paced (a fixed offered
rate), so both capacity and latency at a realistic rate are visible.

The load generator is a single asyncio process built from protocol
callbacks rather than coroutines, and it reports its own CPU use, so a
reader can check that the figures describe the target, not the generator
competing with it for the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import os
import platform
import secrets
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
HOST = "127.0.0.1"
BASELINE = "baseline-python-hl7"
# PostgreSQL last: its checkpoints and autovacuum after a run would
# otherwise take CPU from whichever target came next.
TARGET_NAMES = (BASELINE, "engine-sqlite", "engine-postgres")
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
START_TIMEOUT = 60.0  # a first start may run the store's migrations
STOP_TIMEOUT = 15.0
ACK_TIMEOUT = 30.0
OK_CODES = (b"AA", b"CA")
END_BLOCK = b"\x1c\x0d"

# Synthetic ADT^A01 of about 1 KB: invented people, places and identifiers.
# {cid} becomes the message's unique control id (MSH-10), also reused in
# PID-3 and PV1-19 so the stored rows differ the way real admissions do.
_SEGMENTS = (
    "MSH|^~\\&|BENCHSEND|BENCHFAC|INTERFACE_ENGINE|BENCHHOSP|{ts}||ADT^A01^ADT_A01|{cid}|P|2.5.1|||AL|NE|USA|UNICODE UTF-8",
    "EVN|A01|{ts}|||BENCH^OPERATOR^ONE|{ts}",
    "PID|1||MRN{cid}^^^BENCHHOSP^MR||DOE^JANE^Q^^MS||19800101|F||2106-3^White^HL70005"
    "|123 EXAMPLE ST^APT 4^SPRINGFIELD^XX^00000^USA^H||^PRN^PH^^^555^5550100|^WPN^PH^^^555^5550101"
    "|EN^English^HL70296|M^Married^HL70002|NON^None^HL70006|ACC{cid}^^^BENCHHOSP^AN",
    "NK1|1|DOE^JOHN^A|SPO^Spouse^HL70063|123 EXAMPLE ST^APT 4^SPRINGFIELD^XX^00000^USA"
    "|^PRN^PH^^^555^5550102||EC^Emergency Contact^HL70131",
    "PV1|1|I|WARD1^101^A^BENCHHOSP||||1234^SMITH^ALEX^^^DR|2345^JONES^SAM^^^DR||MED||||1|||1234^SMITH^ALEX^^^DR"
    "|IN||SELF|||||||||||||||||||BENCHHOSP||ADM|||{ts}",
    "PV2|||CP^Chest pain",
    "AL1|1|DA|PEN^Penicillin^LOCAL|SV|Hives|20100101",
    "AL1|2|FA|PNT^Peanut^LOCAL|MO|Swelling|20150601",
    "DG1|1||R07.9^Chest pain, unspecified^I10||{ts}|A",
    "DG1|2||I10^Essential hypertension^I10||{ts}|W",
)
FRAME_TEMPLATE = "\x0b" + "\r".join(_SEGMENTS) + "\r\x1c\r"
FRAME_BYTES = len(FRAME_TEMPLATE.replace("{ts}", "YYYYMMDDHHMMSS").format(cid="B000000c-00-000000"))


class TargetSkipped(Exception):
    """The target cannot run here (e.g. no database server); not a failure."""


class TargetFailed(Exception):
    """The target did not start or stop as it should."""


# --------------------------------------------------------------------------
# Load generator


def check_ack(frame: bytes, control_id: bytes) -> str | None:
    """Return why `frame` is not a positive ACK for `control_id`, or None."""
    if not frame.startswith(b"\x0b"):
        return "ACK frame without MLLP start block"
    body = frame[1:]
    sep = body[3:4] if body.startswith(b"MSH") else b"|"
    for segment in body.split(b"\r"):
        segment = segment.lstrip(b"\n")
        if segment.startswith(b"MSA"):
            fields = segment.split(sep)
            code = fields[1] if len(fields) > 1 else b""
            if code not in OK_CODES:
                return f"MSA-1 is {code.decode(errors='replace') or 'empty'}"
            if len(fields) < 3 or fields[2] != control_id:
                return "MSA-2 does not match the sent MSH-10"
            return None
    return "ACK without MSA segment"


class Sender(asyncio.Protocol):
    """One MLLP connection: send a message, wait for its ACK, send the next.

    Driven by callbacks rather than a coroutine per connection, to spare
    the generator a task wake-up per message.  With `interval` set, sends
    follow a fixed schedule and go out at once when the schedule has
    already passed (the target is behind).
    """

    def __init__(self, loop, template: str, id_prefix: str, count: int | None, interval: float | None):
        self.loop = loop
        self.template = template
        self.id_prefix = id_prefix
        self.count = count
        self.interval = interval
        self.transport = None
        self.buffer = bytearray()
        self.seq = 0
        self.in_flight: bytes | None = None
        self.sent_at = 0.0
        self.first_due = 0.0
        self.stop_at: float | None = None
        self.last_ack_at: float | None = None
        self.latencies: list[float] = []
        self.ok = 0
        self.late = 0
        self.failures: collections.Counter[str] = collections.Counter()
        self.done = loop.create_future()

    def connection_made(self, transport):
        self.transport = transport

    def start(self, first_due: float, stop_at: float | None) -> None:
        self.first_due = first_due
        self.stop_at = stop_at
        self.loop.call_at(first_due, self._send)

    def _send(self) -> None:
        if self.done.done():
            return
        now = self.loop.time()
        if self.seq == self.count or (self.stop_at is not None and now >= self.stop_at):
            self.done.set_result(None)
            return
        control_id = f"{self.id_prefix}{self.seq}"
        self.in_flight = control_id.encode()
        self.sent_at = now
        self.transport.write(self.template.format(cid=control_id).encode())

    def data_received(self, data: bytes) -> None:
        now = self.loop.time()
        buffer = self.buffer
        buffer += data
        while (end := buffer.find(END_BLOCK)) >= 0:
            frame = bytes(buffer[:end])
            del buffer[: end + len(END_BLOCK)]
            self._on_ack(frame, now)

    def _on_ack(self, frame: bytes, now: float) -> None:
        if self.in_flight is None:
            self.failures["ACK with no message outstanding"] += 1
            return
        self.latencies.append(now - self.sent_at)
        problem = check_ack(frame, self.in_flight)
        if problem:
            self.failures[problem] += 1
        else:
            self.ok += 1
        self.in_flight = None
        self.last_ack_at = now
        self.seq += 1
        if self.interval is None:
            self._send()
            return
        due = self.first_due + self.seq * self.interval
        if due > now:
            self.loop.call_at(due, self._send)
        else:
            self.late += 1
            self._send()

    def check_timeout(self, now: float) -> None:
        if self.in_flight is not None and now - self.sent_at > ACK_TIMEOUT:
            self._abandon(f"no ACK within {ACK_TIMEOUT:g} s")
            self.transport.abort()

    def connection_lost(self, exc) -> None:
        self._abandon("connection closed by target")

    def _abandon(self, reason: str) -> None:
        """Count what this connection will now never get acknowledged."""
        if self.done.done():
            return
        if self.in_flight is not None:
            self.failures[reason] += 1
            self.in_flight = None
            self.seq += 1
        if self.count is not None and self.count > self.seq:
            self.failures[f"not sent ({reason})"] += self.count - self.seq
        self.done.set_result(None)


def stat_cpu_seconds(stat: Path) -> float | None:
    """CPU time (user + system) in a /proc stat file, a process's or a thread's; None where there is none."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int, children: bool = True) -> float | None:
    """CPU time (user + system) of another process and (`children`) of the processes it runs
    (the engine's channel processor and store writer), from /proc where there is one."""
    own = stat_cpu_seconds(Path(f"/proc/{pid}/stat"))
    if own is None or not children:
        return own
    return own + sum(process_cpu_seconds(child) or 0.0 for child in children_of(pid))


def children_of(pid: int) -> list[int]:
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            found += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except OSError:
            continue
    return found


def host_cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies over all CPUs, to see whether the machine itself was saturated."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except OSError:
        return None
    idle = ticks[3] + ticks[4]  # idle + iowait
    return sum(ticks) - idle, sum(ticks)


def filesystem_type(path: Path) -> str | None:
    """Type of the filesystem holding `path`: a store on tmpfs never really syncs."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    path = str(path.resolve())
    matches = [(mount, kind) for mount, kind in mounts
               if path == mount or path.startswith(mount.rstrip("/") + "/")]
    return max(matches, key=lambda m: len(m[0]))[1] if matches else None


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile, so p99 is a latency some message actually saw."""
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


async def run_phase(port: int, target_pid: int, *, id_prefix: str, connections: int,
                    count: int | None, rate: float | None = None,
                    stop_after: float | None = None) -> dict:
    """Drive one load shape to completion and summarise it."""
    loop = asyncio.get_running_loop()
    template = FRAME_TEMPLATE.replace("{ts}", datetime.now().strftime("%Y%m%d%H%M%S"))
    interval = connections / rate if rate else None
    senders = [Sender(loop, template, f"{id_prefix}-{i:02d}-", count, interval) for i in range(connections)]
    await asyncio.gather(*(loop.create_connection(lambda s=s: s, HOST, port) for s in senders))

    cpu_start = time.process_time()
    target_cpu_start = process_cpu_seconds(target_pid)
    host_start = host_cpu_ticks()
    started = loop.time()
    stop_at = started + stop_after if stop_after else None
    for i, sender in enumerate(senders):
        # Paced connections are staggered so the aggregate is evenly spread.
        sender.start(started + (i / rate if rate else 0.0), stop_at)
    pending = {sender.done for sender in senders}
    while pending:
        _, pending = await asyncio.wait(pending, timeout=1.0)
        now = loop.time()
        for sender in senders:
            sender.check_timeout(now)
    finished = loop.time()
    cpu = time.process_time() - cpu_start
    target_cpu_end = process_cpu_seconds(target_pid)
    host_end = host_cpu_ticks()
    for sender in senders:
        sender.transport.close()

    latencies = sorted(latency for sender in senders for latency in sender.latencies)
    failures = collections.Counter()
    for sender in senders:
        failures.update(sender.failures)
    acks = [sender.last_ack_at for sender in senders if sender.last_ack_at is not None]
    wall = (max(acks) if acks else finished) - started
    ok = sum(sender.ok for sender in senders)
    busy = finished - started
    return {
        "connections": connections,
        "messages": sum(sender.seq for sender in senders),
        "acked_ok": ok,
        "offered_rate": rate,
        "seconds": round(wall, 3),
        "msg_per_s": ok / wall if wall > 0 else 0.0,
        "p50_ms": percentile(latencies, 0.50) * 1e3 if latencies else None,
        "p99_ms": percentile(latencies, 0.99) * 1e3 if latencies else None,
        "max_ms": latencies[-1] * 1e3 if latencies else None,
        "failures": sum(failures.values()),
        "failure_reasons": dict(failures),
        "late_sends": sum(sender.late for sender in senders),
        "generator_cpu_s": round(cpu, 3),
        "generator_cpu_pct": 100 * cpu / busy if busy > 0 else None,
        "generator_us_per_msg": 1e6 * cpu / max(1, len(latencies)),
        "target_cpu_pct": (100 * (target_cpu_end - target_cpu_start) / busy
                           if busy > 0 and target_cpu_start is not None and target_cpu_end is not None
                           else None),
        "host_cpu_pct": (100 * (host_end[0] - host_start[0]) / (host_end[1] - host_start[1])
                         if host_start and host_end and host_end[1] > host_start[1] else None),
    }


def outside_cpu_pct(result: dict) -> float | None:
    """Share of the machine busy with neither the generator nor the target process.

    That is a database server's work, or other processes competing with
    the run; the latter make its figures unrepresentative.
    """
    parts = (result["host_cpu_pct"], result["generator_cpu_pct"], result["target_cpu_pct"])
    if None in parts:
        return None
    host, gen, target = parts
    return max(0.0, host - (gen + target) / (os.cpu_count() or 1))


async def load_target(port: int, pid: int, args, run_tag: str) -> list[dict]:
    """Warm up (and size the closed run), then the closed-loop and paced shapes."""
    c = args.connections
    warm = await run_phase(port, pid, id_prefix=f"B{run_tag}w", connections=c, count=None,
                           stop_after=args.warmup)
    if warm["failures"]:
        return [{"shape": "warm-up", **warm}]
    per_conn = args.messages or max(1, round(warm["msg_per_s"] * args.duration / c))
    closed = await run_phase(port, pid, id_prefix=f"B{run_tag}c", connections=c, count=per_conn)
    paced_per_conn = max(1, round(args.rate * args.duration / c))
    paced = await run_phase(port, pid, id_prefix=f"B{run_tag}p", connections=c, count=paced_per_conn,
                            rate=args.rate)
    return [{"shape": "closed", **closed}, {"shape": f"paced {args.rate:g}/s", **paced}]


# --------------------------------------------------------------------------
# Targets


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join("    | " + line for line in text) or "    | (no output)"


@contextlib.contextmanager
def subprocess_target(name: str, argv: list[str], port: int, workdir: Path):
    """Start `argv`, yield its pid once `port` accepts connections, then SIGTERM it."""
    # IE_STORE_URL would override the store the harness configured.
    env = {key: value for key, value in os.environ.items() if key != "IE_STORE_URL"}
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as log:
        began = time.monotonic()
        proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)
    try:
        while True:
            if proc.poll() is not None:
                raise TargetFailed(f"exited with status {proc.returncode} before listening:\n{log_tail(log_path)}")
            try:
                socket.create_connection((HOST, port), timeout=0.5).close()
                break
            except OSError:
                pass
            if time.monotonic() - began > START_TIMEOUT:
                raise TargetFailed(f"not listening on port {port} after {START_TIMEOUT:g} s:\n{log_tail(log_path)}")
            time.sleep(0.1)
        print(f"  listening on {HOST}:{port} after {time.monotonic() - began:.1f} s (pid {proc.pid})")
        yield proc.pid
        if proc.poll() is not None:
            raise TargetFailed(f"exited with status {proc.returncode} during the run:\n{log_tail(log_path)}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                print(f"  !! {name} ignored SIGTERM for {STOP_TIMEOUT:g} s and was killed")
            else:
                if proc.returncode not in (0, -signal.SIGTERM):
                    print(f"  !! {name} exited with status {proc.returncode} after SIGTERM:\n{log_tail(log_path)}")


def own_files(workdir: Path) -> str:
    """Config lines that keep an engine's pid file, key file and audit checkpoint in `workdir`.

    Benchmarks run the engine from the repository root: without these it would use
    (and leave behind) the checkout's var/. Follows an [engine] table's keys.
    """
    return (f"pid_file = {toml_string(str(workdir / 'engine.pid'))}\n"
            f"[keys]\nfile = {toml_string(str(workdir / 'keys.json'))}\n"
            f"[audit]\ncheckpoint_file = {toml_string(str(workdir / 'audit-checkpoint.json'))}\n")


@contextlib.contextmanager
def scratch_schema(url: str, prefix: str):
    """`url` pointed at a new schema of its own in that PostgreSQL database, dropped afterwards."""
    import uuid

    import psycopg

    schema = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)
    admin.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"
    finally:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")
        admin.close()


def toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


@contextlib.contextmanager
def engine(name: str, store_url: str, workdir: Path):
    """Run the engine with the least config that exercises durable ingest."""
    port = free_port()
    channels = workdir / "no-channels"
    channels.mkdir(exist_ok=True)
    config = workdir / "engine.toml"
    config.write_text(
        "[engine]\n"
        'log_level = "warn"\n'
        + own_files(workdir) +
        "[admin]\nport = 0\n[store]\n"
        f"url = {toml_string(store_url)}\n"
        # No channels: the benchmark measures ingest alone, and runs from the repository
        # root, whose sample channels name listeners this config does not have.
        "[channels]\n"
        f"directory = {toml_string(str(channels))}\n"
        "[[listeners]]\n"
        'name = "bench"\n'
        f"host = {toml_string(HOST)}\n"
        f"port = {port}\n"
        'ack_mode = "stored"\n'
    )
    # `-m` from the checkout runs the tree's code even if the venv's
    # editable install predates the package's modules.
    argv = [sys.executable, "-m", "interface_engine", "run", "--config", str(config)]
    with subprocess_target(name, argv, port, workdir) as pid:
        yield pid, port


@contextlib.contextmanager
def engine_sqlite(workdir: Path):
    with engine("engine-sqlite", f"sqlite:///{workdir / 'store.db'}", workdir) as running:
        yield running


def postgres_url() -> str:
    return os.environ.get("IE_BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL)


@contextlib.contextmanager
def engine_postgres(workdir: Path):
    """Run the engine on a throwaway schema so runs never see each other's rows."""
    import psycopg
    from sqlalchemy.engine import make_url

    base = make_url(postgres_url())
    libpq = base.set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        admin = psycopg.connect(libpq, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        raise TargetSkipped(f"PostgreSQL unreachable at {base.render_as_string()}: {exc}".strip()) from exc
    schema = f"bench_{secrets.token_hex(4)}"
    with admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
        try:
            url = base.update_query_dict({"options": f"-csearch_path={schema}"})
            with engine("engine-postgres", url.render_as_string(hide_password=False), workdir) as running:
                yield running
        finally:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


@contextlib.contextmanager
def baseline(workdir: Path):
    port = free_port()
    argv = [sys.executable, str(HERE / "baseline_server.py"), "--port", str(port)]
    with subprocess_target(BASELINE, argv, port, workdir) as pid:
        yield pid, port


TARGETS = {"engine-sqlite": engine_sqlite, "engine-postgres": engine_postgres, BASELINE: baseline}


# --------------------------------------------------------------------------
# Reporting


def machine_info() -> dict:
    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    info = {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": cpu_model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "sqlite": sqlite3.sqlite_version,
        "tempdir": tempfile.gettempdir(),
        "tempdir_fs": filesystem_type(Path(tempfile.gettempdir())),
    }
    with contextlib.suppress(Exception):
        import psycopg
        from sqlalchemy.engine import make_url

        libpq = make_url(postgres_url()).set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(libpq, connect_timeout=5) as conn:
            info["postgres"] = conn.execute("SHOW server_version").fetchone()[0]
    return info


def code_version() -> str:
    """The commit under test, marked when the work tree differs from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit} with uncommitted changes" if dirty else commit


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_table(results: list[dict]) -> str:
    header = ("target", "shape", "conns", "messages", "msg/s", "p50 ms", "p99 ms", "max ms",
              "failures", "gen CPU", "target CPU", "host CPU")
    rows = [header]
    for r in results:
        rows.append((
            r["target"], r["shape"], str(r["connections"]), str(r["messages"]),
            fmt(r["msg_per_s"], ",.0f"), fmt(r["p50_ms"], ".2f"), fmt(r["p99_ms"], ".2f"),
            fmt(r["max_ms"], ".2f"), str(r["failures"]),
            fmt(r["generator_cpu_pct"], ".0f") + "%", fmt(r["target_cpu_pct"], ".0f") + "%",
            fmt(r["host_cpu_pct"], ".0f") + "%",
        ))
    return text_table(rows)


def text_table(rows: list[tuple[str, ...]], left: int = 2) -> str:
    """Rows of cells (the first is the header) as aligned text: `left` columns flush left, the rest right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i < left else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def closed_ratios(results: list[dict]) -> dict[str, float]:
    closed = {r["target"]: r["msg_per_s"] for r in results if r["shape"] == "closed"}
    base = closed.get(BASELINE)
    if not base:
        return {}
    return {f"{name} / {BASELINE}": closed[name] / base
            for name in ("engine-sqlite", "engine-postgres") if name in closed}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(TARGET_NAMES),
                        help="comma-separated, from: %(default)s")
    parser.add_argument("--connections", type=int, default=16, help="concurrent MLLP connections (default 16)")
    parser.add_argument("--messages", type=int,
                        help="messages per connection in the closed-loop run "
                             "(default: sized from the warm-up so the run lasts --duration)")
    parser.add_argument("--rate", type=float, default=1000.0,
                        help="total offered msg/s in the paced run (default 1000)")
    parser.add_argument("--duration", type=float, default=10.0,
                        help="target seconds for the closed-loop run and for the paced run (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0,
                        help="seconds of unrecorded closed-loop load before measuring (default 2)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.targets) - set(TARGET_NAMES)
    if unknown:
        parser.error(f"unknown target(s): {', '.join(sorted(unknown))}")
    if args.connections < 1 or args.rate <= 0 or args.duration <= 0 or (args.messages or 1) < 1:
        parser.error("--connections, --messages, --rate and --duration must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    run_tag = secrets.token_hex(3)
    machine = machine_info()
    code = code_version()
    print(f"machine: nproc={machine['nproc']}  cpu={machine['cpu']}  python={machine['python']}  "
          f"sqlite={machine['sqlite']}  postgres={machine.get('postgres', 'n/a')}")
    print(f"         {machine['platform']}; SQLite stores under {machine['tempdir']} "
          f"({machine['tempdir_fs'] or 'unknown filesystem'})")
    if machine["tempdir_fs"] in ("tmpfs", "ramfs"):
        print("!! the temporary directory is in memory, so SQLite commits never reach a disk: "
              "set TMPDIR to a directory on disk for meaningful engine-sqlite figures")
    print(f"code: {code}")
    print(f"run {run_tag}: {args.connections} connections, {FRAME_BYTES} byte ADT^A01 frames, "
          f"closed-loop for ~{args.duration:g} s, then paced at {args.rate:g} msg/s")

    results: list[dict] = []
    skipped: dict[str, str] = {}
    errors: dict[str, str] = {}
    for name in args.targets:
        print(f"\n== {name}")
        try:
            with tempfile.TemporaryDirectory(prefix=f"ie-bench-{name}-") as tmp:
                with TARGETS[name](Path(tmp)) as (pid, port):
                    for result in asyncio.run(load_target(port, pid, args, run_tag)):
                        result = {"target": name, **result}
                        result["outside_cpu_pct"] = outside_cpu_pct(result)
                        results.append(result)
                        behind = (f"{result['late_sends']} sends behind schedule, "
                                  if result["offered_rate"] else "")
                        print(f"  {result['shape']}: {result['msg_per_s']:,.0f} msg/s, "
                              f"p99 {fmt(result['p99_ms'], '.2f')} ms, {result['failures']} failures, "
                              f"{behind}generator {result['generator_us_per_msg']:.0f} us CPU/msg")
        except TargetSkipped as exc:
            skipped[name] = str(exc)
            print(f"  skipped: {exc}")
        except (TargetFailed, OSError) as exc:
            errors[name] = str(exc)
            print(f"  !! FAILED: {exc}")

    if results:
        print("\n" + render_table(results))
        print("  (gen CPU: this load generator, % of one core; target CPU: the target process, % of one core,"
              " excluding any database server; host CPU: whole machine, % of all its CPUs)")
    ratios = closed_ratios(results)
    for label, ratio in ratios.items():
        print(f"closed-loop throughput {label}: {ratio:.2f}x")
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    for r in results:
        if (r["outside_cpu_pct"] or 0) > 10:
            database = " (includes the PostgreSQL server)" if r["target"] == "engine-postgres" else ""
            print(f"note: {r['target']} {r['shape']}: {r['outside_cpu_pct']:.0f}% of the machine was busy "
                  f"outside the generator and target{database}")

    failed = [r for r in results if r["failures"]]
    for r in failed:
        print(f"!! {r['target']} {r['shape']}: {r['failures']} FAILED messages: "
              + "; ".join(f"{n} x {reason}" for reason, n in r["failure_reasons"].items()))
    for name in errors:
        print(f"!! {name} did not complete (see above)")
    if failed or errors:
        print("!! THIS RUN HAD FAILURES: its figures do not describe a healthy target")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "run": run_tag,
            "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(["benchmarks/ingest.py", *(sys.argv[1:] if argv is None else argv)]),
            "code": code,
            "machine": machine,
            "results": results,
            "closed_loop_ratios": ratios,
            "skipped": skipped,
            "errors": errors,
        }, indent=2) + "\n")
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
