"""The web console in headless Chromium against a real engine: log in, watch, search, open, replay.

Needs Debian's `chromium` and `chromium-driver` (the CI script installs them) and
Selenium; without them these tests skip, and with CI=true they fail. Screenshots
of the dashboard and the message page go to $IE_SCREENSHOTS, else under the
test's tmp_path; the path is printed.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import unavailable
from tests.messages import adt_a01
from tests.receiver import Receiver
from tests.test_admin import PASSWORD, Admin, audit_actions, wait_for
from tests.test_channels_e2e import Setup

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
#: The synthetic patient of tests/messages.py as a page could show it.
PATIENT = ("MRN100001", "DOE^JANE", "DOE")


@pytest.fixture
def browser():
    try:
        from selenium import webdriver
    except ImportError:
        unavailable("Selenium is not installed (pip install -e '.[test]')")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (Path(path).exists() or shutil.which(Path(path).name)):
            unavailable(f"{Path(path).name} is missing: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1400,1100"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER if Path(CHROMEDRIVER).exists()
                                      else shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def admin(tmp_path, engine_factory):
    with Receiver() as downstream:
        yield Admin(Setup(tmp_path, engine_factory), downstream)


@pytest.fixture
def screenshots(tmp_path) -> Path:
    folder = Path(os.environ.get("IE_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots in {folder}")
    return folder


def steady(read):
    """`read()`, again if the page reloaded under it: the dashboard refreshes itself every few seconds."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    for _ in range(20):
        try:
            return read()
        except (NoSuchElementException, StaleElementReferenceException):
            time.sleep(0.1)
    return read()


class Console:
    """The browser on the engine's console, with a few steps a person takes."""

    def __init__(self, driver, admin: Admin):
        self.driver, self.base = driver, admin.engine.admin_url

    def open(self, path: str):
        self.driver.get(self.base + path)

    @property
    def path(self) -> str:
        return urlsplit(self.driver.current_url).path

    def find(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def all(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def click(self, css: str, then: str):
        """Click, and wait for the next page: one with `then` on it."""
        self.find(css).click()
        wait_for(lambda: self.all(then), f"{then} after clicking {css}")

    def log_in(self, role: str):
        self.open("/")
        assert self.path == "/login"                 # no session: to the login form, then back
        self.find("#user").send_keys(f"u-{role}")
        self.find("#password").send_keys(PASSWORD)
        self.find("#login").click()
        wait_for(lambda: self.path == "/" and self.all("#channels"), "the dashboard after login")

    def text(self, css: str) -> str:
        return steady(lambda: self.find(css).text)

    def classes(self, css: str) -> list[str]:
        return steady(lambda: self.find(css).get_attribute("class").split())

    def count(self, channel: str, state: str) -> str:
        cells = f'tr[data-channel="{channel}"] td[data-state="{state}"]'
        return steady(lambda: self.find(cells).text if self.all(cells) else "")

    def csrf(self) -> str:
        return steady(lambda: self.find('input[name="csrf"]').get_attribute("value"))

    def source_without_tokens(self) -> str:
        """The page source, less the session's random CSRF token (it could spell anything)."""
        return steady(lambda: self.driver.page_source.replace(self.csrf(), ""))

    def shot(self, folder: Path, name: str):
        path = folder / f"{name}.png"
        height = self.driver.execute_script("return document.documentElement.scrollHeight")
        self.driver.set_window_size(1400, min(height + 150, 8000))     # the whole page in one picture
        assert self.driver.save_screenshot(str(path)) and path.stat().st_size > 1000
        self.driver.set_window_size(1400, 1100)
        print(f"screenshot: {path}")


def post(admin: Admin, path: str, body: str, cookie: str | None) -> tuple[int, bytes]:
    """A form POST from outside the browser: a forged request as another site would send it."""
    conn = http.client.HTTPConnection(admin.url.hostname, admin.url.port, timeout=15)
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if cookie:
        headers["Cookie"] = f"ie_session={cookie}"
    conn.request("POST", path, body=body, headers=headers)
    answer = conn.getresponse()
    data = answer.read()
    conn.close()
    return answer.status, data


def test_an_operator_watches_counts_change_finds_a_message_and_replays_it(admin, browser, screenshots):
    console, setup = Console(browser, admin), admin.setup
    console.log_in("operator")
    assert "u-operator (operator)" in console.text("header")
    assert console.count("adt", "sent") == ""          # nothing received yet
    assert [a[0] for a in setup.send(adt_a01("WEB1"), adt_a01("WEB2"))] == ["AA", "AA"]
    # The page refreshes itself: the counts change without anyone reloading it.
    wait_for(lambda: console.count("adt", "sent") == "2", "the dashboard to show both sent", timeout=20)
    assert "ok" in console.classes('tr[data-destination="adt/downstream"]')
    assert console.text('tr[data-destination="adt/downstream"] td[data-state="sent"]') == "2"
    console.shot(screenshots, "dashboard")

    console.click('header nav a[href="/ui/messages"]', "#f-control_id")
    console.find("#f-control_id").send_keys("WEB2")
    assert console.all("#f-patient")                  # an operator may search by patient
    console.click("#search", "#results")
    rows = console.all("#results tbody tr")
    assert len(rows) == 1 and "WEB2" in rows[0].text
    console.click("#results tbody a", "#decision")
    message_id = int(console.path.rsplit("/", 1)[1])
    assert console.find("#decision").text == "passed to 2 destination(s): downstream, archive"
    assert "MRN100001" in console.find("#raw").text
    names = {row.text for row in console.all("#segments td")}
    assert "Patient name" in names and "Patient identifier list" in names
    assert len(console.all('section.delivery[data-destination="downstream"] tr.attempt')) == 1
    console.shot(screenshots, "message")
    viewed = audit_actions(setup.store, "content.viewed")
    assert [(e["object_id"], e["actor"]) for e in viewed] == [(str(message_id), "user:u-operator")]
    assert '"console"' in viewed[0]["detail"]

    # A dry run shows what would be sent and changes nothing.
    console.find("#dest-downstream").click()
    console.click("#dry-run", "#diff")
    assert console.find("h1").text.startswith("Dry run") and console.find("#queued").text == "1"
    assert console.find("#diff").text.startswith(f"message {message_id} -> downstream: would send")
    assert setup.store.count_deliveries() == 4
    console.click("#back", "form#replay")
    before = len(admin.downstream.received)
    console.find("#dest-downstream").click()
    console.click("#do-replay", "#outcome")
    assert console.find("h1").text.startswith("Replayed") and console.find("#queued").text == "1"
    admin.downstream.wait_for(before + 1)
    assert admin.downstream.control_ids()[-1] == "WEB2"
    console.click("#back", "form#replay")

    def new_attempt_shown():
        browser.refresh()
        replayed = [s for s in console.all('section.delivery[data-destination="downstream"]')
                    if "replay" in s.find_element("css selector", "h3").text]
        return replayed and replayed[0].find_elements("css selector", "tr.attempt.outcome-sent")
    wait_for(new_attempt_shown, "the replayed delivery's attempt on the message page")
    assert [e["actor"] for e in audit_actions(setup.store, "message.replayed")] == ["user:u-operator"]

    console.click("#logout", "#user")
    assert console.path == "/login"
    console.open(f"/ui/messages/{message_id}")
    assert console.path == "/login"                    # the session is gone


def test_a_viewer_sees_no_patient_data_and_cannot_replay(admin, browser, screenshots):
    console, setup = Console(browser, admin), admin.setup
    assert [a[0] for a in setup.send(adt_a01("VIEW1"))] == ["AA"]
    setup.wait(lambda: setup.store.count_deliveries(state="sent") == 2, what="delivered")
    console.log_in("viewer")
    assert console.count("adt", "sent") == "1"
    pages = {"dashboard": console.source_without_tokens()}
    console.open("/ui/messages?control_id=VIEW1")
    assert not console.all("#f-patient")               # no patient search for a viewer
    pages["browser"] = console.source_without_tokens()
    console.click("#results tbody a", "#decision")
    message_id = int(console.path.rsplit("/", 1)[1])
    assert console.find("#metadata").text and console.all("#deliveries tr.delivery")
    assert not console.all("#raw") and not console.all("#segments") and not console.all("form#replay")
    pages["message"] = console.source_without_tokens()
    console.shot(screenshots, "message-viewer")
    for name, source in pages.items():
        shown = [p for p in PATIENT if p in source]
        assert not shown, f"patient data on the viewer's {name} page: {shown}"
    assert audit_actions(setup.store, "content.viewed") == []
    # A patient search sent anyway is refused (and audited, as by the API).
    console.open("/ui/messages?patient=MRN100001")
    assert "analyst" in console.find("#error").text and "MRN100001" not in console.find("main").text

    # Forged replays: the viewer's own session (its role), an operator's session without the
    # token (CSRF), and no session at all; none queues anything.
    viewer_cookie, viewer_csrf = browser.get_cookie("ie_session")["value"], console.csrf()
    path, form = f"/ui/messages/{message_id}/replay", "destination=downstream&action=replay"
    assert post(admin, path, f"{form}&csrf={viewer_csrf}", viewer_cookie)[0] == 403
    browser.delete_all_cookies()
    console.log_in("operator")
    operator_cookie = browser.get_cookie("ie_session")["value"]
    status, body = post(admin, path, form, operator_cookie)
    assert status == 403 and b"CSRF" in body
    assert post(admin, path, f"{form}&csrf=guessed", operator_cookie)[0] == 403
    assert post(admin, path, form, None)[0] == 401
    assert setup.store.count_deliveries() == 2
    wait_for(lambda: len(audit_actions(setup.store, "access.denied")) >= 4, "the refusals audited")


def test_a_stuck_queue_is_red_and_its_error_shown_from_analyst_up(admin, browser):
    console, setup = Console(browser, admin), admin.setup
    admin.downstream.stop()
    assert [a[0] for a in setup.send(adt_a01("STUCK1"))] == ["AA"]
    console.log_in("analyst")

    downstream = 'tr[data-destination="adt/downstream"]'
    wait_for(lambda: "stuck" in console.classes(downstream) and console.text(f"{downstream} td.error"),
             "the blocked destination in red with its error", timeout=20)
    assert re.search(r"refused|connect", console.text(f"{downstream} td.error"))
    assert "stuck" in console.classes('tr[data-channel="adt"]')
    assert "ok" in console.classes('tr[data-destination="adt/archive"]')
    browser.delete_all_cookies()
    console.log_in("viewer")                           # a viewer sees the colour, not the text
    assert "stuck" in console.classes(downstream)
    assert "last error" not in console.text("#destinations") and 'class="error"' not in console.source_without_tokens()
