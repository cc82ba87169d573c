"""A scripted Engine for testing the algorithm core without a neural network.

`policy(prompt) -> (text, logprob)` decides each greedy output; `adversary_fn(prompt,
completion) -> score` each adversary score. It counts calls and the largest batch it saw."""
from __future__ import annotations

import asyncio

from ida_ray.engine import Engine, Generation


class ScriptedEngine(Engine):
    def __init__(self, policy, adversary_fn=None, logprob_fn=None, version: int = 0):
        self.policy = policy
        self.adversary_fn = adversary_fn or (lambda p, c: 0.0)
        self.logprob_fn = logprob_fn or (lambda p, c: -1.0)
        self._version = version
        self.prompts: list[str] = []

    @property
    def weight_version(self) -> int:
        return self._version

    async def generate(self, prompts):
        await asyncio.sleep(0)
        self.prompts += list(prompts)
        out = []
        for p in prompts:
            text, lp = self.policy(p)
            out.append(Generation(text, lp, True, self._version))
        return out

    async def logprob(self, prompts, completions):
        return [self.logprob_fn(p, c) for p, c in zip(prompts, completions)]

    async def adversary(self, prompts, completions):
        return [self.adversary_fn(p, c) for p, c in zip(prompts, completions)]


def garbage_policy(prompt):
    """Unconfident, unparseable output for every prompt."""
    return "#", -5.0


def oracle_policy(task, logprob=-0.001):
    """A model that answers like the ground truth and fans out/in like the expert."""
    from ida_ray.prompts import COMPACT

    def policy(prompt):
        role, body = prompt[0], prompt[1:-1]
        if role == "A":
            return task.solve(body), logprob
        if role == "O":
            return COMPACT.format_step(task.expert_fan_out(body)), logprob
        q, rest = body.split("[", 1)
        (q1, a1), (q2, a2) = [tuple(part.split(":", 1)) for part in rest.rstrip("]").split("][")]
        return COMPACT.format_step(task.expert_fan_in(q, ((q1, a1), (q2, a2)))), logprob

    return policy
