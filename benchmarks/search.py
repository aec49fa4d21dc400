"""Search benchmark: lookups by control id and by patient in a store of 1,000,000 messages.

The store is filled straight through SQL (realistic rows: ~700-byte ADT and ORU
messages from a few senders over 30 days, one patient index entry each, about
five messages per patient), never over MLLP, then searched through
`Store.search`, the code behind `interface-engine messages search`. Cold: every
key looked up for the first time; warm: the same keys again. The OS file cache
is not dropped, so "cold" means cold for the database's own caches only.

`--write-cost` measures instead what the patient index adds to ingest: reading
PID-3 and hashing it per message, and `Store.write` batches with and without
index entries.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ingest import scratch_schema  # noqa: E402
from interface_engine import hl7  # noqa: E402
from interface_engine.hl7.patients import patient_ids  # noqa: E402
from interface_engine.keys import Keys  # noqa: E402
from interface_engine.store import Incoming, Store  # noqa: E402
from interface_engine.store.search import Criteria  # noqa: E402
from interface_engine.store.store import utcnow  # noqa: E402

POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
SENDERS = [("ADT_APP", "GENERAL_HOSP"), ("ADT_APP", "EAST_CAMPUS"), ("LAB_APP", "GENERAL_LAB"),
           ("REG_APP", "CLINIC"), ("ORDERS", "GENERAL_HOSP")]
COLUMNS = ("id", "received_at", "listener", "peer", "state", "error", "sending_application",
           "sending_facility", "receiving_application", "receiving_facility", "message_type",
           "trigger_event", "control_id", "version", "size", "sha256", "raw", "ack", "duplicates",
           "channel", "filter_reason")


def control_id(n: int) -> str:
    return f"BENCH{n:08d}"


def mrn(n: int) -> str:
    return f"MRN{n:07d}"


def message(n: int, patient: int, app: str, fac: str, kind: str) -> bytes:
    """A synthetic message (invented people and places), about 700 bytes."""
    head = f"MSH|^~\\&|{app}|{fac}|ENGINE|HUB|20260101120000||{kind}|{control_id(n)}|P|2.5.1\r"
    pid = f"PID|1||{mrn(patient)}^^^GEN^MR||DOE^JANE^Q||19800101|F|||1 MAIN ST^^SPRINGFIELD^ST^00000||555-0100\r"
    if kind.startswith("ORU"):
        body = ("OBR|1|ORD1001|FILORD1001|24331-1^LIPID PANEL^LN|||20260103093000|||||||||||||||"
                "20260103100000|||F\rOBX|1|NM|2093-3^CHOLESTEROL^LN||182|mg/dL^^UCUM|<200|N|||F\r"
                "OBX|2|NM|2571-8^TRIGLYCERIDE^LN||95|mg/dL^^UCUM|<150|N|||F\rNTE|1||Fasting sample\r")
    else:
        body = ("EVN|A01|20260101120000\rNK1|1|DOE^JOHN|SPO|1 MAIN ST^^SPRINGFIELD^ST^00000|555-0101\r"
                "PV1|1|I|WARD1^101^A^GEN||||1234^WELBY^MARCUS|||MED||||ADM|||1234^WELBY^MARCUS|IN\r"
                "AL1|1|DA|PCN^PENICILLIN^L|SV|HIVES\rDG1|1||I10^ESSENTIAL HYPERTENSION^I10||20260101|A\r")
    return (head + pid + body).encode()


def rows(count: int, keys: Keys, start: datetime, stamp):
    """(message row, patient index row) for ids 1..count, oldest first."""
    step = timedelta(days=30) / count
    patients = max(1, count // 5)
    rng = random.Random(7)
    for n in range(1, count + 1):
        app, fac = SENDERS[n % len(SENDERS)]
        kind = "ORU^R01^ORU_R01" if app == "LAB_APP" else ("ADT^A08^ADT_A01" if n % 7 == 0 else "ADT^A01^ADT_A01")
        patient = rng.randrange(patients)
        raw = message(n, patient, app, fac, kind)
        mtype, trigger = kind.split("^")[:2]
        ack = f"MSH|^~\\&|ENGINE|HUB|{app}|{fac}|20260101120000||ACK^{trigger}|A{n}|P|2.5.1\rMSA|AA|{control_id(n)}\r"
        yield ((n, stamp(start + step * n), "main", "10.0.0.5:40000", "sent", None, app, fac, "ENGINE", "HUB",
                mtype, trigger, control_id(n), "2.5.1", len(raw), hashlib.sha256(raw).hexdigest(), raw,
                ack.encode(), 0, "lab" if app == "LAB_APP" else "adt", None),
               (n, keys.patient_hash(mrn(patient), "GEN")))


def fill(store: Store, count: int, keys: Keys, chunk: int = 20_000) -> float:
    began = time.perf_counter()
    stamp = store._datetime if store._sqlite else (lambda value: value)
    raw_conn = store.engine.raw_connection()
    try:
        cur = raw_conn.cursor()
        if store._sqlite:
            cur.execute("PRAGMA synchronous=OFF")
            sql = f"INSERT INTO messages ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
            messages, patients = [], []
            for message_row, patient_row in rows(count, keys, utcnow() - timedelta(days=30), stamp):
                messages.append(message_row)
                patients.append(patient_row)
                if len(messages) == chunk:
                    cur.executemany(sql, messages)
                    cur.executemany("INSERT INTO message_patients VALUES (?, ?)", patients)
                    raw_conn.commit()
                    messages, patients = [], []
            if messages:
                cur.executemany(sql, messages)
                cur.executemany("INSERT INTO message_patients VALUES (?, ?)", patients)
            raw_conn.commit()
            cur.execute("ANALYZE")
        else:
            patients = []
            with cur.copy(f"COPY messages ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                for message_row, patient_row in rows(count, keys, utcnow() - timedelta(days=30), stamp):
                    copy.write_row(message_row)
                    patients.append(patient_row)
            with cur.copy("COPY message_patients (message_id, patient_hash) FROM STDIN") as copy:
                for patient_row in patients:
                    copy.write_row(patient_row)
            cur.execute("SELECT setval(pg_get_serial_sequence('messages', 'id'), %s)", (count,))
            raw_conn.commit()
            cur.execute("ANALYZE")
            raw_conn.commit()
    finally:
        raw_conn.close()
    return time.perf_counter() - began


def timed(store: Store, criteria: list[Criteria], expect_found: bool) -> tuple[list[float], list[float]]:
    """Wall-clock and this thread's CPU milliseconds per lookup (on a shared machine the
    difference is mostly time spent waiting for a core)."""
    wall, cpu = [], []
    for c in criteria:
        began, began_cpu = time.perf_counter(), time.thread_time()
        found = store.search(c)
        wall.append((time.perf_counter() - began) * 1000)
        cpu.append((time.thread_time() - began_cpu) * 1000)
        if expect_found and not found:
            raise SystemExit(f"a lookup found nothing: {c}")
    return wall, cpu


def summary(times: tuple[list[float], list[float]]) -> str:
    wall, cpu = sorted(times[0]), sorted(times[1])
    p95 = wall[min(len(wall) - 1, int(len(wall) * 0.95))]
    return (f"median {statistics.median(wall):6.2f} ms  p95 {p95:6.2f} ms  max {wall[-1]:6.2f} ms  "
            f"(CPU median {statistics.median(cpu):5.2f} ms)")


def measure(name: str, url: str, count: int, lookups: int, keys: Keys) -> None:
    store = Store(url)
    store.upgrade()
    seconds = fill(store, count, keys)
    print(f"\n== {name}: {count:,} messages filled in {seconds:.0f} s")
    store.close()
    store = Store(url)  # a new connection: nothing of the fill in the database's own cache
    rng = random.Random(11)
    picks = rng.sample(range(1, count + 1), 2 * lookups)
    by_id = [Criteria(control_id=control_id(n)) for n in picks[:lookups]]
    patients = max(1, count // 5)
    by_patient = [Criteria(patient_hash=keys.patient_hash(mrn(p), "GEN"))
                  for p in rng.sample(range(patients), lookups)]
    store.search(Criteria(limit=1))  # open the connection outside the timings
    for label, criteria in (("control id", by_id), ("patient", by_patient)):
        cold = timed(store, criteria, expect_found=(label == "control id"))
        warm = timed(store, criteria, expect_found=(label == "control id"))
        print(f"  {label:10}  cold  {summary(cold)}   ({lookups} lookups)")
        print(f"  {label:10}  warm  {summary(warm)}")
    store.close()


def write_cost(batches: int, batch: int, keys: Keys) -> None:
    """What the patient index adds to ingest: extraction + hash per message, and Store.write."""
    raw = message(1, 42, "ADT_APP", "GENERAL_HOSP", "ADT^A01^ADT_A01")
    header = hl7.peek(raw)
    n = 50_000
    began = time.perf_counter()
    for _ in range(n):
        tuple(keys.patient_hash(i, a) for i, a in patient_ids(raw, header))
    print(f"PID-3 read and hashed: {(time.perf_counter() - began) / n * 1e6:.1f} µs per message")
    with tempfile.TemporaryDirectory() as folder:
        for label, with_patients in (("without index entries", False), ("with index entries", True)):
            store = Store(f"sqlite:///{folder}/{label.replace(' ', '-')}.db")
            store.upgrade()
            hashes = (keys.patient_hash("MRN0000042", "GEN"),) if with_patients else ()
            counter = 0
            began = time.perf_counter()
            for _ in range(batches):
                items = []
                for _ in range(batch):
                    counter += 1
                    items.append(Incoming(raw=raw, listener="l", peer="p", state="received", ack=b"A",
                                          control_id=f"W{counter}", patients=hashes))
                store.write(items)
            elapsed = time.perf_counter() - began
            print(f"Store.write on SQLite, {label}: {batches * batch / elapsed:,.0f} msg/s "
                  f"({batches} batches of {batch})")
            store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=1_000_000, help="messages in each store (default 1,000,000)")
    ap.add_argument("--lookups", type=int, default=500, help="lookups per kind, cold and warm (default 500)")
    ap.add_argument("--postgres", default=POSTGRES_URL,
                    help="PostgreSQL database to fill, in a schema of its own dropped after "
                         f"(default {POSTGRES_URL}); 'none' to skip")
    ap.add_argument("--write-cost", action="store_true", help="measure the patient index's cost to ingest instead")
    args = ap.parse_args()
    keys = Keys("bench", secrets.token_bytes(32), secrets.token_bytes(32))
    print(f"machine: nproc={os.cpu_count()}  python={sys.version.split()[0]}  "
          f"load average {os.getloadavg()[0]:.1f} at start")
    if args.write_cost:
        write_cost(200, 100, keys)
        return
    with tempfile.TemporaryDirectory() as folder:
        measure("SQLite", f"sqlite:///{folder}/search.db", args.messages, args.lookups, keys)
    if args.postgres != "none":
        with scratch_schema(args.postgres, "bench_search") as url:
            measure("PostgreSQL", url, args.messages, args.lookups, keys)


if __name__ == "__main__":
    main()
