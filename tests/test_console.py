"""The web console over plain HTTP: form login and logout, redirects kept on this server, escaping, headers."""

from __future__ import annotations

import http.client
from urllib.parse import quote

import pytest

from tests.messages import adt_a01
from tests.receiver import Receiver
from tests.test_admin import PASSWORD, Admin, audit_actions, wait_for
from tests.test_channels_e2e import Setup

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
def admin(tmp_path, engine_factory):
    with Receiver() as downstream:
        yield Admin(Setup(tmp_path, engine_factory), downstream)


def fetch(admin: Admin, method: str, path: str, body: str | None = None, headers=None):
    """(status, headers, body text) without following redirects."""
    conn = http.client.HTTPConnection(admin.url.hostname, admin.url.port, timeout=15)
    conn.request(method, path, body=body, headers=headers or {})
    answer = conn.getresponse()
    data = answer.read().decode("utf-8", "replace")
    conn.close()
    return answer.status, answer, data


def log_in(admin: Admin, role: str, next_: str = "/") -> tuple[int, str | None, str | None]:
    """(status, Location, session cookie) of a form login as the console's page sends it."""
    body = f"user=u-{role}&password={quote(PASSWORD)}&next={quote(next_, safe='')}"
    status, answer, _ = fetch(admin, "POST", "/login", body, FORM)
    cookie = answer.getheader("Set-Cookie")
    return status, answer.getheader("Location"), cookie.split(";")[0] if cookie else None


def test_a_form_login_redirects_to_next_on_this_server_only(admin):
    status, location, cookie = log_in(admin, "viewer", "/ui/messages?state=sent")
    assert (status, location) == (303, "/ui/messages?state=sent") and cookie.startswith("ie_session=")
    for elsewhere in ("https://elsewhere.example/", "//elsewhere.example/x", "/\\elsewhere.example", "ui"):
        assert log_in(admin, "viewer", elsewhere)[:2] == (303, "/")
    body = f"user=u-viewer&password=wrong+password+here&next={quote('/ui/messages', safe='')}"
    status, answer, _ = fetch(admin, "POST", "/login", body, FORM)
    assert status == 303 and answer.getheader("Location") == "/login?next=%2Fui%2Fmessages&failed=1"
    assert answer.getheader("Set-Cookie") is None
    assert [e["outcome"] for e in audit_actions(admin.setup.store, "auth.login")][-1] == "failure"
    status, _, page = fetch(admin, "GET", "/login?next=%2Fui%2Fmessages&failed=1")
    assert status == 200 and "Wrong user name or password" in page and 'value="/ui/messages"' in page


def test_a_page_without_a_session_sends_the_browser_to_the_login_form(admin):
    status, answer, _ = fetch(admin, "GET", "/ui/messages?state=sent")
    assert status == 303 and answer.getheader("Location") == "/login?next=%2Fui%2Fmessages%3Fstate%3Dsent"
    status, _, _ = fetch(admin, "POST", "/ui/messages/1/replay", "action=replay", FORM)
    assert status == 401                              # a change is refused outright, not redirected


def test_pages_escape_engine_data_and_forbid_scripts(admin):
    setup = admin.setup
    assert [a[0] for a in setup.send(adt_a01("<i>X&Y"))] == ["AA"]
    _, _, cookie = log_in(admin, "viewer")
    status, answer, page = fetch(admin, "GET", "/ui/messages?control_id=" + quote("<i>X&Y"), headers={"Cookie": cookie})
    assert status == 200 and answer.getheader("Content-Type") == "text/html; charset=utf-8"
    assert "&lt;i&gt;X&amp;Y" in page and "<i>X" not in page
    policy = answer.getheader("Content-Security-Policy")
    assert "default-src 'none'" in policy and "script" not in policy and "frame-ancestors 'none'" in policy
    assert answer.getheader("Referrer-Policy") == "no-referrer"   # addresses can hold search terms
    assert "<script" not in page


def test_a_form_logout_ends_the_session_and_returns_to_the_login_form(admin):
    _, _, cookie = log_in(admin, "analyst")
    status, _, page = fetch(admin, "GET", "/", headers={"Cookie": cookie})
    assert status == 200 and "u-analyst (analyst)" in page
    csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    assert fetch(admin, "POST", "/logout", "next=%2Flogin", FORM | {"Cookie": cookie})[0] == 403   # no token
    status, answer, _ = fetch(admin, "POST", "/logout", f"csrf={csrf}&next=%2Flogin", FORM | {"Cookie": cookie})
    assert status == 303 and answer.getheader("Location") == "/login"
    assert fetch(admin, "GET", "/", headers={"Cookie": cookie})[0] == 303
    wait_for(lambda: audit_actions(admin.setup.store, "access.denied"), "the refused logout audited")


def test_a_replay_form_post_must_name_its_action(admin):
    setup = admin.setup
    assert [a[0] for a in setup.send(adt_a01("ACT1"))] == ["AA"]
    setup.wait(lambda: setup.store.count_deliveries(state="sent") == 2, what="delivered")
    _, _, cookie = log_in(admin, "operator")
    page = fetch(admin, "GET", "/", headers={"Cookie": cookie})[2]
    csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    session = FORM | {"Cookie": cookie}
    status, _, page = fetch(admin, "POST", "/ui/messages/1/replay", f"csrf={csrf}&destination=downstream", session)
    assert status == 400 and "expected dry-run or replay" in page
    status, _, page = fetch(admin, "POST", "/ui/messages/1/replay",
                            f"csrf={csrf}&destination=nowhere&action=replay", session)
    assert status == 400 and "nowhere" in page        # the API's own refusal, as a page
    assert setup.store.count_deliveries() == 2
    status, _, page = fetch(admin, "POST", "/ui/messages/1/replay",
                            f"csrf={csrf}&destination=downstream&action=replay", session)
    assert status == 200 and 'id="queued">1<' in page
    setup.wait(lambda: setup.store.count_deliveries(state="sent") == 3, what="the replay sent")


@pytest.fixture
def dying_console(tmp_path, engine_factory):
    """A console over a destination that gives up at once."""
    from tests.test_channels_e2e import adt_channel

    with Receiver(mode="AR") as downstream:
        setup = Setup(tmp_path, engine_factory)
        setup.channel("adt", adt_channel(downstream.port, on_failure="skip", attempts=1))
        yield Admin(setup, downstream, channel=False)


def test_an_operator_edits_a_dead_letter_in_the_console_and_resends_it(dying_console):
    admin, setup, downstream = dying_console, dying_console.setup, dying_console.downstream
    assert setup.send(adt_a01("DEAD1"))[0][0] == "AA"
    setup.wait(lambda: setup.store.count_deliveries(state="dead") == 1, what="the dead letter")
    _, _, viewer = log_in(admin, "viewer")
    status, _, page = fetch(admin, "GET", "/ui/dead", headers={"Cookie": viewer})
    assert status == 200 and "DEAD1" in page and "Resend" not in page and "DOE" not in page
    assert fetch(admin, "GET", "/ui/dead/1", headers={"Cookie": viewer})[0] == 403
    _, _, cookie = log_in(admin, "operator")
    status, _, page = fetch(admin, "GET", "/ui/dead", headers={"Cookie": cookie})
    dead_id = page.split('href="/ui/dead/', 1)[1].split('"', 1)[0]
    status, _, page = fetch(admin, "GET", f"/ui/dead/{dead_id}", headers={"Cookie": cookie})
    assert status == 200 and "DOE^JANE" in page and 'id="raw"' in page
    csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    original = setup.store.get_message(1)["raw"]
    edited = original.decode().replace("DOE^JANE", "DOE^JANET").replace("\r", "\r\n")  # as a browser posts it
    downstream.mode = "AA"
    session = FORM | {"Cookie": cookie}
    assert fetch(admin, "POST", f"/ui/dead/{dead_id}/resend", f"action=edited&raw={quote(edited)}",
                 session)[0] == 403                                       # no CSRF token
    status, _, page = fetch(admin, "POST", f"/ui/dead/{dead_id}/resend",
                            f"csrf={csrf}&action=edited&raw={quote(edited)}", session)
    assert status == 200 and 'id="was-edited">yes<' in page
    downstream.wait_for(2)
    assert b"DOE^JANET" in downstream.received[-1] and b"\r\n" not in downstream.received[-1]
    assert setup.store.get_message(1)["raw"] == original
    edits = audit_actions(setup.store, "message.edited")
    assert len(edits) == 1 and edits[0]["actor"] == "user:u-operator"
    status, _, page = fetch(admin, "POST", f"/ui/dead/{dead_id}/resend", f"csrf={csrf}&action=as-is", session)
    assert status == 200 and 'id="was-edited">no<' in page
    downstream.wait_for(3)
    assert b"DOE^JANE^" in downstream.received[-1]
    wait_for(lambda: len(audit_actions(setup.store, "delivery.resent")) == 2, "both resends audited")
