"""A language model as the expert H: asked in the chat format, cached, retried, on a budget.

    expert = LMExpert(task, HTTPChatClient(cfg), cfg, cache=ExpertCache(path))
    tree = await amplify_tree(task, engine, question, amplify_cfg, rng, expert=expert)

`LMExpert` offers the three coroutines every expert offers (`fan_out`, `fan_in`, `answer`;
ida_ray/experts.py). Each step is one chat: a system message saying what an expert of HCH
does and how to reply, a few worked examples (the task's `expert_examples`, by default made by
its coded expert: one direct answer, one split, one combination), then the step's own
message, the same one M is shown in the chat prompt format (ida_ray/prompts.py). The reply is
read by that format's parser and checked by the task; a reply that cannot be read is sent back
with the parse error, up to `parse_retries` times, and then the step fails with
`ExpertFailure` (recorded on the tree as `expert_failure`). Every step has a deadline.

Two clients reach the model: `HTTPChatClient` (any OpenAI-compatible `/chat/completions`
endpoint: `vllm serve`, a hosted API) and `EngineChatClient` (a group of vLLM replica actors in
the cluster, through the same replica pool as M; ida_ray/cluster/ray_backend.py starts it).

Expert calls are the scarce resource, so every reply is kept in a SQLite cache keyed on the
expert's identity (model, template version, sampling settings) and the exact conversation: a
resumed or repeated run makes no call twice (Ought's ICE caches every call for the same
reason). `ExpertBudget` caps the calls an expander may make in an iteration; past it the
step raises `ExpertBudgetExhausted`, and H' answers alone (ida_ray/amplify.py).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from ida_ray.errors import ExpertBudgetExhausted, ExpertFailure, ParseError
from ida_ray.experts import ExpertReply, ExpertUsage
from ida_ray.prompts import ChatFormat
from ida_ray.steps import Answer, Split, Step
from ida_ray.tasks.base import Task

SYSTEM = (
    "You are one expert in a tree of experts. Each expert gets a question. If it is small enough, answer "
    "it yourself. Otherwise split it into two subquestions whose answers will let you answer it; later "
    "you are shown their answers and either give the answer or ask two more subquestions.\n"
    "Reply in exactly one of two forms, with nothing else:\n"
    "Answer: <the answer>\n"
    "or\n"
    "Subquestion 1: <a question>\n"
    "Subquestion 2: <a question>")
RETRY = ("Your reply could not be read ({error}). Reply with one line 'Answer: <the answer>', or with two "
         "lines 'Subquestion 1: <a question>' and 'Subquestion 2: <a question>'.")


@dataclass(kw_only=True)
class LMExpertConfig:
    """H as a language model (config `expert: lm`, section `lm_expert:`)."""

    backend: Literal["http", "cluster"] = "http"
    """"http": an OpenAI-compatible endpoint (`vllm serve`, a hosted API); "cluster": the
    expert's own vLLM replica actors, started with the run from `path`."""
    base_url: str = "http://127.0.0.1:8000/v1"
    """The endpoint's base URL (backend http); requests go to <base_url>/chat/completions."""
    model: str | None = None
    """The model name the endpoint serves (backend http; for `vllm serve DIR`, DIR unless
    --served-model-name says otherwise)."""
    api_key_env: str | None = None
    """The environment variable holding the API key, sent as a bearer token (None: no key)."""
    path: str | None = None
    """The expert's weights, an HF directory or hub id (backend cluster; it never trains)."""
    replicas: int = 1
    """vLLM replica actors serving the expert (backend cluster)."""
    gpus_per_replica: int = 1
    """GPUs of each expert replica, its tensor-parallel size (backend cluster, use_gpu)."""
    concurrency: int = 16
    """Requests in flight at once, per expander."""
    timeout_s: float = 60.0
    """One request's timeout."""
    deadline_s: float = 300.0
    """One expert step's deadline, retries included: then the step fails (expert_failure)."""
    max_retries: int = 3
    """Retries of a request that fails in transport, times out, or gets 429/5xx; with
    exponential back-off from `backoff_s` and full jitter."""
    backoff_s: float = 0.5
    parse_retries: int = 2
    """Times an unreadable reply is sent back with its parse error before the step fails."""
    temperature: float = 0.0
    max_tokens: int = 256
    """Completion tokens per reply."""
    few_shot: int = 1
    """Worked examples of each kind (answer, split, combine) in every conversation."""
    cache_path: str | None = None
    """The SQLite cache of replies (None: <run_dir>/expert_cache.sqlite); a shared path lets
    runs share it."""
    use_cache: bool = True
    max_calls_per_iteration: int | None = None
    """Endpoint calls per iteration (cache hits are free); past it H' answers alone."""
    max_calls_per_run: int | None = None
    """Endpoint calls over the run; past it, `on_budget` says what happens."""
    on_budget: Literal["hprime", "stop"] = "hprime"
    """When the run's budget is spent: "hprime" (H' answers alone, the model taking every step
    it can) or "stop" (the run ends after that iteration)."""
    price_per_1k_prompt_tokens: float = 0.0
    price_per_1k_completion_tokens: float = 0.0
    """Cost figures in metrics.jsonl (in whatever currency the prices are in)."""

    def problems(self) -> list[str]:
        p = []
        if self.backend == "http" and not self.model:
            p.append("lm_expert.model must name the model the endpoint serves (backend http)")
        if self.backend == "http" and not self.base_url.startswith(("http://", "https://")):
            p.append(f"lm_expert.base_url must be an http(s) URL, got {self.base_url!r}")
        if self.backend == "cluster" and not self.path:
            p.append("lm_expert.path must name the expert's weights (backend cluster)")
        for name in ("concurrency", "replicas", "gpus_per_replica", "max_tokens"):
            if getattr(self, name) < 1:
                p.append(f"lm_expert.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("timeout_s", "deadline_s"):
            if getattr(self, name) <= 0:
                p.append(f"lm_expert.{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_retries", "parse_retries", "few_shot", "backoff_s", "temperature"):
            if getattr(self, name) < 0:
                p.append(f"lm_expert.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_calls_per_iteration", "max_calls_per_run"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                p.append(f"lm_expert.{name} must be >= 0 or null, got {getattr(self, name)}")
        return p

    def api_key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ExpertFailure(f"lm_expert.api_key_env names {self.api_key_env}, which is not set")
        return key


class ExpertBudget:
    """Endpoint calls an expander may still make (None: no cap). Set per iteration."""

    def __init__(self, allowed: int | None = None):
        self.allowed = allowed
        self.used = 0
        self._lock = threading.Lock()

    def set(self, allowed: int | None) -> None:
        with self._lock:
            self.allowed, self.used = allowed, 0

    def take(self) -> None:
        with self._lock:
            if self.allowed is not None and self.used >= self.allowed:
                raise ExpertBudgetExhausted(f"expert budget of {self.allowed} calls spent")
            self.used += 1


# ---------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------
class ExpertCache:
    """Replies by key, in SQLite (WAL: several expander processes on a node may share it)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, expert TEXT, reply TEXT, "
                         "prompt_tokens INTEGER, completion_tokens INTEGER, created REAL)")

    @staticmethod
    def key(identity: dict, messages: list[dict]) -> str:
        return hashlib.sha256(json.dumps([identity, messages], sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> tuple[str, int, int] | None:
        with self._lock:
            row = self._db.execute("SELECT reply, prompt_tokens, completion_tokens FROM replies WHERE key = ?",
                                   (key,)).fetchone()
        return None if row is None else (row[0], int(row[1]), int(row[2]))

    def put(self, key: str, identity: dict, reply: str, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?, ?, ?)",
                             (key, json.dumps(identity, sort_keys=True), reply, prompt_tokens, completion_tokens,
                              time.time()))

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __getstate__(self):  # a cache travels to an actor as its path, and reopens there
        return {"path": str(self.path)}

    def __setstate__(self, state):
        self.__init__(state["path"])


# ---------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------
@dataclass
class ChatReply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    retries: int = 0


class ChatClient(ABC):
    """One chat completion: messages in, the assistant's reply out; ExpertFailure otherwise."""

    @abstractmethod
    def identity(self) -> dict:
        """What makes two clients' replies interchangeable (the cache key's expert part)."""

    @abstractmethod
    async def complete(self, messages: list[dict]) -> ChatReply: ...

    async def close(self) -> None:
        return None


class HTTPChatClient(ChatClient):
    """An OpenAI-compatible endpoint: POST <base_url>/chat/completions."""

    RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}

    def __init__(self, cfg: LMExpertConfig, rng: random.Random | None = None):
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.rng = rng or random.Random()
        self._client = None
        self._loop = None
        self._slots: asyncio.Semaphore | None = None
        self.requests = 0  # sent to the endpoint, failed attempts and retries included

    def identity(self) -> dict:
        return {"backend": "http", "model": self.cfg.model, "base_url": self.cfg.base_url}

    def _http(self):
        import httpx

        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:  # one client per event loop that uses it
            key = self.cfg.api_key()
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            self._client = httpx.AsyncClient(timeout=self.cfg.timeout_s, headers=headers)
            self._slots, self._loop = asyncio.Semaphore(self.cfg.concurrency), loop
        return self._client

    async def complete(self, messages: list[dict]) -> ChatReply:
        import httpx

        client = self._http()
        body = {"model": self.cfg.model, "messages": messages, "temperature": self.cfg.temperature,
                "max_tokens": self.cfg.max_tokens}
        problem = "no attempt"
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:  # exponential back-off with full jitter
                await asyncio.sleep(self.rng.uniform(0, self.cfg.backoff_s * 2 ** (attempt - 1)))
            try:
                async with self._slots:
                    self.requests += 1
                    response = await client.post(self.url, json=body)
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                problem = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code in self.RETRY_STATUS:
                problem = f"HTTP {response.status_code}: {response.text[:200]}"
                continue
            if response.status_code != 200:
                raise ExpertFailure(f"lm expert {self.url}: HTTP {response.status_code}: {response.text[:300]}",
                                    attempts=attempt + 1)
            try:
                data = response.json()
                text = data["choices"][0]["message"]["content"]
                usage = data.get("usage") or {}
                if not isinstance(text, str):
                    raise TypeError("content is not a string")
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                problem = f"not a chat completion ({type(exc).__name__}: {exc}): {response.text[:200]!r}"
                continue
            return ChatReply(text, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0),
                             attempt)
        raise ExpertFailure(f"lm expert {self.url}: no reply after {self.cfg.max_retries + 1} attempts ({problem})",
                            attempts=self.cfg.max_retries + 1)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class EngineChatClient(ChatClient):
    """The expert served by an Engine (in the cluster: its own vLLM replica actors behind a
    ReplicaPool): each conversation rendered by the expert tokenizer's chat template."""

    def __init__(self, engine, tokenizer, name: str):
        self.engine, self.tokenizer, self.name = engine, tokenizer, name
        self.format = ChatFormat(tokenizer)
        self.requests = 0

    def identity(self) -> dict:
        return {"backend": "cluster", "model": self.name, "greedy": True}

    async def complete(self, messages: list[dict]) -> ChatReply:
        prompt = self.format.render(messages)
        self.requests += 1
        (gen,) = await self.engine.generate([prompt])
        n_prompt = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        n_completion = len(self.tokenizer(gen.text, add_special_tokens=False)["input_ids"]) + int(gen.finished)
        return ChatReply(gen.text, n_prompt, n_completion)


# ---------------------------------------------------------------------------------------
# The expert
# ---------------------------------------------------------------------------------------
@dataclass
class FewShot:
    """One worked example: the message of a step and the expert's reply to it."""

    message: str
    reply: str


def few_shot_messages(task: Task, fmt: ChatFormat, n: int, seed: int = 0) -> list[FewShot]:
    """n worked examples of each kind, from the task's own `expert_examples`."""
    out = []
    for kind, question, sub, step in task.expert_examples(n, random.Random(f"few-shot-{seed}")):
        if kind == "fan_in":
            message = fmt.fan_in_message(question, sub)
        elif kind == "answer":
            message = fmt.answer_message(question)
        else:
            message = fmt.fan_out_message(question)
        out.append(FewShot(message, fmt.format_step(step) if kind != "answer" else fmt.format_answer(step.text)))
    return out


@dataclass
class LMExpertStats:
    steps: int = 0
    requests: int = 0
    cache_hits: int = 0
    parse_retries: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class LMExpert:
    """H as a language model behind a ChatClient (see the module docstring)."""

    def __init__(self, task: Task, client: ChatClient, cfg: LMExpertConfig, cache: ExpertCache | None = None,
                 budget: ExpertBudget | None = None):
        self.task, self.client, self.cfg, self.cache = task, client, cfg, cache
        self.budget = budget or ExpertBudget()
        self.format = ChatFormat()  # the messages' text; the client renders or sends them
        self.examples = few_shot_messages(task, self.format, cfg.few_shot)
        self.template = [{"role": "system", "content": SYSTEM}]
        for ex in self.examples:
            self.template += [{"role": "user", "content": ex.message}, {"role": "assistant", "content": ex.reply}]
        self.template_version = hashlib.sha256(json.dumps(self.template).encode()).hexdigest()[:12]
        self.stats = LMExpertStats()

    def identity(self) -> dict:
        """The model, the template version and the sampling settings: what the cache keys on."""
        return {**self.client.identity(), "template": self.template_version, "temperature": self.cfg.temperature,
                "max_tokens": self.cfg.max_tokens}

    async def fan_out(self, question: str) -> ExpertReply:
        return await self._step(self.format.fan_out_message(question), question, answer_only=False)

    async def fan_in(self, question: str, sub) -> ExpertReply:
        return await self._step(self.format.fan_in_message(question, sub), question, answer_only=False)

    async def answer(self, question: str) -> ExpertReply:
        return await self._step(self.format.answer_message(question), question, answer_only=True)

    async def _step(self, message: str, question: str, answer_only: bool) -> ExpertReply:
        """One step within its deadline. A failed step's exception carries what it cost
        (`usage`), so the tree counts the requests that failed too."""
        self.stats.steps += 1
        usage = ExpertUsage()
        try:
            return await asyncio.wait_for(self._converse(message, question, answer_only, usage), self.cfg.deadline_s)
        except TimeoutError:
            self.stats.failures += 1
            raise ExpertFailure(f"lm expert: no usable reply within the step's deadline of {self.cfg.deadline_s:g}s",
                                usage=usage) from None
        except ExpertBudgetExhausted:
            raise
        except ExpertFailure as exc:
            self.stats.failures += 1
            exc.usage = usage
            raise

    async def _converse(self, message: str, question: str, answer_only: bool, usage: ExpertUsage) -> ExpertReply:
        messages = self.template + [{"role": "user", "content": message}]
        for attempt in range(self.cfg.parse_retries + 1):
            text = await self._complete(messages, usage)
            try:
                if answer_only:
                    step: Step = Answer(self.format.parse_answer(text, self.task, question))
                else:
                    step = self.format.parse_step(text, self.task, question)
                return ExpertReply(step, usage)
            except ParseError as exc:
                if attempt == self.cfg.parse_retries:
                    raise ExpertFailure(f"lm expert: unreadable reply after {attempt + 1} tries ({exc}): "
                                        f"{text[:200]!r}") from None
                usage.parse_retries += 1
                self.stats.parse_retries += 1
                messages = messages + [{"role": "assistant", "content": text},
                                       {"role": "user", "content": RETRY.format(error=exc)}]
        raise AssertionError("unreachable")

    async def _complete(self, messages: list[dict], usage: ExpertUsage) -> str:
        identity = self.identity()
        key = ExpertCache.key(identity, messages)
        if self.cache is not None and self.cfg.use_cache:
            hit = self.cache.get(key)
            if hit is not None:
                usage.cache_hits += 1
                self.stats.cache_hits += 1
                return hit[0]
        self.budget.take()
        try:
            reply = await self.client.complete(messages)
        except ExpertFailure as exc:  # the attempts were made, and count
            usage.requests += exc.attempts
            self.stats.requests += exc.attempts
            raise
        usage.requests += 1 + reply.retries
        usage.prompt_tokens += reply.prompt_tokens
        usage.completion_tokens += reply.completion_tokens
        self.stats.requests += 1 + reply.retries
        self.stats.prompt_tokens += reply.prompt_tokens
        self.stats.completion_tokens += reply.completion_tokens
        if self.cache is not None and self.cfg.use_cache:
            self.cache.put(key, identity, reply.text, reply.prompt_tokens, reply.completion_tokens)
        return reply.text

    def stats_dict(self) -> dict:
        return asdict(self.stats)


def cache_for(cfg: LMExpertConfig, run_dir: str | os.PathLike) -> ExpertCache | None:
    """The run's reply cache: cfg.cache_path, else <run_dir>/expert_cache.sqlite."""
    if not cfg.use_cache:
        return None
    return ExpertCache(Path(cfg.cache_path).expanduser() if cfg.cache_path else Path(run_dir) / "expert_cache.sqlite")


def build_lm_expert(task: Task, cfg: LMExpertConfig, run_dir: str | os.PathLike, engine=None) -> LMExpert:
    """The LM expert of a run: over HTTP, or (backend cluster) over `engine`, the pool of the
    expert's own replicas."""
    if cfg.backend == "http":
        client: ChatClient = HTTPChatClient(cfg)
    else:
        if engine is None:
            raise ExpertFailure("lm_expert.backend 'cluster' needs the expert's replicas (the Ray backend)")
        from ida_ray.models import load_tokenizer

        client = EngineChatClient(engine, load_tokenizer(cfg.path), cfg.path)
    return LMExpert(task, client, cfg, cache=cache_for(cfg, run_dir))


def expert_figures(trees, cfg: LMExpertConfig) -> dict:
    """An iteration's expert cost, summed over its amplification trees' `expert_usage` (trees
    or their TreeSummary)."""
    amp = [t for t in trees if t.mode == "amplify"]
    total = {k: sum(t.expert_usage.get(k, 0) for t in amp) for k in
             ("requests", "cache_hits", "parse_retries", "prompt_tokens", "completion_tokens")}
    tokens = total["prompt_tokens"] + total["completion_tokens"]
    cost = (total["prompt_tokens"] * cfg.price_per_1k_prompt_tokens
            + total["completion_tokens"] * cfg.price_per_1k_completion_tokens) / 1000
    return {**{f"expert_{k}": v for k, v in total.items()}, "expert_tokens": tokens,
            "expert_tokens_per_tree": tokens / max(1, len(amp)), "expert_cost": round(cost, 6)}


def coded_expert_steps(task: Task, question: str) -> list[tuple[str, str, tuple | None, Step]]:
    """Every step of `question`'s expert-only tree, as (kind, question, sub, step): "fan_out"
    (sub None) or "fan_in" (sub the two subquestions with their answers), in the order the tree
    takes them. What an LM expert is trained on, and measured against."""
    from ida_ray.tasks.base import expert_tree_answer

    out = []

    def walk(q: str) -> None:
        step = task.expert_fan_out(q)
        out.append(("fan_out", q, None, step))
        while isinstance(step, Split):
            for s in step.questions:
                walk(s)
            sub = tuple((s, expert_tree_answer(task, s)) for s in step.questions)
            step = task.expert_fan_in(q, sub)
            out.append(("fan_in", q, sub, step))

    walk(question)
    return out


def expert_transcripts(expert: LMExpert, sizes, n: int, rng: random.Random) -> list[tuple[list[dict], str]]:
    """Conversations as `expert` holds them, each with the reply the task's coded expert would
    give: every fan-out and fan-in step of n expert-only trees. Training a model on these makes
    a model that can play H (`experiments.lm_expert`); its errors are its own."""
    fmt, out = expert.format, []
    for _ in range(n):
        for kind, q, sub, step in coded_expert_steps(expert.task, expert.task.generate(rng.choice(list(sizes)), rng)):
            message = fmt.fan_out_message(q) if kind == "fan_out" else fmt.fan_in_message(q, sub)
            out.append((expert.template + [{"role": "user", "content": message}], fmt.format_step(step)))
    return out


__all__ = ["ChatClient", "EngineChatClient", "ExpertBudget", "ExpertBudgetExhausted", "ExpertCache", "FewShot",
           "HTTPChatClient", "LMExpert", "LMExpertConfig", "coded_expert_steps", "expert_transcripts"]
