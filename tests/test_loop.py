"""The IDA iteration on the in-process backend (no Ray): it honours every option it serves,
refuses the ones it cannot before anything starts, resumes exactly, and runs the honest
objective through the same loop."""
from __future__ import annotations

import json

import pytest

from ida_ray.config import load_config
from ida_ray.entrypoints.train import train
from ida_ray.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread_module")

TINY = {"backend": "local", "engine": "torch", "iterations": 2, "train_sizes": [1, 2, 3],
        "amplify_trees_per_iteration": 24, "distill_trees_per_iteration": 16, "eval_questions_per_size": 10,
        "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
        "train.steps_per_iteration": 10, "train.adversary_steps_per_iteration": 2}


def tiny(run_dir, **more):
    return load_config("default", {**TINY, "run_dir": str(run_dir), **more})


def test_resume_matches_a_straight_run(tmp_path):
    # The part run stops by asking for one iteration; a cosine schedule spans a run's
    # iterations, so it would give that iteration other rates: this compares constant rates.
    constant = {"train.lr_schedule": "constant"}
    straight = train(tiny(tmp_path / "straight", **constant), progress=False, log=lambda s: None)
    part = tmp_path / "part"
    train(tiny(part, iterations=1, **constant), progress=False, log=lambda s: None)
    with pytest.raises(ConfigError, match="--resume"):
        train(tiny(part, **constant), progress=False, log=lambda s: None)
    resumed = train(tiny(part, **constant), resume=True, progress=False, log=lambda s: None)
    a, b = straight[1], resumed[1]
    assert [m["iteration"] for m in resumed] == [0, 1]
    assert (b["buffer"], b["trees"], b["examples"]) == (a["buffer"], a["trees"], a["examples"])
    assert b["model_loss"] == pytest.approx(a["model_loss"], rel=1e-5)
    assert b["accuracy_by_size"] == a["accuracy_by_size"] and b["replica_versions"] == {"local": 2}
    state = json.loads((part / "state.json").read_text())
    assert state["completed_iterations"] == 2 and state["checkpoint"].endswith("local/iteration_0001")
    # Two checkpoints are kept (resume may need the one before the newest).
    assert sorted(p.name for p in (part / "checkpoints" / "local").iterdir()) == ["iteration_0000", "iteration_0001"]


def test_honest_objective_runs_in_the_one_loop(tmp_path):
    """objective honest on the local backend: the two-headed model trains, the round's C and
    the held-out probe reach metrics.jsonl, the checkpoint keeps both heads."""
    cfg = tiny(tmp_path, objective="honest", iterations=1, task_kwargs={"base_size": 2, "max_digit": 9},
               train_sizes=[2, 3, 4], **{"honest.small_batch_size": 8})
    (m,) = train(cfg, progress=False, log=lambda s: None)
    assert m["honest"]["trusted_examples"] > 0 and m["honest"]["questions"] > 0
    assert 0 <= m["honest"]["intended_right_where_simple_errs"] <= 1
    assert list(tmp_path.glob("checkpoints/local/iteration_0000/model/instrumental_head.safetensors"))
    assert json.loads((tmp_path / "checkpoints/local/iteration_0000/learner.json").read_text())["objective"] == "honest"


def test_questions_file_on_the_local_backend(tmp_path):
    questions = tmp_path / "q.txt"
    questions.write_text("1,2\n3,x\n2,2,1\n")
    cfg = tiny(tmp_path / "run", iterations=1)
    (m,) = train(cfg, progress=False, questions_file=questions, log=lambda s: None)
    records = [json.loads(line) for line in (tmp_path / "run" / "trees" / "iteration_0000.jsonl").open()]
    users = [r for r in records if r["source"] == "user"]
    assert len(users) == 3 and m["errors"].get("malformed_question") == 1 and m["jobs"]["rejected"] == 1


@pytest.mark.parametrize("override, message", [
    ({"expert": "human"}, "expert 'human' needs the Ray backend"),
    ({"replicas": 2}, "backend 'local' is one process"),
    ({"engine": "vllm"}, "engine must be 'torch'"),
])
def test_the_local_backend_refuses_what_it_cannot_serve(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        train(tiny(tmp_path, **override), progress=False, log=lambda s: None)
    assert not (tmp_path / "state.json").exists()


def test_a_run_saved_before_new_model_fields_still_resumes(tmp_path):
    """state.json written before ModelSpec gained path and dtype: their defaults fill in."""
    train(tiny(tmp_path, iterations=1), progress=False, log=lambda s: None)
    state_path = tmp_path / "state.json"
    state = json.loads(state_path.read_text())
    for key in ("path", "dtype"):
        del state["config"]["model"][key]
    state_path.write_text(json.dumps(state))
    resumed = train(tiny(tmp_path), resume=True, progress=False, log=lambda s: None)
    assert [m["iteration"] for m in resumed] == [0, 1]


def test_the_metrics_line_is_written_before_the_state_that_counts_it(tmp_path, monkeypatch):
    """A crash between the two writes re-runs the iteration rather than losing its record."""
    import ida_ray.loop

    def crash(self, trained):
        raise RuntimeError("killed between the metrics line and state.json")
    monkeypatch.setattr(ida_ray.loop.IDARun, "save_state", crash)
    with pytest.raises(RuntimeError, match="killed"):
        train(tiny(tmp_path, iterations=1), progress=False, log=lambda s: None)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    assert not (tmp_path / "state.json").exists()  # so the iteration runs again, and its new line wins


def test_the_local_backend_refuses_however_it_is_made(tmp_path):
    from ida_ray.local_backend import LocalBackend

    with pytest.raises(ConfigError, match="backend 'local' is one process"):
        LocalBackend(tiny(tmp_path, replicas=2))


def test_the_supervised_arm_trains_on_true_answers_of_the_same_trees(tmp_path):
    """amplify.answer_labels=ground_truth through the loop: every answer example in the replay
    buffer is the task's true answer, on the same trees as IDA's run of the same configuration,
    and at nodes IDA has no label for (the untrained model's distillation trees fail to parse,
    so IDA takes no answer from them; their questions still have true answers)."""
    from ida_ray.prompts import COMPACT
    from ida_ray.replay import spill_path
    from ida_ray.tasks import get_task

    task = get_task("sum", **load_config("default").task_kwargs)
    runs = {}
    for labels in ("tree", "ground_truth"):
        run_dir = tmp_path / labels
        history = train(tiny(run_dir, iterations=1, serve_pages=False, **{"amplify.answer_labels": labels}),
                        progress=False, log=lambda s: None)
        answers = [json.loads(line) for line in spill_path(run_dir).read_text().splitlines()]
        answers = [(COMPACT.question_of_answer_prompt(e["prompt"]), e["completion"]) for e in answers
                   if e["kind"] == "answer"]
        runs[labels] = (history[0], answers)
    (ida, ida_answers), (sup, sup_answers) = runs["tree"], runs["ground_truth"]
    assert (ida["trees"], ida["expert_calls_per_tree"]) == (sup["trees"], sup["expert_calls_per_tree"])
    assert sup_answers and all(COMPACT.format_answer(task.solve(q)) == a for q, a in sup_answers)
    assert set(ida_answers) < set(sup_answers)  # IDA's labels here are the expert's, all true
