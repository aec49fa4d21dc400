"""Alerts: one notice per incident to a real webhook, its resolution, the audit trail, the rules' arithmetic."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from zoneinfo import ZoneInfo

import pytest

from interface_engine.alerts import FIRING, RESOLVED, Evaluator, Snapshot, window_start
from interface_engine.config import ConfigError, parse
from interface_engine.store.search import Status
from tests.messages import adt_a01
from tests.receiver import Receiver
from tests.test_channels_e2e import Setup, adt_channel


class Webhook:
    """A real HTTP receiver on 127.0.0.1: records every POST, answers with a scripted status."""

    def __init__(self, answers=()):
        self.posts: list[dict] = []
        self.headers: list[dict] = []
        self.answers = list(answers)   # statuses for the first requests, then 200
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = hook.answers.pop(0) if hook.answers else 200
                if status == 200:
                    hook.posts.append(json.loads(body))
                    hook.headers.append(dict(self.headers))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


class AlertSetup(Setup):
    def start(self, alerts: str):
        extra = f'[channels]\ndirectory = "{self.channels}"\nmappings = "{self.mappings}"\n' + alerts
        self.engine = self.engine_factory(extra=extra)
        self.store = self.engine.open_store()
        return self.engine

    def audited(self) -> list[tuple[str, str, dict]]:
        with sqlite3.connect(self.engine.store_url.removeprefix("sqlite:///")) as db:
            rows = db.execute("SELECT action, object_id, detail FROM audit_events "
                              "WHERE action LIKE 'alert.%' ORDER BY id").fetchall()
        return [(action, rule, json.loads(detail)) for action, rule, detail in rows]


@pytest.fixture
def setup(tmp_path, engine_factory):
    return AlertSetup(tmp_path, engine_factory)


def queue_age_alerts(url: str, token_file=None) -> str:
    token = f'token = "file:{token_file}"\n' if token_file else ""
    return f"""
[alerts]
webhook = "{url}"
{token}interval = "200ms"
timeout = "2s"
[[alerts.rules]]
name = "downstream stuck"
kind = "queue_age"
channel = "adt"
destination = "*"
older_than = "1s"
"""


def test_a_destination_down_fires_once_and_resolves_once_when_it_is_back(setup, webhook, tmp_path):
    (tmp_path / "token").write_text("s3cret-token\n")
    downstream = Receiver().start()
    port = downstream.port
    downstream.stop()
    setup.channel("adt", adt_channel(port, attempts=50))
    setup.start(queue_age_alerts(webhook.url, tmp_path / "token"))
    setup.send(*[adt_a01(f"ALERT{i}") for i in range(5)])
    setup.wait(lambda: webhook.posts, what="the alert at the webhook")
    time.sleep(1.5)   # several evaluations while the incident lasts: still one notice
    assert len(webhook.posts) == 1
    fired = webhook.posts[0]
    assert fired["status"] == "firing" and fired["rule"] == "downstream stuck"
    assert (fired["kind"], fired["channel"], fired["destination"]) == ("queue_age", "adt", "downstream")
    assert fired["value"] > 1 and fired["threshold"] == 1 and fired["unit"] == "seconds"
    assert fired["resolved_at"] is None and fired["started_at"].endswith("Z")
    assert webhook.headers[0]["Authorization"] == "Bearer s3cret-token"
    downstream = Receiver(port=port).start()
    try:
        setup.wait(lambda: len(webhook.posts) == 2, what="the resolve notice")
        time.sleep(0.6)
    finally:
        downstream.stop()
    assert len(webhook.posts) == 2
    resolved = webhook.posts[1]
    assert resolved["status"] == "resolved" and resolved["started_at"] == fired["started_at"]
    assert resolved["value"] == 0 and resolved["resolved_at"] >= resolved["started_at"]
    setup.wait(lambda: len(setup.audited()) == 2, what="both notices audited")
    (a1, rule1, d1), (a2, rule2, d2) = setup.audited()
    assert (a1, a2, rule1, rule2) == ("alert.fired", "alert.resolved", "downstream stuck", "downstream stuck")
    assert d1["destination"] == "downstream" and "resolved_at" in d2
    log = setup.engine.log()
    assert log.count("alert downstream stuck: adt/downstream: oldest delivery waiting") == 1
    assert log.count("alert downstream stuck: adt/downstream: resolved") == 1
    assert "s3cret-token" not in log


def test_a_webhook_that_is_down_gets_the_notice_at_a_later_evaluation(setup):
    hook = Webhook(answers=[503, 503])
    try:
        downstream = Receiver().start()
        port = downstream.port
        downstream.stop()
        setup.channel("adt", adt_channel(port, attempts=50))
        setup.start(queue_age_alerts(hook.url))
        setup.send(adt_a01("HOOK1"))
        setup.wait(lambda: hook.posts, what="the alert after the webhook came back")
        time.sleep(0.6)
        assert [p["status"] for p in hook.posts] == ["firing"]
        assert setup.engine.log().count("alert webhook answered HTTP 503") == 2
        setup.wait(lambda: len(setup.audited()) == 1, what="the alert audited")
        time.sleep(0.3)
        assert len(setup.audited()) == 1   # audited once, however often it was posted
    finally:
        hook.close()


# -- the rules against snapshots ------------------------------------------------------

T0 = datetime(2026, 11, 21, 8, 0, 0)   # naive UTC, as the store keeps time


def rules(*tables: str):
    text = "\n".join(f"[[alerts.rules]]\n{t}" for t in tables)
    import tomllib

    return parse(tomllib.loads(text)).alerts.rules


def queue(depth=0, age=None) -> dict:
    return {"queued": depth, "sent": 0, "error": 0, "dead": 0, "filtered": 0, "queue_depth": depth,
            "oldest_queued_age_s": age}


def snap(at, destinations=None, errors=None, channels=(), last=None) -> Snapshot:
    return Snapshot(at, Status({}, destinations or {}), errors or {}, tuple(channels), last)


def test_queue_depth_fires_per_destination_once_and_resolves():
    ev = Evaluator(rules('name = "deep"\nkind = "queue_depth"\nover = 10\ndestination = "lab-*"'), T0)
    deep = {("adt", "lab-a"): queue(11), ("adt", "lab-b"): queue(3), ("adt", "other"): queue(99)}
    [notice] = ev.evaluate(snap(T0, deep))
    assert (notice.status, notice.destination, notice.value) == (FIRING, "lab-a", 11)
    assert ev.evaluate(snap(T0 + timedelta(seconds=30), deep)) == []
    [done] = ev.evaluate(snap(T0 + timedelta(seconds=60), {("adt", "lab-a"): queue(10)}))
    assert (done.status, done.started_at) == (RESOLVED, T0)
    assert done.summary() == "deep: adt/lab-a: resolved, now 10 deliveries"


def test_error_rate_counts_the_errors_of_the_last_minute():
    ev = Evaluator(rules('name = "failing"\nkind = "error_rate"\nper_minute = 5\ndestination = "*"',
                        'name = "channel failing"\nkind = "error_rate"\nper_minute = 5'), T0)
    at = [T0 + timedelta(seconds=s) for s in (30, 60, 90, 150)]
    # 4 and 2 errors in the first half minute: neither destination is over 5 a minute, the channel is
    fired = ev.evaluate(snap(at[0], errors={("adt", "a"): 4, ("adt", "b"): 2}))
    assert [(n.rule.name, n.channel, n.destination, n.value) for n in fired] == \
        [("channel failing", "adt", None, 6.0)]
    fired = ev.evaluate(snap(at[1], errors={("adt", "a"): 10, ("adt", "b"): 2}))
    assert [(n.rule.name, n.destination, n.value) for n in fired] == [("failing", "a", 10.0)]
    # over the minute before 150s (from the 90s sample): no new errors, both resolve
    assert ev.evaluate(snap(at[2], errors={("adt", "a"): 10, ("adt", "b"): 2})) == []
    resolved = ev.evaluate(snap(at[3], errors={("adt", "a"): 10, ("adt", "b"): 2}))
    assert sorted((n.status, n.rule.name) for n in resolved) == \
        [(RESOLVED, "channel failing"), (RESOLVED, "failing")]


def test_silence_counts_only_within_its_hours_in_its_zone():
    [rule] = rules('name = "quiet"\nkind = "silence"\nchannel = "adt"\nquiet_for = "30m"\n'
                   'hours = "07:00-19:00"\ntimezone = "Europe/Berlin"')
    ev = Evaluator((rule,), T0 - timedelta(days=1))
    yesterday = T0 - timedelta(hours=14)            # 19:00 Berlin the day before: outside the hours
    # 08:00 UTC is 09:00 in Berlin: two hours into the span, none of them with a message
    [fired] = ev.evaluate(snap(T0, channels=["adt", "lab"], last={"adt": yesterday, "lab": None}))
    assert (fired.channel, fired.value) == ("adt", 7200)
    [done] = ev.evaluate(snap(T0 + timedelta(minutes=1), channels=["adt"], last={"adt": T0}))
    assert done.status == RESOLVED
    # at 06:40 Berlin the span has not begun: no alert however long the night was
    early = datetime(2026, 11, 21, 5, 40)
    assert Evaluator((rule,), early - timedelta(days=2)).evaluate(
        snap(early, channels=["adt"], last={"adt": early - timedelta(hours=12)})) == []


def test_a_span_across_midnight_began_the_evening_before():
    zone = ZoneInfo("UTC")
    assert window_start(datetime(2026, 11, 21, 3, 0), (22 * 60, 6 * 60), zone) == datetime(2026, 11, 20, 22, 0)
    assert window_start(datetime(2026, 11, 21, 23, 0), (22 * 60, 6 * 60), zone) == datetime(2026, 11, 21, 22, 0)
    assert window_start(datetime(2026, 11, 21, 12, 0), (22 * 60, 6 * 60), zone) is None


def test_the_newest_message_of_each_channel_is_found_whatever_its_state(store_url):
    from interface_engine.store import Processed, Store
    from tests.test_status import stored

    store = Store(store_url)
    store.check_schema()
    try:
        stored(store, "L1", now=T0)
        stored(store, "B1", channel="lab", now=T0 + timedelta(minutes=1))
        newest = stored(store, "L2", now=T0 + timedelta(minutes=5))
        store.save_processing([Processed(newest, "adt", filter_reason="not wanted")])
        assert store.last_received(["adt", "lab", "none"]) == \
            {"adt": T0 + timedelta(minutes=5), "lab": T0 + timedelta(minutes=1), "none": None}
    finally:
        store.close()


@pytest.mark.parametrize("alerts, error", [
    ('[[alerts.rules]]\nname = "x"\nkind = "queue_size"\nover = 1',
     "alerts.rules[0].kind: expected one of queue_depth, queue_age, error_rate, silence, got 'queue_size'"),
    ('[[alerts.rules]]\nname = "x"\nkind = "queue_age"',
     "alerts.rules[0].older_than: required key is missing"),
    ('[[alerts.rules]]\nname = "x"\nkind = "queue_depth"\nover = 1\nhours = "07:00-19:00"',
     "alerts.rules[0].hours: not a key of a queue_depth rule"),
    ('[[alerts.rules]]\nname = "x"\nkind = "silence"\nquiet_for = "1h"\nhours = "7-19"',
     'alerts.rules[0].hours: expected a span such as "07:00-19:00"'),
    ('[[alerts.rules]]\nname = "x"\nkind = "silence"\nquiet_for = "1h"\ntimezone = "Mars/Olympus"',
     "alerts.rules[0].timezone: expected a time zone"),
    ('[[alerts.rules]]\nname = "x"\nkind = "error_rate"\nper_minute = 0',
     "alerts.rules[0].per_minute: expected a positive number"),
    ('[[alerts.rules]]\nname = "x"\nkind = "queue_depth"\nover = 1\n'
     '[[alerts.rules]]\nname = "x"\nkind = "queue_depth"\nover = 2',
     "alerts.rules[1].name: expected a unique rule name"),
    ('[alerts]\nwebhook = "alerts.example.org/hook"', "alerts.webhook: expected an http:// or https:// URL"),
    ('[alerts]\nwebhook = "https://alerts.example.org/hook"\ntoken = "s3cret"',
     "alerts.token: expected a reference such as env:NAME"),
    ('[alerts]\nwebhook = "https://alerts.example.org/hook"\ntoken = "env:IE_TEST_NO_SUCH_VAR"',
     "alerts.token: environment variable IE_TEST_NO_SUCH_VAR is not set"),
    ('[alerts]\ninterval = "soon"', "alerts.interval: expected a duration"),
    ('[alerts]\nwebhok = "https://alerts.example.org/hook"', "alerts.webhok: unknown key"),
])
def test_config_errors_name_the_file_and_key(tmp_path, alerts, error):
    from interface_engine.config import load

    path = tmp_path / "engine.toml"
    path.write_text(alerts + "\n")
    with pytest.raises(ConfigError) as e:
        load(path)
    assert str(e.value).startswith(f"{path}: {error}")
    assert "s3cret" not in str(e.value)
