"""A fast version of the core learning run (experiments/core_learning.py): the model learns
sizes the expert never answers directly, from IDA's trees alone (no ground-truth label), and
H' cuts expert calls."""
import asyncio

import pytest

from ida_ray.config import AmplifyConfig, IDAConfig, TrainConfig
from ida_ray.local_loop import LocalIDA


@pytest.mark.slow
def test_ida_learns_and_expert_calls_fall(tmp_path):
    cfg = IDAConfig(
        task="sum", task_kwargs={"base_size": 1, "max_digit": 3}, iterations=4, amplify_trees_per_iteration=192,
        distill_trees_per_iteration=256, eval_questions_per_size=60, seed=0, run_dir=str(tmp_path),
        amplify=AmplifyConfig(max_new_tokens=12, adversarial_fraction=0.75),
        train=TrainConfig(steps_per_iteration=200, adversary_steps_per_iteration=30, replay_capacity=6000))
    history = asyncio.run(LocalIDA(cfg).run())
    first, last = history[0], history[-1]
    # The expert answers only single digits; sizes 3 and 4 come from trees alone. Chance on a
    # two-digit sum is well under 1 in 10.
    hard = lambda m: (m["accuracy_by_size"][3] + m["accuracy_by_size"][4]) / 2  # noqa: E731
    assert last["accuracy_by_size"][2] >= 0.8
    assert hard(last) >= 0.45 and hard(last) > hard(first) + 0.15
    assert last["expert_calls_per_tree"] < 0.5 * first["expert_calls_per_tree"]
    assert last["weight_version"] == 4
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 4
