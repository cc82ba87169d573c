"""Whole runs with parts killed under them: nothing is lost, the run finishes.

1. A run on a vLLM replica whose replica and one of two expanders are killed (and restarted by
   Ray) while iteration 1's trees are in flight; its questions file holds malformed lines and
   a question deeper than the depth bound. Every submitted job yields exactly one tree
   record, no tree fails because of the kills, bad input is recorded by kind, and the run
   reaches its last iteration with the replica on the latest weights.
2. The driver (`python -m ida_ray.entrypoints.train`) killed with SIGKILL once a checkpoint is written;
   `--resume` finishes the run, its learner worker killed too on the way (Ray Train restarts
   it from the checkpoint), and the final weights equal those of a run never killed.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import ray
import yaml
from run_checks import nothing_lost
from safetensors.torch import load_file

from ida_ray.actors.coordinator import COORDINATOR_NAME
from ida_ray.config import AmplifyConfig, ClusterResources, IDAConfig, TrainConfig, load_config
from ida_ray.entrypoints.train import train
from ida_ray.models import ModelSpec
from ida_ray.replay import read_tree_records

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
RESOURCES = ClusterResources(replica_cpus=1, expander_cpus=0.25, learner_cpus=1)
RAY_INIT = dict(num_cpus=4, namespace="test-chaos")  # the `cluster` fixture (tests/conftest.py)


class Chaos(threading.Thread):
    """Kills replica-0 and expander-0 (Ray restarts both) once iteration `at` is expanding."""

    def __init__(self, at: int):
        super().__init__(daemon=True)
        self.at, self.killed_during, self.error = at, None, None
        self.stop = threading.Event()

    def run(self):
        try:
            while not self.stop.wait(0.05):
                try:
                    coordinator = ray.get_actor(COORDINATOR_NAME)
                    progress = ray.get(coordinator.progress.remote(), timeout=5)
                except (ValueError, ray.exceptions.RayError):
                    continue  # not started yet
                if progress["completed"] == self.at and progress["phase"] == "expanding trees":
                    ray.kill(ray.get_actor("expander-0"), no_restart=False)
                    ray.kill(ray.get_actor("replica-0"), no_restart=False)
                    self.killed_during = progress
                    return
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


@pytest.mark.vllm
def test_replica_and_expander_killed_mid_run_lose_nothing(cluster, tmp_path):
    questions = tmp_path / "questions.txt"
    # 2 iterations: entries 0-2 in iteration 0, 3-5 in iteration 1. "1,,2" and "abc" are
    # malformed; the 8-digit list needs depth 2, over max_depth=1.
    questions.write_text("1,2,3\n1,,2\n1,2,3,4,5,6,7,8\n# a comment\n4,4\nabc\n9,9,9\n")
    cfg = IDAConfig(
        task="sum", task_kwargs={"base_size": 2}, train_sizes=(1, 2, 3, 4), iterations=2, seed=0,
        amplify_trees_per_iteration=24, distill_trees_per_iteration=8, eval_questions_per_size=5,
        amplify=AmplifyConfig(max_new_tokens=8, max_depth=1),
        model=ModelSpec(hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128),  # head size 32: vLLM-CPU
        train=TrainConfig(steps_per_iteration=10, adversary_steps_per_iteration=3, replay_capacity=2000),
        engine="vllm", replicas=1, expanders=2, learner_workers=1, run_dir=str(tmp_path / "run"), resources=RESOURCES)
    chaos = Chaos(at=1)
    chaos.start()
    try:
        history = train(cfg, progress=False, questions_file=questions)
    finally:
        chaos.stop.set()
        chaos.join(10)
    assert chaos.error is None, chaos.error
    assert chaos.killed_during is not None, "the kills never happened"
    run = Path(cfg.run_dir)

    # The run reached its last iteration, the restarted replica on the latest weights.
    assert [m["iteration"] for m in history] == [0, 1]
    last = history[-1]
    assert last["replica_versions"] == {"replica-0": 2} and last["weight_version"] == 2
    # The kills hit work in flight: the dead expander's chunks were re-issued, and the pools
    # re-sent the batches the dead replica held.
    assert last["jobs"]["reissued_chunks"] >= 1 and last["jobs"]["lost_jobs"] == 0, last["jobs"]
    assert last["replica_faults"]["resent"] + last["replica_faults"]["resyncs"] >= 1, last["replica_faults"]

    # Exactly one record per submitted job, and each user question in exactly one of them.
    user = []
    for m in history:
        trees = nothing_lost(run, m, m["jobs"]["submitted"] + m["jobs"]["rejected"])
        by = Counter((t["mode"], t["source"]) for t in trees)
        assert by[("amplify", "train")] + by[("amplify", "adversarial")] == 24 and by[("distill", "train")] == 8
        user += [t for t in trees if t["source"] == "user"]
    assert sorted(t["question"] for t in user) == sorted(["1,2,3", "1,,2", "1,2,3,4,5,6,7,8", "4,4", "abc", "9,9,9"])

    # Bad input and bounds: recorded on the trees, counted by kind in metrics.jsonl and on the
    # dashboard; the run went on.
    kinds = {t["question"]: (t["error"] or {}).get("kind") for t in user}
    assert kinds["1,,2"] == kinds["abc"] == "malformed_question"
    assert kinds["1,2,3,4,5,6,7,8"] == "depth_exceeded"
    assert {kinds[q] for q in ("1,2,3", "4,4", "9,9,9")} == {None}
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    errors = Counter()
    for m in lines:
        errors.update(m["errors"])
    assert errors["malformed_question"] == 2 and errors["depth_exceeded"] >= 1
    assert errors["output_too_long"] + errors["parse_error"] >= 1  # the untrained model's distillation trees
    dash = json.loads((run / "dashboard_metrics.json").read_text())
    assert dash["trees_failed"]["malformed_question"] == 2


# -- the driver killed between iterations ------------------------------------------------------
TINY = {
    "iterations": 3, "train_sizes": [1, 2, 3, 4], "amplify_trees_per_iteration": 24,
    "distill_trees_per_iteration": 16, "eval_questions_per_size": 10, "amplify": {"max_new_tokens": 8},
    "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
    "train": {"steps_per_iteration": 10, "adversary_steps_per_iteration": 3, "replay_capacity": 2000},
    "resources": {"replica_cpus": 1, "expander_cpus": 0.25, "learner_cpus": 1},
}


def final_weights(run_dir: Path) -> dict:
    ckpt = Path(json.loads((run_dir / "state.json").read_text())["checkpoint"])
    return {part: load_file(ckpt / part / "model.safetensors") for part in ("model", "adversary")}


def completed(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "state.json").read_text())["completed_iterations"]
    except (OSError, ValueError):
        return 0


def learner_worker_pids(session: int) -> list[int]:
    """The Ray Train worker processes of the driver whose session (process group) is `session`."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.getsid(int(proc.name)) == session and \
                    (proc / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                pids.append(int(proc.name))
        except (OSError, ProcessLookupError):
            continue
    return pids


def test_driver_killed_between_iterations_resumes_to_the_same_weights(cluster, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    cfg = load_config(config)

    # The run never killed, in this process (on the module's cluster).
    straight = tmp_path / "straight"
    train(IDAConfig.from_dict(dict(cfg.to_dict(), engine="torch", run_dir=str(straight))), progress=False)

    # The same run as a driver process with its own local cluster, killed with SIGKILL (its
    # whole process group: the driver and the Ray processes it started) once a checkpoint is
    # recorded, then resumed.
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ida_ray.entrypoints.train", "--config", str(config), "--engine", "torch",
           "--run-dir", str(run), "--no-dashboard", "--no-progress"]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 600
            while completed(run) < 1:
                assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                assert time.time() < deadline, "no checkpoint within 600 s"
                time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(60)
    done_when_killed = completed(run)
    assert 1 <= done_when_killed < 3
    # The resumed run loses its learner worker once, soon after it starts.
    with open(tmp_path / "resumed.log", "w") as log:
        proc = subprocess.Popen(cmd + ["--resume"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            killed_learner, deadline = None, time.time() + 600
            while proc.poll() is None and time.time() < deadline:
                pids = learner_worker_pids(proc.pid)
                if pids and killed_learner is None:
                    time.sleep(1.0)
                    os.kill(pids[0], signal.SIGKILL)
                    killed_learner = pids[0]
                time.sleep(0.1)
            proc.wait(max(1, deadline - time.time()))
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    out = (tmp_path / "resumed.log").read_text()
    assert proc.returncode == 0, out[-4000:]
    assert killed_learner is not None, "the resumed run's learner worker was never seen"
    assert f"{done_when_killed} iterations already done" in out
    assert completed(run) == 3

    # Weights, optimizer state, replay buffer and RNG came back: the same final weights.
    a, b = final_weights(straight), final_weights(run)
    for part in ("model", "adversary"):
        assert a[part].keys() == b[part].keys()
        diff = max(float((a[part][k] - b[part][k]).abs().max()) for k in a[part])
        assert diff <= 1e-6, (part, diff)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted({m["iteration"] for m in lines}) == [0, 1, 2]
    trees = read_tree_records(run, 2)
    assert len(trees) == 24 + 16  # the resumed iteration's records, once
