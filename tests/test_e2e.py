"""End to end on a local Ray cluster: vLLM-CPU replica, expander, Ray Train learner,
coordinator. The model learns through IDA (accuracy rises, expert calls per tree fall), every
iteration's weights reach the replica, and a run resumes from its checkpoint exactly where a
straight run would be."""
from __future__ import annotations

import json
import re
import threading
import urllib.request

import pytest
import ray

from ida_ray.config import AmplifyConfig, ClusterResources, IDAConfig, TrainConfig
from ida_ray.entrypoints.train import train
from ida_ray.errors import ConfigError

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# Logical CPUs: expansion and training alternate, so the actors share the 2 cores.
RESOURCES = ClusterResources(replica_cpus=1, expander_cpus=0.5, learner_cpus=1)
# The `ray_cluster` fixture (tests/conftest.py). With the dashboard: its metrics agent exports
# the run's series to Prometheus.
RAY_INIT = dict(num_cpus=3, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True,
                namespace="test-e2e")


class MetricsScraper(threading.Thread):
    """Reads Ray's Prometheus endpoint while a run is live, keeping every ida series seen."""

    def __init__(self):
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{ray._private.worker.global_worker.node.metrics_export_port}/metrics"
        self.series: dict[str, list[float]] = {}
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(3):
            try:
                text = urllib.request.urlopen(self.url, timeout=5).read().decode()
            except OSError:
                continue
            for name, value in re.findall(r"^ray_(ida_\w+?)(?:_total)?\{.*\} ([-\d.e+]+)$", text, re.M):
                self.series.setdefault(name, []).append(float(value))


def small_config(run_dir, engine: str, iterations: int, trees: int = 96, steps: int = 100,
                 backend: str = "ray") -> IDAConfig:
    return IDAConfig(
        task="sum", task_kwargs={"base_size": 2}, train_sizes=(1, 2, 3, 4), iterations=iterations, seed=0,
        amplify_trees_per_iteration=trees, distill_trees_per_iteration=2 * trees // 3, eval_questions_per_size=30,
        amplify=AmplifyConfig(max_new_tokens=12),
        train=TrainConfig(steps_per_iteration=steps, adversary_steps_per_iteration=steps // 6, replay_capacity=4000,
                          check_ranks_in_sync=True),
        engine=engine, run_dir=str(run_dir), replicas=1, expanders=1, learner_workers=1, backend=backend,
        resources=RESOURCES)


@pytest.mark.vllm
def test_distributed_ida_learns_on_vllm(ray_cluster, tmp_path):
    cfg = small_config(tmp_path, "vllm", iterations=4)
    scraper = MetricsScraper()
    scraper.start()
    history = train(cfg, progress=False)
    scraper.stop.set()
    assert [m["iteration"] for m in history] == [0, 1, 2, 3]
    state = json.loads((tmp_path / "state.json").read_text())
    first, last = history[0], history[-1]
    mean = lambda acc: sum(acc.values()) / len(acc)  # noqa: E731
    curve = [mean(state["initial_accuracy"])] + [mean(m["accuracy_by_size"]) for m in history]
    print("mean held-out accuracy, before training and after each iteration:", curve)
    assert curve[-1] >= curve[0] + 0.25 and curve[-1] > curve[1], curve
    assert last["accuracy_by_size"][1] >= 0.5  # chance is 1 in 10
    assert last["expert_calls_per_tree"] < first["expert_calls_per_tree"]
    assert last["answered_by"].get("model", 0) + last["answered_by"].get("model_via_hprime", 0) > 0
    # Every iteration's weights reached the replica, and the learner's ranks agreed.
    assert [m["replica_versions"] for m in history] == [{"replica-0": v} for v in (1, 2, 3, 4)]
    assert [m["weight_version"] for m in history] == [1, 2, 3, 4]
    assert all(m["learner_ranks_in_sync"] for m in history)
    # What the run leaves behind.
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4
    assert (tmp_path / "plots" / "progress.png").stat().st_size > 10_000
    assert state["completed_iterations"] == 4 and state["checkpoint"].endswith("iteration_0003")
    trees = (tmp_path / "trees" / "iteration_0003.jsonl").read_text().splitlines()
    assert len(trees) == 96 + 64 and json.loads(trees[0])["iteration"] == 3
    dash = json.loads((tmp_path / "dashboard_metrics.json").read_text())
    assert dash["replica_weight_version"] == {"replica-0": 4}
    assert set(dash["eval_accuracy"]) == {"1", "2", "3", "4"} and dash["iteration"][""] == 4
    # Its counters add up the iterations' records (one count of who answered, not two).
    answered = {}
    for m in history:
        for who, n in m["answered_by"].items():
            answered[who] = answered.get(who, 0) + n
    assert dash["nodes_answered"] == answered
    assert sum(dash["trees_completed"].values()) == sum(m["trees"] for m in history)
    assert dash["expert_calls_per_tree"][""] == pytest.approx(last["expert_calls_per_tree"])
    # ... and the same series reached Ray's metrics endpoint (the dashboard's source).
    for name in ("ida_trees_completed", "ida_nodes_per_second", "ida_expert_calls_per_tree_bucket", "ida_loss",
                 "ida_nodes_answered", "ida_eval_accuracy", "ida_replica_weight_version",
                 "ida_replica_queue_depth"):
        assert name in scraper.series, (name, sorted(scraper.series))
    assert max(scraper.series["ida_replica_weight_version"]) >= 3
    for m in history:
        print(f"iter {m['iteration']}: acc {m['accuracy_by_size']} expert/tree {m['expert_calls_per_tree']:.2f} "
              f"loss {m['model_loss']:.3f} phases {m['phase_seconds']}")


@pytest.mark.vllm
def test_weights_broadcast_by_the_learner_reach_the_replica_every_iteration(ray_cluster, tmp_path):
    """weight_sync "broadcast": rank 0 of the Ray Train learner sends each round's model into the
    replica's vLLM worker (Gloo on CPU), and the swap finds it there."""
    with pytest.raises(ConfigError, match="needs backend 'ray' and engine 'vllm'"):
        IDAConfig(weight_sync="broadcast", engine="torch")
    cfg = small_config(tmp_path, "vllm", iterations=2, trees=48, steps=60)
    cfg.weight_sync = "broadcast"
    history = train(cfg.validate(), progress=False)
    sent = [m["weight_broadcast"] for m in history]
    assert [b["error"] for b in sent] == [None, None], sent
    assert [b["joined"] for b in sent] == [True, False]  # one group for the run
    assert all(b["replicas"] == 1 and b["bytes"] > 0 and b["seconds"] > 0 for b in sent)
    assert [m["replica_versions"] for m in history] == [{"replica-0": v} for v in (1, 2)]
    state = json.loads((tmp_path / "state.json").read_text())
    mean = lambda acc: sum(acc.values()) / len(acc)  # noqa: E731
    # The replica serves what the learner trained: held-out accuracy (model alone) rises.
    assert mean(history[-1]["accuracy_by_size"]) >= mean(state["initial_accuracy"]) + 0.15, \
        [state["initial_accuracy"]] + [m["accuracy_by_size"] for m in history]


def test_resume_matches_a_straight_run(ray_cluster, tmp_path):
    """Weights, optimizer state, replay buffer, iteration counter and RNG all come back: the
    resumed second iteration trains on the same data to the same loss as a straight run's."""
    def cfg(run_dir, iterations):
        return small_config(run_dir, "torch", iterations, trees=48, steps=40)

    straight = train(cfg(tmp_path / "straight", 2), progress=False)
    part = tmp_path / "resumed"
    train(cfg(part, 1), progress=False)
    with pytest.raises(ConfigError, match="--resume"):  # refuses to overwrite a run
        train(cfg(part, 2), progress=False)
    resumed = train(cfg(part, 2), resume=True, progress=False)
    assert [m["iteration"] for m in resumed] == [0, 1]
    a, b = straight[1], resumed[1]
    assert b["weight_version"] == 2 and b["replica_versions"] == {"replica-0": 2}
    assert b["buffer"] == a["buffer"]  # iteration 0's examples were kept
    assert b["trees"] == a["trees"] and b["expert_calls_per_tree"] == pytest.approx(a["expert_calls_per_tree"])
    assert b["model_loss"] == pytest.approx(a["model_loss"], rel=1e-3)
    assert b["accuracy_by_size"] == a["accuracy_by_size"]


def test_local_and_ray_backends_run_the_same_iteration(ray_cluster, tmp_path):
    """The loop is written once: on the torch engine the in-process backend and the Ray
    backend (replica, expander, Ray Train learner) draw the same questions, build the same
    trees, train on the same samples and reach the same losses and accuracies."""
    def cfg(run_dir, backend):
        return small_config(run_dir, "torch", 2, trees=32, steps=20, backend=backend)

    on_ray = train(cfg(tmp_path / "ray", "ray"), progress=False)
    local = train(cfg(tmp_path / "local", "local"), progress=False)
    for a, b in zip(on_ray, local):
        assert (a["trees"], a["examples"], a["buffer"], a["answered_by"]) == (b["trees"], b["examples"], b["buffer"],
                                                                               b["answered_by"])
        assert a["model_loss"] == pytest.approx(b["model_loss"], rel=1e-4)
        assert a["adversary_loss"] == pytest.approx(b["adversary_loss"], rel=1e-4)
        assert a["accuracy_by_size"] == b["accuracy_by_size"]
    assert local[-1]["replica_versions"] == {"local": 2} and on_ray[-1]["replica_versions"] == {"replica-0": 2}
