"""End to end in headless Chromium: `python -m pipelines.viewer --human` serves a run, a
person (Selenium) browses a tree and expands a node, then answers the expert's requests from
the page (a malformed reply first, whose error the page shows) until the tree completes.

Needs Debian's chromium and chromium-driver and the selenium package (.ci/browser-deps.sh
installs them); skipped with that reason where they are missing. Screenshots of every page
go to $IDA_SCREENSHOT_DIR (docs/screenshots to refresh the committed ones), else to a tmp dir.
"""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ida_ray.prompts import format_step
from ida_ray.tasks import get_task
from test_viewer import make_trees, write_run

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
try:
    import selenium  # noqa: F401
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    MISSING = f"{', '.join(missing)} not installed" if missing else None
except ImportError:
    MISSING = "the selenium package is not installed"

pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"{MISSING}: run .ci/browser-deps.sh as root")

TASK = get_task("sum")
ROOT = Path(__file__).resolve().parents[1]
WAIT = 30  # seconds for anything on a page to appear (2 busy cores in CI)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    d = Path(os.environ.get("IDA_SCREENSHOT_DIR") or tmp_path_factory.mktemp("screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The viewer CLI on a run with fixture trees, one human tree on 1,2,3,4 started."""
    run_dir = write_run(tmp_path_factory.mktemp("run"), make_trees())
    port = free_port()
    log = open(run_dir / "viewer.log", "w")
    proc = subprocess.Popen([sys.executable, "-u", "-m", "pipelines.viewer", "--run-dir", str(run_dir), "--port",
                             str(port), "--human", "--task", "sum", "--question", "1,2,3,4", "--timeout", "300"],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(base + "/api/info", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise AssertionError(f"viewer did not start:\n{(run_dir / 'viewer.log').read_text()}")
            time.sleep(0.3)
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait(driver, condition, message):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # The human page re-renders its run table every second: an element may go stale mid-check.
    return WebDriverWait(driver, WAIT, poll_frequency=0.1,
                         ignored_exceptions=(StaleElementReferenceException,)).until(condition, message)


def test_browse_filter_and_expand_a_node(server, browser, shots):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(server + "/")
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr.tree-row")) >= 8, "tree rows")
    browser.save_screenshot(str(shots / "trees.png"))

    Select(browser.find_element(By.NAME, "size")).select_by_value("8")
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr.tree-row")) == 1, "filtered to size 8")
    assert "size=8" in browser.current_url
    browser.find_element(By.CSS_SELECTOR, "a.tree-link").click()

    wait(browser, lambda d: d.find_elements(By.ID, "tree-summary"), "tree page")
    assert "3,1,4,1,5,9,2,6" in browser.find_element(By.ID, "tree-summary").text
    root = browser.find_element(By.CSS_SELECTOR, "#tree > details.node")
    assert root.get_attribute("open") is not None
    child = root.find_element(By.CSS_SELECTOR, "details.node")
    assert child.get_attribute("open") is None
    fan_out_row = child.find_element(By.CSS_SELECTOR, "tr.step-fan_out")
    assert not fan_out_row.is_displayed()  # collapsed
    child.find_element(By.TAG_NAME, "summary").click()
    wait(browser, lambda d: fan_out_row.is_displayed(), "expanded node shows its steps")
    assert "expert" in fan_out_row.text and "split" in fan_out_row.text
    assert child.find_elements(By.CSS_SELECTOR, "details.node")  # its own recursed child
    browser.save_screenshot(str(shots / "tree.png"))


def reply_for(card) -> str:
    """The step a careful person types: the coded expert's, read off the card."""
    from selenium.webdriver.common.by import By

    question = card.get_attribute("data-question")
    if card.get_attribute("data-kind") == "fan_out":
        return format_step(TASK.expert_fan_out(question))
    sub = [tuple(s.strip() for s in li.text.split("\u2192")) for li in card.find_elements(By.CSS_SELECTOR, "ul.sub li")]
    return format_step(TASK.expert_fan_in(question, tuple(sub)))


def test_answer_requests_in_the_page_until_the_tree_completes(server, browser, shots):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    browser.get(server + "/human")
    card = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".request"), "a pending request")[0]
    assert card.get_attribute("data-kind") == "fan_out" and card.get_attribute("data-question") == "1,2,3,4"

    reply = card.find_element(By.CSS_SELECTOR, "input.reply")
    reply.send_keys("10?")
    card.find_element(By.CSS_SELECTOR, "button.send").click()
    error = card.find_element(By.CSS_SELECTOR, ".error")
    wait(browser, lambda d: "must start with '!'" in error.text, "the parser's error is shown")
    browser.save_screenshot(str(shots / "human_error.png"))

    answered = set()
    deadline = time.time() + 90
    while not browser.find_elements(By.CSS_SELECTOR, "tr.run-done"):
        assert time.time() < deadline, "the human tree did not complete"
        assert not browser.find_elements(By.CSS_SELECTOR, "tr.run-failed"), "the human tree failed"
        try:
            for card in browser.find_elements(By.CSS_SELECTOR, ".request"):
                rid = card.get_attribute("data-request-id")
                if rid in answered:
                    continue
                reply = card.find_element(By.CSS_SELECTOR, "input.reply")
                reply.clear()
                reply.send_keys(reply_for(card))
                card.find_element(By.CSS_SELECTOR, "button.send").click()
                answered.add(rid)
        except StaleElementReferenceException:
            pass  # the page re-rendered under us; look again
        time.sleep(0.2)
    # the first request, answered after its malformed reply, and the root's fan-in at least
    assert len(answered) >= 2
    wait(browser, lambda d: "nothing waiting" in d.find_element(By.ID, "requests").text, "queue empty")
    done = "tr.run-done td"
    wait(browser, lambda d: [td.text for td in d.find_elements(By.CSS_SELECTOR, done)][2] == "10", "answer 10")
    browser.save_screenshot(str(shots / "human_done.png"))

    href = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "tr.run-done a.tree-link").get_attribute("href"),
                "link to the tree")
    browser.get(href)
    summary = wait(browser, lambda d: d.find_elements(By.ID, "tree-summary"), "the completed tree")[0]
    rows = {tr.find_element(By.TAG_NAME, "th").text: tr.find_element(By.TAG_NAME, "td")
            for tr in summary.find_elements(By.TAG_NAME, "tr")}
    assert rows["question"].text == "1,2,3,4" and rows["source"].text == "user"
    assert rows["answer"].text.startswith("10") and rows["answer"].find_elements(By.CSS_SELECTOR, ".ok")
    fan_out = browser.find_element(By.CSS_SELECTOR, "#tree > details.node > .node-body tr.step-fan_out")
    assert "expert" in fan_out.text and "split 1,2 | 3,4" in fan_out.text
    browser.find_element(By.ID, "expand-all").click()
    browser.save_screenshot(str(shots / "human_tree.png"))
