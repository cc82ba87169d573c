"""A bounded replay buffer of training examples, tagged with weight versions.

Keeps the newest `capacity` examples (FIFO eviction) and samples uniformly. Optionally
appends every added example to a JSONL spill file and reloads it on start, so completed work
survives a restart."""
from __future__ import annotations

import gzip
import json
import os
import random
import re
import shutil
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

from ida_ray.errors import StagingError
from ida_ray.examples import Example
from ida_ray.messages import ExpandResult
from ida_ray.tree import Tree

_TREE_FILE = re.compile(r"^iteration_(\d+)\.jsonl(\.gz)?$")
SPILL_SLACK = 3  # the spill is compacted to 2 x capacity once it passes 3 x capacity lines


@dataclass(kw_only=True)
class RecordsConfig:
    """What the run keeps on disk of its trees, and how much room it needs (a long run must
    not fill the disk: the default run writes about 5 MB of tree records an iteration)."""

    compress_trees: bool = True
    """Gzip each iteration's tree records once the next iteration's are written (about 10x
    smaller); the newest iteration stays plain JSONL for `tail` and the live viewer."""
    keep_tree_iterations: int | None = None
    """Keep the tree records of only the newest N iterations (None: every iteration's)."""
    min_free_mb: int = 200
    """Before each iteration, the run stops (resumable, with a clear error) if the run
    directory's filesystem has less free space than this."""

    def problems(self) -> list[str]:
        p = []
        if self.keep_tree_iterations is not None and self.keep_tree_iterations < 1:
            p.append(f"records.keep_tree_iterations must be >= 1 or null, got {self.keep_tree_iterations}")
        if self.min_free_mb < 0:
            p.append(f"records.min_free_mb must be >= 0, got {self.min_free_mb}")
        return p


class ReplayBuffer:
    def __init__(self, capacity: int, spill_path: str | Path | None = None, seed: int = 0):
        self.capacity = capacity
        self._items: deque[Example] = deque(maxlen=capacity)
        self._rng = random.Random(seed)
        self.spill_path = Path(spill_path) if spill_path else None
        self.total_added = 0
        self._spilled = 0  # lines in the spill file
        if self.spill_path and self.spill_path.exists():
            for line in self.spill_path.read_text().splitlines():
                if line.strip():
                    self._items.append(Example(**json.loads(line)))
                    self._spilled += 1
            self.total_added = len(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def add(self, examples: list[Example]) -> None:
        self._items.extend(examples)
        self.total_added += len(examples)
        if self.spill_path:
            self.spill_path.parent.mkdir(parents=True, exist_ok=True)
            with self.spill_path.open("a") as f:
                for ex in examples:
                    f.write(json.dumps(ex.to_dict()) + "\n")
            self._spilled += len(examples)
            # Bounded on disk too: the newest 2 x capacity lines cover what is held, and what a
            # resume after a crash mid-iteration (its newest examples dropped) falls back on.
            if self._spilled > SPILL_SLACK * self.capacity:
                compact_spill(self.spill_path, 2 * self.capacity, None)
                self._spilled = 2 * self.capacity

    def drop_older_than(self, version: int) -> int:
        """Drop the examples made by weights older than `version`; returns how many. (The spill
        keeps them: a resume reloads them, and the next round drops them again.)"""
        keep = [e for e in self._items if e.weight_version >= version]
        dropped = len(self._items) - len(keep)
        if dropped:
            self._items = deque(keep, maxlen=self.capacity)
        return dropped

    def sample(self, n: int, kinds: tuple[str, ...] | None = None) -> list[Example]:
        pool = [e for e in self._items if kinds is None or e.kind in kinds]
        if not pool:
            return []
        return [pool[self._rng.randrange(len(pool))] for _ in range(n)]

    def all(self, kinds: tuple[str, ...] | None = None) -> list[Example]:
        return [e for e in self._items if kinds is None or e.kind in kinds]

    def versions(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for e in self._items:
            counts[e.weight_version] = counts.get(e.weight_version, 0) + 1
        return counts




def spill_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "replay" / "examples.jsonl"


def trees_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "trees"


def tree_file(run_dir: str | Path, iteration: int) -> Path | None:
    """Where iteration's tree records are: plain JSONL, or gzipped once the run moved on."""
    plain = trees_dir(run_dir) / f"iteration_{iteration:04d}.jsonl"
    packed = plain.with_name(plain.name + ".gz")
    return plain if plain.exists() else packed if packed.exists() else None


def open_records(path: Path, mode: str = "rb"):
    """A tree-record file for reading, plain or gzipped."""
    return (gzip.open if path.suffix == ".gz" else open)(path, mode)


def read_tree_records(run_dir: str | Path, iteration: int) -> list[dict]:
    """The tree records of one iteration, as dicts (a torn last line is left out)."""
    path = tree_file(run_dir, iteration)
    if path is None:
        return []
    out = []
    with open_records(path, "rt") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def gzip_file(path: Path) -> Path:
    """path -> path.gz, written beside it under a temporary name and renamed: a crash leaves
    one whole copy."""
    target, tmp = path.with_name(path.name + ".gz"), path.with_name(path.name + ".gz.partial")
    with open(path, "rb") as src, gzip.open(tmp, "wb", compresslevel=6) as dst:
        shutil.copyfileobj(src, dst)
    os.replace(tmp, target)
    path.unlink()
    return target


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
    """The run's replay buffer and tree records (the Ray backend hosts it in an actor,
    ida_ray/actors/replay_buffer.py; the local backend holds it in-process):
      * seeded sampling, so each learner rank draws its own reproducible minibatches;
      * tree records as JSONL under run_dir/trees/iteration_NNNN.jsonl for the viewer;
      * resume: examples and trees newer than the last checkpoint are dropped (an iteration
        whose training never completed produced them), and the spill file is compacted to the
        newest `capacity` examples so it does not grow without bound across restarts."""

    def __init__(self, capacity: int, run_dir: str | Path, seed: int = 0, completed_iterations: int | None = None,
                 records: RecordsConfig | None = None):
        """`completed_iterations`: None starts empty (a previous spill is discarded). An int N
        resumes after a checkpoint that includes iterations 0..N-1: the spilled examples they
        produced (weight_version < N; iteration i expands with weights version i) and their tree
        files are kept, anything newer is dropped."""
        if capacity < 1:
            raise ValueError(f"replay capacity must be >= 1, got {capacity}")
        self.run_dir = Path(run_dir)
        self.records = records or RecordsConfig()
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
        self.dropped_stale = 0
        # Expanded results by iteration, job id and tree id, held until the loop commits the
        # iteration (stage, commit).
        self.staged: dict[int, dict[str, dict[str, ExpandResult]]] = {}
        self.committed: set[int] = set()
        self.restaged = 0
        self.late = 0

    def _drop_tree_files(self, drop) -> None:
        for f in trees_dir(self.run_dir).iterdir():
            m = _TREE_FILE.match(f.name)
            if m and drop(int(m.group(1))):
                f.unlink()

    def add(self, examples: list[Example]) -> int:
        self.buffer.add(examples)
        return len(self.buffer)

    def stage(self, results: list[ExpandResult]) -> int:
        """Hold expanded results (trees with their examples) until their iteration is committed:
        expanders send them here themselves, and the loop sees only their summaries. A job
        may be staged more than once (a chunk re-sent after its expander staged it and died, or
        that expander staging late): every copy is held, by tree id, and the commit takes the
        one whose summary the loop holds. Results of an iteration already committed are late
        and dropped. Returns how many results were held."""
        held = 0
        for r in results:
            if r.tree.iteration in self.committed:
                self.late += 1
                continue
            copies = self.staged.setdefault(r.tree.iteration, {}).setdefault(r.job_id, {})
            self.restaged += bool(copies)
            copies[r.tree.tree_id] = r
            held += 1
        return held

    def commit(self, iteration: int, trees: list[tuple[str, str]]) -> int:
        """The iteration's staged results, the copies named by (job id, tree id) in this order
        (so seeded sampling is reproducible), into the buffer and the tree records; returns the
        buffer's size. Every named copy must be staged, and every staged job named once; else
        StagingError, and nothing is committed."""
        held = self.staged.get(iteration, {})
        job_ids = [job for job, _ in trees]
        missing = [job for job, tree_id in trees if tree_id not in held.get(job, {})]
        unlisted = sorted(set(held) - set(job_ids))
        if missing or unlisted or len(set(job_ids)) != len(job_ids):
            raise StagingError(f"iteration {iteration}: {len(missing)} listed jobs not staged ({missing[:5]}), "
                               f"{len(unlisted)} staged jobs not listed ({unlisted[:5]}), "
                               f"{len(job_ids) - len(set(job_ids))} listed twice")
        results = [held[job][tree_id] for job, tree_id in trees]
        del self.staged[iteration]
        self.committed.add(iteration)
        self.add([e for r in results for e in r.examples])
        self.add_trees(iteration, [r.tree for r in results])
        return len(self.buffer)

    def add_trees(self, iteration: int, trees: list[Tree]) -> int:
        path = trees_dir(self.run_dir) / f"iteration_{iteration:04d}.jsonl"
        with path.open("a") as f:
            for t in trees:
                f.write(json.dumps(t.to_dict(), separators=(",", ":")) + "\n")
        self.trees_written += len(trees)
        self._retain(iteration)
        return self.trees_written

    def _retain(self, newest: int) -> None:
        """Older iterations' tree records: gzipped, and past keep_tree_iterations deleted."""
        keep = self.records.keep_tree_iterations
        for f in sorted(trees_dir(self.run_dir).iterdir()):
            m = _TREE_FILE.match(f.name)
            if not m or int(m.group(1)) >= newest:
                continue
            if keep is not None and int(m.group(1)) <= newest - keep:
                f.unlink()
            elif self.records.compress_trees and not m.group(2):
                gzip_file(f)

    def drop_stale(self, min_version: int) -> int:
        """Before a training round bound by max_staleness: drop examples older than min_version."""
        dropped = self.buffer.drop_older_than(min_version)
        self.dropped_stale += dropped
        return dropped

    def sample(self, n: int, kinds: list[str] | tuple[str, ...] | None = None, seed: int | None = None,
               balance_sizes: bool = False) -> list[Example]:
        """n examples drawn uniformly with replacement; [] when none of `kinds` is held. With
        `balance_sizes` each draw first picks one of the question sizes held (Example.size; the
        unsized are one more group) uniformly, then an example of that size."""
        kinds = tuple(kinds) if kinds is not None else None
        if seed is None and not balance_sizes:
            return self.buffer.sample(n, kinds)
        pool = self.buffer.all(kinds)
        if not pool:
            return []
        rng = random.Random(seed)
        if not balance_sizes:
            return [pool[rng.randrange(len(pool))] for _ in range(n)]
        by_size: dict[int | None, list[Example]] = {}
        for e in pool:
            by_size.setdefault(e.size, []).append(e)
        groups = [by_size[k] for k in sorted(by_size, key=lambda k: (k is None, k or 0))]
        out = []
        for _ in range(n):
            group = groups[rng.randrange(len(groups))]
            out.append(group[rng.randrange(len(group))])
        return out

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
            "dropped_stale": self.dropped_stale,
            "staged": {it: len(held) for it, held in self.staged.items()},
            "restaged": self.restaged,
            "late": self.late,
        }
