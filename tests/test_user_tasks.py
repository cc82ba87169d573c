"""Tasks from outside the package: a Task subclass named by import path wherever a task name
is taken (the config, the command line, inside the actors), graded by its own `is_correct`.
The example is examples/tasks/max_list.py, which is not built in."""
from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scripted_engine import ScriptedEngine

from ida_ray.config import load_config
from ida_ray.errors import ConfigError
from ida_ray.evaluation import evaluate
from ida_ray.tasks import TASKS, expert_tree_answer, get_task

ROOT = Path(__file__).resolve().parents[1]
MAX = "examples.tasks.max_list:MaxOfList"
TINY = ["--iterations", "1", "--amplify-trees", "8", "--no-progress", "distill_trees_per_iteration=4",
        "eval_questions_per_size=4", "train.steps_per_iteration=3", "train.adversary_steps_per_iteration=1",
        "model={hidden_size: 64, num_layers: 1, num_heads: 2, intermediate_size: 128}"]


def test_a_task_by_import_path_is_built_with_its_options_and_named_by_its_path():
    task = get_task(MAX, base_size=2)
    assert type(task).__module__ == "examples.tasks.max_list" and MAX not in TASKS
    assert (task.base_size, task.default_sizes, task.name) == (2, tuple(range(1, 9)), MAX)
    assert get_task("sum").name == "sum"  # built-in tasks keep their names


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 12), seed=st.integers(0, 10_000), base=st.integers(1, 3))
def test_the_example_tasks_expert_only_tree_is_the_ground_truth(size, seed, base):
    task = get_task(MAX, base_size=base)
    question = task.generate(size, random.Random(seed))
    assert expert_tree_answer(task, question) == task.solve(question)


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:Task", "cannot import 'no_such_module_xyz'"),
    ("examples.tasks.max_list:Nope", "has no 'Nope'"),
    ("examples.tasks.max_list:re", "is not a subclass of ida_ray.tasks.Task"),
    ("kinship", "nor an import path module:Class"),
])
def test_a_bad_import_path_is_a_clear_config_error(spec, message):
    with pytest.raises(ConfigError, match=message):
        get_task(spec)
    with pytest.raises(ConfigError, match=message):
        load_config("default", {"task": spec})


def test_evaluation_grades_with_the_tasks_own_check():
    """The example grades as numbers: "088" is right where the maximum is 88."""
    task = get_task(MAX)
    questions = {2: ["88,3", "7,41"]}
    padded = ScriptedEngine(lambda p: ("088" if "88" in p else "40", -0.1))
    assert asyncio.run(evaluate(task, padded, questions)) == {2: 0.5}
    assert not task.is_correct("88,3", None) and not task.is_correct("88,3", "x")


def _run(args, tmp_path) -> subprocess.CompletedProcess:
    # The console script, from the repository root: the task's module is found from there.
    exe = Path(sys.executable).parent / "ida-ray"
    return subprocess.run([str(exe), "train", *args], capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_the_command_line_runs_a_task_by_import_path(tmp_path):
    done = _run(["--task", MAX, "--backend", "local", "--run-dir", str(tmp_path / "run"), *TINY], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "trees" / "iteration_0000.jsonl").open().readline())
    assert record["task"] == MAX
    bad = _run(["--task", "examples.tasks.max_list:Nope", "--backend", "local", "--run-dir", str(tmp_path / "x")],
               tmp_path)
    assert bad.returncode == 2 and "has no 'Nope'" in bad.stderr


@pytest.mark.ray
def test_a_task_by_import_path_runs_inside_the_actors(tmp_path):
    """Replica, expander and learner actors on a local Ray cluster each load the user's task."""
    done = _run(["--task", MAX, "--engine", "torch", "--no-dashboard", "--run-dir", str(tmp_path / "run"),
                 "resources.expander_cpus=0.25", *TINY], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (m,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert m["trees"] == 12 and m["replica_versions"] == {"replica-0": 1}
    assert m["expert_calls_per_tree"] > 0  # the user's coded expert answered in the expander
