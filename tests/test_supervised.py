"""The supervised baseline: ground-truth labels on the answer head; it learns on a tiny run."""
import random

import pytest

from ida_ray.config import TrainConfig
from ida_ray.evaluation import heldout_questions
from ida_ray.models import ModelSpec
from ida_ray.prompts import COMPACT
from ida_ray.supervised import SupervisedBaseline, labelled_examples
from ida_ray.tasks import get_task

SMALL = ModelSpec(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=192, max_positions=64)
# A tiny model trains fastest on one thread, and far faster when the cores are shared: the
# `one_thread` fixture (tests/conftest.py).


def test_examples_carry_ground_truth_on_the_answer_head():
    task = get_task("assign")
    examples = labelled_examples(task, (3, 5), 40, random.Random(0))
    assert len(examples) == 40
    for e in examples:
        q = e.prompt[1:-1]
        assert e.kind == "answer" and e.prompt == COMPACT.answer_prompt(q)
        assert e.completion == task.solve(q)
        assert task.size(q) in (3, 5)


def test_bad_input_is_rejected():
    task = get_task("sum")
    with pytest.raises(ValueError):
        labelled_examples(task, (), 3, random.Random(0))
    with pytest.raises(ValueError):
        SupervisedBaseline(task, (1,), SMALL, TrainConfig(batch_size=0))
    baseline = SupervisedBaseline(task, (1,), SMALL, TrainConfig())
    with pytest.raises(ValueError):
        baseline.fit(-1, {1: ["3"]})


def test_loss_falls_and_accuracy_rises(one_thread):
    task = get_task("sum", base_size=2, max_digit=3)
    sizes = (1, 2)
    heldout = heldout_questions(task, sizes, 40, seed=0)
    baseline = SupervisedBaseline(task, sizes, SMALL, TrainConfig(lr=3e-3, batch_size=32), seed=0, max_new_tokens=4)
    before = baseline.evaluate(heldout)
    result = baseline.fit(90, heldout, eval_every=45, log_every=15)

    assert result.train_examples == 90 * 32 and result.steps == 90
    assert [s for s, _ in result.checkpoints] == [45, 90]
    assert result.accuracy_by_size == result.checkpoints[-1][1]
    assert len(result.loss_history) == 6
    assert result.loss_history[-1] < 0.5 * result.loss_history[0]
    # Answers are 1 digit at size 1 (4 values) and 1 digit at size 2 (7 values): an untrained
    # model essentially never emits digit + end-of-sequence; copying the digit is learned fast.
    assert before[1] <= 0.3
    assert result.accuracy_by_size[1] >= 0.8
    assert result.accuracy_by_size[2] >= 0.7  # adding two digits, not only copying one
    assert sum(result.accuracy_by_size.values()) > sum(before.values()) + 0.5
