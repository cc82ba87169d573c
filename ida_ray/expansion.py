"""Expanding jobs into trees on any Engine: what the local backend runs in-process and each
TreeExpander actor runs over its replica pool. One result per job, in job order; a tree's own
failures are recorded on the tree, never raised past it."""
from __future__ import annotations

import uuid

from ida_ray.amplify import amplify_tree, distill_tree
from ida_ray.config import AmplifyConfig
from ida_ray.engine import Engine
from ida_ray.examples import ground_truth_examples, question_size, tree_examples
from ida_ray.messages import ExpandJob, ExpandResult
from ida_ray.prompts import COMPACT, PromptFormat
from ida_ray.tasks.base import Task
from ida_ray.tree import Node, Tree


async def expand_job(task: Task, engine: Engine, job: ExpandJob, cfg: AmplifyConfig, expert=None,
                     fmt: PromptFormat = COMPACT) -> ExpandResult:
    """The job's tree and its examples. `expert`: H of amplification trees (None: the task's
    coded expert); distillation trees are the model's alone and never ask H. `fmt`: how the
    model's prompts and replies are written. The examples are IDA's, or with
    `cfg.answer_labels` "ground_truth" the supervised baseline's (ida_ray.examples)."""
    if job.mode == "amplify":
        tree = await amplify_tree(task, engine, job.question, cfg, job.rng(), job.iteration, hprime=job.hprime,
                                  source=job.source, expert=expert, fmt=fmt)
    else:
        tree = await distill_tree(task, engine, job.question, cfg, job.iteration, source=job.source, fmt=fmt)
    if cfg.answer_labels == "ground_truth":
        return ExpandResult(job.job_id, tree, ground_truth_examples(tree, task, fmt))
    return ExpandResult(job.job_id, tree, tree_examples(tree, task))


def failure_result(task: Task, job: ExpandJob, error: dict) -> ExpandResult:
    """The result of a job that produced no tree: a record with the error on the tree and its
    root, and no training examples."""
    size = question_size(task, job.question)  # None: the question may be the reason it failed
    root = Node(question=job.question, depth=0, error=error)
    tree = Tree(tree_id=uuid.uuid4().hex, task=task.name, question=job.question, size=-1 if size is None else size, mode=job.mode,
                iteration=job.iteration, root=root, error=error, source=job.source)
    return ExpandResult(job.job_id, tree, [])
