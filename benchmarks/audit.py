"""How long `interface-engine audit verify` takes on a chain of 100,000 events (goal: under 10 s).

Fills a fresh store with synthetic events (message ids, names, no content), in
batches as the engine's writer appends them, signs a checkpoint of the head, then
runs the real command in a subprocess and times it, start to exit, several times;
prints each run and the median. Run from the repository root:

    .venv/bin/python benchmarks/audit.py
    .venv/bin/python benchmarks/audit.py --events 1000000 --runs 1
    .venv/bin/python benchmarks/audit.py --store-url postgresql+psycopg://postgres@127.0.0.1:5432/test
    .venv/bin/python benchmarks/audit.py --write-cost      # what the trail adds to Store.write

`--write-cost` instead stores the same batches of synthetic messages with and without
the trail, taking turns, and prints the CPU time per message of this process (the
writer's own cost, which a shared machine disturbs less than wall time) and the wall time.

A PostgreSQL store must be empty (the script creates the tables). The exit status
is non-zero if verify does not report the chain intact; the goal is reported, not
enforced.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ingest import scratch_schema  # noqa: E402
from interface_engine import keys  # noqa: E402
from interface_engine.audit import AuditTrail, write_checkpoint  # noqa: E402
from interface_engine.store import Store  # noqa: E402
from interface_engine.store.store import utcnow  # noqa: E402

GOAL_SECONDS = 10.0
ACTIONS = ("message.received", "message.queued", "delivery.sent")


def fill(trail: AuditTrail, events: int, batch: int = 300):
    """Events as a busy engine writes them: one batch per commit, three events per message."""
    start = utcnow()
    for first in range(0, events, batch):
        with trail.db.begin() as conn:
            trail.append(conn, start + timedelta(milliseconds=first), [
                ("engine:bench", ACTIONS[i % 3], "message", str(i // 3 + 1), "127.0.0.1",
                 "success", f"{i // 3:032x}", json.dumps({"channel": "adt", "listener": "bench"}))
                for i in range(first, min(events, first + batch))])


def write_cost(batches: int = 200, size: int = 32) -> None:
    from interface_engine.store import Incoming

    def batch(tag, n):
        return [Incoming(raw=b"MSH|^~\\&|APP|FAC|||20260101||ADT^A01|%d|P|2.5\r" % i, listener="bench",
                         peer="127.0.0.1", state="received", ack=b"ACK", sending_application="APP",
                         sending_facility="FAC", control_id=f"{tag}{n}-{i}", message_type="ADT",
                         trigger_event="A01", channel="adt") for i in range(size)]

    with tempfile.TemporaryDirectory(prefix="ie-bench-audit-") as tmp:
        trail = AuditTrail(bytes(32), "bench")
        stores = {"without": Store(f"sqlite:///{tmp}/plain.db"),
                  "with": Store(f"sqlite:///{tmp}/audited.db", audit=trail)}
        cpu, wall = dict.fromkeys(stores, 0.0), dict.fromkeys(stores, 0.0)
        for store in stores.values():
            store.check_schema()
            store.write(batch("warm", 0))
        for n in range(batches):
            for name, store in stores.items():
                items = batch(name, n)
                c, w = time.process_time(), time.perf_counter()
                store.write(items)
                cpu[name] += time.process_time() - c
                wall[name] += time.perf_counter() - w
        messages = batches * size
        for name in stores:
            print(f"Store.write {name:7} the trail: {cpu[name] / messages * 1e6:6.1f} us CPU, "
                  f"{wall[name] / messages * 1e6:6.1f} us wall per message ({messages:,} messages, "
                  f"batches of {size}, SQLite)")
        print(f"the trail adds {(cpu['with'] - cpu['without']) / messages * 1e6:.1f} us CPU per message")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000, help="events in the chain (default 100000)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of verify (default 3)")
    parser.add_argument("--store-url", help="default: a SQLite file in a temporary folder")
    parser.add_argument("--write-cost", action="store_true",
                        help="measure what the trail adds to storing a message instead")
    args = parser.parse_args()
    if args.write_cost:
        write_cost()
        return 0
    with tempfile.TemporaryDirectory(prefix="ie-bench-audit-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        url = args.store_url or f"sqlite:///{work / 'store.db'}"
        if url.startswith("postgresql"):
            url = stack.enter_context(scratch_schema(url, "bench_audit"))
        key_file = keys.create(work / "keys.json")
        config = work / "engine.toml"
        config.write_text(f'[engine]\nnode = "bench"\n[store]\nurl = {json.dumps(url)}\n'
                          f'[keys]\nfile = {json.dumps(str(work / "keys.json"))}\n'
                          f'[audit]\ncheckpoint_file = {json.dumps(str(work / "checkpoint.json"))}\n')
        trail = AuditTrail(key_file.audit, "bench")
        store = Store(url, audit=trail)
        store.check_schema()
        started = time.perf_counter()
        fill(trail, args.events)
        filled = time.perf_counter() - started
        write_checkpoint(work / "checkpoint.json", trail.key, trail.heads())
        store.close()
        print(f"filled {args.events:,} events in {filled:.1f} s ({args.events / filled:,.0f} events/s "
              f"appended, in batches of 300) into {url.split(':')[0]}")
        times, failed = [], False
        for run in range(args.runs):
            started = time.perf_counter()
            result = subprocess.run([sys.executable, "-m", "interface_engine", "audit", "verify",
                                     "--config", str(config)], cwd=REPO, capture_output=True, text=True)
            seconds = time.perf_counter() - started
            times.append(seconds)
            print(f"run {run + 1}: {seconds:.2f} s  exit {result.returncode}  {result.stdout.strip()}")
            failed |= result.returncode != 0
            if result.returncode:
                print(result.stderr.strip())
        median = statistics.median(times)
        print(f"audit verify, {args.events:,} events: median {median:.2f} s "
              f"({args.events / median:,.0f} events/s); goal under {GOAL_SECONDS:.0f} s: "
              f"{'met' if median < GOAL_SECONDS else 'NOT met'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
