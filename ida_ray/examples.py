"""Training examples from tree records (the losses of ALGORITHM.md sections 2-3).

Model examples are (prompt, completion) pairs trained by -log M(completion + EOS | prompt):
  answer   L_M       = -log M(A | q) at every completed node (amplified or distilled A), except
                       where H' returned the model's own confident answer unexamined, and
                       distilled answers of trees the model was unsure of (Tree.distill_target)
  fan_out  L_fan_out = -log M_fan_out(H_fan_out(q) | q), only where the expert took the step
  fan_in   L_fan_in  = -log M_fan_in(H_fan_in(...) | ...), only where the expert took the step
Adversary examples regress Adv(prompt, M's greedy output) onto log M(target | prompt).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from ida_ray.errors import MalformedQuestion
from ida_ray.tree import EXPERT, HPRIME, StepRecord, Tree

log = logging.getLogger(__name__)

MODEL_KINDS = ("answer", "fan_out", "fan_in")


@dataclass(frozen=True)
class Example:
    kind: str  # "answer" | "fan_out" | "fan_in" | "adversary"
    prompt: str
    completion: str
    target: float | None = None  # adversary regression target
    weight_version: int = 0
    tree_id: str = ""
    # The question's size (Task.size) for answer examples whose question the task could size;
    # train.balance_answer_sizes draws answers equally from each size by it.
    size: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _adversary_example(rec: StepRecord | None, tree_id: str) -> list[Example]:
    if rec is None or rec.model_output is None or rec.target_logprob is None:
        return []
    return [Example("adversary", rec.prompt, rec.model_output, rec.target_logprob,
                    rec.weight_version or 0, tree_id)]


def question_size(task, question: str) -> int | None:
    """The task's size of `question`, or None where it cannot size it (a subquestion the model
    made up, which may not parse; None also where no task is given)."""
    if task is None:
        return None
    try:
        return task.size(question)
    except Exception:  # noqa: BLE001 - a user task's size on a made-up question: unsized, not fatal
        return None


def tree_examples(tree: Tree, task=None) -> list[Example]:
    """All examples of one tree: subtrees that completed count even if the tree failed.
    `task`: the tree's task, which sizes the answer examples (Example.size)."""
    out: list[Example] = []
    for node in tree.nodes():
        if node.answer is None:
            continue
        v = node.answer_step.weight_version if node.answer_step else 0
        # An answer H' took straight from the confident model carries no new information;
        # training on it would only reinforce the model's own (possibly wrong) belief.
        if node.answer_step.who != HPRIME and tree.distill_target is not False:
            # The completion is the answer as the prompt format writes it (answer_step.output).
            out.append(Example("answer", node.answer_step.prompt, node.answer_step.output, None, v or 0,
                               tree.tree_id, question_size(task, node.question)))
        out += _adversary_example(node.answer_step, tree.tree_id)
        for rec in [node.fan_out] + [r.fan_in for r in node.rounds]:
            if rec is None:
                continue
            if rec.who == EXPERT and tree.mode == "amplify":
                out.append(Example(rec.role, rec.prompt, rec.output, None, rec.weight_version or 0, tree.tree_id))
            out += _adversary_example(rec, tree.tree_id)
    return out


def ground_truth_examples(tree: Tree, task, fmt) -> list[Example]:
    """The supervised baseline's examples of one tree (amplify.answer_labels: ground_truth):
    an answer example at every node whose question the task can solve, labelled with the
    task's true answer, in place of IDA's answer examples; the expert's fan-out and fan-in
    steps and the adversary's examples are IDA's own. The questions are the same trees' (a
    distillation tree's subquestions are the model's own). Every node is labelled, including
    those IDA takes no answer from (where H' passed on the model's own answer, failed nodes,
    distillation trees below distill_min_confidence): the baseline is supervised learning on
    the same questions, not IDA with its labels swapped. `fmt`: the run's prompt format, which
    writes the prompt and the answer."""
    out = [ex for ex in tree_examples(tree, task) if ex.kind != "answer"]
    for node in tree.nodes():
        try:
            truth = task.solve(node.question)
        except MalformedQuestion:  # a subquestion the model made up badly has no true answer
            continue
        except Exception as exc:  # noqa: BLE001 - a user task's solve: one node's label, not the chunk
            log.warning("%s.solve raised %s on %r: no label for that node", type(task).__name__,
                        type(exc).__name__, node.question[:200])
            continue
        version = (node.answer_step.weight_version if node.answer_step else 0) or 0
        out.append(Example("answer", fmt.answer_prompt(node.question), fmt.format_answer(truth), None, version,
                           tree.tree_id, question_size(task, node.question)))
    return out
