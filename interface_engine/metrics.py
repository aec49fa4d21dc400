"""Prometheus metrics: what the store holds, read at scrape time, and what this process measured.

Counts of messages, deliveries and queues come from the store (`Store.status`, index
reads only) when they are scraped, so they are the numbers `interface-engine status`
shows, whichever engine did the work and across restarts. Latencies, errors and TLS
refusals are measured in this process on the hot path: each component takes its
labelled child once (a histogram observe is about a microsecond, with no lookup).

The metrics live in a registry of their own, never in prometheus_client's global one,
so several engines (or tests) in one process do not mix their numbers.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from twisted.logger import Logger

log = Logger()

PREFIX = "interface_engine"
ACK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DELIVERY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
COMMIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

#: Error kinds (the `kind` label of interface_engine_errors_total).
REJECTED_HEADER = "rejected_header"        # MSH cannot be accepted (AR)
REJECTED_LIMITS = "rejected_limits"        # too many segments or repetitions (AR)
REJECTED_UNROUTED = "rejected_unrouted"    # no channel takes the message type (AR, code 200)
REJECTED_CONFLICT = "rejected_conflict"    # control id reused with other content (AE)
REJECTED_OVERSIZED = "rejected_oversized"  # frame over max_frame (AR, nothing stored)
DELIVERY_FAILED = "delivery_failed"        # an attempt that did not deliver (retried or not)
DEAD_LETTERED = "dead_lettered"            # a delivery given up (on_failure = "skip")
TEMPLATE = "template"                      # a payload or target that did not render
#: The kinds an error_rate alert counts against a channel or destination.
DELIVERY_ERRORS = (DELIVERY_FAILED, TEMPLATE)


class Metrics:
    """The engine's metrics. `store` (optional) feeds the counts read at scrape time."""

    def __init__(self, store=None):
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.ack_latency = Histogram(
            f"{PREFIX}_ack_latency_seconds", "From a complete MLLP frame to its answer written",
            ["listener"], buckets=ACK_BUCKETS, registry=r)
        self.delivery_latency = Histogram(
            f"{PREFIX}_delivery_seconds", "Duration of one delivery attempt (rendering included)",
            ["channel", "destination"], buckets=DELIVERY_BUCKETS, registry=r)
        self.commit_latency = Histogram(
            f"{PREFIX}_store_commit_seconds", "One group-commit batch of one kind of store work",
            ["work"], buckets=COMMIT_BUCKETS, registry=r)
        self.errors = Counter(
            f"{PREFIX}_errors", "Rejected messages, failed attempts, dead letters, template errors",
            ["kind", "channel", "destination"], registry=r)
        self.tls_failures = Counter(
            f"{PREFIX}_tls_handshake_failures", "TLS handshakes a listener refused or that failed",
            ["listener"], registry=r)
        if store is not None:
            r.register(StoreCollector(store))

    def error(self, kind: str, channel: str = "", destination: str = ""):
        """Count one error; for rare events (the hot paths keep children, see `errors.labels`)."""
        self.errors.labels(kind, channel or "", destination or "").inc()

    def delivery_errors(self) -> dict[tuple[str, str], float]:
        """Delivery errors so far per (channel, destination), for error_rate alerts."""
        totals: dict[tuple[str, str], float] = {}
        for family in self.errors.collect():
            for sample in family.samples:
                labels = sample.labels
                if sample.name.endswith("_total") and labels["kind"] in DELIVERY_ERRORS:
                    key = (labels["channel"], labels["destination"])
                    totals[key] = totals.get(key, 0.0) + sample.value
        return totals

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type.

        Blocking (it reads the store): call it from a thread, e.g. `threads.deferToThread`.
        """
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class StoreCollector:
    """Counts from the store, read when scraped: the same numbers as `interface-engine status`."""

    def __init__(self, store):
        self.store = store

    def describe(self):
        # Named here so that registering never reads the store.
        return list(self._families())

    @staticmethod
    def _families():
        yield GaugeMetricFamily(f"{PREFIX}_messages", "Stored messages by channel and state",
                                labels=["channel", "state"])
        yield GaugeMetricFamily(f"{PREFIX}_deliveries", "Deliveries by channel, destination and state",
                                labels=["channel", "destination", "state"])
        yield GaugeMetricFamily(f"{PREFIX}_queue_depth", "Deliveries waiting (queued or in error)",
                                labels=["channel", "destination"])
        yield GaugeMetricFamily(f"{PREFIX}_queue_oldest_age_seconds",
                                "Age of the oldest waiting delivery (0 when none waits)",
                                labels=["channel", "destination"])
        yield GaugeMetricFamily(f"{PREFIX}_store_up", "1 if the store could be read for this scrape")

    def collect(self):
        messages, deliveries, depth, age, up = self._families()
        try:
            status = self.store.status()
        except Exception as e:  # a scrape must answer, and say that the store did not
            log.error("metrics: cannot read the store's counts: {error}",
                      error=str(e).splitlines()[0] if str(e) else type(e).__name__)
            up.add_metric([], 0)
            return [up]
        for channel, states in status.channels.items():
            for state, n in states.items():
                messages.add_metric([channel or "", state], n)
        for (channel, destination), entry in status.destinations.items():
            labels = [channel or "", destination]
            for state, n in entry.items():
                if state not in ("queue_depth", "oldest_queued_age_s"):
                    deliveries.add_metric(labels + [state], n)
            depth.add_metric(labels, entry["queue_depth"])
            age.add_metric(labels, entry["oldest_queued_age_s"] or 0.0)
        up.add_metric([], 1)
        return [messages, deliveries, depth, age, up]
