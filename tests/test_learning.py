"""A fast version of the core learning run: the model learns from the expert through IDA,
with no ground-truth label, and H' cuts expert calls."""
import asyncio

import pytest

from ida_ray.config import AmplifyConfig, IDAConfig, TrainConfig
from ida_ray.local_loop import LocalIDA


@pytest.mark.slow
def test_ida_learns_and_expert_calls_fall(tmp_path):
    cfg = IDAConfig(
        task="sum", task_kwargs={"max_digit": 3}, iterations=4, train_sizes=(1, 2, 3, 4), amplify_trees_per_iteration=128,
        distill_trees_per_iteration=128, eval_questions_per_size=60, seed=0, run_dir=str(tmp_path),
        amplify=AmplifyConfig(max_new_tokens=12),
        train=TrainConfig(steps_per_iteration=150, adversary_steps_per_iteration=30, replay_capacity=4000))
    history = asyncio.run(LocalIDA(cfg).run())
    first, last = history[0], history[-1]
    # Chance on a one- or two-digit answer is at most 1 in 10.
    assert last["accuracy_by_size"][1] >= 0.6
    assert last["accuracy_by_size"][2] >= 0.3
    mean = lambda m: sum(m["accuracy_by_size"].values()) / len(m["accuracy_by_size"])  # noqa: E731
    assert mean(last) > mean(first) + 0.2
    assert last["expert_calls_per_tree"] < 0.8 * first["expert_calls_per_tree"]
    assert last["weight_version"] == 4
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 4
