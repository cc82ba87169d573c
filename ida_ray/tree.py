"""Tree records: everything that happened while answering one question.

A `Node` is one question in the tree: its fan-out step, the fan-in rounds (each with the two
subquestions, the model's answers to them, the adversary's scores, which one was recursed on,
the child nodes, and the fan-in step), its final answer and any error. A `StepRecord` says who
took a step (the expert, the model, or the model standing in for the expert through H'), with
the model's log-prob and the weight version. Records round-trip through JSON; nothing is
pickled.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ida_ray.engine import Generation

EXPERT = "expert"
MODEL = "model"
HPRIME = "model_via_hprime"  # H' used the model's output because the model was confident


@dataclass
class StepRecord:
    role: str  # "answer" | "fan_out" | "fan_in"
    prompt: str
    output: str  # completion text: an answer, or "!a" / "?q1&q2" for fan-out and fan-in
    who: str
    logprob: float | None = None  # the model's log-prob of its own output
    weight_version: int | None = None
    # Adversary training data for this step: Adv(prompt, model_output) should predict
    # log M(target | prompt), the log-likelihood of what the amplified tree settled on.
    model_output: str | None = None
    target_logprob: float | None = None
    adversary_score: float | None = None

    @classmethod
    def from_generation(cls, role: str, prompt: str, gen: Generation, who: str = MODEL,
                        output: str = "") -> StepRecord:
        """The record of a step the model was asked to take: its greedy output `gen` (text,
        log-prob, weight version). `output` is what the step settled on; it is empty until the
        tree decides (the model's text through H', or the expert's step)."""
        return cls(role=role, prompt=prompt, output=output, who=who, logprob=gen.logprob,
                   weight_version=gen.weight_version, model_output=gen.text)


@dataclass
class Round:
    subquestions: list[str]  # canonical order
    model_answers: list[str | None] = field(default_factory=lambda: [None, None])
    adversary_scores: list[float | None] = field(default_factory=lambda: [None, None])
    chosen: list[int] = field(default_factory=list)  # indices recursed on
    children: list[Node | None] = field(default_factory=lambda: [None, None])
    answers: list[str | None] = field(default_factory=lambda: [None, None])
    fan_in: StepRecord | None = None


@dataclass
class Node:
    question: str
    depth: int
    answer_step: StepRecord | None = None  # the model's direct answer M(q) and its adversary data
    fan_out: StepRecord | None = None
    rounds: list[Round] = field(default_factory=list)
    answer: str | None = None
    answered_by: str | None = None
    error: dict | None = None  # {"kind": ..., "message": ...}
    audited: bool = False  # H' was switched off here: the expert checked the model (see AmplifyConfig)

    def walk(self):
        yield self
        for r in self.rounds:
            for c in r.children:
                if c is not None:
                    yield from c.walk()


@dataclass
class Tree:
    tree_id: str
    task: str
    question: str
    size: int
    mode: str  # "amplify" | "distill"
    iteration: int
    root: Node
    expert_calls: int = 0
    model_calls: int = 0
    # What the expert's steps cost, where it reports it (a language model: requests, cache
    # hits, replies sent back unreadable, tokens; ida_ray.experts.ExpertUsage).
    expert_usage: dict = field(default_factory=dict)
    weight_versions: list[int] = field(default_factory=list)
    error: dict | None = None
    source: str = "train"  # "train" | "adversarial" | "user"
    # Distillation trees: probability of the model-only tree's path, and whether it was high
    # enough for its answer to become a training target.
    confidence: float | None = None
    distill_target: bool | None = None

    @property
    def answer(self) -> str | None:
        return self.root.answer

    @property
    def ok(self) -> bool:
        return self.error is None and self.root.answer is not None

    def nodes(self):
        return list(self.root.walk())

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict) -> Tree:
        d = dict(d)
        d["root"] = _node(d["root"])
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> Tree:
        return cls.from_dict(json.loads(s))


def _step(d: dict | None) -> StepRecord | None:
    return None if d is None else StepRecord(**d)


def _node(d: dict[str, Any]) -> Node:
    d = dict(d)
    d["answer_step"] = _step(d.get("answer_step"))
    d["fan_out"] = _step(d.get("fan_out"))
    rounds = []
    for r in d.get("rounds", []):
        r = dict(r)
        r["children"] = [None if c is None else _node(c) for c in r["children"]]
        r["fan_in"] = _step(r.get("fan_in"))
        rounds.append(Round(**r))
    d["rounds"] = rounds
    return Node(**d)


def error_record(exc: BaseException) -> dict:
    return {"kind": getattr(exc, "kind", type(exc).__name__), "message": str(exc)[:500]}
