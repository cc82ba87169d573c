"""`ida-ray eval`: a model, outside any run, on a task's held-out questions or a questions file.

    ida-ray eval runs/latest                         # the run's best model, on its own task
    ida-ray eval runs/latest --which last --amplify  # the last one, and its amplified trees
    ida-ray eval ./my-export --questions-file q.txt --out eval.json
    ida-ray eval runs/latest --every-question        # every question of each size the task can list
    ida-ray eval ./any-hf-dir --task my_pkg.tasks:Kinship --prompt-format chat

The model alone answers each question greedily (the prompt format the model was trained
with), graded by the task's `is_correct`: accuracy by size, as the run's own evaluation. With
--amplify, each question is also answered by an amplification tree (the task's coded expert
H', the model, and the adversary beside the model), and the tree's answer is graded too.

In-process on the torch engine (no Ray, no vLLM), so it runs where the weights are.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ida_ray.config import IDAConfig, load_config
from ida_ray.errors import ConfigError
from ida_ray.run_dir import ModelSource, find_model


@dataclass
class EvalResult:
    model: str
    which: str
    iteration: int | None
    task: str
    task_kwargs: dict
    prompt_format: str
    questions: str  # "held-out", "every question" or the questions file's path
    accuracy_by_size: dict[int, float]
    questions_by_size: dict[int, int]
    amplified_accuracy_by_size: dict[int, float] | None = None
    expert_calls_per_tree: float | None = None
    malformed: list[dict] = field(default_factory=list)  # questions-file lines that are not questions
    unlisted_sizes: list[int] = field(default_factory=list)  # --every-question: sizes too many to list, not graded
    answers: list[dict] = field(default_factory=list)  # per question: size, the model's answer, correct
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def eval_config(source: ModelSource, task: str | None, task_kwargs: dict | None, prompt_format: str | None,
                seed: int) -> IDAConfig:
    """The config the model is evaluated under: its run's (or its export's), with the model
    path pointing at it and any task or format given here over it."""
    base = dict(source.config or {})
    overrides: dict = {"model.path": str(source.model_dir), "seed": seed, "logger": []}
    if task is not None:
        overrides["task"] = task
        overrides["task_kwargs"] = task_kwargs or {}
    elif task_kwargs is not None:
        overrides["task_kwargs"] = task_kwargs
    if prompt_format is not None:
        overrides["model.prompt_format"] = prompt_format
    if not base and task is None:
        raise ConfigError(f"{source.model_dir} comes from no ida-ray run: say which task with --task")
    if not base:  # a bare HF directory: its chat template decides the format unless told
        from ida_ray.models import load_tokenizer

        if prompt_format is None:
            overrides["model.prompt_format"] = "chat" if load_tokenizer(source.model_dir).chat_template else "compact"
    if "model" in base:  # the run's model spec, pointed at this model's weights
        base["model"] = {k: v for k, v in base["model"].items() if k != "path"}
    return load_config("default", {**_flat(base), **overrides})


def _flat(config: dict) -> dict:
    """A saved config as dotted overrides (sections merged key by key over the default)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and key not in ("task_kwargs",):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


async def _evaluate(cfg: IDAConfig, source: ModelSource, questions_file: str | None, per_size: int | None,
                    amplify: bool, every_question: bool = False) -> EvalResult:
    from ida_ray.engine import TorchEngine
    from ida_ray.evaluation import heldout_questions, said_answer
    from ida_ray.expansion import expand_job
    from ida_ray.messages import ExpandJob
    from ida_ray.models import load_adversary, load_model, load_tokenizer
    from ida_ray.preflight import check_questions_file
    from ida_ray.tasks import get_task

    t0 = time.time()
    task = get_task(cfg.task, **cfg.task_kwargs)
    tokenizer = load_tokenizer(source.model_dir)
    fmt = cfg.model.make_format(tokenizer)
    if amplify and source.adversary_dir is None:
        raise ConfigError(f"--amplify needs the adversary beside the model ({source.model_dir.parent}/adversary or "
                          f"{source.model_dir}/adversary): amplification trees choose their branch with it")
    adversary = load_adversary(source.adversary_dir) if amplify else None
    engine = TorchEngine(load_model(source.model_dir, cfg.model.torch_dtype), adversary, tokenizer,
                         max_new_tokens=cfg.amplify.max_new_tokens, cache_size=0)
    malformed, unlisted = [], []
    if every_question:
        by_size = {}
        for s in cfg.sizes(task):
            listed = task.every_question(s)
            if listed is None:
                unlisted.append(s)
            else:
                by_size[s] = listed
        if not by_size:
            raise ConfigError(f"{cfg.task} lists every question of none of the sizes {list(cfg.sizes(task))} (too "
                              "many, or the task does not say: Task.every_question); use held-out questions or "
                              "--questions-file")
    elif questions_file:
        entries = check_questions_file(cfg, questions_file)
        malformed = [e.to_dict() for e in entries if e.problem]
        by_size: dict[int, list[str]] = {}
        for e in entries:
            if not e.problem:
                by_size.setdefault(task.size(e.question), []).append(e.question)
    else:
        by_size = heldout_questions(task, cfg.sizes(task), per_size or cfg.eval_questions_per_size, cfg.seed)
    flat = [(s, q) for s in sorted(by_size) for q in by_size[s]]
    if not flat:
        raise ConfigError(f"no well-formed question to evaluate in {questions_file}")
    gens = await engine.generate([fmt.answer_prompt(q) for _, q in flat])
    answers = []
    for (s, q), g in zip(flat, gens):
        said = said_answer(fmt, g.text) if g.finished else None
        answers.append({"size": s, "question": q, "answer": said, "correct": task.is_correct(q, said)})
    result = EvalResult(
        model=str(source.model_dir), which=source.which, iteration=source.iteration, task=cfg.task,
        task_kwargs=cfg.task_kwargs, prompt_format=cfg.model.prompt_format,
        questions="every question" if every_question else str(Path(questions_file).resolve()) if questions_file
        else "held-out",
        accuracy_by_size=_by_size(answers, "correct"), questions_by_size={s: len(v) for s, v in by_size.items()},
        malformed=malformed, unlisted_sizes=unlisted, answers=answers)
    if amplify:
        rng = random.Random(cfg.seed)
        jobs = [ExpandJob(job_id=f"e{i}", question=q, mode="amplify", iteration=0, seed=rng.randrange(2**31))
                for i, (_, q) in enumerate(flat)]
        trees = [(await expand_job(task, engine, job, cfg.amplify, fmt=fmt)).tree for job in jobs]
        for a, tree in zip(answers, trees):
            a["amplified_answer"] = tree.answer
            a["amplified_correct"] = tree.ok and task.is_correct(tree.question, tree.answer)
            a["expert_calls"] = tree.expert_calls
        result.amplified_accuracy_by_size = _by_size(answers, "amplified_correct")
        result.expert_calls_per_tree = round(sum(t.expert_calls for t in trees) / len(trees), 3)
    result.seconds = round(time.time() - t0, 2)
    return result


def _by_size(answers: list[dict], key: str) -> dict[int, float]:
    sizes = sorted({a["size"] for a in answers})
    return {s: round(sum(a[key] for a in answers if a["size"] == s) / sum(a["size"] == s for a in answers), 4)
            for s in sizes}


def evaluate_model(path: str | Path, *, which: str = "best", task: str | None = None, task_kwargs: dict | None = None,
                   prompt_format: str | None = None, questions_file: str | None = None, per_size: int | None = None,
                   amplify: bool = False, every_question: bool = False, seed: int = 0,
                   out: str | Path | None = None) -> EvalResult:
    """Evaluate the model at `path` (see the module docstring); writes the result as JSON to `out`.
    every_question: every question of each size the task can list (`Task.every_question`)
    instead of a held-out draw; not with questions_file."""
    if every_question and questions_file:
        raise ConfigError("--every-question and --questions-file each say which questions: give one")
    source = find_model(path, which)
    cfg = eval_config(source, task, task_kwargs, prompt_format, seed)
    result = asyncio.run(_evaluate(cfg, source, questions_file, per_size, amplify, every_question))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result.to_dict(), indent=1))
    return result
