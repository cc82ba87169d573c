"""End to end in headless Chromium: `python -m ida_ray.entrypoints.viewer --human` serves a run, a
person (Selenium) browses a tree and expands a node, then answers the expert's requests from
the page (a malformed reply first, whose error the page shows) until the tree completes. Then
`ida-ray train --expert human` (a real one-iteration run on a local Ray cluster) waits on the
person, who answers its amplification trees' requests on the run's page until the run ends,
and the run's tree record holds the person's steps.

Needs Debian's chromium and chromium-driver and the selenium package (.ci/browser-deps.sh
installs them); skipped with that reason where they are missing. Screenshots of every page
go to $IDA_SCREENSHOT_DIR (docs/screenshots to refresh the committed ones), else to a tmp dir.
"""
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from test_viewer import make_trees, write_run

from ida_ray.prompts import COMPACT
from ida_ray.tasks import get_task
from ida_ray.tree import EXPERT

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
    """A free port between Ray's worker ports (10002-19999) and the kernel's ephemeral ones
    (32768 up), for a command started next. `ida-ray train --expert human` binds its page's port
    before it starts Ray (`reserve_port`); the range keeps the port clear of whatever Ray's
    processes, still running from an earlier test, bind between this pick and that bind."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20_000, 32_000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    d = Path(os.environ.get("IDA_SCREENSHOT_DIR") or tmp_path_factory.mktemp("screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


class Served:
    """A command serving the viewer app on a free port (`--port`/`--pages-port` PORT is
    appended), started and waited for; `stop()` ends it if it is still running."""

    def __init__(self, args: list[str], log_path: Path, port_flag: str = "--port", timeout_s: float = 120):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-u", *args, port_flag, str(self.port)], cwd=ROOT,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout_s
        while True:
            try:
                urllib.request.urlopen(self.base + "/api/info", timeout=2)
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise AssertionError(f"{args[:2]} did not serve the page:\n{log_path.read_text()[-5000:]}") from None
                time.sleep(0.3)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The viewer CLI on a run with fixture trees, one human tree on 1,2,3,4 started."""
    run_dir = write_run(tmp_path_factory.mktemp("run"), make_trees())
    served = Served(["-m", "ida_ray.entrypoints.viewer", "--run-dir", str(run_dir), "--human", "--task", "sum",
                     "--question", "1,2,3,4", "--timeout", "300"], run_dir / "viewer.log")
    yield served.base
    served.stop()


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


def wait(driver, condition, message, timeout=WAIT):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # The human page re-renders its run table every second: an element may go stale mid-check.
    return WebDriverWait(driver, timeout, poll_frequency=0.1,
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


def reply_for(card, task=TASK) -> str:
    """The step a careful person types: the coded expert's, read off the card."""
    from selenium.webdriver.common.by import By

    question = card.get_attribute("data-question")
    if card.get_attribute("data-kind") == "fan_out":
        return COMPACT.format_step(task.expert_fan_out(question))
    sub = [tuple(s.strip() for s in li.text.split("\u2192")) for li in card.find_elements(By.CSS_SELECTOR, "ul.sub li")]
    return COMPACT.format_step(task.expert_fan_in(question, tuple(sub)))


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


# -- a training run with the person as the expert ------------------------------------------
# One iteration of the real distributed run on the torch engine: tiny model, two amplification
# trees over lists of 1-2 digits (a handful of requests), a few training steps.
TINY_RUN = {
    "iterations": 1, "train_sizes": [1, 2], "amplify_trees_per_iteration": 2, "distill_trees_per_iteration": 2,
    "eval_questions_per_size": 2,
    "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
    "train": {"steps_per_iteration": 2, "adversary_steps_per_iteration": 1, "batch_size": 8},
    "resources": {"expander_cpus": 0.25},
}


@pytest.fixture(scope="module")
def human_run(tmp_path_factory):
    """`ida-ray train --expert human` in a subprocess with its own run directory and port."""
    root = tmp_path_factory.mktemp("human_run")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_RUN))
    run_dir = root / "run"
    served = Served(["-m", "ida_ray.entrypoints.cli", "train", "--config", str(config), "--engine", "torch", "--expert",
                     "human", "--human-timeout", "300", "--run-dir", str(run_dir), "--no-dashboard",
                     "--no-progress"], root / "train.log", port_flag="--pages-port")
    served.run_dir = run_dir
    yield served
    served.stop()


def test_train_with_the_person_as_expert_until_the_run_ends(human_run, browser, shots):
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.common.by import By

    from ida_ray.config import load_config

    task = get_task("sum", **load_config("default").task_kwargs)  # the run's task: the config overlays the default
    browser.get(human_run.base + "/human")
    wait(browser, lambda d: "training run" in d.find_element(By.ID, "run-status").text, "the run's status line")
    assert not browser.find_element(By.ID, "runs-section").is_displayed()  # the run starts its own trees

    # The first request comes once the run's cluster is up and its trees start; a malformed
    # reply to it comes back with the parser's error.
    card = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".request"), "a pending request", 150)[0]
    assert card.get_attribute("data-kind") == "fan_out"
    card.find_element(By.CSS_SELECTOR, "input.reply").send_keys("3?")
    card.find_element(By.CSS_SELECTOR, "button.send").click()
    error = card.find_element(By.CSS_SELECTOR, ".error")
    wait(browser, lambda d: "must start with '!'" in error.text, "the parser's error is shown")
    assert "expanding trees" in browser.find_element(By.ID, "run-status").text
    browser.save_screenshot(str(shots / "train_human.png"))

    sent: dict[str, str] = {}  # the request's prompt (question, and subanswers for a fan-in) -> the reply
    answered = set()
    deadline = time.time() + 150
    while human_run.proc.poll() is None:
        assert time.time() < deadline, f"the run did not finish:\n{human_run.log_path.read_text()[-3000:]}"
        try:
            for card in browser.find_elements(By.CSS_SELECTOR, ".request"):
                rid = card.get_attribute("data-request-id")
                if rid in answered:
                    continue
                text = reply_for(card, task)
                prompt = card.find_element(By.CSS_SELECTOR, ".prompt code").text
                reply = card.find_element(By.CSS_SELECTOR, "input.reply")
                reply.clear()
                reply.send_keys(text)
                card.find_element(By.CSS_SELECTOR, "button.send").click()
                answered.add(rid)
                assert sent.setdefault(prompt, text) == text
        except (StaleElementReferenceException, WebDriverException):
            pass  # the page re-rendered under us, or the run ended and its page went away
        time.sleep(0.2)
    log = human_run.log_path.read_text()
    assert human_run.proc.returncode == 0, log[-3000:]
    assert "you are the expert: answer the run's requests at http://127.0.0.1:" in log
    assert "== ida-ray results ==" in log
    assert len(answered) >= 4  # two trees over 1-2 digits: the person answers every node (H' is not yet sure)

    trees = [json.loads(line) for f in sorted((human_run.run_dir / "trees").glob("*.jsonl"))
             for line in f.read_text().splitlines()]
    amplified = [t for t in trees if t["mode"] == "amplify"]
    assert len(amplified) == 2 and all(t["error"] is None and t["expert_calls"] >= 1 for t in amplified), amplified

    def expert_steps(node):
        steps = [node.get("fan_out")] + [r.get("fan_in") for r in node.get("rounds", [])]
        yield from ((s["prompt"], s["output"]) for s in steps if s and s["who"] == EXPERT)
        for r in node.get("rounds", []):
            for child in r["children"]:
                if child:
                    yield from expert_steps(child)

    steps = [s for t in amplified for s in expert_steps(t["root"])]
    assert len(steps) == sum(t["expert_calls"] for t in amplified)
    assert all(sent[prompt] == out for prompt, out in steps), (steps, sent)  # every one the person's
    assert all(t["expert_calls"] == 0 for t in trees if t["mode"] == "distill")

    # The completed tree in the viewer: the person's steps are the expert's.
    done = max(amplified, key=lambda t: t["expert_calls"])
    viewer = Served(["-m", "ida_ray.entrypoints.viewer", "--run-dir", str(human_run.run_dir)],
                    human_run.run_dir / "viewer.log")
    try:
        browser.get(f"{viewer.base}/tree/{done['tree_id']}")
        summary = wait(browser, lambda d: d.find_elements(By.ID, "tree-summary"), "the completed tree")[0]
        assert done["question"] in summary.text
        browser.find_element(By.ID, "expand-all").click()
        fan_out = browser.find_element(By.CSS_SELECTOR, "#tree > details.node > .node-body tr.step-fan_out")
        assert "expert" in fan_out.text
        browser.save_screenshot(str(shots / "train_human_tree.png"))
    finally:
        viewer.stop()



# -- the viewer beside a live run -----------------------------------------------------------
# The local backend (one process) on the tiny model: iterations of a few seconds each, enough
# for the page to show one iteration before the next arrives.
LIVE_RUN = {
    "backend": "local", "engine": "torch", "iterations": 6, "train_sizes": [1, 2, 3],
    "amplify_trees_per_iteration": 48, "distill_trees_per_iteration": 32, "eval_questions_per_size": 20,
    "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
    "train": {"steps_per_iteration": 40, "adversary_steps_per_iteration": 4}, "logger": [],
}


def test_the_runs_own_viewer_follows_it_then_search_and_compare_a_question_across_iterations(
        tmp_path_factory, browser, shots):
    from selenium.webdriver.common.by import By

    root = tmp_path_factory.mktemp("live_run")
    config = root / "live.yaml"
    config.write_text(yaml.safe_dump(LIVE_RUN))
    run_dir = root / "run"
    run = Served(["-m", "ida_ray.entrypoints.cli", "train", "--config", str(config), "--run-dir", str(run_dir),
                  "--no-progress"], root / "train.log", port_flag="--pages-port")
    try:
        browser.get(run.base + "/")
        points = lambda d: {int(a.get_attribute("data-iteration"))  # noqa: E731
                            for a in d.find_elements(By.CSS_SELECTOR, "#accuracy-chart a.point-link")}
        wait(browser, lambda d: points(d) and len(d.find_elements(By.CSS_SELECTOR, "tr.tree-row")) > 0,
             "the first iteration's point and trees", 120)
        first = max(points(browser))
        assert run.proc.poll() is None, "the run ended before the page saw it running"
        browser.save_screenshot(str(shots / "live_run.png"))
        # No reload: the page follows the run and shows the next iteration as it completes.
        browser.execute_script("window.notReloaded = true")
        wait(browser, lambda d: max(points(d)) > first, "a later iteration, without reloading", 120)
        assert browser.execute_script("return window.notReloaded === true")
    finally:
        run.proc.wait(timeout=300)
        run.stop()
    assert run.proc.returncode == 0, run.log_path.read_text()[-3000:]
    assert "tree viewer and progress: http://127.0.0.1:" in run.log_path.read_text()

    viewer = Served(["-m", "ida_ray.entrypoints.viewer", "--run-dir", str(run_dir)], run_dir / "viewer.log")
    try:
        # A point of the plot opens that iteration's trees of that size.
        browser.get(viewer.base + "/")
        link = wait(browser, lambda d: [a for a in d.find_elements(By.CSS_SELECTOR, "#accuracy-chart a.point-link")
                                        if a.get_attribute("data-iteration") == "2"
                                        and a.get_attribute("data-series") == "size 2"], "iteration 2's point")[0]
        browser.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", link)
        wait(browser, lambda d: "iteration=2" in d.current_url and d.find_elements(By.CSS_SELECTOR, "tr.tree-row"),
             "the point's trees")
        rows = browser.find_elements(By.CSS_SELECTOR, "tr.tree-row")
        assert all(r.find_elements(By.TAG_NAME, "td")[0].text == "2" and r.find_elements(By.TAG_NAME, "td")[3].text == "2"
                   for r in rows)

        # Search by question text: a size-1 question of this run, found among every tree.
        trees = json.loads(urllib.request.urlopen(viewer.base + "/api/trees?size=1&limit=1000", timeout=10).read())
        by_question: dict[str, set] = {}
        for t in trees["trees"]:
            by_question.setdefault(t["question"], set()).add(t["iteration"])
        question = max(by_question, key=lambda q: len(by_question[q]))
        assert len(by_question[question]) >= 2  # sum's size-1 questions recur across iterations
        browser.get(viewer.base + "/")
        box = wait(browser, lambda d: d.find_elements(By.ID, "search"), "the search box")[0]
        box.send_keys("," if "," in question else question)
        wait(browser, lambda d: "q=" in d.current_url, "the search in the URL")
        texts = wait(browser, lambda d: [a.text for a in d.find_elements(By.CSS_SELECTOR, "a.tree-link")], "matches")
        assert texts and all(("," if "," in question else question) in t for t in texts)

        # One question's trees across iterations, side by side.
        browser.get(f"{viewer.base}/question?q={urllib.parse.quote(question)}")
        columns = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".column"), "the columns")
        iterations = [int(c.get_attribute("data-iteration")) for c in columns]
        assert iterations == sorted(iterations) and len(set(iterations)) >= 2
        for c in columns:
            assert c.find_elements(By.CSS_SELECTOR, "tbody tr")[0].text.startswith(question)
            assert c.find_elements(By.CSS_SELECTOR, ".badge")  # who answered
        browser.save_screenshot(str(shots / "question_across_iterations.png"))
    finally:
        viewer.stop()


def test_off_localhost_the_page_opens_with_the_printed_token_only(tmp_path, browser, shots):
    from selenium.webdriver.common.by import By

    run_dir = write_run(tmp_path / "run", make_trees())
    port = free_port()
    log_path = tmp_path / "viewer.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-u", "-m", "ida_ray.entrypoints.viewer", "--run-dir", str(run_dir),
                                 "--host", "0.0.0.0", "--port", str(port)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while "?token=" not in log_path.read_text():
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()
            time.sleep(0.2)
        token = log_path.read_text().split("?token=")[1].split()[0]
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):  # the URL is printed just before the server listens
            try:
                urllib.request.urlopen(f"{base}/static/style.css", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        browser.delete_all_cookies()
        browser.get(base + "/")
        assert "needs the run's token" in browser.find_element(By.TAG_NAME, "body").text
        browser.get(f"{base}/?token={token}")
        rows = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "tr.tree-row"), "the trees, with the token")
        href = rows[0].find_element(By.CSS_SELECTOR, "a.tree-link").get_attribute("href")
        assert "token" not in href
        browser.get(href)  # the cookie the token set carries the next pages and their API calls
        wait(browser, lambda d: d.find_elements(By.ID, "tree-summary"), "a tree page, by the cookie")
        browser.delete_all_cookies()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
