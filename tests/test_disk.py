"""A long run does not fill the disk: older tree records are gzipped and, if asked, only the
newest iterations' kept; the replay spill stays bounded; the run directory's size is in the
metrics; and a full disk stops the run with a clear error, resumable once there is room."""
from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ida_ray.checkpoint import checkpoint_problem
from ida_ray.config import load_config
from ida_ray.entrypoints.train import train
from ida_ray.replay import read_tree_records, spill_path
from ida_ray.viewer.store import TreeStore

pytestmark = pytest.mark.usefixtures("one_thread_module")

TINY = {"backend": "local", "engine": "torch", "iterations": 4, "train_sizes": [1, 2, 3],
        "amplify_trees_per_iteration": 24, "distill_trees_per_iteration": 16, "eval_questions_per_size": 10,
        "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
        "train": {"steps_per_iteration": 10, "adversary_steps_per_iteration": 2, "replay_capacity": 100},
        "logger": [], "serve_pages": False}


def test_old_tree_records_are_gzipped_and_trimmed_and_the_spill_stays_bounded(tmp_path):
    cfg = load_config("default", {**TINY, "run_dir": str(tmp_path), "records.keep_tree_iterations": 2})
    history = train(cfg, progress=False, log=lambda s: None)
    assert sorted(p.name for p in (tmp_path / "trees").iterdir()) == ["iteration_0002.jsonl.gz", "iteration_0003.jsonl"]
    packed = read_tree_records(tmp_path, 2)
    assert len(packed) == history[2]["trees"] == 40 and read_tree_records(tmp_path, 0) == []
    assert gzip.open(tmp_path / "trees" / "iteration_0002.jsonl.gz", "rt").readline().startswith("{")
    # The viewer reads both, and only what was kept.
    assert sorted({s["iteration"] for s in TreeStore(tmp_path).summaries()}) == [2, 3]
    assert len(spill_path(tmp_path).read_text().splitlines()) <= 3 * 100  # capacity 100, 4 x ~100+ examples added
    assert all(m["run_dir_mb"] > 0 and m["disk_free_mb"] > 0 for m in history)
    assert history[-1]["run_dir_mb"] < 5


@pytest.fixture
def small_disk(tmp_path):
    """A 900 KB tmpfs: room for the run's first iteration, not its fourth."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=900k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}): needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ida_ray.entrypoints.cli", "train", *args], capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])


def test_a_full_disk_stops_the_run_clearly_and_it_resumes_once_there_is_room(small_disk, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "records": {"min_free_mb": 0}}))
    run_dir = small_disk / "run"
    failed = cli("--config", str(config), "--run-dir", str(run_dir), "--no-progress")
    assert failed.returncode == 1, failed.stderr[-2000:]
    assert "disk_full" in failed.stderr and "--resume" in failed.stderr, failed.stderr[-2000:]
    state = yaml.safe_load((run_dir / "state.json").read_text())
    done = state["completed_iterations"]
    assert 1 <= done < 4

    # Room again: the run resumes from its last intact checkpoint and finishes.
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    resumed = cli("--config", str(config), "--run-dir", str(run_dir), "--no-progress", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert sorted({yaml.safe_load(line)["iteration"] for line in lines}) == [0, 1, 2, 3]
    last = yaml.safe_load((run_dir / "state.json").read_text())
    assert last["completed_iterations"] == 4 and checkpoint_problem(last["checkpoint"]) is None

    # Below records.min_free_mb the run refuses to start an iteration, before writing anything.
    low = cli("--config", str(config), "--run-dir", str(run_dir), "--no-progress", "--resume", "iterations=5",
              "records.min_free_mb=100000")
    assert low.returncode == 1 and "records.min_free_mb" in low.stderr, low.stderr[-2000:]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == len(lines)
