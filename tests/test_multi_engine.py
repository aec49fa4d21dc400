"""Two engine processes on one PostgreSQL store: every delivery done once, in queue order, and a
takeover within seconds when one of them is killed."""

import threading
import time

import pytest
import sqlalchemy as sa

from interface_engine import hl7
from interface_engine.mllp import MLLPClient, MLLPError
from interface_engine.mllp.framing import END_BLOCK, START_BLOCK
from interface_engine.store import Incoming
from interface_engine.store.schema import deliveries, messages, queue_leases
from tests.messages import adt_a01, oru_r01
from tests.receiver import Receiver

pytestmark = pytest.mark.postgres

LEASE = 4.0   # seconds: a takeover is due within one lease and one renewal
#: one channel per message type, each with one MLLP destination: four destination queues
KINDS = ("ADT", "ORU", "ORM", "SIU")
QUEUES = [(kind.lower(), "out") for kind in KINDS]
CONNECTIONS = 4   # per engine
WINDOW = 16       # frames a sender has in flight


def channel(kind: str, port: int) -> str:
    return (f'name = "{kind.lower()}"\n[source]\ntype = "mllp"\nlistener = "test"\n'
            f'message_types = ["{kind}"]\n[[destinations]]\nname = "out"\ntype = "mllp"\n'
            f'host = "127.0.0.1"\nport = {port}\ntemplate = "hl7/forward.hl7.j2"\n'
            f'ack_timeout = "2s"\nconnect_timeout = "1s"\n')


def message(kind: str, cid: str) -> bytes:
    if kind == "ORU":
        return oru_r01(cid)
    return adt_a01(cid).replace(b"|ADT^A01^ADT_A01|", {"ADT": b"|ADT^A01^ADT_A01|", "ORM": b"|ORM^O01^ORM_O01|",
                                                       "SIU": b"|SIU^S12^SIU_S12|"}[kind])


class Cluster:
    """Four downstream receivers, four channels of one destination each, two engines on one store."""

    def __init__(self, tmp_path, engine_factory, store_url):
        self.receivers = {q: Receiver().start() for q in QUEUES}
        channels, mappings = tmp_path / "channels", tmp_path / "mappings" / "hl7"
        channels.mkdir()
        mappings.mkdir(parents=True)
        (mappings / "forward.hl7.j2").write_text("{{ msg | hl7_set('MSH-5', 'DOWNSTREAM') }}\n")
        for kind, queue in zip(KINDS, QUEUES):
            (channels / f"{queue[0]}.toml").write_text(channel(kind, self.receivers[queue].port))
        # One key file for both, as for engines in production: each reads what the other sealed.
        extra = (f'[channels]\ndirectory = "{channels}"\nmappings = "{mappings.parent}"\n'
                 f'[keys]\nfile = "{tmp_path / "keys.json"}"\n')
        self.engines = {n: engine_factory(store_url=store_url, extra=extra, workdir=tmp_path / n,
                                          engine={"node": n, "queue_lease": f"{LEASE}s",
                                                  "log_level": "info"})
                        for n in ("a", "b")}
        self.store = self.engines["a"].open_store()

    def close(self):
        for e in self.engines.values():
            e.stop()
        for r in self.receivers.values():
            r.stop()
        self.store.close()

    def owners(self) -> dict:
        with self.store.engine.connect() as conn:
            return dict(((c, d), o) for c, d, o in conn.execute(
                sa.select(queue_leases.c.channel, queue_leases.c.destination, queue_leases.c.owner)
                .where(queue_leases.c.expires_at > sa.func.timezone("utc", sa.func.now()))))

    def wait(self, condition, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.1)
        logs = "\n".join(e.log()[-2000:] for e in self.engines.values())
        raise AssertionError(f"timed out waiting for {what}\n{logs}")

    def balanced(self):
        """Both engines deliver, two queues each."""
        def check():
            owners = list(self.owners().values())
            return len(owners) == 4 and owners.count("a") == owners.count("b") == 2
        self.wait(check, 20, "the four queues shared two and two")

    def send(self, per_connection: int, acked: dict, sent: list, engines=("a", "b")):
        """Senders on every engine's listener, WINDOW frames in flight each; the types take turns.

        Returns the threads."""
        def sender(engine: str, n: int):
            try:
                with MLLPClient("127.0.0.1", self.engines[engine].port, timeout=15) as c:
                    for first in range(0, per_connection, WINDOW):
                        ids = [f"{engine}{n}-{i:05d}" for i in range(first, min(first + WINDOW, per_connection))]
                        c.send_raw(b"".join(START_BLOCK + message(KINDS[i % 4], cid) + END_BLOCK
                                            for i, cid in enumerate(ids, first)))
                        sent[0] += len(ids)
                        for i, cid in enumerate(ids, first):
                            answer = hl7.parse(c.receive())
                            if answer["MSA-1"] == "AA" and answer["MSA-2"] == cid:
                                acked[cid] = QUEUES[i % 4]
            except MLLPError:
                pass   # its engine was killed under it
        threads = [threading.Thread(target=sender, args=(e, n)) for e in engines for n in range(CONNECTIONS)]
        for t in threads:
            t.start()
        return threads

    def queue_order(self, queue) -> list[str]:
        """The control ids of one destination's deliveries, in queue (delivery id) order."""
        with self.store.engine.connect() as conn:
            return list(conn.execute(
                sa.select(messages.c.control_id).join(deliveries, deliveries.c.message_id == messages.c.id)
                .where(deliveries.c.channel == queue[0], deliveries.c.destination == queue[1])
                .order_by(deliveries.c.id)).scalars())

    def check_order(self, queue, arrived: list[str], repeats_allowed: int) -> int:
        """Arrival order is queue order; a repeat may only be the delivery just before it again."""
        once = [cid for k, cid in enumerate(arrived) if k == 0 or arrived[k - 1] != cid]
        repeats = len(arrived) - len(once)
        assert repeats <= repeats_allowed, f"{queue}: {repeats} repeated deliveries"
        assert len(set(once)) == len(once), f"{queue}: a message delivered twice, not in a row"
        assert once == self.queue_order(queue), f"{queue}: arrival order is not queue order"
        for sender in {cid.split("-")[0] for cid in once}:
            mine = [cid for cid in once if cid.startswith(sender + "-")]
            assert mine == sorted(mine), f"{queue}: messages of one connection out of order"
        return repeats


@pytest.fixture
def cluster(tmp_path, engine_factory, postgres_url):
    c = Cluster(tmp_path, engine_factory, postgres_url)
    yield c
    c.close()


def test_two_engines_deliver_each_message_once_in_queue_order(cluster):
    cluster.balanced()
    logged = {n: len(e.log()) for n, e in cluster.engines.items()}
    acked, sent = {}, [0]
    started = time.monotonic()
    for t in cluster.send(10_000 // (2 * CONNECTIONS), acked, sent):
        t.join(120)
    assert len(acked) == 10_000
    stored = time.monotonic() - started
    expected = {q: sum(1 for queue in acked.values() if queue == q) for q in QUEUES}
    # Generous: about a minute on a quiet 2-CPU machine, much longer when it is shared.
    cluster.wait(lambda: all(len(cluster.receivers[q].received) >= expected[q] for q in QUEUES), 300,
                 "every delivery")
    elapsed = time.monotonic() - started
    for q in QUEUES:
        arrived = cluster.receivers[q].control_ids()
        cluster.check_order(q, arrived, repeats_allowed=0)
        assert set(arrived) == {cid for cid, queue in acked.items() if queue == q}
    cluster.balanced()   # and the queues were shared all along: nothing moved
    for n, e in cluster.engines.items():
        assert "gives up" not in e.log()[logged[n]:], f"a queue moved while {n} was delivering"
    print(f"\n10,000 messages acknowledged in {stored:.1f}s and delivered by two engines in {elapsed:.1f}s")


def test_a_killed_engine_s_queues_and_messages_are_taken_over(cluster, postgres_url):
    cluster.balanced()
    b_queues = {q for q, o in cluster.owners().items() if o == "b"}
    acked, sent = {}, [0]
    threads = cluster.send(500, acked, sent)   # up to 4,000 messages
    while sent[0] < 1_500:
        time.sleep(0.01)
    cluster.engines["b"].kill()
    killed = time.monotonic()
    # What a crash can leave besides: messages b stored and answered, not yet through their channel.
    b_store = cluster.engines["b"].open_store(node="b")
    left = [f"LEFT-{i:02d}" for i in range(20)]
    b_store.write([Incoming(message("ADT", cid), "test", "127.0.0.1", "received", b"AA", channel="adt",
                            message_type="ADT", control_id=cid) for cid in left])
    b_store.close()
    acked.update((cid, ("adt", "out")) for cid in left)
    cluster.wait(lambda: list(cluster.owners().values()) == ["a"] * 4, 3 * LEASE,
                 "engine a to take over b's queues")
    takeover = time.monotonic() - killed
    assert takeover < LEASE + 3, takeover
    for t in threads:
        t.join(120)
    assert 1_500 < len(acked) < 4_000, len(acked)

    def all_delivered():
        arrived = {q: set(cluster.receivers[q].control_ids()) for q in QUEUES}
        return all(cid in arrived[q] for cid, q in acked.items())
    cluster.wait(all_delivered, 180, "every acknowledged message at its destination")
    cluster.wait(lambda: cluster.store.count_messages(state="received") == 0 and
                 cluster.store.count_deliveries(state="queued") == 0, 30, "every stored message delivered")
    assert cluster.store.count_messages(state="sent") == cluster.store.count_messages()
    repeats = {q[0]: cluster.check_order(q, cluster.receivers[q].control_ids(),
                                         repeats_allowed=1 if q in b_queues else 0) for q in QUEUES}
    print(f"\ntakeover {takeover:.1f}s after SIGKILL; repeated deliveries per queue {repeats}; "
          f"{len(acked) - len(left)} acknowledged")
