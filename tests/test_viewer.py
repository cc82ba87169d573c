"""The tree viewer's API and the human-expert queue, on trees made by the real amplification
code with scripted engines (no neural network, no browser)."""
import asyncio
import json
import random
import time

import pytest
from fastapi.testclient import TestClient
from scripted_engine import ScriptedEngine, garbage_policy, oracle_policy

from ida_ray.amplify import amplify_tree, distill_tree
from ida_ray.config import AmplifyConfig
from ida_ray.errors import ExpertFailure
from ida_ray.experts import HumanExpert, HumanQueue, HumanTimeout, UnknownRequest
from ida_ray.steps import Answer, Split
from ida_ray.tasks import get_task
from ida_ray.tree import EXPERT, HPRIME
from ida_ray.viewer import create_app
from ida_ray.viewer.human_runs import HumanRuns
from ida_ray.viewer.store import TreeStore

TASK = get_task("sum")


def confidently_wrong(prompt):
    """Answers every question "7" with certainty: H' takes it, so most roots are wrong."""
    return ("7", -0.001) if prompt[0] == "A" else ("#", -5.0)


def make_trees():
    """A small run: expert-only trees, trees mixing model and expert, a confidently wrong
    model through H', a tree stopped by the depth bound, and a distillation tree."""
    run = asyncio.run

    def amp(policy, q, iteration, version, **cfg):
        eng = ScriptedEngine(policy, adversary_fn=lambda p, c: -0.1 * len(p), version=version)
        return run(amplify_tree(TASK, eng, q, AmplifyConfig(**cfg), random.Random(len(q)), iteration))

    it0 = [amp(garbage_policy, q, 0, 0) for q in ("4", "1,2,3", "5,5,5,5,5")]
    it0.append(amp(garbage_policy, "1,2,3,4,5", 0, 0, max_depth=1))  # depth_exceeded
    it1 = [amp(oracle_policy(TASK, logprob=-3.0), q, 1, 1) for q in ("3,1,4,1", "3,1,4,1,5,9,2,6")]
    it1.append(amp(confidently_wrong, "9,9,9", 1, 1))
    it1.append(run(distill_tree(TASK, ScriptedEngine(oracle_policy(TASK), version=1), "2,7,1", AmplifyConfig(), 1)))
    return {0: it0, 1: it1}


@pytest.fixture(scope="module")
def trees():
    return make_trees()


def write_run(run_dir, trees_by_iteration):
    (run_dir / "trees").mkdir(parents=True, exist_ok=True)
    for it, trees in trees_by_iteration.items():
        with open(run_dir / "trees" / f"iter_{it:03d}.jsonl", "w") as f:
            for t in trees:
                # writers may add fields of their own: the viewer ignores them and recomputes
                # correctness itself, so a stale or wrong "correct" must not leak through
                f.write(json.dumps(dict(t.to_dict(), correct="stale")) + "\n")
    return run_dir


@pytest.fixture
def client(tmp_path, trees):
    with TestClient(create_app(write_run(tmp_path, trees))) as c:
        yield c


def test_fixture_trees_cover_what_the_viewer_shows(trees):
    all_trees = trees[0] + trees[1]
    whos = {n.answered_by for t in all_trees for n in t.nodes()}
    assert {EXPERT, HPRIME} <= whos
    assert any(t.error and t.error["kind"] == "depth_exceeded" for t in all_trees)
    assert any(t.answer is not None and t.answer != TASK.solve(t.question) for t in all_trees)


def test_list_all_newest_first_with_facets(client, trees):
    data = client.get("/api/trees").json()
    assert data["total"] == 8
    assert [t["tree_id"] for t in data["trees"]][:4] == [t.tree_id for t in reversed(trees[1])]
    assert data["facets"]["iteration"] == [0, 1] and data["facets"]["mode"] == ["amplify", "distill"]
    assert data["facets"]["error"] == ["depth_exceeded"]
    info = client.get("/api/info").json()
    assert info["trees"] == 8 and info["problems"] == [] and info["human"] is False


def test_correctness_is_computed_from_the_task_not_the_record(client):
    by_q = {t["question"]: t for t in client.get("/api/trees").json()["trees"]}
    assert by_q["3,1,4,1,5,9,2,6"]["correct"] is True and by_q["3,1,4,1,5,9,2,6"]["answer"] == "31"
    assert by_q["9,9,9"]["correct"] is False and by_q["9,9,9"]["answered_by"] == HPRIME
    assert by_q["1,2,3,4,5"]["correct"] is False and by_q["1,2,3,4,5"]["error"] == "depth_exceeded"


@pytest.mark.parametrize("query, questions", [
    ("iteration=0", {"4", "1,2,3", "5,5,5,5,5", "1,2,3,4,5"}),
    ("size=3", {"1,2,3", "9,9,9", "2,7,1"}),
    ("size=3&iteration=1&mode=amplify", {"9,9,9"}),
    ("correct=false", {"9,9,9", "1,2,3,4,5"}),
    ("correct=true&iteration=1", {"3,1,4,1", "3,1,4,1,5,9,2,6", "2,7,1"}),
    ("error=any", {"1,2,3,4,5"}),
    ("error=none&size=5", {"5,5,5,5,5"}),
    ("task=sum&size=8", {"3,1,4,1,5,9,2,6"}),
    ("task=sort", set()),
])
def test_filters(client, query, questions):
    data = client.get(f"/api/trees?{query}").json()
    assert {t["question"] for t in data["trees"]} == questions and data["total"] == len(questions)


def test_bad_filter_values_are_rejected_clearly(client):
    r = client.get("/api/trees?size=big")
    assert r.status_code == 422 and "size" in r.text
    assert client.get("/api/trees?correct=maybe").status_code == 422


def test_paging(client):
    a = client.get("/api/trees?limit=3").json()
    b = client.get("/api/trees?limit=3&offset=3").json()
    assert len(a["trees"]) == 3 and a["total"] == 8
    assert not {t["tree_id"] for t in a["trees"]} & {t["tree_id"] for t in b["trees"]}


def test_get_tree_is_the_record_plus_correctness_on_every_node(client, trees):
    tree = trees[1][1]  # 8 digits, unconfident oracle: expert splits, model answers one branch
    d = client.get(f"/api/trees/{tree.tree_id}").json()
    assert d["correct"] is True and d["truth"] == "31" and d["weight_versions"] == [1]
    root = d["root"]
    assert root["fan_out"]["who"] == EXPERT and root["fan_out"]["output"] == "?3,1,4,1&5,9,2,6"
    assert root["answer_step"]["logprob"] == -3.0
    rnd = root["rounds"][0]
    assert len(rnd["chosen"]) == 1 and all(s is not None for s in rnd["adversary_scores"])
    child = rnd["children"][rnd["chosen"][0]]
    assert child["correct"] is True and child["truth"] == TASK.solve(child["question"])
    stripped = {k: v for k, v in d.items() if k not in ("correct", "truth")}
    assert stripped["tree_id"] == tree.tree_id and stripped["expert_calls"] == tree.expert_calls


def test_unknown_tree_is_404(client):
    r = client.get("/api/trees/nope")
    assert r.status_code == 404 and "nope" in r.json()["detail"]


def test_pages_are_served(client):
    for path in ("/", "/tree/abc", "/human", "/static/tree.js", "/static/common.js"):
        assert client.get(path).status_code == 200, path


def test_bad_lines_are_reported_and_a_partial_last_line_waits(tmp_path, trees):
    write_run(tmp_path, {0: trees[0][:2]})
    path = tmp_path / "trees" / "iter_000.jsonl"
    with open(path, "a") as f:
        f.write("not json\n")
        f.write(json.dumps({"tree_id": "x"}) + "\n")
        half = trees[1][0].to_json()
        f.write(half[:40])  # a writer is in the middle of this line
    store = TreeStore(tmp_path)
    assert len(store.summaries()) == 2 and len(store.problems) == 2
    assert "iter_000.jsonl" in store.problems[0]
    with open(path, "a") as f:
        f.write(half[40:] + "\n")
    assert len(store.summaries()) == 3 and store.load(trees[1][0].tree_id) == trees[1][0]


def test_new_files_and_rewritten_files_are_picked_up(tmp_path, trees):
    write_run(tmp_path, {0: trees[0]})
    store = TreeStore(tmp_path)
    assert len(store.summaries()) == 4
    write_run(tmp_path, {0: trees[0][:1], 1: trees[1]})  # iter_000 rewritten shorter, iter_001 new
    ids = {s["tree_id"] for s in store.summaries()}
    assert ids == {trees[0][0].tree_id} | {t.tree_id for t in trees[1]}


def test_run_dir_without_trees_is_empty_not_an_error(tmp_path):
    with TestClient(create_app(tmp_path)) as c:
        assert c.get("/api/trees").json()["total"] == 0
        assert c.get("/api/info").json()["trees_dir_exists"] is False
        assert c.get("/api/human/requests").status_code == 404  # no --human


# -- the human expert queue ------------------------------------------------------------

def test_queue_rejects_malformed_then_accepts_valid():
    async def main():
        q = HumanQueue(timeout_s=5)
        expert = HumanExpert(TASK, q)
        waiter = asyncio.create_task(expert.fan_out("1,2,3"))
        while not q.pending():
            await asyncio.sleep(0.01)
        (req,) = q.pending()
        assert req["kind"] == "fan_out" and req["prompt"] == "O1,2,3=" and req["error"] is None
        bad = q.submit(req["request_id"], "6")
        assert not bad["accepted"] and "must start with '!'" in bad["error"]
        assert q.pending()[0]["error"] == bad["error"] and not waiter.done()
        bad_split = q.submit(req["request_id"], "?1,2&3,x")
        assert not bad_split["accepted"] and "malformed subquestion" in bad_split["error"]
        assert q.submit(req["request_id"], " ?1,2&3 ")["accepted"]
        assert await waiter == Split("1,2", "3")
        with pytest.raises(UnknownRequest):
            q.submit(req["request_id"], "!6")
        answer = asyncio.create_task(expert.answer("1,2"))
        while not q.pending():
            await asyncio.sleep(0.01)
        rid = q.pending()[0]["request_id"]
        assert not q.submit(rid, "!3")["accepted"]  # a bare answer has no prefix
        assert q.submit(rid, "3")["accepted"] and await answer == "3"
        assert q.answered == 2 and q.pending() == []
    asyncio.run(main())


def test_queue_timeout_is_an_expert_failure():
    async def main():
        q = HumanQueue(timeout_s=0.05)
        with pytest.raises(HumanTimeout, match="no answer from the person within 0.05s") as info:
            await HumanExpert(TASK, q).fan_in("1,2,3", (("3", "3"), ("1,2", "3")))
        assert isinstance(info.value, ExpertFailure) and info.value.kind == "expert_failure"
        assert q.pending() == [] and q.timed_out == 1
    asyncio.run(main())


def test_queue_answered_from_another_thread():
    async def main():
        q = HumanQueue(timeout_s=5)
        waiter = asyncio.create_task(HumanExpert(TASK, q).fan_out("8"))
        while not q.pending():
            await asyncio.sleep(0.01)
        rid = q.pending()[0]["request_id"]
        result = await asyncio.to_thread(q.submit, rid, "!8")
        assert result["accepted"] and await waiter == Answer("8")
    asyncio.run(main())


def test_amplify_tree_with_a_timed_out_person_records_expert_failure():
    tree = asyncio.run(amplify_tree(TASK, ScriptedEngine(garbage_policy), "1,2,3", AmplifyConfig(),
                                    random.Random(0), expert=HumanExpert(TASK, HumanQueue(timeout_s=0.05))))
    assert tree.error["kind"] == "expert_failure" and "no answer from the person" in tree.error["message"]
    assert tree.expert_calls == 1


def wait_for(fn, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


@pytest.fixture
def human_client(tmp_path):
    runs = HumanRuns(TASK, ScriptedEngine(garbage_policy), AmplifyConfig(), HumanQueue(timeout_s=30), tmp_path)
    with TestClient(create_app(tmp_path, runs)) as c:
        yield c


def answer_as_the_coded_expert(req):
    """What a diligent person would type: the coded expert's own step."""
    from ida_ray.prompts import COMPACT
    if req["kind"] == "fan_out":
        return COMPACT.format_step(TASK.expert_fan_out(req["question"]))
    return COMPACT.format_step(TASK.expert_fan_in(req["question"], tuple(tuple(p) for p in req["sub"])))


def test_human_tree_through_the_api_malformed_then_valid_until_complete(human_client):
    c = human_client
    run = c.post("/api/human/runs", json={"question": "1,2,3,4"}).json()
    assert run["state"] == "running"
    first = wait_for(lambda: c.get("/api/human/requests").json()["requests"])[0]
    assert first["kind"] == "fan_out" and first["question"] == "1,2,3,4"
    bad = c.post(f"/api/human/requests/{first['request_id']}", json={"text": "10?"})
    assert bad.status_code == 422 and "must start with '!'" in bad.json()["detail"]
    assert c.get("/api/human/requests").json()["requests"][0]["error"] == bad.json()["detail"]
    answered = 0
    while c.get("/api/human/runs").json()["runs"][0]["state"] == "running":
        pending = c.get("/api/human/requests").json()["requests"]
        for req in pending:
            r = c.post(f"/api/human/requests/{req['request_id']}", json={"text": answer_as_the_coded_expert(req)})
            assert r.status_code == 200 and r.json()["accepted"], r.text
            answered += 1
        time.sleep(0.02)
        assert answered < 20
    # garbage model: every step is the person's; root fan-out, two leaves, root fan-in
    assert answered == 4
    (done,) = c.get("/api/human/runs").json()["runs"]
    assert done["state"] == "done" and done["answer"] == "10" and done["expert_calls"] == 4
    listed = c.get("/api/trees?source=user").json()["trees"]
    assert [t["tree_id"] for t in listed] == [done["tree_id"]] and listed[0]["correct"] is True
    tree = c.get(f"/api/trees/{done['tree_id']}").json()
    assert tree["root"]["answered_by"] == EXPERT and tree["root"]["fan_out"]["output"] == "?1,2&3,4"


def test_human_run_rejects_a_malformed_question(human_client):
    r = human_client.post("/api/human/runs", json={"question": "1,,2"})
    assert r.status_code == 422 and "comma-separated digits" in r.json()["detail"]
    assert human_client.get("/api/human/runs").json()["runs"] == []


def test_answering_an_unknown_request_is_404(human_client):
    r = human_client.post("/api/human/requests/abc", json={"text": "!1"})
    assert r.status_code == 404 and "not pending" in r.json()["detail"]


# -- the pages off localhost: a token, no cross-site posts, bounded bodies -------------------
def serve_guarded(run_dir, host="0.0.0.0"):
    """A real server for run_dir on `host`, with the token page_guard gives that host."""
    import socket

    from ida_ray.entrypoints.viewer import PageServer
    from ida_ray.viewer.app import page_guard

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = page_guard(host)
    return PageServer(create_app(run_dir, token=token), host, port).start(), f"http://127.0.0.1:{port}", token


def test_off_localhost_every_request_needs_the_token_and_cross_site_posts_are_refused(tmp_path, trees):
    import httpx

    server, base, token = serve_guarded(write_run(tmp_path, trees))
    try:
        assert token and len(token) >= 24
        assert httpx.get(f"{base}/api/info").status_code == 403
        assert httpx.get(f"{base}/").status_code == 403
        assert httpx.get(f"{base}/api/trees", params={"token": "wrong"}).status_code == 403
        first = httpx.get(f"{base}/api/trees", params={"token": token})
        assert first.status_code == 200 and first.json()["total"] == sum(len(v) for v in trees.values())
        cookie = first.cookies.get("ida_ray_token")
        assert cookie == token  # the page's own fetches carry it from here on
        assert httpx.get(f"{base}/api/info", cookies={"ida_ray_token": cookie}).status_code == 200
        assert httpx.get(f"{base}/api/info", headers={"Authorization": f"token {token}"}).status_code == 200
        assert httpx.get(f"{base}/static/style.css").status_code == 200  # no secrets in the static files
        # A POST from another site is refused even with the cookie; from this page it reaches the app.
        auth = {"Authorization": f"token {token}"}
        evil = httpx.post(f"{base}/api/human/requests/r1", json={"text": "!3"},
                          headers={**auth, "Origin": "http://evil.example"})
        assert evil.status_code == 403 and "cross-site" in evil.text
        same = httpx.post(f"{base}/api/human/requests/r1", json={"text": "!3"},
                          headers={**auth, "Origin": base})
        assert same.status_code == 404  # no human expert on this page: the app's own answer
        big = httpx.post(f"{base}/api/human/runs", content=b"x" * 70_000, headers={**auth, "Content-Type": "application/json"})
        assert big.status_code == 413
    finally:
        server.stop()


def test_on_localhost_no_token_is_asked_but_bodies_stay_bounded(tmp_path, trees):
    import httpx

    server, base, token = serve_guarded(write_run(tmp_path, trees), host="127.0.0.1")
    try:
        assert token is None
        assert httpx.get(f"{base}/api/info").status_code == 200
        assert httpx.post(f"{base}/api/human/runs", content=b"x" * 70_000,
                          headers={"Content-Type": "application/json"}).status_code == 413
        long_reply = httpx.post(f"{base}/api/human/runs", json={"question": "1," * 5000})
        assert long_reply.status_code == 422  # over MAX_TEXT: refused by the model, not a 5xx
    finally:
        server.stop()


def test_a_reserved_port_is_held_until_its_page_serves_on_it_and_freed_after(tmp_path, trees):
    """`ida-ray train --expert human` binds its page's port before Ray starts (Ray's processes
    bind ports of their own, and once took a port that was merely found free): nothing else can
    bind it meanwhile, the page then serves on that very socket, and stopping the page frees it."""
    import socket

    import httpx

    from ida_ray.entrypoints.viewer import PageServer, reserve_port

    sock = reserve_port("127.0.0.1", 0)
    port = sock.getsockname()[1]
    with socket.socket() as other, pytest.raises(OSError):
        other.bind(("127.0.0.1", port))
    with pytest.raises(OSError):
        reserve_port("127.0.0.1", port)
    server = PageServer(create_app(write_run(tmp_path, trees)), "127.0.0.1", port, sock=sock).start()
    try:
        info = httpx.get(f"http://127.0.0.1:{port}/api/info", timeout=10)
        assert info.status_code == 200
    finally:
        server.stop()
    assert sock.fileno() == -1  # closed with the server
    reserve_port("127.0.0.1", port).close()  # and the port is free again
