"""Metrics of a real engine process: the counts the store shows, one latency per message, errors by kind."""

from __future__ import annotations

import http.client
from urllib.parse import urlsplit

import pytest
from prometheus_client.parser import text_string_to_metric_families

from interface_engine.metrics import Metrics
from interface_engine.store.search import DELIVERY_STATES
from tests.messages import adt_a01
from tests.pki import TestCA
from tests.receiver import Receiver
from tests.test_channels_e2e import Setup, adt_channel
from tests.test_cli import cli
from tests.test_status import busy  # noqa: F401  (a store with every kind of count, SQLite and PostgreSQL)
from tests.test_tls import openssl_client, try_hl7

class Harness(Setup):
    """The channels end-to-end setup, scraped as Prometheus does: GET /metrics with a viewer token."""

    def start(self, extra: str = "", **listener):
        channels = f'[channels]\ndirectory = "{self.channels}"\nmappings = "{self.mappings}"\n'
        self.engine = self.engine_factory(listener=listener or None, extra=channels + extra)
        self.store = self.engine.open_store()
        self.token = cli("tokens", "create", "prometheus", "--role", "viewer", "--config",
                         self.engine.config_path).stdout.strip()
        self.wait(lambda: self._get("/metrics").status == 200, what="the token taken up")
        return self.engine

    def _get(self, path: str):
        url = urlsplit(self.engine.admin_url)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=15)
        conn.request("GET", path, headers={"Authorization": f"Bearer {self.token}"})
        answer = conn.getresponse()
        answer.body = answer.read()
        conn.close()
        return answer

    def scrape(self) -> Samples:
        answer = self._get("/metrics")
        assert answer.status == 200 and answer.getheader("Content-Type").startswith("text/plain")
        return Samples(answer.body.decode())


class Samples:
    """A scrape, parsed by prometheus_client's own parser."""

    def __init__(self, text: str):
        self.values = {(s.name, frozenset(s.labels.items())): s.value
                       for family in text_string_to_metric_families(text) for s in family.samples}

    def __call__(self, name: str, **labels) -> float | None:
        return self.values.get((name, frozenset(labels.items())))


def assert_store_counts(samples: Samples, status):
    """Every count `interface-engine status` shows is the metric's value, and no metric adds one."""
    for channel, states in status.channels.items():
        for state, n in states.items():
            assert samples("interface_engine_messages", channel=channel or "", state=state) == n
    for (channel, destination), entry in status.destinations.items():
        labels = {"channel": channel, "destination": destination}
        for state in DELIVERY_STATES:
            assert samples("interface_engine_deliveries", **labels, state=state) == entry[state]
        assert samples("interface_engine_queue_depth", **labels) == entry["queue_depth"]
        # read a moment apart: the age may have grown by a rounding step (0.1 s) in between
        assert samples("interface_engine_queue_oldest_age_seconds", **labels) == \
            pytest.approx(entry["oldest_queued_age_s"] or 0.0, abs=1.0)
    shown = sum(len(states) for states in status.channels.values())
    assert sum(1 for name, _ in samples.values if name == "interface_engine_messages") == shown
    assert samples("interface_engine_store_up") == 1


@pytest.fixture
def harness(tmp_path, engine_factory):
    return Harness(tmp_path, engine_factory)


def test_scraped_counts_are_the_stores_and_each_message_is_one_latency(harness, tmp_path):
    n = 25
    with Receiver() as downstream:
        harness.channel("adt", adt_channel(downstream.port, archive=tmp_path / "archive"))
        harness.start()
        ids = [f"MET{i}" for i in range(n)]
        assert [a[0] for a in harness.send(*[adt_a01(cid) for cid in ids])] == ["AA"] * n
        unrouted = adt_a01("MET-ORU").replace(b"ADT^A01^ADT_A01", b"ORU^R01^ORU_R01")
        assert harness.send(unrouted)[0][0] == "AR"
        harness.wait(lambda: harness.store.count_deliveries(state="sent") == 2 * n, what="all delivered")
        samples = harness.scrape()
    status = harness.store.status()
    assert_store_counts(samples, status)
    assert samples("interface_engine_messages", channel="adt", state="sent") == n
    assert samples("interface_engine_messages", channel="", state="rejected") == 1
    assert samples("interface_engine_deliveries", channel="adt", destination="downstream", state="sent") == n
    # one ACK per frame, one attempt per delivery, on the hot paths
    assert samples("interface_engine_ack_latency_seconds_count", listener="test") == n + 1
    for destination in ("downstream", "archive"):
        assert samples("interface_engine_delivery_seconds_count", channel="adt",
                       destination=destination) == n
    assert samples("interface_engine_errors_total", kind="rejected_unrouted", channel="",
                   destination="") == 1
    commits = samples("interface_engine_store_commit_seconds_count", work="write")
    assert 1 <= commits <= n + 1
    assert samples("interface_engine_store_commit_seconds_count", work="record_attempts") >= 1
    # The same numbers through the module API, on a store opened beside the engine.
    body, content_type = Metrics(harness.store).render()
    assert content_type.startswith("text/plain")
    assert_store_counts(Samples(body.decode()), harness.store.status())


def test_failed_attempts_dead_letters_and_template_errors_are_counted(harness):
    (harness.mappings / "hl7" / "broken.hl7.j2").write_text("{{ (msg['MSH-10'] | length) // 0 }}\n")
    with Receiver() as downstream:
        downstream.script(["AE", "AE"])
        harness.channel("adt", adt_channel(downstream.port, on_failure="skip", attempts=2) + """
[[destinations]]
name = "broken"
type = "mllp"
host = "127.0.0.1"
port = 9
template = "hl7/broken.hl7.j2"
[destinations.retry]
on_failure = "skip"
attempts = 1
""")
        harness.start()
        harness.send(adt_a01("ERR1"), adt_a01("ERR2"))
        harness.wait(lambda: harness.store.count_deliveries(state="dead") == 3, what="three dead letters")
        harness.wait(lambda: harness.store.count_deliveries(state="sent") == 1, what="ERR2 sent")
        samples = harness.scrape()
    errors = {(kind, destination): samples("interface_engine_errors_total", kind=kind, channel="adt",
                                          destination=destination)
              for kind in ("delivery_failed", "dead_lettered", "template")
              for destination in ("downstream", "broken")}
    assert errors == {("delivery_failed", "downstream"): 2, ("dead_lettered", "downstream"): 1,
                      ("template", "downstream"): 0,
                      # rendered at processing (2), rendered again at the one attempt each (2)
                      ("template", "broken"): 4, ("delivery_failed", "broken"): 2,
                      ("dead_lettered", "broken"): 2}
    assert samples("interface_engine_delivery_seconds_count", channel="adt", destination="downstream") == 3
    assert_store_counts(samples, harness.store.status())


def test_refused_tls_handshakes_are_counted_per_listener(harness, tmp_path):
    ca = TestCA(tmp_path / "pki")
    server = ca.issue("localhost", server=True)
    harness.start(tls={"cert": str(server.cert), "key": str(server.key), "client_ca": str(ca.cert)})
    for _ in range(3):   # no client certificate: refused in the handshake
        assert b"MSA" not in try_hl7(openssl_client(harness.engine.port, ca=ca.cert))
    harness.wait(lambda: harness.engine.log().count("refused TLS connection") == 3, what="three refusals")
    assert harness.scrape()("interface_engine_tls_handshake_failures_total", listener="test") == 3


def test_a_store_that_cannot_be_read_is_a_scrape_that_says_so(tmp_path):
    from interface_engine.store import Store

    store = Store(f"sqlite:///{tmp_path / 'missing' / 'store.db'}")
    samples = Samples(Metrics(store).render()[0].decode())
    assert samples("interface_engine_store_up") == 0
    assert not [name for name, _ in samples.values if name == "interface_engine_messages"]


def test_the_store_counts_are_the_same_on_both_stores(busy):
    store, _, _ = busy
    assert_store_counts(Samples(Metrics(store).render()[0].decode()), store.status())


def test_scrapes_during_a_load_run_follow_the_store_and_end_equal_to_it(harness, tmp_path):
    import threading

    n = 400
    with Receiver() as downstream:
        harness.channel("adt", adt_channel(downstream.port))
        harness.start()
        sent = threading.Thread(target=harness.send, args=[adt_a01(f"LOAD{i}") for i in range(n)])
        sent.start()
        seen = []
        while sent.is_alive():
            samples = harness.scrape()                       # while messages keep arriving
            seen.append(sum(samples("interface_engine_messages", channel="adt", state=s) or 0
                            for s in ("received", "queued", "sent")))
        sent.join()
        harness.wait(lambda: harness.store.count_deliveries(state="sent") == n, what="all delivered")
        final = harness.scrape()
    assert len(seen) >= 2 and seen == sorted(seen) and seen[-1] <= n     # never ahead of the store
    assert_store_counts(final, harness.store.status())
    assert final("interface_engine_ack_latency_seconds_count", listener="test") == n
