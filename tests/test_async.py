"""Mode async on the Ray backend: the next iteration's trees expand while the learner trains.

One run of 4 iterations (torch-engine replica, one expander, one Ray Train worker), with
max_staleness 1. While iteration 1's round trains and iteration 2's trees expand ahead, the
replica, the expander and the learner's worker are killed by process id (Ray restarts the
first two, Ray Train the third from its last checkpoint). Checked:
  * every example any round trained on is within the bound (the round's oldest version), and
    the examples past it were dropped and counted;
  * every tree of iteration i was made by weights i-1 or i (expanded ahead, the swap landing
    between two requests), and the expansion ran beside training (the loop waited less than
    the expansion took);
  * nothing lost: one tree record per job in every iteration, the last checkpoint in the
    resume state, and the run ends on the last weights in the replica.
"""
from __future__ import annotations

import json
import os
import signal
import threading
from collections import Counter
from pathlib import Path

import pytest
import ray
from run_checks import nothing_lost

from ida_ray.actors.coordinator import COORDINATOR_NAME
from ida_ray.config import AmplifyConfig, ClusterResources, IDAConfig, TrainConfig
from ida_ray.entrypoints.train import train
from ida_ray.errors import ConfigError
from ida_ray.examples import tree_examples
from ida_ray.models import ModelSpec
from ida_ray.tree import Tree

pytestmark = [pytest.mark.ray, pytest.mark.slow]

RAY_INIT = dict(num_cpus=4, namespace="test-async")
AMPLIFY, DISTILL = 24, 16


def async_config(run_dir: Path, **kw) -> IDAConfig:
    return IDAConfig(**{
        "task": "sum", "task_kwargs": {"base_size": 2}, "train_sizes": (1, 2, 3, 4), "iterations": 4, "seed": 3,
        "mode": "async", "max_staleness": 1,
        "amplify_trees_per_iteration": AMPLIFY, "distill_trees_per_iteration": DISTILL, "eval_questions_per_size": 5,
        "amplify": AmplifyConfig(max_new_tokens=8),
        "model": ModelSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        "train": TrainConfig(steps_per_iteration=30, adversary_steps_per_iteration=5, replay_capacity=20000),
        "engine": "torch", "run_dir": str(run_dir),
        "resources": ClusterResources(replica_cpus=1, expander_cpus=0.25, learner_cpus=1), **kw})


def worker_pids(class_name: str) -> list[int]:
    """This cluster's actor processes of a class (descendants of this process: ray.init started
    the cluster here, so another cluster on the machine is never touched)."""
    import psutil

    pids = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.cmdline()[:1] and proc.cmdline()[0].startswith(f"ray::{class_name}"):
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return pids


class KillWhileAhead(threading.Thread):
    """SIGKILLs the replica, the expander and the learner's worker once iteration `at` trains
    with the next iteration's trees expanding."""

    def __init__(self, at: int):
        super().__init__(daemon=True)
        self.at, self.killed, self.error = at, {}, None
        self.stop = threading.Event()

    def run(self):
        try:
            while not self.stop.wait(0.05):
                try:
                    progress = ray.get(ray.get_actor(COORDINATOR_NAME).progress.remote(), timeout=5)
                except (ValueError, ray.exceptions.RayError):
                    continue
                if progress["completed"] == self.at and progress["phase"] == "training (the next trees expanding)":
                    for name in ("TreeExpander", "ModelReplica", "RayTrainWorker"):
                        pids = worker_pids(name)
                        if pids:
                            os.kill(pids[0], signal.SIGKILL)
                            self.killed[name] = pids[0]
                    return
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def step_versions(trees: list[dict]) -> Counter:
    return Counter(e.weight_version for t in trees for e in tree_examples(Tree.from_dict(t)))


def test_async_trains_within_the_staleness_bound_and_loses_nothing_to_kills(cluster, tmp_path):
    cfg = async_config(tmp_path / "run")
    chaos = KillWhileAhead(at=1)
    chaos.start()
    try:
        history = train(cfg, progress=False)
    finally:
        chaos.stop.set()
        chaos.join(10)
    assert chaos.error is None, chaos.error
    assert set(chaos.killed) == {"TreeExpander", "ModelReplica", "RayTrainWorker"}, chaos.killed
    run = Path(cfg.run_dir)

    assert [m["iteration"] for m in history] == [0, 1, 2, 3]
    assert all(m["mode"] == "async" for m in history)
    assert history[-1]["replica_versions"] == {"replica-0": 4} and history[-1]["weight_version"] == 4
    ahead_tree_versions = Counter()
    for m in history:
        it = m["iteration"]
        # The bound, on every example each round trained on (round i trains version i).
        assert m["oldest_weight_version_trained"] is not None
        assert it - m["oldest_weight_version_trained"] <= cfg.max_staleness, m
        # Nothing lost: one record per job, each tree once, none failed for the kills.
        trees = nothing_lost(run, m, AMPLIFY + DISTILL)
        assert m["jobs"]["submitted"] == AMPLIFY + DISTILL
        versions = step_versions(trees)
        assert set(versions) <= ({0} if it == 0 else {it - 1, it}), (it, versions)
        if it > 0:
            ahead_tree_versions[it - 1] += versions[it - 1]
    # Expanded ahead: steps taken on the weights before the round that trained beside them.
    assert sum(ahead_tree_versions.values()) > 0
    # Beside training: over iterations 1-3 the loop waited for less than the expansions took.
    waited = sum(m["phase_seconds"]["expand"] for m in history[1:])
    assert waited < sum(m["expansion_seconds"] for m in history[1:]), [
        (m["phase_seconds"]["expand"], m["expansion_seconds"]) for m in history]
    # Past the bound: iteration 0's examples (version 0) go before round 2 (version 2 - 1 = 1).
    assert history[2]["examples_dropped_stale"] > 0
    assert history[-1]["jobs"]["lost_jobs"] == 0
    state = json.loads((run / "state.json").read_text())
    assert state["completed_iterations"] == 4 and Path(state["checkpoint"]).is_dir()


def test_async_needs_the_ray_backend_and_a_bound_of_at_least_one(tmp_path):
    from ida_ray.preflight import backend_problems

    assert any("mode 'async'" in p for p in backend_problems(async_config(tmp_path, backend="local")))
    with pytest.raises(ConfigError, match="max_staleness must be >= 1 in mode async"):
        async_config(tmp_path, max_staleness=0)
