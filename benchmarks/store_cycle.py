"""The store writer's cycle on its own: what one delivered message costs the store.

Each cycle does what the engine's writer does for the sample ADT channel with two
destinations, pipelined as in the engine: it stores 16 messages, records their
processing (two deliveries each, 1 KB outputs) and the attempts of the previous
cycle's deliveries, and reads both queues. The store is SQLite on disk, encrypted
and audited as the engine's is. Two ways of committing alternate in rounds:

- ``joined``: processing and attempts in one transaction (Store.joined), as the engine does;
- ``separate``: each in its own transaction, the baseline.

Run from the repository root::

    .venv/bin/python benchmarks/store_cycle.py [--cycles 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from interface_engine import keys  # noqa: E402
from interface_engine.audit import AuditTrail  # noqa: E402
from interface_engine.store import (QUEUED, RECEIVED, SENT, Attempt, Incoming, NewDelivery,  # noqa: E402
                                    Processed, Store, utcnow)
from interface_engine.store.cipher import Cipher  # noqa: E402
from tests.messages import adt_a01  # noqa: E402

BATCH = 16
QUEUES = [("adt", "archive", 256), ("adt", "downstream", 256)]


class Writer:
    def __init__(self, directory: Path):
        made = keys.create(directory / "keys.json")
        self.store = Store(f"sqlite:///{directory / 'store.db'}", audit=AuditTrail(made.audit, "bench"),
                           node="bench", cipher=Cipher(made))
        self.store.check_schema()
        self.sent = 0
        self.heads: list = [[], []]

    def cycle(self, joined: bool):
        batch = []
        for _ in range(BATCH):
            self.sent += 1
            control_id = f"SC{self.sent}"
            batch.append(Incoming(
                raw=adt_a01(control_id), listener="bench", peer="127.0.0.1", state=RECEIVED,
                ack=b"MSH|^~\\&|ACK|" + control_id.encode(), sending_application="ADT_APP",
                sending_facility="GENERAL_HOSP", message_type="ADT", trigger_event="A01",
                control_id=control_id, version="2.5.1", channel="adt",
                patients=(hashlib.sha256(control_id.encode()).hexdigest(),)))
        stored = self.store.write(batch)
        processed = [Processed(o.message_id, "adt", deliveries=(
            NewDelivery("archive", QUEUED, b"x" * 1000, f"archive/{o.message_id}.hl7"),
            NewDelivery("downstream", QUEUED, b"y" * 1000))) for o in stored]
        now = utcnow()
        attempts = [[Attempt(d.id, d.message_id, now, 1.0, True, SENT, response=b"MSA|AA|x") for d in head]
                    for head in self.heads]
        with self.store.joined() if joined else nullcontext():
            self.store.save_processing(processed)
            for kind in attempts:
                if kind:
                    self.store.record_attempts(kind)
        self.heads = self.store.queue(QUEUES)

    def run(self, cycles: int, joined: bool) -> dict:
        started, cpu = time.perf_counter(), time.process_time()
        for _ in range(cycles):
            self.cycle(joined)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        return {"wall_ms_per_cycle": 1000 * wall / cycles, "cpu_us_per_msg": 1e6 * cpu / cycles / BATCH}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=200, help="cycles of 16 messages per round (default 200)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each mode, alternating (default 3)")
    parser.add_argument("--json", type=Path, metavar="FILE")
    args = parser.parse_args()
    results: dict[str, list] = {"joined": [], "separate": []}
    for _ in range(args.rounds):
        for mode in ("separate", "joined"):
            directory = Path(tempfile.mkdtemp(prefix="store-cycle-"))
            try:
                writer = Writer(directory)
                writer.run(5, mode == "joined")   # warm-up: statements compiled, pages cached
                results[mode].append(writer.run(args.cycles, mode == "joined"))
                writer.store.close()
            finally:
                shutil.rmtree(directory)
    print(f"{args.cycles} cycles of {BATCH} messages (store, processing with 2 deliveries, 2 attempts each), "
          f"{args.rounds} rounds, medians:")
    summary = {}
    for mode, runs in results.items():
        wall = statistics.median(r["wall_ms_per_cycle"] for r in runs)
        cpu = statistics.median(r["cpu_us_per_msg"] for r in runs)
        summary[mode] = {"wall_ms_per_cycle": wall, "cpu_us_per_msg": cpu, "runs": runs}
        print(f"  {mode:9} {wall:6.2f} ms a cycle ({1000 * wall / BATCH:4.0f} µs a message), "
              f"{cpu:4.0f} µs CPU a message")
    ratio = summary["separate"]["wall_ms_per_cycle"] / summary["joined"]["wall_ms_per_cycle"]
    print(f"  joined / separate: {ratio:.2f}x the cycles per second")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
