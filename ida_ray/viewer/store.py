"""The trees of a run directory, indexed for browsing: <run_dir>/trees/*.jsonl (and
*.jsonl.gz, an iteration's records once the run gzipped them), one `Tree.to_dict()` per line.

The index keeps a short summary per tree and where its line starts, and loads a whole tree
only when it is opened, so a run with many thousands of trees stays cheap. `refresh()` reads
only what was appended since the last call (a live run keeps writing), skips a last line
that is still being written, and reindexes a file that shrank. A line that is not a tree is
skipped and reported in `problems`, never fatal.

Correctness is computed here with the task's ground-truth `solve()`, whatever a line says.
"""
from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

from ida_ray.errors import ConfigError
from ida_ray.replay import open_records
from ida_ray.tasks import get_task
from ida_ray.tree import Node, Tree

_TREE_FIELDS = {f.name for f in dataclasses.fields(Tree)}
MAX_PROBLEMS = 100


def tree_from_record(record: dict) -> Tree:
    """A Tree from one JSONL record; extra keys a writer added (e.g. "correct") are ignored."""
    return Tree.from_dict({k: v for k, v in record.items() if k in _TREE_FIELDS})


class Correctness:
    """Ground truth per (task, question), through each task's `solve()`; None where unknown."""

    def __init__(self):
        self._tasks: dict = {}

    def solve(self, task_name: str, question: str) -> str | None:
        if task_name not in self._tasks:
            try:
                self._tasks[task_name] = get_task(task_name)
            except ConfigError:
                self._tasks[task_name] = None
        task = self._tasks[task_name]
        if task is None or question is None:
            return None
        try:
            return task.solve(question)
        except ValueError:  # a malformed question has no right answer
            return None

    def is_correct(self, task_name: str, question: str, answer: str | None) -> bool | None:
        truth = self.solve(task_name, question)
        if truth is None:
            return None
        return self._tasks[task_name].is_correct(question, answer)


def summarise(tree: Tree, correctness: Correctness) -> dict:
    nodes = tree.nodes()
    return {
        "tree_id": tree.tree_id, "task": tree.task, "question": tree.question, "size": tree.size,
        "mode": tree.mode, "iteration": tree.iteration, "source": tree.source, "answer": tree.answer,
        "answered_by": tree.root.answered_by,
        "correct": correctness.is_correct(tree.task, tree.question, tree.answer),
        "expert_calls": tree.expert_calls, "model_calls": tree.model_calls,
        "weight_versions": tree.weight_versions, "nodes": len(nodes), "depth": max(n.depth for n in nodes),
        "error": tree.error["kind"] if tree.error else None,
    }


def annotated(tree: Tree, correctness: Correctness) -> dict:
    """The tree's dict with "correct" (and the ground truth) on the tree and on every node."""
    d = tree.to_dict()
    d["correct"] = correctness.is_correct(tree.task, tree.question, tree.answer)
    d["truth"] = correctness.solve(tree.task, tree.question)

    def mark(node_dict: dict, node: Node) -> None:
        node_dict["truth"] = correctness.solve(tree.task, node.question)
        node_dict["correct"] = None if node.answer is None else \
            correctness.is_correct(tree.task, node.question, node.answer)
        for rd, rnd in zip(node_dict["rounds"], node.rounds):
            for cd, child in zip(rd["children"], rnd.children):
                if child is not None:
                    mark(cd, child)

    mark(d["root"], tree.root)
    return d


@dataclasses.dataclass
class _FileState:
    offset: int = 0  # bytes indexed so far (always at a line boundary)
    size: int = 0


class TreeStore:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.trees_dir = self.run_dir / "trees"
        self.correctness = Correctness()
        self._lock = threading.Lock()
        self._files: dict[Path, _FileState] = {}
        self._summaries: dict[str, dict] = {}  # tree_id -> summary (insertion order = file order)
        self._where: dict[str, tuple[Path, int]] = {}  # tree_id -> (file, byte offset of its line)
        self.problems: list[str] = []

    # -- indexing --------------------------------------------------------------------
    def refresh(self) -> None:
        with self._lock:
            if not self.trees_dir.is_dir():
                return
            for gone in [p for p in self._files if not p.exists()]:  # e.g. gzipped into a .gz beside it
                self._forget(gone)
                del self._files[gone]
            for path in sorted([*self.trees_dir.glob("*.jsonl"), *self.trees_dir.glob("*.jsonl.gz")]):
                state = self._files.setdefault(path, _FileState())
                try:
                    size = path.stat().st_size
                except FileNotFoundError:  # gzipped between the listing and now
                    continue
                if size < state.size:  # rewritten or truncated: index it again
                    self._forget(path)
                    state = self._files[path] = _FileState()
                if size > state.offset:
                    self._index_from(path, state)
                state.size = size

    def _forget(self, path: Path) -> None:
        gone = [tid for tid, (p, _) in self._where.items() if p == path]
        for tid in gone:
            del self._where[tid]
            del self._summaries[tid]

    def _index_from(self, path: Path, state: _FileState) -> None:
        if path.suffix == ".gz":  # written whole (renamed into place): read it all, once
            self._forget(path)
            with open_records(path) as f:
                data = f.read()
            state.offset = 0
        else:
            with open(path, "rb") as f:
                f.seek(state.offset)
                data = f.read()
        end = data.rfind(b"\n") + 1  # a last line without newline is still being written
        pos = 0
        while pos < end:
            nl = data.index(b"\n", pos)
            line = data[pos:nl]
            if line.strip():
                self._index_line(path, state.offset + pos, line)
            pos = nl + 1
        state.offset += end

    def _index_line(self, path: Path, offset: int, line: bytes) -> None:
        try:
            tree = tree_from_record(json.loads(line))
        except Exception as exc:  # any malformed line: report and go on
            if len(self.problems) < MAX_PROBLEMS:
                self.problems.append(f"{path.name} at byte {offset}: not a tree ({type(exc).__name__}: "
                                     f"{str(exc)[:120]})")
            return
        self._summaries.pop(tree.tree_id, None)  # a tree written again: the later record wins
        self._summaries[tree.tree_id] = dict(summarise(tree, self.correctness), file=path.name)
        self._where[tree.tree_id] = (path, offset)

    # -- queries ---------------------------------------------------------------------
    def summaries(self) -> list[dict]:
        self.refresh()
        with self._lock:  # by iteration (stable: file order within one), however files were indexed
            return sorted(self._summaries.values(), key=lambda s: s["iteration"])

    def with_question(self, question: str) -> list[dict]:
        """The summaries of every tree of exactly this question, oldest iteration first."""
        return sorted((s for s in self.summaries() if s["question"] == question),
                      key=lambda s: (s["iteration"], s["mode"]))

    def load(self, tree_id: str) -> Tree | None:
        self.refresh()
        with self._lock:
            where = self._where.get(tree_id)
        if where is None:
            return None
        try:
            return _read_at(*where)
        except FileNotFoundError:  # gzipped since it was indexed: index again and retry once
            self.refresh()
            with self._lock:
                again = self._where.get(tree_id)
            return None if again is None or again[0] == where[0] else _read_at(*again)


def _read_at(path: Path, offset: int) -> Tree:
    with open_records(path) as f:
        f.seek(offset)
        return tree_from_record(json.loads(f.readline()))


FILTERS = ("task", "size", "iteration", "mode", "source", "correct", "error", "q")


def matches(summary: dict, filters: dict) -> bool:
    """filters: task, mode, source (exact); size, iteration (int); correct ("true" | "false" |
    "unknown"); error ("any" | "none" | an error kind); q (text the question contains, any
    case). A None value does not filter."""
    for key in ("task", "mode", "source", "size", "iteration"):
        if filters.get(key) is not None and summary[key] != filters[key]:
            return False
    text = filters.get("q")
    if text and text.casefold() not in (summary["question"] or "").casefold():
        return False
    correct = filters.get("correct")
    if correct is not None and correct != {True: "true", False: "false", None: "unknown"}[summary["correct"]]:
        return False
    error = filters.get("error")
    if error == "any":
        return summary["error"] is not None
    if error == "none":
        return summary["error"] is None
    return error is None or summary["error"] == error


def facets(summaries: list[dict]) -> dict:
    """The distinct values of each filterable field, for the page's drop-downs."""
    out = {}
    for key in ("task", "size", "iteration", "mode", "source", "error"):
        out[key] = sorted({s[key] for s in summaries if s[key] is not None})
    return out
