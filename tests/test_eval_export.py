"""`ida-ray eval` and `ida-ray export` on a real (tiny) run: the best model is kept as the run
goes, exported as an HF directory with a model card, and evaluated outside the run with the
run's own figures."""
from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from ida_ray.config import load_config
from ida_ray.entrypoints import cli
from ida_ray.entrypoints.evaluate import evaluate_model
from ida_ray.entrypoints.export import export_model
from ida_ray.entrypoints.train import train
from ida_ray.errors import ConfigError
from ida_ray.run_dir import best_score, read_best

pytestmark = pytest.mark.usefixtures("one_thread_module")

TINY = {"backend": "local", "engine": "torch", "iterations": 3, "train_sizes": [1, 2],
        "amplify_trees_per_iteration": 48, "distill_trees_per_iteration": 24, "eval_questions_per_size": 20,
        "model": {"hidden_size": 48, "num_layers": 1, "num_heads": 2, "intermediate_size": 96},
        "train.steps_per_iteration": 40, "train.adversary_steps_per_iteration": 4, "logger": []}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    history = train(load_config("default", {**TINY, "run_dir": str(run_dir)}), progress=False, log=lambda s: None)
    return run_dir, history


def test_the_run_keeps_its_best_iteration(run):
    run_dir, history = run
    best = max(history, key=lambda m: (best_score(m["accuracy_by_size"]), m["iteration"]))
    kept = read_best(run_dir)
    assert kept["iteration"] == best["iteration"] == history[-1]["best_iteration"]
    assert kept["accuracy_by_size"] == {str(k): v for k, v in best["accuracy_by_size"].items()}
    assert (run_dir / "best" / "model" / "model.safetensors").exists()
    assert (run_dir / "best" / "adversary" / "config.json").exists()


def test_eval_of_the_run_reproduces_the_runs_own_figure(run, tmp_path):
    run_dir, history = run
    last = history[-1]
    out = tmp_path / "eval.json"
    assert cli.main(["eval", str(run_dir), "--which", "last", "--amplify", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    # Same weights, same held-out questions (the run's seed), same greedy decoding.
    assert {int(k): v for k, v in r["accuracy_by_size"].items()} == last["accuracy_by_size"]
    assert r["which"] == "last" and r["iteration"] == last["iteration"] and r["task"] == "sum"
    assert set(r["amplified_accuracy_by_size"]) == {"1", "2"} and r["expert_calls_per_tree"] > 0
    assert len(r["answers"]) == 40 and all("amplified_correct" in a for a in r["answers"])


def test_export_then_eval_the_exported_directory(run, tmp_path):
    run_dir, history = run
    out = export_model(run_dir, tmp_path / "exported", command="ida-ray export test")
    best = read_best(run_dir)
    model = AutoModelForCausalLM.from_pretrained(out)  # what vllm serve and from_pretrained load
    assert model.config.num_hidden_layers == 1
    AutoModelForSequenceClassification.from_pretrained(out / "adversary")
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and f"iteration {best['iteration']}" in card
    assert card.count("\n| ") >= len(history) + 1 and "ida-ray export test" in card
    info = json.loads((out / "ida_ray.json").read_text())
    assert info["task"] == "sum" and info["iteration"] == best["iteration"] and len(info["history"]) == 3
    # The exported directory evaluates on its own: task and format come from ida_ray.json.
    r = evaluate_model(out, per_size=20)
    assert r.task == "sum" and r.prompt_format == "compact"
    assert r.accuracy_by_size == {int(k): v for k, v in best["accuracy_by_size"].items()}
    with pytest.raises(ConfigError, match="not empty"):
        export_model(run_dir, out)


def test_eval_on_a_questions_file_lists_malformed_lines(run, tmp_path):
    run_dir, _ = run
    qf = tmp_path / "q.txt"
    qf.write_text("3,4\n1,2,3\nnot a question\n")
    r = evaluate_model(run_dir, questions_file=str(qf))
    assert r.questions_by_size == {2: 1, 3: 1} and len(r.malformed) == 1 and r.malformed[0]["line"] == 3
    assert [a["question"] for a in r.answers] == ["3,4", "1,2,3"]


def test_eval_refuses_what_it_cannot_do(run, tmp_path, capsys):
    run_dir, _ = run
    from ida_ray.models import create_model_dirs

    model_dir, _ = create_model_dirs(tmp_path / "bare")
    with pytest.raises(ConfigError, match="--task"):
        evaluate_model(model_dir)
    with pytest.raises(ConfigError, match="adversary"):
        evaluate_model(model_dir, task="sum", amplify=True)
    assert cli.main(["eval", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_eval_on_every_question_grades_the_whole_space_as_a_file_of_it_would(run, tmp_path):
    run_dir, _ = run
    r = evaluate_model(run_dir, which="last", every_question=True)
    # The run's task: sum over digits 0..3 at sizes 1 and 2, so 4 and 16 questions, each once.
    assert r.questions == "every question" and r.questions_by_size == {1: 4, 2: 16} and not r.unlisted_sizes
    assert len({a["question"] for a in r.answers}) == 20
    qf = tmp_path / "all.txt"
    qf.write_text("\n".join(a["question"] for a in r.answers) + "\n")
    assert evaluate_model(run_dir, which="last", questions_file=str(qf)).accuracy_by_size == r.accuracy_by_size
    # A size whose space is too large to list is named and left out, not drawn from.
    from ida_ray.tasks import get_task

    wide = get_task("sum", base_size=3, max_digit=9)
    assert [s for s in wide.default_sizes if wide.every_question(s) is None] == [6, 7, 8, 9, 10, 11, 12]
    assert get_task("coins").every_question(1) is None  # the default: the task does not list its questions
    with pytest.raises(ConfigError, match="give one"):
        evaluate_model(run_dir, every_question=True, questions_file=str(qf))
