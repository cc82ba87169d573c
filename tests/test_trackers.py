"""Experiment trackers, read back with each tracker's own reader: TensorBoard's event
accumulator, MLflow's client, and W&B's offline run files."""
from __future__ import annotations

import glob

import pytest
from mlflow import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ida_ray.config import load_config
from ida_ray.entrypoints.train import train
from ida_ray.errors import ConfigError
from ida_ray.trackers import Trackers, TrackingConfig, flatten

pytestmark = pytest.mark.usefixtures("one_thread_module")

TINY = {"backend": "local", "engine": "torch", "iterations": 2, "train_sizes": [1, 2],
        "amplify_trees_per_iteration": 12, "distill_trees_per_iteration": 8, "eval_questions_per_size": 6,
        "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
        "train.steps_per_iteration": 4, "train.adversary_steps_per_iteration": 1}


@pytest.fixture
def offline_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def same(logged, expected) -> bool:
    """(step, value) lists equal up to TensorBoard's float32."""
    return [s for s, _ in logged] == [s for s, _ in expected] and \
        all(v == pytest.approx(e, rel=1e-6, abs=1e-6) for (_, v), (_, e) in zip(logged, expected))


def scalars(run_dir, tag) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def mlflow_history(run_dir, key) -> list[tuple[int, float]]:
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("ida-ray").experiment_id])
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)), run


def wandb_logs(run_dir) -> list[tuple[str, bytes]]:
    """Each offline W&B session's log: (its file name, run-<id>.wandb, and its bytes)."""
    paths = sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb")))
    return [(p.rsplit("/", 1)[1], open(p, "rb").read()) for p in paths]


def test_flatten_keeps_every_number_under_a_slash_path():
    m = {"iteration": 3, "accuracy_by_size": {1: 1.0, 4: 0.5}, "phase_seconds": {"train": 2.5}, "stop": "x",
         "swapped": {"r0": 3}, "ok": True, "nan": float("nan"), "answered_by": ["h"]}
    assert flatten(m) == {"iteration": 3.0, "accuracy_by_size/1": 1.0, "accuracy_by_size/4": 0.5,
                          "phase_seconds/train": 2.5, "swapped/r0": 3.0, "ok": 1.0}


def test_a_run_logs_every_iteration_to_all_three_trackers_and_resumes_into_the_same_runs(tmp_path, offline_wandb):
    run_dir = tmp_path / "run"
    cfg = load_config("default", {**TINY, "run_dir": str(run_dir), "iterations": 1,
                                  "logger": ["tensorboard", "wandb", "mlflow"]})
    first = train(cfg, progress=False, log=lambda s: None)
    resumed = train(load_config("default", {**TINY, "run_dir": str(run_dir), "logger": ["tensorboard", "wandb", "mlflow"]}),
                    resume=True, progress=False, log=lambda s: None)
    history = first + resumed[1:]
    acc = [(m["iteration"], m["accuracy_by_size"][2]) for m in history]
    loss = [(m["iteration"], m["model_loss"]) for m in history]
    calls = [(m["iteration"], m["expert_calls_per_tree"]) for m in history]

    assert same(scalars(run_dir, "accuracy_by_size/2"), acc)
    assert same(scalars(run_dir, "model_loss"), loss) and loss[0][1] != loss[1][1]
    assert same(scalars(run_dir, "expert_calls_per_tree"), calls)
    tb = EventAccumulator(str(run_dir / "tensorboard"))
    tb.Reload()
    assert tb.Tags()["images"] == ["progress"] and "config/text_summary" in tb.Tags()["tensors"]

    got, run = mlflow_history(run_dir, "accuracy_by_size.2")
    assert same(got, acc) and same(mlflow_history(run_dir, "model_loss")[0], loss)  # one run across the resume
    assert run.data.params["train.steps_per_iteration"] == "4" and run.data.params["task"] == "sum"
    assert run.info.status == "FINISHED"

    # W&B offline: a session per start, both with the run's one id (`wandb sync` joins them).
    logs = wandb_logs(run_dir)
    assert len(logs) == 2 and len({name for name, _ in logs}) == 1, logs
    for _, log in logs:
        assert b"accuracy_by_size" in log and b"expert_calls_per_tree" in log and b"steps_per_iteration" in log


def test_no_logger_writes_nothing_and_an_unknown_one_is_a_config_error(tmp_path):
    cfg = load_config("default", {**TINY, "run_dir": str(tmp_path), "iterations": 1, "logger": []})
    train(cfg, progress=False, log=lambda s: None)
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "mlruns").exists()
    with pytest.raises(ConfigError, match="unknown tracker"):
        load_config("default", {"logger": ["tensorboard", "comet"]})


def test_an_unreachable_mlflow_server_is_a_clear_error_before_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    with pytest.raises(ConfigError, match="logger mlflow"):
        Trackers(["mlflow"], TrackingConfig(mlflow_tracking_uri="http://127.0.0.1:9"), tmp_path, {"task": "sum"})


def test_a_tracker_that_fails_mid_run_is_switched_off_and_the_others_go_on(tmp_path):
    said = []
    trackers = Trackers(["tensorboard"], TrackingConfig(), tmp_path, {"task": "sum"}, log=said.append)

    class Broken:
        name = "broken"

        def log_iteration(self, *a):
            raise OSError("disk full")

        def close(self):
            pass

    trackers.trackers.insert(0, Broken())
    for it in range(2):
        trackers.log_iteration({"iteration": it, "accuracy_by_size": {1: 0.5 + it / 4}})
    trackers.close()
    assert said == ["warning: logger broken failed and is switched off: disk full"]
    assert same(scalars(tmp_path, "accuracy_by_size/1"), [(0, 0.5), (1, 0.75)])
