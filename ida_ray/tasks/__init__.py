"""Built-in tasks. `get_task(name, **kwargs)` builds one by name."""
from ida_ray.tasks.assignments import Assignments
from ida_ray.tasks.base import QUESTION_CHARS, Task, expert_tree_answer
from ida_ray.tasks.perm_power import PermPower
from ida_ray.tasks.shortest_path import ShortestPath
from ida_ray.tasks.sum_list import SumList

TASKS: dict[str, type[Task]] = {
    "sum": SumList,
    "perm": PermPower,
    "assign": Assignments,
    "path": ShortestPath,
}


def get_task(name: str, **kwargs) -> Task:
    try:
        return TASKS[name](**kwargs)
    except KeyError:
        from ida_ray.errors import ConfigError

        raise ConfigError(f"unknown task {name!r}; built-in tasks: {sorted(TASKS)}") from None


__all__ = ["QUESTION_CHARS", "TASKS", "Task", "expert_tree_answer", "get_task"]
