"""Queue leases and node heartbeats, on SQLite and PostgreSQL: the rules several engines rely on."""

import threading
from datetime import timedelta

import pytest
import sqlalchemy as sa

from interface_engine.store import Incoming, NewDelivery, Processed, Store, utcnow
from interface_engine.store.leases import Claim, Leases, Node
from interface_engine.store.schema import messages, nodes, queue_leases
from tests.messages import adt_a01

QUEUES = (("adt", "one"), ("adt", "two"))


def node(name: str, run: str = "run1") -> Node:
    return Node(name, run, 1000, "host-" + name, utcnow())


def claim(n: Node, queues=QUEUES, duration=15.0, channels=("adt",)) -> Claim:
    return Claim(n, tuple(queues), duration, 3 * duration, tuple(channels))


@pytest.fixture
def leases(store_url):
    store = Store(store_url)
    store.check_schema()
    yield Leases(store)
    store.close()


def renew(leases: Leases, c: Claim):
    return leases.renew([c])[0]


def expire(leases: Leases, queue):
    with leases.store.engine.begin() as conn:
        conn.execute(sa.update(queue_leases).where(queue_leases.c.channel == queue[0],
                                                   queue_leases.c.destination == queue[1])
                     .values(expires_at=utcnow() - timedelta(hours=1)))


def test_free_queues_are_taken_and_ours_are_renewed(leases):
    a = node("a")
    first = renew(leases, claim(a))
    assert first.held == set(QUEUES) and first.share == 2
    with leases.store.engine.connect() as conn:
        ends = dict(((c, d), e) for c, d, e in conn.execute(
            sa.select(queue_leases.c.channel, queue_leases.c.destination, queue_leases.c.expires_at)))
    assert renew(leases, claim(a)).held == set(QUEUES)
    with leases.store.engine.connect() as conn:
        later = dict(((c, d), e) for c, d, e in conn.execute(
            sa.select(queue_leases.c.channel, queue_leases.c.destination, queue_leases.c.expires_at)))
    assert all(later[q] >= ends[q] for q in QUEUES)


def test_a_live_lease_of_another_node_or_run_is_refused_an_expired_one_taken(leases):
    a, b = node("a"), node("b")
    renew(leases, claim(a))
    refused = renew(leases, claim(b))
    assert refused.held == set() and refused.share == 1   # two live nodes: one queue each
    expire(leases, QUEUES[1])
    assert renew(leases, claim(b)).held == {QUEUES[1]}
    # a's renewal keeps only what is still its own
    assert renew(leases, claim(a)).held == {QUEUES[0]}


def test_a_restarted_node_waits_for_its_old_leases_except_on_sqlite(leases):
    """On PostgreSQL the old run may live on elsewhere under the same name; a SQLite file has
    one engine, so the old run is dead and a restart after a crash takes its queues at once."""
    renew(leases, claim(node("a")))
    held = renew(leases, claim(node("a", run="run2"))).held
    assert held == (set() if leases.store.url.startswith("postgresql") else set(QUEUES))


def test_ours_are_kept_beyond_the_share_until_released(leases):
    a, b = node("a"), node("b")
    renew(leases, claim(a))
    renew(leases, claim(b))
    assert renew(leases, claim(a)).held == set(QUEUES)   # share 1, but a still delivers both
    leases.release([(a, (QUEUES[1],))])
    assert renew(leases, claim(b)).held == {QUEUES[1]}


def test_a_node_that_leaves_frees_its_queues_and_its_row(leases):
    a, b = node("a"), node("b")
    renew(leases, claim(a))
    leases.leave([a])
    with leases.store.engine.connect() as conn:
        assert conn.execute(sa.select(nodes.c.name)).scalars().all() == []
    assert renew(leases, claim(b)).held == set(QUEUES)


def test_messages_of_a_gone_node_are_waiting_for_a_live_one(leases, store_url):
    store = leases.store
    a, b = node("a"), node("b")
    renew(leases, claim(a))
    renew(leases, claim(b))
    ids = {}
    for name in ("a", "b"):
        store.node = name
        item = Incoming(adt_a01(f"FROM-{name}"), "test", "peer", "received", b"AA", channel="adt",
                        control_id=f"FROM-{name}")
        ids[name] = store.write([item])[0].message_id
    assert leases.waiting("a", ("adt",), 45.0, own=False) == []
    assert [r[0] for r in leases.waiting("a", ("adt",), 45.0, own=True)] == [ids["a"]]
    assert leases.waiting("a", ("oru",), 45.0, own=True) == []
    with store.engine.begin() as conn:   # b's heartbeat grows old
        conn.execute(sa.update(nodes).where(nodes.c.name == "b")
                     .values(seen_at=utcnow() - timedelta(minutes=5)))
    assert [r[0] for r in leases.waiting("a", ("adt",), 45.0, own=False)] == [ids["b"]]
    assert renew(leases, claim(a)).absent_waiting
    assert not renew(leases, claim(a, channels=("oru",))).absent_waiting


@pytest.mark.postgres
def test_a_lease_row_locked_by_another_engine_is_skipped_not_waited_for(postgres_url):
    leases = Leases(Store(postgres_url))
    leases.store.check_schema()
    renew(leases, claim(node("a")))
    expire(leases, QUEUES[0])
    other = leases.store.engine.connect()
    other.begin()
    other.execute(sa.select(queue_leases).where(queue_leases.c.destination == "one").with_for_update())
    try:
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("r", renew(leases, claim(node("b")))))
        t.start()
        t.join(5)
        assert not t.is_alive(), "the renewal waited for a locked lease row"
        assert result["r"].held == set()   # "one" is locked, "two" is a's and live
        assert result["r"].skipped == {QUEUES[0]}
    finally:
        other.rollback()
        other.close()
    assert renew(leases, claim(node("b"))).held == {QUEUES[0]}
    leases.store.close()


@pytest.mark.postgres
def test_two_engines_racing_for_one_message_process_it_once(postgres_url):
    first, second = Store(postgres_url), Store(postgres_url)
    first.check_schema()
    mid = first.write([Incoming(adt_a01("RACE"), "test", "peer", "received", b"AA",
                                channel="adt", control_id="RACE")])[0].message_id
    result = Processed(mid, "adt", deliveries=(NewDelivery("one", "queued", b"x"),))
    holder = first.engine.connect()
    holder.begin()   # the first engine's processing, not yet committed
    holder.execute(sa.update(messages).where(messages.c.id == mid).values(state="queued"))
    answers = {}
    t = threading.Thread(target=lambda: answers.setdefault("second", second.save_processing([result])))
    t.start()
    t.join(1)
    assert t.is_alive(), "the second engine did not wait for the first one's transaction"
    holder.commit()
    holder.close()
    t.join(5)
    assert answers["second"] == [False]
    assert second.count_deliveries(message_id=mid) == 0
    first.close()
    second.close()
