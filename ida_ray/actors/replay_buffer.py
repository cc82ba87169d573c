"""The replay buffer as a named Ray actor ("replay-buffer").

Wraps `ida_ray.replay.ReplayBuffer` (capacity, FIFO eviction, uniform sampling, JSONL spill of
every added example) and adds what the distributed loop needs:
  * examples cross actor boundaries as plain dicts (`Example.to_dict()`), never pickled objects;
  * seeded sampling, so each learner rank draws its own reproducible minibatches;
  * tree records written as JSONL under run_dir/trees/iteration_NNNN.jsonl for the viewer;
  * resume: examples and trees newer than the last checkpoint are dropped (they were produced
    by an iteration whose training never completed), and the spill file is compacted to the
    newest `capacity` examples so it does not grow without bound across restarts.
"""
from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from pathlib import Path

import ray

from ida_ray.examples import Example
from ida_ray.replay import ReplayBuffer

REPLAY_BUFFER_NAME = "replay-buffer"
_TREE_FILE = re.compile(r"^iteration_(\d+)\.jsonl$")


def spill_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "replay" / "examples.jsonl"


def trees_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "trees"


def compact_spill(path: Path, capacity: int, max_weight_version: int | None) -> int:
    """Rewrite the spill file keeping the newest `capacity` examples whose weight version is at
    most `max_weight_version` (None: keep all versions). Returns how many lines were dropped.
    A torn last line (a crash mid-write) is dropped too rather than failing the restart."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            Example(**d)
        except (json.JSONDecodeError, TypeError):
            dropped += 1
            continue
        if max_weight_version is not None and d.get("weight_version", 0) > max_weight_version:
            dropped += 1
            continue
        kept.append(line)
    dropped += max(0, len(kept) - capacity)
    kept = kept[-capacity:] if capacity else []
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(k + "\n" for k in kept))
    os.replace(tmp, path)
    return dropped


class ReplayStore:
    """The actor's logic as a plain class, so it is testable without Ray."""

    def __init__(self, capacity: int, run_dir: str | Path, seed: int = 0, completed_iterations: int | None = None):
        """`completed_iterations`: None starts empty (a previous spill is discarded). An int N
        resumes after a checkpoint that includes iterations 0..N-1: the spilled examples they
        produced (weight_version < N; iteration i expands with weights version i) and their tree
        files are kept, anything newer is dropped."""
        if capacity < 1:
            raise ValueError(f"replay capacity must be >= 1, got {capacity}")
        self.run_dir = Path(run_dir)
        path = spill_path(run_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        trees_dir(run_dir).mkdir(parents=True, exist_ok=True)
        if completed_iterations is None:
            path.unlink(missing_ok=True)
            self._drop_tree_files(lambda it: True)
            self.dropped_on_resume = 0
        else:
            self.dropped_on_resume = compact_spill(path, capacity, completed_iterations - 1)
            self._drop_tree_files(lambda it: it >= completed_iterations)
        self.buffer = ReplayBuffer(capacity, spill_path=path, seed=seed)
        self.trees_written = 0

    def _drop_tree_files(self, drop) -> None:
        for f in trees_dir(self.run_dir).iterdir():
            m = _TREE_FILE.match(f.name)
            if m and drop(int(m.group(1))):
                f.unlink()

    def add(self, examples: list[dict]) -> int:
        self.buffer.add([Example(**e) for e in examples])
        return len(self.buffer)

    def add_trees(self, iteration: int, trees: list[dict]) -> int:
        path = trees_dir(self.run_dir) / f"iteration_{iteration:04d}.jsonl"
        with path.open("a") as f:
            for t in trees:
                f.write(json.dumps(t, separators=(",", ":")) + "\n")
        self.trees_written += len(trees)
        return self.trees_written

    def sample(self, n: int, kinds: list[str] | tuple[str, ...] | None = None, seed: int | None = None) -> list[dict]:
        """n examples drawn uniformly with replacement; [] when none of `kinds` is held."""
        kinds = tuple(kinds) if kinds is not None else None
        if seed is None:
            return [e.to_dict() for e in self.buffer.sample(n, kinds)]
        pool = self.buffer.all(kinds)
        if not pool:
            return []
        rng = random.Random(seed)
        return [pool[rng.randrange(len(pool))].to_dict() for _ in range(n)]

    def stats(self) -> dict:
        items = self.buffer.all()
        return {
            "size": len(self.buffer),
            "capacity": self.buffer.capacity,
            "total_added": self.buffer.total_added,
            "by_kind": dict(Counter(e.kind for e in items)),
            "by_weight_version": self.buffer.versions(),
            "trees_written": self.trees_written,
            "dropped_on_resume": self.dropped_on_resume,
        }


@ray.remote(num_cpus=0)
class ReplayBufferActor(ReplayStore):
    """ReplayStore as a Ray actor. Its methods run one at a time (a plain actor), so adds and
    samples never interleave."""


def start_replay_buffer(capacity: int, run_dir: str | Path, seed: int = 0, completed_iterations: int | None = None,
                        name: str = REPLAY_BUFFER_NAME):
    return ReplayBufferActor.options(name=name).remote(capacity, str(run_dir), seed, completed_iterations)
