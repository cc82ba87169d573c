"""Checkpoints survive a writer killed mid-write, and a truncated or corrupted checkpoint is
refused with the file named, the previous one used in its place (resume included)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from ida_ray.checkpoint import PARTIAL_SUFFIX, checkpoint_problem, latest_checkpoint
from ida_ray.config import load_config
from ida_ray.entrypoints.train import train
from ida_ray.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread_module")

TINY = {"backend": "local", "engine": "torch", "iterations": 3, "train_sizes": [1, 2, 3],
        "amplify_trees_per_iteration": 24, "distill_trees_per_iteration": 16, "eval_questions_per_size": 10,
        "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
        "train.steps_per_iteration": 10, "train.adversary_steps_per_iteration": 2, "logger": [], "serve_pages": False}

# A writer: one whole checkpoint (iteration 0) of a model large enough that writing the next
# takes a while, then "writing" and the second one (iteration 1), again and again until killed.
WRITER = """
import sys
from ida_ray.checkpoint import save_checkpoint
from ida_ray.config import load_config
from ida_ray.training import build_objective
cfg = load_config("default", {"model": {"hidden_size": 512, "num_layers": 4, "num_heads": 8,
                                        "intermediate_size": 2048}, "run_dir": sys.argv[1]})
objective = build_objective(cfg)
save_checkpoint(sys.argv[1] + "/iteration_0000", objective, 0)
print("writing", flush=True)
while True:
    save_checkpoint(sys.argv[1] + "/iteration_0001", objective, 1)
"""


def test_a_writer_killed_mid_checkpoint_leaves_the_previous_one_whole(tmp_path):
    seen_partial = False
    for attempt, delay in enumerate([0.05, 0.2, 0.5, 1.0, 2.0]):
        root = tmp_path / f"try{attempt}"
        root.mkdir()
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert checkpoint_problem(root / "iteration_0000") is None
        second = root / "iteration_0001"
        # Never a half-written checkpoint under its own name: absent, or whole.
        assert not second.exists() or checkpoint_problem(second) is None
        assert latest_checkpoint(root) in (root / "iteration_0000", second)
        if (root / f"iteration_0001{PARTIAL_SUFFIX}").exists():
            seen_partial = True
            assert latest_checkpoint(root) == (second if second.exists() else root / "iteration_0000")
            break
    assert seen_partial, "no kill landed mid-write"


def flip_a_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupted_last_checkpoint_is_named_and_the_run_resumes_from_the_one_before(tmp_path):
    straight = train(load_config("default", {**TINY, "run_dir": str(tmp_path / "straight")}), progress=False,
                     log=lambda s: None)
    run_dir = tmp_path / "run"
    train(load_config("default", {**TINY, "run_dir": str(run_dir)}), progress=False, log=lambda s: None)
    last = run_dir / "checkpoints" / "local" / "iteration_0002"
    flip_a_byte(last / "model" / "model.safetensors")
    assert "model.safetensors is corrupted" in checkpoint_problem(last)
    said = []
    resumed = train(load_config("default", {**TINY, "run_dir": str(run_dir)}), resume=True, progress=False,
                    log=said.append)
    warning = next(s for s in said if s.startswith("warning:"))
    assert "model.safetensors is corrupted" in warning and "iteration 1" in warning
    # Iteration 2 ran again from iteration 1's weights, replay buffer and question state: as the straight run did.
    assert [m["iteration"] for m in resumed] == [0, 1, 2]
    assert resumed[2]["accuracy_by_size"] == straight[2]["accuracy_by_size"]
    assert resumed[2]["model_loss"] == pytest.approx(straight[2]["model_loss"], rel=1e-5)
    assert checkpoint_problem(last) is None  # written again, whole
    assert json.loads((run_dir / "state.json").read_text())["completed_iterations"] == 3


def test_truncated_checkpoints_with_no_intact_one_before_are_refused_with_the_file_named(tmp_path):
    run_dir = tmp_path / "run"
    train(load_config("default", {**TINY, "iterations": 2, "run_dir": str(run_dir)}), progress=False,
          log=lambda s: None)
    for it in (0, 1):
        adversary = run_dir / "checkpoints" / "local" / f"iteration_000{it}" / "adversary" / "model.safetensors"
        adversary.write_bytes(adversary.read_bytes()[:100])
    with pytest.raises(ConfigError, match=r"adversary/model.safetensors is truncated .* no earlier checkpoint is intact"):
        train(load_config("default", {**TINY, "run_dir": str(run_dir)}), resume=True, progress=False, log=lambda s: None)


def test_a_moved_run_directory_evaluates_and_resumes_from_its_own_checkpoints(tmp_path):
    # state.json names the last checkpoint by the absolute path it had when written; a run
    # directory copied off the cluster that ran it, or renamed, must still find it.
    from ida_ray.entrypoints.evaluate import evaluate_model
    from ida_ray.run_dir import read_state

    first = tmp_path / "on_the_cluster"
    straight = train(load_config("default", {**TINY, "iterations": 2, "run_dir": str(first)}), progress=False,
                     log=lambda s: None)
    moved = tmp_path / "on_my_laptop"
    first.rename(moved)
    state = read_state(moved)
    assert state["checkpoint"].startswith(str(moved / "checkpoints")) and state["completed_iterations"] == 2
    last = evaluate_model(moved, which="last", per_size=10)
    assert last.iteration == 1 and last.accuracy_by_size == straight[-1]["accuracy_by_size"]
    notes = []
    resumed = train(load_config("default", {**TINY, "iterations": 3, "run_dir": str(moved)}), resume=True,
                    progress=False, log=notes.append)
    assert [m["iteration"] for m in resumed] == [0, 1, 2]  # iterations 0-1 read back, only 2 run
    assert not any("resuming from the checkpoint of iteration" in n for n in notes), notes
