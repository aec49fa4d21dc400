"""Crash durability: every message whose AA reached the sender survives SIGKILL, exactly once."""

import threading
import time

import pytest

from interface_engine import hl7
from interface_engine.mllp import MLLPClient, MLLPError
from interface_engine.store import Store
from tests.messages import adt_a01

CONNECTIONS = 8
PER_CONNECTION = 700  # 5,600 in all; the kill lands somewhere in the middle


@pytest.mark.slow
def test_sigkill_loses_no_acknowledged_message(store_url, engine_factory, tmp_path):
    engine = engine_factory(store_url=store_url)
    acked: list[set[str]] = [set() for _ in range(CONNECTIONS)]
    sent = [0] * CONNECTIONS

    def sender(n):
        try:
            with MLLPClient("127.0.0.1", engine.port, timeout=10) as c:
                for i in range(PER_CONNECTION):
                    cid = f"K{n}-{i}"
                    sent[n] += 1
                    answer = hl7.parse(c.send(adt_a01(cid, mrn=f"MRN{n}{i}")))
                    if answer["MSA-1"] == "AA" and answer["MSA-2"] == cid:
                        acked[n].add(cid)
        except MLLPError:
            pass  # the engine was killed under us: expected

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(CONNECTIONS)]
    for t in threads:
        t.start()
    while sum(sent) < CONNECTIONS * PER_CONNECTION // 2:
        time.sleep(0.01)
    engine.kill()
    for t in threads:
        t.join(30)
    confirmed = set().union(*acked)
    assert 1000 < len(confirmed) < CONNECTIONS * PER_CONNECTION, len(confirmed)

    engine.start()  # a restart after the crash opens the same store and serves again
    with MLLPClient("127.0.0.1", engine.port) as c:
        assert hl7.parse(c.send(adt_a01("AFTER-RESTART")))["MSA-1"] == "AA"
    assert engine.stop() == 0

    store = Store(store_url)
    rows = store.list_messages(limit=100_000)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["control_id"]] = counts.get(r["control_id"], 0) + 1
    lost = [cid for cid in confirmed if counts.get(cid, 0) != 1]
    assert not lost, f"{len(lost)} acknowledged messages are missing or stored twice"
    assert all(n == 1 for n in counts.values())
