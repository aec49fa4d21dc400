"""The admin API against a real engine: authentication before the body, roles, sessions, CSRF, JSON errors."""

from __future__ import annotations

import http.client
import json
import socket
import time
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa

from interface_engine import inspection

from tests.messages import adt_a01
from tests.receiver import Receiver
from tests.test_audit_cli import wait_for
from tests.test_channels_e2e import Setup, adt_channel
from tests.test_cli import cli

ROLES = ("viewer", "analyst", "operator", "admin")
PASSWORD = "correct horse battery"


class Admin:
    """An engine with one channel, a token per role and a user per role."""

    def __init__(self, setup: Setup, downstream: Receiver, channel: bool = True):
        self.setup, self.downstream = setup, downstream
        if channel:
            setup.channel("adt", adt_channel(downstream.port, archive=setup.root / "archive"))
        self.engine = setup.start()
        self.url = urlsplit(self.engine.admin_url)
        config = self.engine.config_path
        self.tokens = {}
        for role in ROLES:
            made = cli("tokens", "create", f"t-{role}", "--role", role, "--config", config)
            assert made.returncode == 0, made.stderr
            self.tokens[role] = made.stdout.strip()
            added = subprocess_input(["users", "add", f"u-{role}", "--role", role, "--password-stdin",
                                      "--config", str(config)], PASSWORD + "\n")
            assert added.returncode == 0, added.stderr
        deadline = time.monotonic() + 10   # the engine re-reads tokens every 2 s
        while self.call("GET", "/api/v1/session", role="admin")[0] != 200:
            assert time.monotonic() < deadline, "the engine did not take up the new tokens"
            time.sleep(0.2)

    def call(self, method, path, *, role=None, body=None, headers=None):
        """(status, JSON answer, response headers)."""
        conn = http.client.HTTPConnection(self.url.hostname, self.url.port, timeout=15)
        sent = dict(headers or {})
        if role:
            sent["Authorization"] = f"Bearer {self.tokens[role]}"
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
            sent.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=body, headers=sent)
        answer = conn.getresponse()
        data = answer.read()
        conn.close()
        kind = answer.getheader("Content-Type")
        if path == "/metrics" and answer.status == 200:   # the one answer that is not JSON
            assert kind.startswith("text/plain"), kind
            return answer.status, data.decode(), answer
        assert kind == "application/json", (path, kind)
        return answer.status, json.loads(data), answer


def subprocess_input(args, text):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "interface_engine", *args], input=text,
                          capture_output=True, text=True, timeout=60)


def audit_actions(store, action):
    with store.engine.connect() as conn:
        return [r._asdict() for r in conn.execute(
            sa.text("SELECT * FROM audit_events WHERE action = :a ORDER BY id"), {"a": action})]


@pytest.fixture
def admin(tmp_path, engine_factory):
    with Receiver() as downstream:
        yield Admin(Setup(tmp_path, engine_factory), downstream)


def test_health_checks_are_open_and_everything_else_needs_credentials(admin):
    assert admin.call("GET", "/healthz")[:2] == (200, {"status": "alive"})
    assert admin.call("GET", "/readyz")[:2] == (200, {"status": "ready", "problems": []})
    status, body, answer = admin.call("GET", "/api/v1/channels")
    assert status == 401 and "Bearer" in body["error"] and answer.getheader("WWW-Authenticate")
    status, _, _ = admin.call("GET", "/api/v1/channels", headers={"Authorization": "Bearer iet_00000000_" + "x" * 43})
    assert status == 401
    wait_for(lambda: any(e["object_id"] == "admin" for e in audit_actions(admin.setup.store, "auth.failed")),
             "the refusal in the audit trail")


def test_an_unauthenticated_upload_is_refused_before_its_body_is_read(admin):
    with socket.create_connection((admin.url.hostname, admin.url.port), timeout=5) as s:
        s.sendall(b"POST /api/v1/replay HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 500000000\r\n\r\n")
        started = time.monotonic()
        answer = b""
        while chunk := s.recv(4096):      # the server answers and closes without waiting for the body
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 401 ") and time.monotonic() - started < 2
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    with socket.create_connection((admin.url.hostname, admin.url.port), timeout=5) as s:
        s.sendall(b"POST /api/v1/replay HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                  + admin.tokens["operator"].encode() + b"\r\nContent-Length: 500000000\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 413 ")   # over max_body, known from the headers alone


def test_each_role_sees_and_does_what_it_may(admin):
    setup = admin.setup
    assert [a[0] for a in setup.send(adt_a01("API1"), adt_a01("API2"))] == ["AA", "AA"]
    setup.wait(lambda: setup.store.count_deliveries(state="sent") == 4, what="both delivered")
    status, channels, _ = admin.call("GET", "/api/v1/channels", role="viewer")
    assert status == 200 and channels == json.loads(inspection.status_json(setup.store.status())) | {"paused": []}
    assert {c["channel"]: c["sent"] for c in channels["channels"]} == {"adt": 2}
    status, found, _ = admin.call("GET", "/api/v1/messages?control_id=API2", role="viewer")
    assert status == 200 and [m["control_id"] for m in found["messages"]] == ["API2"]
    message_id = found["messages"][0]["id"]
    # A viewer sees metadata only; an analyst sees content, and the viewing is audited first.
    status, outline, _ = admin.call("GET", f"/api/v1/messages/{message_id}", role="viewer")
    assert status == 200 and "raw" not in outline and "output" not in json.dumps(outline)
    assert "MRN100001" not in json.dumps(outline) and outline["decision"].startswith("passed to 2")
    status, shown, _ = admin.call("GET", f"/api/v1/messages/{message_id}", role="analyst")
    assert status == 200 and "MRN100001" in shown["raw"]
    assert any(s["segment"] == "PID" for s in shown["segments"])
    viewed = audit_actions(setup.store, "content.viewed")
    assert [(e["object_id"], e["actor"]) for e in viewed] == [(str(message_id), "token:t-analyst(" +
                                                               admin.tokens["analyst"][4:12] + ")")]
    assert admin.call("GET", "/api/v1/messages?patient=MRN100001", role="viewer")[0] == 403
    status, by_patient, _ = admin.call("GET", "/api/v1/messages?patient=MRN100001&authority=GEN", role="analyst")
    assert status == 200 and len(by_patient["messages"]) == 2
    # Replay: refused to a viewer and an analyst (audited), done for an operator, to one destination.
    for role in ("viewer", "analyst"):
        assert admin.call("POST", "/api/v1/replay", role=role, body={"ids": [message_id]})[0] == 403
    wait_for(lambda: len(audit_actions(setup.store, "access.denied")) == 3, "three denials audited")
    status, preview, _ = admin.call("POST", "/api/v1/replay", role="operator",
                                    body={"ids": [message_id], "destinations": ["downstream"], "dry_run": True})
    assert status == 200 and preview["dry_run"] and preview["queued"] == 1
    before = len(admin.downstream.received)
    status, done, _ = admin.call("POST", "/api/v1/replay", role="operator",
                                 body={"ids": [message_id], "destinations": ["downstream"]})
    assert status == 200 and done["queued"] == 1 and done["replay"] >= 1
    admin.downstream.wait_for(before + 1)
    assert admin.downstream.control_ids()[-1] == "API2"
    wait_for(lambda: setup.store.count_deliveries(state="sent") == 5, "the replayed delivery sent")
    assert [e["actor"] for e in audit_actions(setup.store, "message.replayed")] == [
        "token:t-operator(" + admin.tokens["operator"][4:12] + ")"]
    # Audit query for operators; reload only for admins.
    status, events, _ = admin.call("GET", "/api/v1/audit?action=message.replayed", role="operator")
    assert status == 200 and len(events["events"]) == 1
    assert admin.call("POST", "/api/v1/reload", role="operator")[0] == 403
    status, reloaded, _ = admin.call("POST", "/api/v1/reload", role="admin")
    assert status == 200 and reloaded["channels"] == ["adt"]


def test_a_browser_session_needs_its_csrf_token_to_change_anything(admin):
    status, body, _ = admin.call("POST", "/login", body="user=u-operator&password=wrong+one+here",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 401
    status, body, answer = admin.call("POST", "/login", body=f"user=u-operator&password={PASSWORD.replace(' ', '+')}",
                                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200 and body["role"] == "operator"
    cookie = answer.getheader("Set-Cookie")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    session = {"Cookie": cookie.split(";")[0]}
    assert admin.call("GET", "/api/v1/session", headers=session)[1]["name"] == "u-operator"
    status, refused, _ = admin.call("POST", "/api/v1/replay", body={"ids": [1]}, headers=session)
    assert status == 403 and "CSRF" in refused["error"]
    status, _, _ = admin.call("POST", "/api/v1/replay", body={"ids": [999999]},
                              headers=session | {"X-CSRF-Token": body["csrf"]})
    assert status == 400                      # past the CSRF check: the selection itself is refused
    logins = audit_actions(admin.setup.store, "auth.login")
    assert [e["outcome"] for e in logins] == ["failure", "success"]
    assert admin.call("POST", "/logout", headers=session | {"X-CSRF-Token": body["csrf"]})[0] == 200
    assert admin.call("GET", "/api/v1/session", headers=session)[0] == 401


def test_a_revoked_token_is_refused_within_seconds(admin):
    token_id = admin.tokens["viewer"][4:12]
    assert cli("tokens", "revoke", token_id, "--config", admin.engine.config_path).returncode == 0
    wait_for(lambda: admin.call("GET", "/api/v1/engine", role="viewer")[0] == 401, "the revocation", 10)
    listing = cli("tokens", "list", "--config", admin.engine.config_path).stdout
    assert token_id in listing and admin.tokens["viewer"][13:] not in listing


def test_errors_are_json_with_a_message(admin):
    assert admin.call("GET", "/api/v1/messages/abc", role="viewer")[:2] == (
        400, {"error": "message id: 'abc' is not a whole number"})
    assert admin.call("GET", "/api/v1/messages/424242", role="viewer")[:2] == (404, {"error": "no message 424242"})
    assert admin.call("GET", "/nowhere", role="viewer")[0] == 404
    assert admin.call("DELETE", "/api/v1/channels", role="admin")[0] == 405
    assert admin.call("GET", "/api/v1/messages?since=yesterday-ish", role="viewer")[0] == 400
    status, body, _ = admin.call("POST", "/api/v1/replay", role="operator", body="{not json")
    assert status == 400 and body == {"error": "the body is not valid JSON"}


def test_the_openapi_file_describes_exactly_the_server_s_routes(admin):
    status, spec, _ = admin.call("GET", "/api/v1/openapi.json", role="viewer")
    assert status == 200
    from interface_engine.admin.api import Api

    served = {(r.method.decode().lower(), r.path) for r in Api.__new__(Api).routes()}
    described = {(method, path) for path, item in spec["paths"].items() for method in item}
    assert served == described


def test_a_paused_destination_holds_its_queue_and_a_paused_channel_its_messages(admin):
    setup, downstream = admin.setup, admin.downstream
    path = "/api/v1/channels/adt/destinations/downstream"
    status, body, _ = admin.call("POST", f"{path}/pause", role="operator")
    assert status == 200 and body["changed"] and body["paused"]
    assert setup.send(adt_a01("P1"))[0][0] == "AA"
    setup.wait(lambda: setup.store.count_deliveries(state="sent") == 1, what="the archive copy")
    time.sleep(1.5)
    assert downstream.received == [] and setup.store.count_deliveries(state="queued") == 1
    assert {"channel": "adt", "destination": "downstream"} in admin.call(
        "GET", "/api/v1/channels", role="viewer")[1]["paused"]
    assert admin.call("POST", f"{path}/resume", role="operator")[1]["changed"]
    downstream.wait_for(1)
    assert downstream.control_ids() == ["P1"]
    # The whole channel: messages are stored and acknowledged, and processed only on resume.
    assert admin.call("POST", "/api/v1/channels/adt/pause", role="operator")[0] == 200
    assert setup.send(adt_a01("P2"))[0][0] == "AA"
    time.sleep(1.5)
    assert setup.store.count_messages(state="received") == 1 and downstream.control_ids() == ["P1"]
    assert admin.call("POST", "/api/v1/channels/adt/resume", role="operator")[0] == 200
    downstream.wait_for(2)
    assert downstream.control_ids() == ["P1", "P2"]
    assert [e["action"] for e in audit_actions(setup.store, "destination.paused")
            + audit_actions(setup.store, "channel.resumed")] == ["destination.paused", "channel.resumed"]
    assert admin.call("POST", "/api/v1/channels/nope/pause", role="operator")[0] == 404
    assert admin.call("POST", "/api/v1/channels/adt/pause", role="analyst")[0] == 403


@pytest.fixture
def dying(tmp_path, engine_factory):
    """An engine whose downstream destination gives up at once (on_failure = skip, one attempt)."""
    with Receiver(mode="AR") as downstream:
        setup = Setup(tmp_path, engine_factory)
        setup.channel("adt", adt_channel(downstream.port, on_failure="skip", attempts=1))
        yield Admin(setup, downstream, channel=False)


def test_dead_letters_are_listed_and_resent_as_they_were_or_edited(dying):
    admin, setup, downstream = dying, dying.setup, dying.downstream
    assert setup.send(adt_a01("DL1"))[0][0] == "AA"
    setup.wait(lambda: setup.store.count_deliveries(state="dead") == 1, what="the dead letter")
    status, listing, _ = admin.call("GET", "/api/v1/dead", role="viewer")
    assert status == 200 and [(d["destination"], d["control_id"]) for d in listing["dead"]] == [("downstream", "DL1")]
    dead_id = listing["dead"][0]["id"]
    downstream.mode = "AA"
    assert admin.call("POST", f"/api/v1/dead/{dead_id}/resend", role="analyst")[0] == 403
    status, again, _ = admin.call("POST", f"/api/v1/dead/{dead_id}/resend", role="operator", body={})
    assert status == 200 and not again["edited"] and again["queued"] == 1
    downstream.wait_for(2)
    # Edited: a new message that names the one it corrects; the original stays as it was.
    original = setup.store.get_message(again["message"])["raw"]
    edited = original.decode().replace("DOE^JANE", "DOE^JANET").replace("\r", "\n")
    status, fixed, _ = admin.call("POST", f"/api/v1/dead/{dead_id}/resend", role="operator", body={"raw": edited})
    assert status == 200 and fixed["edited"] and fixed["message"] != again["message"]
    downstream.wait_for(3)
    assert b"DOE^JANET" in downstream.received[-1]
    assert setup.store.get_message(again["message"])["raw"] == original
    correction = setup.store.get_message(fixed["message"])
    assert correction["edited_from"] == again["message"] and correction["listener"] == "admin"
    assert correction["correlation_id"] == setup.store.get_message(again["message"])["correlation_id"]
    actions = [(e["action"], e["object_id"]) for e in audit_actions(setup.store, "message.edited")
               + audit_actions(setup.store, "delivery.resent")]
    assert actions == [("message.edited", str(fixed["message"])), ("delivery.resent", str(dead_id)),
                       ("delivery.resent", str(fixed["delivery"]))]
    status, refused, _ = admin.call("POST", f"/api/v1/dead/{dead_id}/resend", role="operator",
                                    body={"raw": "not a message"})
    assert status == 400 and "MSH" in refused["error"]
    assert admin.call("POST", "/api/v1/dead/999999/resend", role="operator", body={})[0] == 404


def test_users_and_tokens_are_managed_from_the_cli_audited_and_never_printed(admin):
    config = admin.engine.config_path
    listing = cli("users", "list", "--config", config).stdout
    assert "u-operator" in listing and "operator" in listing and PASSWORD not in listing
    short = subprocess_input(["users", "add", "bob", "--role", "viewer", "--password-stdin", "--config",
                              str(config)], "short\n")
    assert short.returncode == 1 and "12 characters" in short.stderr and "Traceback" not in short.stderr
    assert cli("users", "add", "bad name", "--role", "viewer", "--config", config).returncode != 0
    assert cli("users", "remove", "u-viewer", "--config", config).returncode == 0
    assert "u-viewer" not in cli("users", "list", "--config", config).stdout
    actions = [e["action"] for e in audit_actions(admin.setup.store, "user.added")
               + audit_actions(admin.setup.store, "token.created") + audit_actions(admin.setup.store, "user.removed")]
    assert actions == ["user.added"] * 4 + ["token.created"] * 4 + ["user.removed"]
    with admin.setup.store.engine.connect() as conn:
        stored = json.dumps([list(r) for r in conn.execute(sa.text("SELECT * FROM admin_users"))], default=str)
        stored += json.dumps([list(r) for r in conn.execute(sa.text("SELECT * FROM api_tokens"))], default=str)
    assert PASSWORD not in stored and not any(t[13:] in stored for t in admin.tokens.values())


def test_every_route_admits_exactly_the_roles_at_or_above_its_own(admin):
    from interface_engine.admin.api import Api
    from interface_engine.admin.auth import rank

    fill = {"message_id": "424242", "channel": "nochannel", "destination": "nodest", "delivery_id": "424242"}
    guarded = [r for r in Api.__new__(Api).routes() if r.role is not None and r.path != "/logout"]
    checked = 0
    for r in guarded:
        path = r.path.format(**fill)
        for role in ROLES:
            body = {} if r.method == b"POST" else None
            status, answer, _ = admin.call(r.method.decode(), path, role=role, body=body)
            if rank(role) < rank(r.role):
                assert status == 403 and r.role in answer["error"], (r.path, role, status)
            else:
                assert status not in (401, 403), (r.path, role, status, answer)
            checked += 1
    assert checked == 4 * len(guarded) >= 60
    wait_for(lambda: len(audit_actions(admin.setup.store, "access.denied")) == sum(rank(r.role) for r in guarded),
             "one audited denial per refused call")


def test_the_admin_server_speaks_tls_when_configured_and_needs_it_off_loopback(tmp_path, engine_factory):
    import ssl

    from tests.pki import TestCA

    ca = TestCA(tmp_path / "pki")
    server = ca.issue("localhost", server=True)
    engine = engine_factory(extra=f'[admin]\nport = 0\n[admin.tls]\ncert = "{server.cert}"\nkey = "{server.key}"\n')
    url = urlsplit(engine.admin_url)
    assert url.scheme == "https"
    context = ssl.create_default_context(cafile=str(ca.cert))
    conn = http.client.HTTPSConnection("127.0.0.1", url.port, timeout=10, context=context)
    conn.request("GET", "/healthz")
    answer = conn.getresponse()
    assert answer.status == 200 and json.loads(answer.read()) == {"status": "alive"}
    conn.close()
    plain = http.client.HTTPConnection("127.0.0.1", url.port, timeout=10)
    with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
        plain.request("GET", "/healthz")
        plain.getresponse()
    config = tmp_path / "exposed.toml"
    config.write_text('[admin]\nhost = "0.0.0.0"\n')
    result = cli("channels", "validate", "--config", config)
    assert result.returncode != 0 and "exposed.toml" in result.stderr and "admin.tls" in result.stderr
