"""Checks a run's input before any cluster resource is taken.

`IDAConfig.validate` checks ranges, assuming each value has the right type; a YAML file can
hold anything (`iterations: three`, `amplify: fast`), and some values are wrong only in
combination (a question size whose prompts overflow the model's context) or only once an actor
starts (a replay capacity of 0, task options the task rejects). `check_config` finds all of
these first, so a bad run costs no cluster time and fails with one ConfigError that names
every problem (the CLI prints it and exits with status 2).
"""
from __future__ import annotations

import dataclasses
import random
import types
import typing
from pathlib import Path

from ida_ray.config import AmplifyConfig, IDAConfig, TrainConfig
from ida_ray.errors import ConfigError
from ida_ray.models import ModelSpec
from ida_ray.questions import UserQuestion, context_needed, read_questions

_SECTIONS = {"": IDAConfig, "amplify.": AmplifyConfig, "train.": TrainConfig, "model.": ModelSpec}


def _type_problem(name: str, value, hint) -> str | None:
    """Why `value` does not fit the annotation `hint` (None if it does)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        found = [_type_problem(name, value, h) for h in options]
        if None in found:
            return None
        if value is not None and type(None) in options:  # say what the non-null option wants
            return found[[h is type(None) for h in options].index(False)] + " (or null)"
        return f"{name} has the wrong type: got {value!r}"
    if hint is type(None):
        return None if value is None else f"{name} must be null, got {value!r}"
    if hint is bool:
        return None if isinstance(value, bool) else f"{name} must be true or false, got {value!r}"
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"{name} must be a whole number, got {value!r}"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"{name} must be a number, got {value!r}"
    if hint is str:
        return None if isinstance(value, str) else f"{name} must be a string, got {value!r}"
    if hint is dict or origin is dict:
        return None if isinstance(value, dict) else f"{name} must be a mapping, got {value!r}"
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return f"{name} must be a list, got {value!r}"
        (item,) = typing.get_args(hint)[:1]
        bad = [v for v in value if _type_problem(name, v, item)]
        return f"{name} must hold whole numbers, got {bad[0]!r}" if bad else None
    if dataclasses.is_dataclass(hint):
        return None if isinstance(value, hint) else f"{name} must be a mapping of its options, got {value!r}"
    return None


def type_problems(cfg: IDAConfig) -> list[str]:
    problems = []
    for prefix, cls in _SECTIONS.items():
        obj = cfg if not prefix else getattr(cfg, prefix[:-1])
        if not isinstance(obj, cls):
            continue  # reported by the top-level section
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            p = _type_problem(prefix + f.name, getattr(obj, f.name), hints[f.name])
            if p:
                problems.append(p)
    return problems


def _range_problems(cfg: IDAConfig) -> list[str]:
    """What IDAConfig.validate does not check, and actors would reject only once started."""
    problems = []
    t, m = cfg.train, cfg.model
    if t.replay_capacity < 1:
        problems.append(f"train.replay_capacity must be >= 1, got {t.replay_capacity}")
    if t.adversary_steps_per_iteration < 0:
        problems.append(f"train.adversary_steps_per_iteration must be >= 0, got {t.adversary_steps_per_iteration}")
    if t.adversary_lr <= 0 or t.grad_clip <= 0 or t.weight_decay < 0:
        problems.append("train.adversary_lr and train.grad_clip must be > 0, train.weight_decay >= 0")
    sizes = {"hidden_size": m.hidden_size, "num_layers": m.num_layers, "num_heads": m.num_heads,
             "intermediate_size": m.intermediate_size, "max_positions": m.max_positions}
    small = [k for k, v in sizes.items() if v < 1]
    if small:
        problems.append(f"model sizes must be >= 1: {', '.join(f'model.{k}={sizes[k]}' for k in small)}")
    elif m.hidden_size % m.num_heads:
        problems.append(f"model.hidden_size ({m.hidden_size}) must be a multiple of model.num_heads ({m.num_heads})")
    if cfg.trees_in_flight < cfg.expanders:
        problems.append(f"trees_in_flight ({cfg.trees_in_flight}) must be at least expanders ({cfg.expanders})")
    return problems


def _context_problem(cfg: IDAConfig, task) -> str | None:
    """The largest training questions' trees must fit the model's context."""
    rng = random.Random(cfg.seed)
    size = max(cfg.sizes(task))
    need = max(context_needed(task, task.generate(size, rng), cfg.amplify.max_new_tokens) for _ in range(8))
    if need > cfg.model.max_positions:
        return (f"questions of size {size} need {need} positions (prompt + amplify.max_new_tokens), more than "
                f"model.max_positions={cfg.model.max_positions}: raise it, or lower the sizes or max_new_tokens")
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


def check_config(cfg: IDAConfig, *, address: str | None = None) -> IDAConfig:
    """The configuration, validated; ConfigError listing every problem otherwise."""
    problems = type_problems(cfg)
    if problems:  # ranges cannot be compared on values of the wrong type
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    cfg.validate()
    problems = _range_problems(cfg)
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
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return cfg


def check_questions_file(cfg: IDAConfig, path: str | Path | None) -> list[UserQuestion]:
    """The entries of a questions file (none without one); ConfigError if the file is unusable."""
    if path is None:
        return []
    from ida_ray.tasks import get_task

    task = get_task(cfg.task, **cfg.task_kwargs)
    return read_questions(path, task, cfg.model.max_positions, cfg.amplify.max_new_tokens)
