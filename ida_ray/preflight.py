"""Checks of a run's input that need more than the config's own values, made before any
cluster resource is taken.

`IDAConfig` checks types and ranges when it is made (ida_ray/config.py). Some values are wrong
only against the task or the machine: task options the task rejects, a question size whose
prompts overflow the model's context, the honest objective on questions where its two
labellers always agree, GPUs asked for and absent, a backend that cannot serve an option.
`check_config` finds all of these first, so a bad run costs no cluster time and fails with one
ConfigError that names every problem (the CLI prints it and exits with status 2).
"""
from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from ida_ray.config import IDAConfig
from ida_ray.errors import ConfigError
from ida_ray.prompts import PromptFormat
from ida_ray.questions import UserQuestion, characters_and_bos, context_needed, read_questions


def prompt_measure(cfg: IDAConfig) -> tuple[PromptFormat, Callable[[str], int]]:
    """M's prompt format, and how many tokens a prompt takes under M's tokenizer."""
    if cfg.model.path is None:
        return cfg.model.make_format(), characters_and_bos
    from ida_ray.models import load_tokenizer
    from ida_ray.tokenizer import bos_ids

    tokenizer = load_tokenizer(cfg.model.path)
    bos = len(bos_ids(tokenizer))
    return (cfg.model.make_format(tokenizer),
            lambda prompt: bos + len(tokenizer(prompt, add_special_tokens=False)["input_ids"]))


def _context_problem(cfg: IDAConfig, task) -> str | None:
    """The largest training questions' trees must fit the model's context (in M's tokens)."""
    rng = random.Random(cfg.seed)
    size = max(cfg.sizes(task))
    fmt, length = prompt_measure(cfg)
    need = max(context_needed(task, task.generate(size, rng), cfg.amplify.max_new_tokens, fmt, length)
               for _ in range(8))
    have = cfg.model.context_length()
    if need > have:
        where = f"model {cfg.model.path}'s context of {have}" if cfg.model.path else f"model.max_positions={have}"
        return (f"questions of size {size} need {need} positions (prompt + amplify.max_new_tokens), more than "
                f"{where}: raise it, or lower the sizes or max_new_tokens")
    return None


def _model_problem(cfg: IDAConfig) -> str | None:
    """A model path that does not load is refused before any actor tries to load it."""
    if cfg.model.path is None:
        return None
    try:
        cfg.model.context_length()
        from ida_ray.models import load_tokenizer

        load_tokenizer(cfg.model.path)
    except ConfigError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - transformers raises OSError, ValueError, ...
        return f"model.path {cfg.model.path!r} does not load as a Hugging Face causal LM: {str(exc)[:300]}"
    return None


def _honest_problem(cfg: IDAConfig, task) -> str | None:
    """The honest objective separates the two labelling processes only where they disagree: a
    question distribution on which the simple labeller never errs leaves it nothing to learn."""
    from ida_ray.honest.ida_trainer import questions_where_simple_errs
    from ida_ray.honest.labels import simple_labeller

    simple = simple_labeller(task)
    if questions_where_simple_errs(task, simple, cfg.sizes(task), 1, cfg.seed, max_draws=2000):
        return None
    return (f"objective 'honest': the simple labeller ({simple.description}) never errs on {cfg.task!r} questions "
            f"of sizes {cfg.sizes(task)} with task_kwargs {cfg.task_kwargs}, so the two labelling processes "
            f"always agree; widen the question distribution (for sum: max_digit 9, or larger sizes)")


def _format_problem(cfg: IDAConfig, task) -> str | None:
    """A natural-language task's questions hold characters the compact format reserves."""
    if task.natural_language and cfg.model.prompt_format != "chat":
        return (f"task {cfg.task!r} is in natural language: it needs model.prompt_format chat (and a model with "
                f"its own tokenizer, model.path)")
    if cfg.model.prompt_format == "chat" and cfg.expert == "human":
        return "expert 'human' reads replies in the compact format: use model.prompt_format compact"
    if cfg.model.prompt_format == "chat" and cfg.objective == "honest":
        return "objective 'honest' runs in the compact format: use model.prompt_format compact"
    return None


def backend_problems(cfg: IDAConfig) -> list[str]:
    """Options the chosen backend cannot serve: refused here rather than ignored."""
    if cfg.backend != "local":
        return []
    p = []
    if cfg.expert == "human":
        p.append("expert 'human' needs the Ray backend (the /human page answers through the run's queue actor): "
                 "use backend ray")
    if cfg.use_gpu:
        p.append("backend 'local' runs on the CPU; use_gpu needs the Ray backend")
    if cfg.expert == "lm" and cfg.lm_expert.backend == "cluster":
        p.append("lm_expert.backend 'cluster' serves the expert on its own replica actors: use backend ray (or "
                 "lm_expert.backend http, with the model behind `vllm serve`)")
    if (cfg.replicas, cfg.expanders, cfg.learner_workers) != (1, 1, 1):
        p.append(f"backend 'local' is one process: replicas, expanders and learner_workers must be 1, got "
                 f"{cfg.replicas}, {cfg.expanders}, {cfg.learner_workers}")
    if cfg.mode == "async":
        p.append("mode 'async' overlaps expansion (the replicas) with training (the learner actors): use backend ray")
    if cfg.engine != "torch":
        p.append(f"backend 'local' serves the model on the torch engine: engine must be 'torch', got {cfg.engine!r}")
    return p


def check_config(cfg: IDAConfig, *, address: str | None = None) -> IDAConfig:
    """The configuration, validated, with M's base model built where the config asks for the
    tiny Qwen2 (ida_ray.models.build_base_model); ConfigError listing every problem otherwise."""
    cfg.validate()  # the config may have been changed since it was made
    from ida_ray.models import build_base_model

    cfg = build_base_model(cfg)
    problems = backend_problems(cfg)
    model_problem = _model_problem(cfg)
    problems += [model_problem] if model_problem else []
    from ida_ray.tasks import get_task

    try:
        task = get_task(cfg.task, **cfg.task_kwargs)
    except ConfigError as exc:
        problems.append(str(exc))
    except (TypeError, ValueError) as exc:
        problems.append(f"task_kwargs {cfg.task_kwargs} do not fit task {cfg.task!r}: {exc}")
    else:
        try:
            for size in cfg.sizes(task):
                task.generate(size, random.Random(0))
        except Exception as exc:  # noqa: BLE001 - a size the task cannot generate
            problems.append(f"train_sizes {cfg.train_sizes}: task {cfg.task!r} cannot generate them: {exc}")
        else:
            p = _format_problem(cfg, task)
            problems += [p] if p else []
            if not problems:
                p = _context_problem(cfg, task)
                problems += [p] if p else []
            if cfg.objective == "honest" and not problems:
                p = _honest_problem(cfg, task)
                problems += [p] if p else []
    if cfg.use_gpu and not address:
        import torch

        if not torch.cuda.is_available():
            problems.append("use_gpu (--gpu) asks for GPUs, but this machine has none and no --address names a "
                            "cluster that might")
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        problems.append(f"run_dir {run_dir} exists and is not a directory")
    if cfg.storage is not None and not problems:
        from ida_ray.storage import RunStorage, StorageError, bounded

        try:
            storage = RunStorage(cfg.storage, cfg.storage_timeout_s)
            bounded(storage.check, cfg.storage_timeout_s, f"checking storage {cfg.storage}")
        except StorageError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return cfg


def check_questions_file(cfg: IDAConfig, path: str | Path | None) -> list[UserQuestion]:
    """The entries of a questions file (none without one); ConfigError if the file is unusable."""
    if path is None:
        return []
    from ida_ray.tasks import get_task

    task = get_task(cfg.task, **cfg.task_kwargs)
    fmt, length = prompt_measure(cfg)
    return read_questions(path, task, cfg.model.context_length(), cfg.amplify.max_new_tokens, fmt, length)
