"""The curriculum over question sizes: the rule (pure), and the loop drawing by it."""
from __future__ import annotations

import pytest

from ida_ray.config import load_config
from ida_ray.curriculum import CurriculumConfig, curriculum_sizes
from ida_ray.entrypoints.train import train
from ida_ray.errors import ConfigError
from ida_ray.replay import read_tree_records

pytestmark = pytest.mark.usefixtures("one_thread_module")


def test_a_size_joins_after_an_iteration_passes_the_largest_so_far():
    cfg = CurriculumConfig(threshold=0.85, first_sizes=2)
    sizes = (3, 1, 4, 2)
    assert curriculum_sizes(sizes, [], cfg) == (1, 2)
    # Passing a size that is not the largest drawn, or falling short of the largest, adds none.
    assert curriculum_sizes(sizes, [{1: 1.0, 2: 0.84}], cfg) == (1, 2)
    assert curriculum_sizes(sizes, [{1: 1.0, 2: 0.85}], cfg) == (1, 2, 3)
    # One size per iteration, even when the next is passed already.
    assert curriculum_sizes(sizes, [{1: 1.0, 2: 0.9, 3: 0.9, 4: 0.9}], cfg) == (1, 2, 3)
    history = [{2: 0.9, 3: 0.1}, {2: 0.9, 3: 0.5}, {3: 0.95}, {4: 1.0}, {4: 1.0}]
    assert [curriculum_sizes(sizes, history[:k], cfg)[-1] for k in range(6)] == [2, 3, 3, 4, 4, 4]
    assert curriculum_sizes(sizes, history, CurriculumConfig()) == (1, 2, 3, 4)  # no threshold: every size


def test_curriculum_settings_are_checked():
    with pytest.raises(ConfigError, match="curriculum.threshold"):
        load_config("default", {"curriculum.threshold": 1.5})
    with pytest.raises(ConfigError, match="curriculum.first_sizes"):
        load_config("default", {"curriculum.first_sizes": 0})


def tiny(run_dir, **more):
    return load_config("default", {
        "backend": "local", "engine": "torch", "iterations": 3, "train_sizes": [1, 2, 3], "run_dir": str(run_dir),
        "amplify_trees_per_iteration": 24, "distill_trees_per_iteration": 16, "eval_questions_per_size": 10,
        "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
        "train.steps_per_iteration": 30, "train.adversary_steps_per_iteration": 2, "train.lr_schedule": "constant",
        "curriculum.threshold": 0.05, "curriculum.first_sizes": 1, **more})


def test_the_loop_draws_its_training_questions_from_the_curriculums_sizes(tmp_path):
    cfg = tiny(tmp_path)
    history = train(cfg, progress=False, log=lambda s: None)
    assert history[0]["sizes_drawn"] == [1]
    for it, m in enumerate(history):
        expected = curriculum_sizes((1, 2, 3), [h["accuracy_by_size"] for h in history[:it]], cfg.curriculum)
        assert m["sizes_drawn"] == list(expected)
        drawn = {r["size"] for r in read_tree_records(tmp_path, it) if r["source"] != "user"}
        assert drawn and drawn <= set(expected)
    assert len(history[-1]["sizes_drawn"]) > 1  # the model passed size 1 (one in 10 right is enough)
    assert [m["largest_size_drawn"] for m in history] == [m["sizes_drawn"][-1] for m in history]
    # Every size is still evaluated.
    assert all(set(m["accuracy_by_size"]) == {1, 2, 3} for m in history)


def test_a_resumed_run_draws_the_sizes_and_questions_of_the_straight_run(tmp_path):
    straight = train(tiny(tmp_path / "straight"), progress=False, log=lambda s: None)
    train(tiny(tmp_path / "part", iterations=2), progress=False, log=lambda s: None)
    resumed = train(tiny(tmp_path / "part"), resume=True, progress=False, log=lambda s: None)
    assert [m["sizes_drawn"] for m in resumed] == [m["sizes_drawn"] for m in straight]
    assert [r["question"] for r in read_tree_records(tmp_path / "part", 2)] == \
        [r["question"] for r in read_tree_records(tmp_path / "straight", 2)]
