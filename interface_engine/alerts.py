"""Alerts: the [alerts] rules evaluated on a schedule, one notice when an incident starts and one when it ends.

Every `interval` the engine reads the store's counts in a thread (the same index reads
as `interface-engine status`, plus the newest message per channel for silence rules)
and compares them with each rule. An incident is one rule breached by one subject (a
destination queue, or a channel); it fires once, however many evaluations it lasts,
and resolves once when the condition clears. Each change is logged and audited at once
(`alert.fired`, `alert.resolved`) and queued for the webhook; a webhook that is down
keeps its notices queued, in order, for the next evaluation. Notices carry names and
numbers only, never message content.

Incidents live in memory: after a restart, one still going on fires again.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from fnmatch import fnmatchcase
from zoneinfo import ZoneInfo

from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.logger import Logger

from .config import AlertRule, AlertsConfig
from .store.store import utcnow

log = Logger()

FIRING, RESOLVED = "firing", "resolved"
#: error_rate counts the errors of the last minute (at least: the window is whole evaluations).
RATE_WINDOW = 60.0
#: Notices kept for a webhook that is down; past this the oldest are dropped (they are in the audit trail).
OUTBOX_LIMIT = 1000
_UNITS = {"queue_depth": "deliveries", "queue_age": "seconds", "error_rate": "errors per minute",
          "silence": "seconds"}


@dataclass(frozen=True)
class Snapshot:
    """What one evaluation sees: the store's counts and this engine's error counters."""

    at: datetime                                   # naive UTC, like the store's times
    status: object                                 # a store.search.Status
    errors: dict[tuple[str, str], float]           # delivery errors so far per (channel, destination)
    channels: tuple[str, ...] = ()                 # the engine's channels, for silence rules
    last_received: dict[str, datetime | None] | None = None


@dataclass(frozen=True)
class Notice:
    """One incident's start or end, as logged, audited and posted to the webhook."""

    status: str                 # firing or resolved
    rule: AlertRule
    channel: str
    destination: str | None
    value: float
    started_at: datetime
    at: datetime

    @property
    def subject(self) -> str:
        return f"{self.channel}/{self.destination}" if self.destination else self.channel

    def summary(self) -> str:
        rule, value = self.rule, self.value
        text = {"queue_depth": f"{value:g} deliveries waiting (over {rule.threshold:g})",
                "queue_age": f"oldest delivery waiting {value:.0f}s (over {rule.threshold:g}s)",
                "error_rate": f"{value:.1f} errors per minute (over {rule.threshold:g})",
                "silence": f"nothing received for {value:.0f}s (over {rule.threshold:g}s)"}[rule.kind]
        if self.status == RESOLVED:
            text = f"resolved, now {value:g} {_UNITS[rule.kind]}"
        return f"{rule.name}: {self.subject}: {text}"

    def payload(self, node: str) -> dict:
        return {"status": self.status, "rule": self.rule.name, "kind": self.rule.kind,
                "channel": self.channel, "destination": self.destination,
                "value": round(self.value, 3), "threshold": self.rule.threshold,
                "unit": _UNITS[self.rule.kind], "engine": node,
                "started_at": _iso(self.started_at),
                "resolved_at": _iso(self.at) if self.status == RESOLVED else None,
                "summary": self.summary()}


class Evaluator:
    """The rules against successive snapshots: which incidents start and which end."""

    def __init__(self, rules: tuple[AlertRule, ...], started: datetime):
        self.rules = rules
        self.started = started
        self.firing: dict[tuple[str, str, str | None], datetime] = {}
        self._samples: deque[tuple[datetime, dict]] = deque([(started, {})])

    def evaluate(self, snap: Snapshot) -> list[Notice]:
        rates = self._rates(snap)
        notices, seen = [], set()
        for rule in self.rules:
            for channel, destination, value, breached in self._measure(rule, snap, rates):
                key = (rule.name, channel, destination)
                seen.add(key)
                if breached and key not in self.firing:
                    self.firing[key] = snap.at
                    notices.append(Notice(FIRING, rule, channel, destination, value, snap.at, snap.at))
                elif not breached and key in self.firing:
                    notices.append(Notice(RESOLVED, rule, channel, destination, value,
                                          self.firing.pop(key), snap.at))
        rules = {rule.name: rule for rule in self.rules}
        for key in [k for k in self.firing if k not in seen]:   # its subject is gone: a queue emptied away
            name, channel, destination = key
            notices.append(Notice(RESOLVED, rules[name], channel, destination, 0.0,
                                  self.firing.pop(key), snap.at))
        return notices

    def _measure(self, rule: AlertRule, snap: Snapshot, rates):
        """(channel, destination, value, breached) for each subject the rule selects."""
        if rule.kind in ("queue_depth", "queue_age"):
            for (channel, destination), entry in snap.status.destinations.items():
                channel = channel or ""
                if fnmatchcase(channel, rule.channel) and fnmatchcase(destination, rule.destination):
                    value = float(entry["queue_depth"] if rule.kind == "queue_depth"
                                  else entry["oldest_queued_age_s"] or 0.0)
                    yield channel, destination, value, value > rule.threshold
        elif rule.kind == "error_rate":
            per_channel: dict[str, float] = {}
            for (channel, destination), rate in rates.items():
                if not fnmatchcase(channel, rule.channel):
                    continue
                if rule.destination is None:
                    per_channel[channel] = per_channel.get(channel, 0.0) + rate
                elif fnmatchcase(destination, rule.destination):
                    yield channel, destination, rate, rate > rule.threshold
            for channel, rate in per_channel.items():
                yield channel, None, rate, rate > rule.threshold
        else:
            for channel in snap.channels:
                if fnmatchcase(channel, rule.channel):
                    quiet = self._quiet(rule, snap, (snap.last_received or {}).get(channel))
                    yield channel, None, quiet, quiet > rule.threshold

    def _rates(self, snap: Snapshot) -> dict[tuple[str, str], float]:
        """Errors per minute over the last minute (or since the start), per (channel, destination)."""
        samples = self._samples
        samples.append((snap.at, snap.errors))
        while len(samples) > 2 and (snap.at - samples[1][0]).total_seconds() >= RATE_WINDOW:
            samples.popleft()
        since, before = samples[0]
        minutes = max((snap.at - since).total_seconds(), RATE_WINDOW) / 60.0
        return {key: (n - before.get(key, 0.0)) / minutes for key, n in snap.errors.items()}

    def _quiet(self, rule: AlertRule, snap: Snapshot, last: datetime | None) -> float:
        """Seconds without a message, counted within the rule's hours only (0 outside them)."""
        since = last or self.started
        if rule.hours is not None:
            start = window_start(snap.at, rule.hours, ZoneInfo(rule.timezone))
            if start is None:
                return 0.0
            since = max(since, start)
        return max(0.0, (snap.at - since).total_seconds())


def window_start(now: datetime, hours: tuple[int, int], zone: ZoneInfo) -> datetime | None:
    """When the current span of `hours` began (naive UTC), or None if `now` (naive UTC) is outside it."""
    local = now.replace(tzinfo=timezone.utc).astimezone(zone)
    minute = local.hour * 60 + local.minute
    begin, end = hours
    inside = begin <= minute < end if begin < end else minute >= begin or minute < end
    if not inside:
        return None
    day = local.date() if minute >= begin else local.date() - timedelta(days=1)
    start = datetime(day.year, day.month, day.day, begin // 60, begin % 60, tzinfo=zone)
    return start.astimezone(timezone.utc).replace(tzinfo=None)


def _iso(at: datetime) -> str:
    return at.replace(tzinfo=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class AlertService(service.Service):
    """Evaluates the rules every `interval` and tells the log, the audit trail and the webhook."""

    name = "alerts"

    def __init__(self, config: AlertsConfig, store, metrics, audit, reactor, node: str, channels=tuple):
        self.config, self.store, self.metrics, self.audit, self.reactor = config, store, metrics, audit, reactor
        self.node = node
        #: a callable naming the engine's current channels (they change at reload)
        self.channels = channels
        self.evaluator = Evaluator(config.rules, utcnow())
        self.outbox: deque[Notice] = deque()
        self._silence = any(rule.kind == "silence" for rule in config.rules)
        self._loop = task.LoopingCall(self.evaluate)
        self._loop.clock = reactor
        self._running: defer.Deferred | None = None
        self._http = None
        if config.webhook is not None:
            from treq.client import HTTPClient
            from twisted.web.client import Agent, HTTPConnectionPool

            pool = HTTPConnectionPool(reactor, persistent=False)
            self._http = HTTPClient(Agent(reactor, pool=pool, connectTimeout=config.timeout))

    def startService(self):
        super().startService()
        self._loop.start(self.config.interval, now=False)

    def stopService(self):
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        return self._running

    def evaluate(self) -> defer.Deferred:
        """One evaluation; the LoopingCall waits for it, so two never overlap."""
        channels = tuple(self.channels()) if self._silence else ()
        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self._read, channels)
        d.addCallback(self._judge)
        d.addCallback(lambda _: self._post())
        d.addErrback(lambda f: log.error("alert evaluation failed: {error}; trying again at the next one",
                                         error=_first_line(f.getErrorMessage()) or f.type.__name__))
        d.addBoth(self._finished)
        self._running = d
        return d

    def _finished(self, _):
        self._running = None

    def _read(self, channels) -> Snapshot:
        return Snapshot(utcnow(), self.store.status(), self.metrics.delivery_errors(), channels,
                        self.store.last_received(channels) if channels else None)

    def _judge(self, snap: Snapshot):
        for notice in self.evaluator.evaluate(snap):
            if notice.status == FIRING:
                log.warn("alert {summary}", summary=notice.summary())
            else:
                log.info("alert {summary}", summary=notice.summary())
            self._audit(notice)
            if self._http is not None:
                if len(self.outbox) >= OUTBOX_LIMIT:
                    log.error("alert webhook: {n} notices waiting; dropping the oldest", n=len(self.outbox))
                    self.outbox.popleft()
                self.outbox.append(notice)

    def _audit(self, notice: Notice):
        audit, payload = self.audit, notice.payload(self.node)
        detail = {key: payload[key] for key in ("kind", "channel", "destination", "value", "threshold",
                                                "started_at", "resolved_at") if payload[key] is not None}
        d = threads.deferToThread(audit.record, f"alert.{'fired' if notice.status == FIRING else 'resolved'}",
                                  actor=audit.actor, object_type="alert", object_id=notice.rule.name,
                                  source=audit.source, detail=detail)
        d.addErrback(lambda f: log.error("could not audit an alert: {error}", error=f.getErrorMessage()))

    @defer.inlineCallbacks
    def _post(self):
        """Send the waiting notices in order; stop at the first failure and keep it for next time."""
        while self.outbox and self.running:
            notice = self.outbox[0]
            headers = {"Content-Type": ["application/json"]}
            if self.config.token:
                headers["Authorization"] = [f"Bearer {self.config.token}"]
            try:
                body = json.dumps(notice.payload(self.node)).encode()
                response = yield self._http.post(self.config.webhook, data=body, headers=headers,
                                                 timeout=self.config.timeout)
                yield response.content()
            except Exception as e:
                log.warn("alert webhook unreachable ({error}); {n} notice(s) wait for the next evaluation",
                         error=_first_line(str(e)) or type(e).__name__, n=len(self.outbox))
                return
            if not 200 <= response.code < 300:
                log.warn("alert webhook answered HTTP {code}; {n} notice(s) wait for the next evaluation",
                         code=response.code, n=len(self.outbox))
                return
            self.outbox.popleft()


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text and text.strip() else ""
