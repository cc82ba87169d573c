"""A bounded replay buffer of training examples, tagged with weight versions.

Keeps the newest `capacity` examples (FIFO eviction) and samples uniformly. Optionally
appends every added example to a JSONL spill file and reloads it on start, so completed work
survives a restart."""
from __future__ import annotations

import json
import random
from collections import deque
from pathlib import Path

from ida_ray.examples import Example


class ReplayBuffer:
    def __init__(self, capacity: int, spill_path: str | Path | None = None, seed: int = 0):
        self.capacity = capacity
        self._items: deque[Example] = deque(maxlen=capacity)
        self._rng = random.Random(seed)
        self.spill_path = Path(spill_path) if spill_path else None
        self.total_added = 0
        if self.spill_path and self.spill_path.exists():
            for line in self.spill_path.read_text().splitlines():
                if line.strip():
                    self._items.append(Example(**json.loads(line)))
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
