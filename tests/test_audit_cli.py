"""The audit trail as an operator meets it: a real engine, `audit verify`, `audit export`."""

import json
import re
import time

import pytest
import sqlalchemy as sa

from interface_engine.store import Store
from tests.messages import adt_a01
from tests.receiver import Receiver
from tests.test_channels_e2e import Setup, adt_channel
from tests.test_cli import assert_one_line_error, cli

# RFC 5424, section 6: HEADER SP STRUCTURED-DATA [SP MSG].
SYSLOG = re.compile(
    r"^<(?P<pri>\d{1,3})>1 "
    r"(?P<timestamp>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?(Z|[+-]\d\d:\d\d)) "
    r"(?P<host>[!-~]{1,255}) (?P<app>[!-~]{1,48}) (?P<procid>[!-~]{1,128}) (?P<msgid>[!-~]{1,32}) "
    r"(?P<sd>-|(\[[^ =\]\"]{1,32}( [^ =\]\"]{1,32}=\"(\\[\"\\\]]|[^\"\\\]])*\")*\])+)"
    r"( (?P<msg>.*))?$")
SD_PARAM = re.compile(r' ([^ =\]"]{1,32})="((?:\\["\\\]]|[^"\\\]])*)"')


def audit_rows(url):
    store = Store(url)
    with store.engine.connect() as conn:
        rows = [r._asdict() for r in conn.execute(sa.text("SELECT * FROM audit_events ORDER BY id"))]
    store.close()
    return rows


def wait_for(condition, what, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_message_through_a_real_engine_is_audited_without_its_content(
        backend, tmp_path, engine_factory, request):
    setup = Setup(tmp_path, engine_factory)
    url = request.getfixturevalue("postgres_url") if backend == "postgres" else None
    with Receiver() as downstream:
        setup.channel("adt", adt_channel(downstream.port))
        extra = (f'[channels]\ndirectory = "{setup.channels}"\nmappings = "{setup.mappings}"\n'
                 '[audit]\ncheckpoint_interval = "200ms"\n')
        engine = engine_factory(store_url=url, extra=extra)
        setup.engine, setup.store = engine, engine.open_store()
        assert setup.send(adt_a01("AUD1")) == [("AA", "AUD1", "")]
        setup.wait(lambda: setup.store.count_messages(state="sent") == 1, what="sent")
        checkpoint = tmp_path / "var" / "audit-checkpoint.json"
        wait_for(lambda: checkpoint.exists() and '"seq": 5' in checkpoint.read_text(), "a checkpoint")
        assert engine.stop() == 0
    message = setup.store.list_messages(limit=1)[0]
    setup.store.close()
    events = audit_rows(engine.store_url)
    actions = [e["action"] for e in events]
    assert actions == ["config.loaded", "engine.started", "message.received", "message.queued",
                       "delivery.sent", "engine.stopped"]
    assert len(message["correlation_id"]) == 32
    assert [e["correlation_id"] for e in events[2:5]] == [message["correlation_id"]] * 3
    assert events[2]["object_id"] == str(message["id"]) and events[2]["source"] == "127.0.0.1"
    assert all(e["actor"] == "engine:" + events[0]["chain"] for e in events)
    for event in events:
        text = json.dumps(event, default=str)
        for content in ("DOE", "JANE", "MRN100001", "MAIN ST", "555-0100", "WELBY"):
            assert content not in text
    saved = json.loads(checkpoint.read_text())
    assert saved["heads"][events[0]["chain"]]["seq"] == 6     # the last one written at stop
    result = cli("audit", "verify", "--config", engine.config_path, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "audit trail intact: 1 chain(s), 6 row(s), checkpoint of 1 chain(s) matches\n"


def test_a_reload_is_audited_and_a_refused_one_as_a_failure(tmp_path, engine_factory):
    setup = Setup(tmp_path, engine_factory)
    setup.channel("adt", adt_channel(1))
    engine = setup.start()
    assert cli("reload", "--config", engine.config_path, cwd=tmp_path).returncode == 0
    wait_for(lambda: "reloaded: 1 channel" in engine.log(), "the reload")
    setup.channel("adt", "name = [")
    engine.proc.send_signal(1)   # SIGHUP: `reload` would refuse to send a set that does not validate
    wait_for(lambda: "reload refused" in engine.log(), "the refused reload")
    wait_for(lambda: len(audit_rows(engine.store_url)) == 4, "the audit of both reloads")
    engine.stop()
    reloads = [e for e in audit_rows(engine.store_url) if e["action"] == "config.reloaded"]
    assert [e["outcome"] for e in reloads] == ["success", "failure"]
    assert "adt.toml" in json.loads(reloads[1]["detail"])["error"]


@pytest.fixture
def configured(tmp_path):
    """An engine config, its key file and a store holding a few events, as a stopped engine leaves them."""
    from interface_engine import config as config_module
    from interface_engine.audit import open_trail
    from interface_engine.store import Incoming

    path = tmp_path / "engine.toml"
    path.write_text(f'[engine]\nnode = "n1"\n[store]\nurl = "sqlite:///{tmp_path}/store.db"\n'
                    f'[keys]\nfile = "{tmp_path}/keys.json"\n'
                    f'[audit]\ncheckpoint_file = "{tmp_path}/cp.json"\n')
    assert cli("keys", "init", "--config", path).returncode == 0
    assert cli("db", "upgrade", "--config", path).returncode == 0
    config = config_module.load(path)
    store, trail = open_trail(config)
    store.write([Incoming(raw=b"MSH|x", listener="l", peer="10.1.1.1:9", state="received", ack=b"A",
                          control_id=f"C{i}") for i in range(3)])
    trail.record("content.viewed", actor='ann "the" admin]', object_type="message", object_id="1",
                 source="cli@host", detail={"why": "a \\ backslash"})
    from interface_engine.audit import write_checkpoint
    write_checkpoint(config.audit.checkpoint_file, trail.key, trail.heads())
    store.close()
    return path


def test_verify_is_one_line_when_clean_and_names_each_problem_otherwise(configured, tmp_path):
    result = cli("audit", "verify", "--config", configured)
    assert result.returncode == 0 and result.stdout.startswith("audit trail intact: 1 chain(s), 4 row(s)")
    store = Store(f"sqlite:///{tmp_path}/store.db")
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE audit_events SET source = '10.9.9.9:1' WHERE seq = 2"))
    store.close()
    result = cli("audit", "verify", "--config", configured)
    assert_one_line_error(result, "audit trail NOT intact: 1 problem(s)")
    assert result.stdout.startswith("chain n1: edited at seq 2: row id 2 seq 2 does not match its mac")


def test_verify_and_export_errors_are_one_line(configured, tmp_path):
    assert_one_line_error(cli("audit", "export", "--since", "yesterday", "--config", configured),
                          "--since", "2026-01-31")
    (tmp_path / "keys.json").unlink()
    assert_one_line_error(cli("audit", "verify", "--config", configured), "keys.json", "keys init")


def test_export_jsonl_and_syslog_and_the_export_is_audited(configured, tmp_path):
    result = cli("audit", "export", "--config", configured)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["action"] for e in events] == ["message.received"] * 3 + ["content.viewed"]
    assert events[0]["at"].endswith("Z") and events[0]["seq"] == 1 and len(events[0]["mac"]) == 64
    out = tmp_path / "audit.log"
    result = cli("audit", "export", "--format", "syslog", "--out", out, "--config", configured)
    assert result.returncode == 0 and result.stdout == f"exported 5 audit event(s) to {out}\n"
    assert out.stat().st_mode & 0o777 == 0o600
    records = out.read_text().splitlines()
    assert len(records) == 5   # the first export is an event too
    for record in records:
        m = SYSLOG.match(record)
        assert m, record
        assert m["host"] == "n1" and m["app"] == "interface-engine" and int(m["pri"]) in (108, 109)
    viewed = SYSLOG.match(records[3])
    params = dict(SD_PARAM.findall(viewed["sd"]))
    assert params["actor"] == 'ann \\"the\\" admin\\]' and params["action"] == "content.viewed"
    assert viewed["sd"].startswith("[audit@32473 ") and viewed["msgid"] == "content.viewed"
    exported = json.loads(SYSLOG.match(records[4])["sd"].split('detail="')[1].split('" mac=')[0]
                          .replace('\\"', '"'))
    assert exported == {"format": "jsonl", "to": "stdout", "events": 4, "since": None}
    later = cli("audit", "export", "--since", "2999-01-01", "--config", configured)
    assert later.returncode == 0 and later.stdout == ""
    assert cli("audit", "verify", "--config", configured).returncode == 0   # the exports chain on


def test_verify_without_the_checkpoint_says_what_it_cannot_rule_out(configured, tmp_path):
    (tmp_path / "cp.json").unlink()
    result = cli("audit", "verify", "--config", configured)
    assert_one_line_error(result, "audit trail NOT intact: 1 problem(s)")
    assert result.stdout == (f"truncated: no audit checkpoint at {tmp_path}/cp.json: rows cut off the end "
                             "of a chain cannot be ruled out (the engine writes it while it runs)\n")


def test_viewing_replaying_and_pruning_are_audited_with_who_asked(tmp_path, engine_factory):
    import getpass

    setup = Setup(tmp_path, engine_factory)
    with Receiver() as downstream:
        setup.channel("adt", adt_channel(downstream.port))
        setup.start()
        assert setup.send(adt_a01("SEEN1"))[0][0] == "AA"
        setup.wait(lambda: setup.store.count_messages(state="sent") == 1, what="sent")
        message = setup.store.list_messages(limit=1)[0]
        config = setup.engine.config_path
        for flags in ([], ["--raw"], ["--json"]):
            assert cli("messages", "show", message["id"], *flags, "--config", config, cwd=tmp_path).returncode == 0
        assert cli("replay", message["id"], "--dry-run", "--config", config, cwd=tmp_path).returncode == 0
        replayed = cli("replay", message["id"], "--config", config, cwd=tmp_path)
        assert replayed.returncode == 0, replayed.stderr
        setup.wait(lambda: len(downstream.received) == 2, what="the replayed message downstream")
    with open(config, "a") as f:
        f.write('[[retention.rules]]\nchannel = "*"\nstates = ["sent"]\ncontent_after = "1ms"\ndelete_after = "1d"\n')
    pruned = cli("db", "prune", "--config", config, cwd=tmp_path)
    assert pruned.returncode == 0, pruned.stderr
    events = [e for e in audit_rows(setup.engine.store_url) if e["actor"] == getpass.getuser()]
    assert [(e["action"], e["object_id"]) for e in events[:5]] == [
        ("content.viewed", str(message["id"]))] * 3 + [("message.replay_previewed", "dry-run"),
                                                        ("message.replayed", "1")]
    assert [e["action"] for e in events[5:]] == ["retention.pruned"]
    views = [json.loads(e["detail"])["view"] for e in events[:3]]
    assert views == ["text", "raw", "json"]
    assert {e["correlation_id"] for e in events[:3]} == {message["correlation_id"]}
    assert json.loads(events[4]["detail"])["messages"] == 1
    assert json.loads(events[5]["detail"])["contents_removed"] == 1
    assert all(e["source"].startswith("cli@") for e in events)
    assert "SEEN1" not in json.dumps(events) and "DOE" not in json.dumps(events)
