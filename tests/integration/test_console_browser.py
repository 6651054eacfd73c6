"""The on-call console in a real browser (headless Chromium from Debian, driven by selenium)
against a whole running system: web, worker, scheduler (with its job thread), history and
the Rilla sandbox. What an operator does at 3 a.m.: sign in (a wrong token refused), find a
call by the customer's phone, read its timeline, fix the tenants file and replay the failed
group, watch it become delivered, pause and resume a client. A form posted without its CSRF
token is refused. Each page is saved as a screenshot in ``test-output/console/``."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.support.wait import WebDriverWait

from tests.integration.test_delivery import ACME_KEY, BETA_KEY, call_body, post_ok
from tests.support import RedisServer, until
from tests.system import ADMIN_TOKEN, ROOT, System

pytestmark = [pytest.mark.integration, pytest.mark.browser]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SHOTS = ROOT / "test-output" / "console"


@pytest.fixture
def browser() -> Iterator[Any]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(20)
    SHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def system(own_redis: RedisServer) -> Iterator[System]:
    s = System(own_redis.url)
    try:
        s.start_rilla_sandbox(f"{ACME_KEY}=office@acme.example", BETA_KEY, wait=False)
        s.start_web(wait=False)
        s.start_worker(concurrency=4, wait=False)
        s.start_scheduler(wait=False)
        s.start_history(wait=False)
        s.ready()
        yield s
    finally:
        s.stop()


def shot(driver: Any, name: str) -> None:
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def follow(driver: Any, element: Any) -> None:
    """Click a link or a form's button and wait for the page it leads to: reading the page
    straight after a click can catch the old one, whose elements then go stale."""
    old = driver.find_element("tag name", "html")
    element.click()
    WebDriverWait(driver, 10).until(_gone(old))


def _gone(old: Any) -> Callable[[Any], bool]:
    """The old page's element is gone: stale, or (Chromium, caught mid-navigation) "Node with
    given id does not belong to the document", which selenium's ``staleness_of`` raises."""
    def check(driver: Any) -> bool:
        try:
            old.is_enabled()
        except WebDriverException:   # StaleElementReferenceException is one
            return True
        return False
    return check


def text(driver: Any) -> str:
    return str(driver.find_element("tag name", "body").text)


def reload_until(driver: Any, check: Callable[[str], bool], timeout: float, what: str) -> str:
    def ready() -> bool:
        driver.refresh()
        return check(text(driver))
    until(ready, timeout, what, interval=0.3)
    return text(driver)


def sign_in(driver: Any, base: str, token: str, name: str = "Dana") -> None:
    driver.get(f"{base}/console/")
    driver.find_element("name", "operator").send_keys(name)
    driver.find_element("name", "token").send_keys(token)
    follow(driver, driver.find_element("css selector", "form button[type=submit]"))


def test_on_call_console_end_to_end(system: System, browser: Any) -> None:
    s, d = system, browser
    phone_call = call_body(1, agent_email="", customer_phone_number="+17205550188",
                           customer_name="Casey Jones")
    delivered_id = post_ok(s, "acme", phone_call)
    failing = [post_ok(s, "acme", call_body(n, agent_email="new.rep@acme.example"))
               for n in (2, 3)]
    until(lambda: s.history.status(delivered_id) == "delivered", 30, "the first delivery")
    until(lambda: all(s.history.status(e) == "dead" for e in failing), 30, "the dead letters")

    # A wrong token is refused; the right one signs in.
    sign_in(d, s.web, "not-the-token-at-all")
    assert "wrong token" in text(d)
    shot(d, "01-sign-in-refused")
    sign_in(d, s.web, ADMIN_TOKEN)
    assert "Overview" in text(d) and "Casey" not in text(d)
    # The overview is the one the scheduler published last (every 10 s): one published
    # before these events' history was written has no chart yet, so reload until it has.
    def charts() -> Any:
        if not d.find_elements("css selector", "svg.chart"):
            d.get(f"{s.web}/console/")
        return d.find_elements("css selector", "svg.chart")
    until(charts, 25, "the charts (the overview is published every 10 s)", interval=1.0)
    shot(d, "02-overview")

    # Find the call by the customer's phone, typed as a person would, and open its timeline.
    d.get(f"{s.web}/console/events")
    d.find_element("name", "phone").send_keys("(720) 555-0188")
    follow(d, d.find_element("css selector", "form.search button"))
    assert "Casey Jones" in text(d)
    shot(d, "03-events-search")
    follow(d, d.find_element("link text", delivered_id))
    page = text(d)
    assert "Timeline" in page and "attempt" in page and "delivered" in page
    shot(d, "04-event-timeline")

    # The failing group: fix the tenants file (the new rep maps to the office user), restart
    # the worker, then replay the group: plan, confirm, progress, delivered.
    d.get(f"{s.web}/console/dead-letters")
    assert "rilla_rejected" in text(d) and "422" in text(d)
    shot(d, "05-dead-letter-groups")
    s.tenants = s.tenants.replace(
        '"mike@acme.example" = "mike.r@acme.example"',
        '"mike@acme.example" = "mike.r@acme.example"\n"new.rep@acme.example" = '
        '"office@acme.example"')
    s.kill("worker", signal.SIGTERM)
    s.start_worker("worker-b", concurrency=4)
    follow(d, d.find_element("css selector", "button[name=action][value=replay]"))
    assert "Confirm: replay 2 dead letter(s)" in text(d)
    shot(d, "06-replay-plan")
    follow(d, d.find_element("css selector", "button.primary"))
    reload_until(d, lambda t: "done" in t and "2 / 2 processed" in t, 30, "the job to finish")
    shot(d, "07-replay-done")
    until(lambda: all(s.history.status(e) == "delivered" for e in failing), 30,
          "the replayed deliveries")
    d.get(f"{s.web}/console/events/{failing[0]}")
    assert "delivered" in text(d) and "replayed" in text(d)
    d.get(f"{s.web}/console/dead-letters")
    assert "No open dead letters" in reload_until(
        d, lambda t: "No open dead letters" in t, 10, "the group to close")

    # Pause a client, see it, resume it.
    d.get(f"{s.web}/console/tenants")
    section = d.find_element("id", "t-acme")
    follow(d, section.find_element("xpath", ".//button[normalize-space()='Pause delivery']"))
    assert "delivery paused" in d.find_element("id", "t-acme").text
    shot(d, "08-tenants-paused")
    follow(d, d.find_element("id", "t-acme").find_element(
        "xpath", ".//button[normalize-space()='Resume delivery']"))
    assert "delivery paused" not in d.find_element("id", "t-acme").text
    d.get(f"{s.web}/console/retries")
    shot(d, "09-retries")
    d.get(f"{s.web}/console/audit")
    audit = reload_until(d, lambda t: "tenant.resume" in t, 10, "the audit entries")
    for action in ("console.sign_in", "job.confirm_replay", "dlq.replay", "tenant.pause"):
        assert action in audit
    assert "console:Dana" in audit
    shot(d, "10-audit")

    # A form without the session's CSRF token is refused (the browser's own cookie, a
    # hand-made POST without the hidden field).
    cookies = {c["name"]: c["value"] for c in d.get_cookies()}
    refused = requests.post(f"{s.web}/console/tenants/acme/pause", cookies=cookies,
                            data={}, allow_redirects=False, timeout=10)
    assert refused.status_code == 403
    assert requests.post(f"{s.web}/console/tenants/acme/pause", cookies=cookies,
                         data={"csrf": "guessed"}, allow_redirects=False,
                         timeout=10).status_code == 403
    assert "delivery paused" not in requests.get(
        f"{s.web}/console/tenants", cookies=cookies, timeout=10).text

    # The same overview on a phone.
    d.set_window_size(390, 844)
    d.get(f"{s.web}/console/")
    time.sleep(0.2)
    shot(d, "11-overview-phone")
