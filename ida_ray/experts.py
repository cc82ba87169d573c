"""The expert H, behind the async interface every expert offers (`fan_out`, `fan_in`,
`answer`): the task's coded oracle (`CodedExpert`, the default) or a person (`HumanExpert`).

`amplify_tree(..., expert=HumanExpert(task, queue))` expands a tree with a person as H: each
fan-out, fan-in and answer request waits in a `HumanQueue` until someone answers it in the
browser (the human page of `ida_ray.viewer`).
A submission is checked by the task's parser before the algorithm sees it: a malformed one
is rejected, the request stays pending, and the parser's message is kept on the request so
the page shows it to the person. A request nobody answers within its timeout fails with
`HumanTimeout`, an `ExpertFailure`, which the tree records like any other expert failure.

The queue is thread-safe: the algorithm may await in one thread's event loop while the web
server answers from another.
"""
from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field

from ida_ray.errors import ExpertFailure, ParseError
from ida_ray.prompts import COMPACT
from ida_ray.steps import Step
from ida_ray.tasks.base import Task

KINDS = ("fan_out", "fan_in", "answer")

# What each kind of request asks of the person, shown on the page.
INSTRUCTIONS = {
    "fan_out": "Answer the question yourself (!answer) or split it into two subquestions (?q1&q2).",
    "fan_in": "Combine the two subanswers into the answer (!answer), or ask two more subquestions (?q1&q2).",
    "answer": "Write the answer (no prefix).",
}


@dataclass
class ExpertUsage:
    """What one expert step cost: endpoint requests (retries included), cache hits, replies
    sent back unreadable, and tokens. Trees sum it (`Tree.expert_usage`)."""

    requests: int = 0
    cache_hits: int = 0
    parse_retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, other: ExpertUsage) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


@dataclass
class ExpertReply:
    """An expert's step with what it cost (an expert may return a bare Step instead)."""

    step: Step
    usage: ExpertUsage


class CodedExpert:
    """H as the task's coded oracle, behind the async interface every expert offers.

    Any object with these three coroutines can stand in for H (a person answering through
    `HumanExpert`, a stronger model): `amplify_tree(expert=...)`.
    `fan_out` and `fan_in` return a Step; `answer` returns an answer string."""

    def __init__(self, task: Task):
        self.task = task

    async def fan_out(self, question: str) -> Step:
        return self.task.expert_fan_out(question)

    async def fan_in(self, question: str, sub: tuple[tuple[str, str], tuple[str, str]]) -> Step:
        return self.task.expert_fan_in(question, sub)

    async def answer(self, question: str) -> str:
        return self.task.expert_answer(question)


class HumanTimeout(ExpertFailure):
    """Nobody answered a request in time."""


class UnknownRequest(KeyError):
    """The request id is not pending: it was answered, timed out, or never existed."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown request"


@dataclass
class HumanRequest:
    request_id: str
    kind: str  # "fan_out" | "fan_in" | "answer"
    task: str
    question: str
    sub: list[list[str]] | None  # fan-in only: [[q1, a1], [q2, a2]] in canonical order
    prompt: str  # the same request in the model's prompt format
    instructions: str
    created: float
    deadline: float
    rejected: list[dict] = field(default_factory=list)  # earlier malformed submissions: {"text", "error"}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["seconds_left"] = max(0.0, round(self.deadline - time.time(), 1))
        d["error"] = self.rejected[-1]["error"] if self.rejected else None
        return d


@dataclass
class _Waiting:
    request: HumanRequest
    task: Task
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


class HumanQueue:
    """Requests waiting for a person, and the validated answers going back to the algorithm."""

    def __init__(self, timeout_s: float = 600.0):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._waiting: dict[str, _Waiting] = {}
        self.answered = 0
        self.timed_out = 0

    async def ask(self, task: Task, kind: str, question: str, sub=None, timeout_s: float | None = None):
        """Wait for the person's validated reply: a Step for fan_out/fan_in, a string for answer."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        timeout = self.timeout_s if timeout_s is None else timeout_s
        sub = None if sub is None else [list(p) for p in sorted(sub)]
        if kind == "fan_in":
            prompt = COMPACT.fan_in_prompt(question, (tuple(sub[0]), tuple(sub[1])))
        else:
            prompt = COMPACT.fan_out_prompt(question) if kind == "fan_out" else COMPACT.answer_prompt(question)
        now = time.time()
        request = HumanRequest(uuid.uuid4().hex[:12], kind, task.name, question, sub, prompt, INSTRUCTIONS[kind],
                               now, now + timeout)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            self._waiting[request.request_id] = _Waiting(request, task, loop, future)
        try:
            done, _ = await asyncio.wait({future}, timeout=timeout)
            if not done:
                with self._lock:
                    still_pending = self._waiting.pop(request.request_id, None) is not None
                    if still_pending:
                        self.timed_out += 1
                if still_pending:
                    raise HumanTimeout(f"no answer from the person within {timeout:g}s to {kind} of {question!r}")
                # submit() took the request just now; its reply is already on its way to this loop.
            return await future
        finally:
            with self._lock:  # a cancelled tree leaves nothing pending
                self._waiting.pop(request.request_id, None)

    def pending(self) -> list[dict]:
        with self._lock:
            requests = [w.request for w in self._waiting.values()]
        return [r.to_dict() for r in sorted(requests, key=lambda r: r.created)]

    def submit(self, request_id: str, text: str) -> dict:
        """Validate a person's reply to a pending request.

        Returns {"accepted": True, "value": ...} and wakes the algorithm, or
        {"accepted": False, "error": message} and keeps the request pending with the message
        recorded. Raises UnknownRequest if the id is not pending."""
        text = (text or "").strip()
        with self._lock:
            waiting = self._waiting.get(request_id)
            if waiting is None:
                raise UnknownRequest(f"request {request_id!r} is not pending (answered, timed out, or unknown)")
            req = waiting.request
            try:
                value = _parse_reply(waiting.task, req.kind, req.question, text)
            except ParseError as exc:
                error = f"{exc} ({INSTRUCTIONS[req.kind]})"
                req.rejected.append({"text": text, "error": error})
                return {"accepted": False, "error": error}
            del self._waiting[request_id]
            self.answered += 1
        waiting.loop.call_soon_threadsafe(_resolve, waiting.future, value)
        return {"accepted": True, "value": text}


def _parse_reply(task: Task, kind: str, question: str, text: str) -> Step | str:
    if kind == "answer":
        return COMPACT.parse_answer(text, task, question)
    return COMPACT.parse_step(text, task, question)


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


class HumanExpert:
    """H answered by a person through a HumanQueue; see `CodedExpert`."""

    def __init__(self, task: Task, queue: HumanQueue, timeout_s: float | None = None):
        self.task, self.queue, self.timeout_s = task, queue, timeout_s

    async def fan_out(self, question: str) -> Step:
        return await self.queue.ask(self.task, "fan_out", question, timeout_s=self.timeout_s)

    async def fan_in(self, question: str, sub: tuple[tuple[str, str], tuple[str, str]]) -> Step:
        return await self.queue.ask(self.task, "fan_in", question, sub, timeout_s=self.timeout_s)

    async def answer(self, question: str) -> str:
        return await self.queue.ask(self.task, "answer", question, timeout_s=self.timeout_s)
