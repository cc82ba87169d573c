"""The human expert of a distributed run (ida_ray/actors/human_queue.py), on a local Ray cluster without
a browser: the queue actor behind the client that expanders use and the backend the /human page
uses; an expander whose amplification trees wait on a person while its distillation trees
never ask; the page's API over the actor; the CLI's human-sized defaults."""
from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import ray
from fastapi.testclient import TestClient

from ida_ray.actors.human_queue import HumanQueueClient, RayHumanBackend, start_human_queue
from ida_ray.errors import ExpertFailure
from ida_ray.experts import HumanExpert, HumanTimeout, UnknownRequest
from ida_ray.messages import ExpandJob
from ida_ray.prompts import COMPACT
from ida_ray.steps import Answer, Split
from ida_ray.tasks import get_task
from ida_ray.tree import EXPERT
from ida_ray.viewer import create_app

pytestmark = pytest.mark.ray

TASK = get_task("sum")
RAY_INIT = dict(num_cpus=2, namespace="test-human-queue")  # the `cluster` fixture (tests/conftest.py)


@pytest.fixture
def queue(cluster, request):
    handle = start_human_queue(timeout_s=30, name=f"hq-{request.node.name}")
    yield handle
    ray.kill(handle, no_restart=True)


def wait_for(fn, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_client_and_backend_share_the_actor(queue):
    backend = RayHumanBackend(queue)
    expert = HumanExpert(TASK, HumanQueueClient(queue))

    async def person_and_expert():
        fan_out = asyncio.ensure_future(expert.fan_out("1,2,3"))
        (req,) = await asyncio.to_thread(wait_for, lambda: backend.requests()["requests"])
        assert req["kind"] == "fan_out" and req["question"] == "1,2,3" and req["prompt"] == "O1,2,3="
        bad = await asyncio.to_thread(backend.submit, req["request_id"], "6")
        assert not bad["accepted"] and "must start with '!'" in bad["error"]
        assert backend.requests()["requests"][0]["error"] == bad["error"] and not fan_out.done()
        assert (await asyncio.to_thread(backend.submit, req["request_id"], "?1,2&3"))["accepted"]
        assert await fan_out == Split("1,2", "3")
        with pytest.raises(UnknownRequest, match="not pending"):
            backend.submit(req["request_id"], "!6")

        fan_in = asyncio.ensure_future(expert.fan_in("1,2,3", (("3", "3"), ("1,2", "3"))))
        (req,) = await asyncio.to_thread(wait_for, lambda: backend.requests()["requests"])
        assert req["kind"] == "fan_in" and req["sub"] == [["1,2", "3"], ["3", "3"]]
        assert (await asyncio.to_thread(backend.submit, req["request_id"], "!6"))["accepted"]
        assert await fan_in == Answer("6")

    asyncio.run(person_and_expert())
    stats = backend.requests()
    assert stats == {"requests": [], "answered": 2, "timed_out": 0}


def test_timeout_is_an_expert_failure_with_the_queue_s_message(queue):
    client = HumanQueueClient(queue)
    with pytest.raises(HumanTimeout, match="no answer from the person within 0.3s") as info:
        asyncio.run(HumanExpert(TASK, client, timeout_s=0.3).fan_out("1,2"))
    assert isinstance(info.value, ExpertFailure) and "Traceback" not in str(info.value)
    assert RayHumanBackend(queue).requests() == {"requests": [], "answered": 0, "timed_out": 1}


def test_a_cancelled_tree_takes_its_request_off_the_page(queue):
    backend = RayHumanBackend(queue)

    async def cancel_while_waiting():
        waiter = asyncio.ensure_future(HumanExpert(TASK, HumanQueueClient(queue)).fan_out("4"))
        await asyncio.to_thread(wait_for, lambda: backend.requests()["requests"])
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter

    asyncio.run(cancel_while_waiting())
    wait_for(lambda: backend.requests()["requests"] == [])


def test_a_dead_queue_fails_the_tree_instead_of_hanging(cluster):
    handle = start_human_queue(timeout_s=30, name="hq-dead")
    ray.kill(handle, no_restart=True)
    with pytest.raises(HumanTimeout, match="human queue is gone"):
        asyncio.run(HumanExpert(TASK, HumanQueueClient(handle)).fan_out("1,2"))


def test_start_human_queue_returns_the_running_one(queue):
    again = start_human_queue(timeout_s=5, name=f"hq-{'test_start_human_queue_returns_the_running_one'}")
    assert ray.get(again.health.remote())["timeout_s"] == 30  # the first one's, not a new queue


def test_page_api_over_the_actor(queue):
    backend = RayHumanBackend(queue, status=lambda: "training run r: iteration 1 of 1, expanding trees")
    client = HumanQueueClient(queue)
    app_client = TestClient(create_app("/nonexistent-run-dir", backend))
    with app_client as c:
        assert c.get("/api/info").json()["human"] is True and c.get("/api/info").json()["human_can_start"] is False
        runs = c.get("/api/human/runs").json()
        assert runs == {"runs": [], "can_start": False, "status": "training run r: iteration 1 of 1, expanding trees"}
        assert c.post("/api/human/runs", json={"question": "1,2"}).status_code == 409

        result = {}
        t = threading.Thread(target=lambda: result.update(step=asyncio.run(client.ask(TASK, "fan_out", "2,2"))))
        t.start()
        (req,) = wait_for(lambda: c.get("/api/human/requests").json()["requests"])
        bad = c.post(f"/api/human/requests/{req['request_id']}", json={"text": "?2&"})
        assert bad.status_code == 422 and "malformed" in bad.json()["detail"].lower()
        ok = c.post(f"/api/human/requests/{req['request_id']}", json={"text": "?2&2"})
        assert ok.status_code == 200 and ok.json()["accepted"]
        t.join(20)
        assert result["step"] == Split("2", "2")
        assert c.post(f"/api/human/requests/{req['request_id']}", json={"text": "!4"}).status_code == 404
        assert c.get("/api/human/requests").json()["answered"] == 1


def test_start_questions_need_a_backend_that_starts_trees(queue):
    with pytest.raises(ValueError, match="starts trees"):
        create_app("/nonexistent-run-dir", RayHumanBackend(queue), start_questions=("1,2",))


@pytest.mark.slow
def test_expander_amplifies_with_the_person_and_distills_alone(cluster, model_dirs):
    """A TreeExpander over a torch replica: the amplification tree's every expert step is the
    person's (H' off), the distillation tree asks nobody; a request nobody answers fails its tree."""
    from ida_ray.actors.expander import start_expanders
    from ida_ray.actors.replica import start_replicas

    model_dir, adversary_dir = model_dirs
    queue = start_human_queue(timeout_s=60, name="hq-expander")
    replicas = start_replicas(1, model_dir, adversary_dir, engine="torch", name_prefix="hq-replica",
                              max_new_tokens=8, num_cpus=0.5, max_restarts=0)
    (expander,) = start_expanders(1, replicas, name_prefix="hq-expander", num_cpus=0.5, max_restarts=0,
                                  amplify={"use_hprime": False, "max_new_tokens": 8}, human_queue=queue)
    handles = [expander, *replicas, queue]
    try:
        assert ray.get(expander.health.remote())["expert"] == "human"
        ref = expander.expand.remote([ExpandJob("a", "1,2,3", "amplify", iteration=0, seed=0),
                                      ExpandJob("d", "1,2,3", "distill", iteration=0)])
        backend, sent = RayHumanBackend(queue), {}
        while not ray.wait([ref], timeout=0.1)[0]:
            for req in backend.requests()["requests"]:
                sub = tuple(tuple(p) for p in req["sub"] or ())
                step = TASK.expert_fan_out(req["question"]) if req["kind"] == "fan_out" else \
                    TASK.expert_fan_in(req["question"], sub)
                text = COMPACT.format_step(step)
                assert backend.submit(req["request_id"], text)["accepted"]
                sent[(req["kind"], req["question"])] = text
            assert len(sent) < 30
        amp, dist = (r.tree for r in ray.get(ref))
        assert amp.error is None and amp.answer == "6" and amp.expert_calls == len(sent) >= 2
        steps = [(s.role, n.question, s.output) for n in amp.nodes()
                 for s in [n.fan_out] + [r.fan_in for r in n.rounds] if s is not None and s.who == EXPERT]
        assert len(steps) == len(sent) and all(sent[(role, q)] == out for role, q, out in steps)
        assert dist.mode == "distill" and dist.expert_calls == 0

        # Nobody answers: the tree is recorded as failed, and the expander goes on.
        slow_queue = start_human_queue(timeout_s=0.5, name="hq-nobody")
        (unanswered,) = start_expanders(1, replicas, name_prefix="hq-expander-nobody", num_cpus=0.5, max_restarts=0,
                                        amplify={"use_hprime": False, "max_new_tokens": 8}, human_queue=slow_queue)
        handles += [slow_queue, unanswered]
        (res,) = ray.get(unanswered.expand.remote([ExpandJob("t", "1,2,3", "amplify", iteration=0)]), timeout=60)
        tree = res.tree
        assert tree.error["kind"] == "expert_failure"
        assert "no answer from the person within 0.5s" in tree.error["message"]
        assert ray.get(unanswered.health.remote())["trees_failed"] == 1
    finally:
        for h in handles:
            ray.kill(h, no_restart=True)


# -- the command line, before any Ray ----------------------------------------------------

@pytest.fixture
def no_train(monkeypatch):
    """Capture the config `ida-ray train` would run, without running it."""
    import ida_ray.entrypoints.train

    seen = {}

    def fake_train(cfg, **kwargs):
        seen["cfg"] = cfg
        return []
    monkeypatch.setattr(ida_ray.entrypoints.train, "train", fake_train)
    return seen


def test_cli_human_mode_is_person_sized_unless_told_otherwise(no_train, tmp_path):
    from ida_ray.entrypoints import cli

    base = ["train", "--engine", "torch", "--run-dir", str(tmp_path / "r")]
    assert cli.main(base + ["--expert", "human"]) == 0
    cfg = no_train["cfg"]
    assert (cfg.expert, cfg.amplify_trees_per_iteration, cfg.pages_host, cfg.pages_port, cfg.human_timeout_s) == \
        ("human", 4, "127.0.0.1", 8266, 1800.0)
    assert cli.main(base + ["--expert", "human", "--amplify-trees", "7", "--human-timeout", "90",
                            "--pages-port", "9001"]) == 0
    cfg = no_train["cfg"]
    assert (cfg.amplify_trees_per_iteration, cfg.human_timeout_s, cfg.pages_port) == (7, 90.0, 9001)
    config = tmp_path / "run.yaml"
    config.write_text("amplify_trees_per_iteration: 12\nexpert: human\n")
    assert cli.main(["train", "--config", str(config), "--engine", "torch"]) == 0
    assert (no_train["cfg"].expert, no_train["cfg"].amplify_trees_per_iteration) == ("human", 12)
    assert cli.main(base) == 0 and no_train["cfg"].expert == "coded"
    assert no_train["cfg"].amplify_trees_per_iteration == 384  # the coded default is untouched


def test_bad_human_settings_are_clear_errors_before_ray(monkeypatch, capsys, tmp_path):
    from ida_ray.entrypoints import cli

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init before the input was checked"))
    with pytest.raises(SystemExit):
        cli.main(["train", "--expert", "robot"])
    with pytest.raises(SystemExit):
        cli.main(["train", "--expert", "human", "--human-timeout", "0"])
    config = tmp_path / "run.yaml"
    config.write_text("expert: person\nhuman_timeout_s: -1\n")
    assert cli.main(["train", "--config", str(config), "--engine", "torch"]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "expert must be one of ['coded', 'human', 'lm']" in err and "human_timeout_s must be > 0" in err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc = cli.main(["train", "--expert", "human", "--engine", "torch", "--pages-port", str(port),
                       "--run-dir", str(tmp_path / "r")])
    assert rc == cli.EXIT_BAD_INPUT and f"cannot serve the human page on 127.0.0.1:{port}" in capsys.readouterr().err
