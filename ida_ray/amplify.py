"""Amplification and distillation trees (ALGORITHM.md sections 2-4), engine-agnostic.

`amplify_tree` expands one question with H' (or H) and the model: at each split the model
answers both subquestions, the adversary scores those answers, and Gumbel-max over the
negated scores picks the branch to recurse on (the one where the model is expected to be
worst); the other branch keeps the model's answer. `distill_tree` is the same step with the
model in every role. Both return a `Tree` record and never raise for bad model output, a
failing expert or a bound being hit: the error is recorded on the node and the tree.

Everything here is a coroutine over the `Engine` interface, so thousands of trees can be in
flight at once and their model calls batched by the engine.
"""
from __future__ import annotations

import asyncio
import math
import random
import uuid
from dataclasses import asdict

from ida_ray.config import AmplifyConfig
from ida_ray.engine import Engine, Generation
from ida_ray.errors import (
    DepthExceeded,
    ExpertBudgetExhausted,
    ExpertFailure,
    FanInRoundsExceeded,
    IDAError,
    OutputTooLong,
    ParseError,
)
from ida_ray.experts import CodedExpert, ExpertReply, ExpertUsage
from ida_ray.prompts import COMPACT, PromptFormat
from ida_ray.steps import Split, Step
from ida_ray.tasks.base import Task
from ida_ray.tree import EXPERT, HPRIME, MODEL, Node, Round, StepRecord, Tree, error_record


def gumbel(rng: random.Random) -> float:
    return -math.log(-math.log(rng.random() or 1e-300))


def gumbel_argmax(scores: list[float], tau: float, rng: random.Random) -> int:
    """Boltzmann exploration by the Gumbel-max trick: argmax_i(score_i + tau * G_i)."""
    noisy = [s + tau * gumbel(rng) for s in scores]
    return max(range(len(noisy)), key=noisy.__getitem__)


class _TreeContext:
    """Per-tree state: counters, the versions used, and the expert/model calls."""

    def __init__(self, task: Task, engine: Engine, cfg: AmplifyConfig, rng: random.Random, hprime: bool,
                 expert=None, fmt: PromptFormat = COMPACT):
        self.task, self.engine, self.cfg, self.rng, self.fmt = task, engine, cfg, rng, fmt
        self.h = expert if expert is not None else CodedExpert(task)
        self.hprime = hprime
        self.expert_calls = 0
        self.expert_usage = ExpertUsage()
        self.model_calls = 0
        self.versions: set[int] = set()

    # -- model -----------------------------------------------------------------------
    async def generate(self, prompts: list[str]) -> list[Generation]:
        self.model_calls += len(prompts)
        gens = await self.engine.generate(prompts)
        self.versions.update(g.weight_version for g in gens)
        return gens

    def confident(self, gen: Generation, adv_score: float | None) -> bool:
        threshold = math.log(1 - self.cfg.eps)
        if self.cfg.confidence == "adversary":
            return adv_score is not None and adv_score >= threshold
        return gen.logprob >= threshold

    async def adversary_if_needed(self, prompt: str, gen: Generation) -> float | None:
        if self.cfg.confidence != "adversary":
            return None
        return (await self.engine.adversary([prompt], [gen.text]))[0]

    # -- bounds (amplification and distillation trees alike) -------------------------
    def check_finished(self, gen: Generation) -> None:
        """Output length: a generation cut off at max_new_tokens is not a step."""
        if not gen.finished:
            raise OutputTooLong(f"no end of sequence within {self.cfg.max_new_tokens} tokens: {gen.text[:60]!r}")

    def new_round(self, node: Node, split: Split) -> Round:
        """Another fan-in round at `node` on `split`'s subquestions (one level deeper), within
        max_fan_in_rounds and max_depth; the round is appended to the node."""
        if len(node.rounds) >= self.cfg.max_fan_in_rounds:
            raise FanInRoundsExceeded(f"more than {self.cfg.max_fan_in_rounds} fan-in rounds at {node.question!r}")
        if node.depth + 1 > self.cfg.max_depth:
            raise DepthExceeded(f"depth {node.depth + 1} > max_depth {self.cfg.max_depth} at {node.question!r}")
        rnd = Round(subquestions=[split.q1, split.q2])
        node.rounds.append(rnd)
        return rnd

    def valid_answer(self, question: str, gen: Generation) -> str | None:
        """The answer a generation says, or None where it is cut off or says none."""
        try:
            self.check_finished(gen)
            return self.fmt.parse_answer(gen.text, self.task, question)
        except (OutputTooLong, ParseError):
            return None

    def parse_model_step(self, question: str, gen: Generation) -> Step:
        self.check_finished(gen)
        return self.fmt.parse_step(gen.text, self.task, question)

    # -- expert ----------------------------------------------------------------------
    async def expert(self, call) -> Step:
        """Await one expert step; `call()` makes the coroutine (made only when H is consulted).
        An expert that reports its cost (ExpertReply) has it added to the tree's."""
        self.expert_calls += 1
        try:
            result = await call()
        except ExpertBudgetExhausted:
            self.expert_calls -= 1  # refused before the expert was consulted
            raise
        except ExpertFailure as exc:
            if exc.usage is not None:  # what a failed step still cost
                self.expert_usage.add(exc.usage)
            raise
        except IDAError:
            raise
        except Exception as exc:  # a user's expert that raises is recorded, not fatal
            raise ExpertFailure(f"{type(exc).__name__}: {exc}") from exc
        if isinstance(result, ExpertReply):
            self.expert_usage.add(result.usage)
            return result.step
        return result

    # -- H' steps --------------------------------------------------------------------
    async def hprime_step(self, role: str, prompt: str, question: str, expert_call,
                          use_model: bool = True) -> StepRecord:
        """H'_fan_out / H'_fan_in: the model's step where it is confident, else the expert's.

        The model's greedy step is computed either way: it is the adversary's input."""
        (gen,) = await self.generate([prompt])
        record = StepRecord.from_generation(role, prompt, gen, who=EXPERT)
        if self.hprime and use_model:
            record.adversary_score = await self.adversary_if_needed(prompt, gen)
            try:
                self.parse_model_step(question, gen)
                if self.confident(gen, record.adversary_score):
                    record.output, record.who = gen.text, HPRIME
                    return record
            except (ParseError, OutputTooLong):
                pass  # not usable: the expert takes the step
        try:
            record.output = self.fmt.format_step(await self.expert(expert_call))
        except ExpertBudgetExhausted:
            # The expert's budget is spent: H' answers alone, with the model's step where it has one.
            if not self.hprime:
                raise
            self.parse_model_step(question, gen)  # a ParseError here fails the node, as any other
            record.output, record.who = gen.text, HPRIME
        return record


async def _target_logprobs(ctx: _TreeContext, records: list[StepRecord]) -> None:
    """Fill each record's adversary target: log M(output | prompt) under the current model."""
    todo = [r for r in records if r is not None and r.output]
    if not todo:
        return
    lps = await ctx.engine.logprob([r.prompt for r in todo], [r.output for r in todo])
    for r, lp in zip(todo, lps):
        r.target_logprob = lp


async def _expand(ctx: _TreeContext, node: Node) -> None:
    """Amp(H', M) at one node. Raises IDAError after recording it on the node."""
    try:
        await _expand_inner(ctx, node)
    except IDAError as exc:
        if node.error is None:
            node.error = error_record(exc)
        raise


async def _expand_inner(ctx: _TreeContext, node: Node) -> None:
    q, task, cfg, fmt = node.question, ctx.task, ctx.cfg, ctx.fmt
    prompt = fmt.answer_prompt(q)
    (gen,) = await ctx.generate([prompt])
    node.answer_step = StepRecord.from_generation("answer", prompt, gen)
    node.audited = ctx.hprime and cfg.audit_fraction > 0 and ctx.rng.random() < cfg.audit_fraction
    if ctx.hprime and not node.audited:
        node.answer_step.adversary_score = await ctx.adversary_if_needed(prompt, gen)
        answer = ctx.valid_answer(q, gen)
        if answer is not None and ctx.confident(gen, node.answer_step.adversary_score):
            node.answer, node.answered_by = answer, HPRIME
            node.answer_step.output, node.answer_step.who = gen.text, HPRIME
            node.answer_step.target_logprob = gen.logprob
            return

    node.fan_out = await ctx.hprime_step("fan_out", fmt.fan_out_prompt(q), q, lambda: ctx.h.fan_out(q),
                                        use_model=not node.audited)
    step = fmt.parse_step(node.fan_out.output, task, q)
    while isinstance(step, Split):
        rnd = ctx.new_round(node, step)
        await _expand_round(ctx, node, rnd)
        sub = ((rnd.subquestions[0], rnd.answers[0]), (rnd.subquestions[1], rnd.answers[1]))
        rnd.fan_in = await ctx.hprime_step("fan_in", fmt.fan_in_prompt(q, sub), q, lambda: ctx.h.fan_in(q, sub),
                                           use_model=not node.audited)
        step = fmt.parse_step(rnd.fan_in.output, task, q)

    node.answer = step.text
    node.answered_by = (node.rounds[-1].fan_in if node.rounds else node.fan_out).who
    node.answer_step.output = fmt.format_answer(node.answer)
    records = [node.answer_step, node.fan_out] + [r.fan_in for r in node.rounds]
    await _target_logprobs(ctx, records)


async def _expand_round(ctx: _TreeContext, node: Node, rnd: Round) -> None:
    """Steps 3-4: model answers both subquestions, the adversary picks one to recurse on."""
    qs = rnd.subquestions
    prompts = [ctx.fmt.answer_prompt(s) for s in qs]
    gens = await ctx.generate(prompts)
    answers = [ctx.valid_answer(s, g) for s, g in zip(qs, gens)]
    # What the model said, where it said an answer (its raw output otherwise, never used as one).
    rnd.model_answers = [a if a is not None else g.text for a, g in zip(answers, gens)]
    valid = [a is not None for a in answers]
    if ctx.cfg.branch_choice == "uniform":
        chosen = [ctx.rng.randrange(2)]
    else:
        scores = await ctx.engine.adversary(prompts, [g.text for g in gens])
        rnd.adversary_scores = list(scores)
        # Recurse where the model is expected to do worst: Gumbel-max over negated scores.
        chosen = [gumbel_argmax([-s for s in scores], ctx.cfg.tau, ctx.rng)]
    # A malformed model answer is never handed to the expert: that branch is expanded too.
    chosen += [i for i in range(2) if not valid[i] and i not in chosen]
    rnd.chosen = sorted(chosen)
    children = [Node(question=qs[i], depth=node.depth + 1) for i in rnd.chosen]
    for i, child in zip(rnd.chosen, children):
        rnd.children[i] = child
    # Let every branch finish before raising, so completed subtrees stay in the record.
    results = await asyncio.gather(*(_expand(ctx, c) for c in children), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    for i in range(2):
        rnd.answers[i] = rnd.children[i].answer if rnd.children[i] is not None else rnd.model_answers[i]


def _new_tree(task: Task, question: str, mode: str, iteration: int, source: str) -> Tree:
    try:
        size = task.size(question)
    except ValueError:
        size = -1
    return Tree(tree_id=uuid.uuid4().hex, task=task.name, question=question, size=size, mode=mode,
                iteration=iteration, root=Node(question=question, depth=0), source=source)


def _finish(tree: Tree, ctx: _TreeContext) -> Tree:
    tree.expert_calls, tree.model_calls = ctx.expert_calls, ctx.model_calls
    tree.expert_usage = asdict(ctx.expert_usage)
    tree.weight_versions = sorted(ctx.versions)
    return tree


async def amplify_tree(task: Task, engine: Engine, question: str, cfg: AmplifyConfig, rng: random.Random,
                       iteration: int = 0, hprime: bool | None = None, source: str = "train",
                       expert=None, fmt: PromptFormat = COMPACT) -> Tree:
    """Amp(H', M)(question) as a tree record; errors are recorded, never raised.

    `expert` is H (default: the task's coded expert, `CodedExpert(task)`); `fmt` how the
    model's prompts and replies are written."""
    ctx = _TreeContext(task, engine, cfg, rng, cfg.use_hprime if hprime is None else hprime, expert, fmt)
    tree = _new_tree(task, question, "amplify", iteration, source)
    try:
        task.parse(question)
        await _expand(ctx, tree.root)
    except IDAError as exc:
        tree.error = error_record(exc)
    return _finish(tree, ctx)


async def distill_tree(task: Task, engine: Engine, question: str, cfg: AmplifyConfig, iteration: int = 0,
                       source: str = "train", fmt: PromptFormat = COMPACT) -> Tree:
    """The model-only tree for one question: M_fan_out, M on both subquestions, M_fan_in.

    Its answer A is the distillation target for M(question), when the tree is confident:
    `tree.confidence` is the probability of the tree's whole path (fan-out, both subanswers,
    fan-in), and below `cfg.distill_min_confidence` the target is dropped (see examples.py)."""
    ctx = _TreeContext(task, engine, cfg, random.Random(0), hprime=False, fmt=fmt)
    tree = _new_tree(task, question, "distill", iteration, source)
    node = tree.root
    try:
        task.parse(question)
        prompt = fmt.answer_prompt(question)
        (gen,) = await ctx.generate([prompt])
        node.answer_step = StepRecord.from_generation("answer", prompt, gen)
        fo_prompt = fmt.fan_out_prompt(question)
        (fo,) = await ctx.generate([fo_prompt])
        node.fan_out = StepRecord.from_generation("fan_out", fo_prompt, fo, output=fo.text)
        step = ctx.parse_model_step(question, fo)
        logprob = fo.logprob  # of the whole model-only tree: every step it took
        while isinstance(step, Split):
            rnd = ctx.new_round(node, step)
            gens = await ctx.generate([fmt.answer_prompt(s) for s in rnd.subquestions])
            said = [ctx.valid_answer(s, g) for s, g in zip(rnd.subquestions, gens)]
            rnd.model_answers = rnd.answers = [a if a is not None else g.text for a, g in zip(said, gens)]
            logprob += sum(g.logprob for g in gens)
            sub = ((step.q1, rnd.answers[0]), (step.q2, rnd.answers[1]))
            fi_prompt = fmt.fan_in_prompt(question, sub)
            (fi,) = await ctx.generate([fi_prompt])
            rnd.fan_in = StepRecord.from_generation("fan_in", fi_prompt, fi, output=fi.text)
            step = ctx.parse_model_step(question, fi)
            logprob += fi.logprob
        node.answer = step.text  # parse_model_step checked it well-formed
        node.answered_by = MODEL
        tree.confidence = math.exp(logprob)
        tree.distill_target = tree.confidence >= cfg.distill_min_confidence
        node.answer_step.output = fmt.format_answer(node.answer)
        await _target_logprobs(ctx, [node.answer_step])
    except IDAError as exc:
        node.error = tree.error = error_record(exc)
    return _finish(tree, ctx)


async def adversarial_question(task: Task, engine: Engine, sizes: tuple[int, ...], cfg: AmplifyConfig,
                               rng: random.Random, fmt: PromptFormat = COMPACT) -> str:
    """Draw k candidates; keep the one the adversary expects M to do worst on (Gumbel-max)."""
    candidates = [task.generate(rng.choice(sizes), rng) for _ in range(cfg.adversarial_candidates)]
    prompts = [fmt.answer_prompt(c) for c in candidates]
    gens = await engine.generate(prompts)
    scores = await engine.adversary(prompts, [g.text for g in gens])
    return candidates[gumbel_argmax([-s for s in scores], cfg.tau, rng)]
