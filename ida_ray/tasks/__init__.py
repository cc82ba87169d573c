"""Tasks: the built-in ones by name, any other by import path.

    get_task("sum", base_size=2)                     # a built-in task
    get_task("my_pkg.tasks:Kinship", hops=3)         # a user's Task subclass, not in this package

Wherever a task name is taken (the config's `task`, `--task`, inside the actors) an import path
`module:Class` works too: the module is imported from the installed packages, or from the
current directory (as uvicorn does for its apps). On a cluster, the module must be importable on
every node: install it there, or ship it with the job (Ray's runtime_env `working_dir`). A task
loaded by import path is named by that path in tree records, so the viewer can load it again.
The Task API is documented in docs/TASKS.md.
"""
import importlib
import os
import sys

from ida_ray.errors import ConfigError
from ida_ray.tasks.assignments import Assignments
from ida_ray.tasks.base import QUESTION_CHARS, Task, expert_tree_answer
from ida_ray.tasks.coins import CoinStories
from ida_ray.tasks.perm_power import PermPower
from ida_ray.tasks.shortest_path import ShortestPath
from ida_ray.tasks.sum_list import SumList

TASKS: dict[str, type[Task]] = {
    "sum": SumList,
    "perm": PermPower,
    "assign": Assignments,
    "path": ShortestPath,
    "coins": CoinStories,  # in English: the chat prompt format
}


def _import(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        cwd = os.getcwd()
        if exc.name is None or not module.startswith(exc.name) or cwd in sys.path:
            raise
    sys.path.insert(0, cwd)  # a module beside the user, as `python -m` would find it
    return importlib.import_module(module)


def task_class(spec: str) -> type[Task]:
    """The Task class a built-in name or an import path `module:Class` names; ConfigError otherwise."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"task must be a built-in task name or an import path module:Class, got {spec!r}")
    if spec in TASKS:
        return TASKS[spec]
    if ":" not in spec:
        raise ConfigError(f"task {spec!r} is not one of the built-in tasks {sorted(TASKS)}, nor an import path "
                          "module:Class")
    module_name, _, attr = spec.partition(":")
    try:
        module = _import(module_name)
    except ImportError as exc:
        raise ConfigError(f"task {spec!r}: cannot import {module_name!r} ({exc})") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise ConfigError(f"task {spec!r}: module {module_name!r} has no {attr!r}")
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ConfigError(f"task {spec!r}: {attr} is not a subclass of ida_ray.tasks.Task")
    return cls


def get_task(spec: str, **kwargs) -> Task:
    """The task a built-in name or an import path names, built with its options."""
    task = task_class(spec)(**kwargs)
    if spec not in TASKS:
        task.name = spec  # tree records name the task by what loads it
    return task


__all__ = ["QUESTION_CHARS", "TASKS", "Task", "expert_tree_answer", "get_task", "task_class"]
