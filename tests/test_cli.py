"""The `ida-ray` command and the config loading behind it: help, clear errors before Ray
starts, config file merging, and one real (small) run through the console entry point."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml

from ida_ray.config import config_values, load_config, presets
from ida_ray.entrypoints import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_ray(monkeypatch):
    """Any attempt to start or join Ray fails the test: input errors must come first."""
    def refuse(*a, **k):
        raise AssertionError("ray.init was called before the input was checked")
    monkeypatch.setattr(ray, "init", refuse)


def run_cli(argv, capsys):
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--task", "--iterations", "--replicas", "--expanders", "--learner-workers", "--engine",
                 "--config", "--run-dir", "--resume", "--address", "--storage"):
        assert flag in text
    assert cli.main([]) == cli.EXIT_BAD_INPUT  # no command: prints help
    assert "train" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["train", "--task", "nope"], "task 'nope' is not one of"),
    (["train", "--config", "/no/such/file.yaml"], "does not exist"),
    (["train", "--config", "no_such_preset"], "no config file or preset named 'no_such_preset'"),
    (["train", "amplify.tau=-1"], "amplify.tau must be >= 0"),
    (["train", "amplify.tua=0.3"], "unknown keys in amplify: ['tua']"),
    (["train", "iterations=three"], "iterations must be a whole number"),
    (["train", "amplify.branch_choice=best"], "amplify.branch_choice must be one of ['adversary', 'uniform']"),
    (["train", "tau"], "is not key=value"),
    (["train", "iterations.x=1"], "'iterations' is not a section"),
    (["train", "--storage", "ftp://host/runs/a"], "scheme 'ftp' is not one pyarrow's filesystems take"),
    (["train", "--storage", "s3:///runs/a"], "names no bucket or host"),
    (["train", "resources.replica_gpus=0"], "resources.replica_gpus must be a whole number >= 1"),
])
def test_bad_input_is_a_clear_error_before_ray(no_ray, capsys, argv, message):
    rc, text = run_cli(argv, capsys)
    assert rc == cli.EXIT_BAD_INPUT and message in text and "Traceback" not in text


@pytest.mark.parametrize("argv", [["train", "--iterations", "0"], ["train", "--replicas", "two"],
                                  ["train", "--engine", "tensorrt"]])
def test_bad_arguments_exit_2(no_ray, capsys, argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2 and "error:" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ("iterations: [1\n", "not valid YAML"),
    ("- a\n- b\n", "expected a mapping"),
    ("iteratons: 3\n", "unknown config keys: ['iteratons']"),
    ("train: {stepz: 3}\n", "unknown keys in train: ['stepz']"),
    ("resources: {gpus: 3}\n", "unknown keys in resources"),
    ("amplify: {eps: 2.0}\n", "amplify.eps must be in (0, 1)"),
])
def test_bad_config_file(no_ray, capsys, tmp_path, content, message):
    path = tmp_path / "run.yaml"
    path.write_text(content)
    rc, text = run_cli(["train", "--config", str(path)], capsys)
    assert rc == cli.EXIT_BAD_INPUT and message in text


def test_existing_run_needs_resume_and_a_matching_model(no_ray, capsys, tmp_path):
    cfg = load_config("default", {"run_dir": str(tmp_path)})
    (tmp_path / "state.json").write_text(json.dumps({
        "completed_iterations": 1, "checkpoint": str(tmp_path), "rng_state": [3, [0] * 625, None],
        "config": dict(cfg.to_dict(), model=dict(cfg.to_dict()["model"], hidden_size=64))}))
    rc, text = run_cli(["train", "--run-dir", str(tmp_path)], capsys)
    assert rc == cli.EXIT_BAD_INPUT and "pass --resume" in text
    rc, text = run_cli(["train", "--run-dir", str(tmp_path), "--resume"], capsys)
    assert rc == cli.EXIT_BAD_INPUT and "model differs" in text


def test_vllm_missing_is_reported(no_ray, capsys, monkeypatch):
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None if name == "vllm" else real(name))
    rc, text = run_cli(["train"], capsys)
    assert rc == cli.EXIT_BAD_INPUT and "--engine torch" in text


def test_config_file_overlays_the_default(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"iterations": 2, "train": {"steps_per_iteration": 5},
                                    "resources": {"learner_cpus": 0.5}}))
    cfg = load_config(path)
    d = load_config("default")
    assert cfg.iterations == 2 and cfg.train.steps_per_iteration == 5
    assert cfg.train.lr == d.train.lr and cfg.task_kwargs == d.task_kwargs  # the rest is the default
    assert cfg.train.adversary_steps_per_iteration == d.train.adversary_steps_per_iteration == 50
    assert cfg.resources.learner_cpus == 0.5
    path.write_text("task: perm\n")
    cfg = load_config(path)
    assert cfg.task == "perm" and cfg.task_kwargs == {} and cfg.train_sizes is None
    path.write_text("base: null\niterations: 3\n")  # over the dataclass defaults, not the default run
    assert load_config(path).train.adversary_steps_per_iteration == 100


def test_overrides_go_over_the_file_and_a_new_task_drops_the_old_options(tmp_path):
    cfg = load_config("default", {"amplify.tau": 0.3, "train.lr": 1e-3, "train_sizes": [1, 2]})
    assert (cfg.amplify.tau, cfg.train.lr, cfg.train_sizes) == (0.3, 1e-3, (1, 2))
    assert cfg.amplify.max_new_tokens == 16  # the preset's, untouched
    cfg = load_config("default", {"task": "perm"})
    assert cfg.task_kwargs == {} and cfg.train_sizes is None
    args = cli.build_parser().parse_args(["train", "--iterations", "3", "iterations=5", "--backend", "local"])
    cfg = cli.config_from_args(args)
    assert cfg.iterations == 5 and (cfg.backend, cfg.engine) == ("local", "torch")  # key=value over flags


def test_exponent_floats_read_as_numbers_on_the_command_line_and_in_files(tmp_path):
    # PyYAML alone reads `1e-3` as a string (YAML 1.1); the help's own example must work.
    args = cli.build_parser().parse_args(["train", "train.lr=1e-3", "train.adversary_lr=2E-4"])
    cfg = cli.config_from_args(args)
    assert (cfg.train.lr, cfg.train.adversary_lr) == (1e-3, 2e-4)
    (tmp_path / "c.yaml").write_text("train: {lr: 5e-4}\n")
    assert load_config(str(tmp_path / "c.yaml")).train.lr == 5e-4


def test_every_preset_loads_and_round_trips():
    assert "default" in presets()
    for name in presets():
        cfg = load_config(name)
        assert type(cfg).from_dict(cfg.to_dict()) == cfg, name
    assert config_values("default")["iterations"] == 16


def test_default_is_local_cpu_vllm_sum():
    cfg = load_config("default")
    assert (cfg.task, cfg.engine, cfg.use_gpu, cfg.replicas, cfg.learner_workers) == ("sum", "vllm", False, 1, 1)
    assert cfg.backend == "ray" and cfg.validate() is cfg


def test_one_tiny_iteration_from_the_command_line(tmp_path):
    """The installed console script, as a user runs it: one tiny iteration in one process."""
    exe = Path(sys.executable).parent / "ida-ray"
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [str(exe), "train", "--backend", "local", "--iterations", "1", "--amplify-trees", "8", "--run-dir",
         str(run_dir), "--no-progress", "distill_trees_per_iteration=4", "eval_questions_per_size=4",
         "train.steps_per_iteration=3", "train.adversary_steps_per_iteration=1",
         "model={hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "== ida-ray results ==" in done.stdout and "iter 0:" in done.stdout
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["backend"], config["engine"], config["amplify_trees_per_iteration"]) == ("local", "torch", 8)


@pytest.mark.ray
@pytest.mark.slow
def test_console_script_runs_and_resumes(tmp_path):
    """The real entry point: a local cluster, 1 iteration on the torch engine, then --resume to
    the same target, which needs no cluster."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "iterations": 1, "train_sizes": [1, 2, 3], "amplify_trees_per_iteration": 24,
        "distill_trees_per_iteration": 16, "eval_questions_per_size": 10,
        "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
        "train": {"steps_per_iteration": 10, "adversary_steps_per_iteration": 2},
        "resources": {"expander_cpus": 0.25}}))
    run_dir = tmp_path / "run"
    exe = Path(sys.executable).parent / "ida-ray"
    cmd = [str(exe), "train", "--config", str(config), "--engine", "torch", "--run-dir", str(run_dir),
           "--no-dashboard", "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "== ida-ray results ==" in done.stdout and "iter 0:" in done.stdout
    assert (run_dir / "plots" / "progress.png").exists() and (run_dir / "state.json").exists()
    again = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert again.returncode == 0 and "1 iterations already done" in again.stdout
    assert "Started a local Ray instance" not in again.stdout + again.stderr
    help_ = subprocess.run([sys.executable, "-m", "ida_ray.entrypoints.train", "--help"], capture_output=True, text=True,
                           timeout=120, cwd=ROOT)
    assert help_.returncode == 0 and "--learner-workers" in help_.stdout


@pytest.mark.ray
@pytest.mark.slow
def test_honest_objective_through_the_cli(tmp_path):
    """`--objective honest`: the same run, learner and checkpoints, with the two-headed model;
    the summary reports C and the probe where the simple labeller errs."""
    config = tmp_path / "honest.yaml"
    config.write_text(yaml.safe_dump({
        "iterations": 1, "task_kwargs": {"base_size": 2, "max_digit": 9}, "train_sizes": [2, 3, 4],
        "amplify_trees_per_iteration": 16, "distill_trees_per_iteration": 8, "eval_questions_per_size": 8,
        "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
        "train": {"steps_per_iteration": 10, "adversary_steps_per_iteration": 2},
        "honest": {"lam": 2.0, "small_batch_size": 8},
        "resources": {"expander_cpus": 0.25}}))
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "ida_ray.entrypoints.cli", "train", "--config", str(config), "--engine", "torch",
           "--objective", "honest", "--run-dir", str(run_dir), "--no-dashboard", "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "honest: C " in done.stdout
    (m,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert m["honest"]["trusted_examples"] > 0 and m["honest"]["questions"] > 0
    assert json.loads((run_dir / "state.json").read_text())["config"]["objective"] == "honest"
    assert list(run_dir.glob("checkpoints/*/iteration_0000/model/instrumental_head.safetensors"))


def test_honest_objective_needs_questions_where_the_simple_labeller_errs(no_ray, capsys):
    # The embedded default sums digits 0..3 over 1..4 digits: never 20, where the simple labeller errs.
    rc = cli.main(["train", "--objective", "honest"])
    assert rc == cli.EXIT_BAD_INPUT and "never errs" in capsys.readouterr().err


def test_the_honest_example_config_passes_preflight():
    from ida_ray.preflight import check_config

    cfg = load_config(str(ROOT / "examples" / "honest.yaml"))
    cfg = check_config(cfg)
    assert cfg.objective == "honest" and cfg.task_kwargs["max_digit"] == 9 and cfg.honest.lam == 1.0
