"""Batch sizes a replica observed: running totals and the most recent few, so a caller can
take the mean over any window from two readings of health()."""
from __future__ import annotations

from collections import deque


class StepLog:
    """Batch sizes of engine steps: running totals (so a caller can take the mean over any
    window from two readings) and the most recent few."""

    def __init__(self):
        self.steps = 0
        self.total = 0
        self.max = 0
        self.recent: deque[int] = deque(maxlen=16)

    def append(self, n: int) -> None:
        self.steps += 1
        self.total += n
        self.max = max(self.max, n)
        self.recent.append(n)

    def summary(self) -> dict:
        return {"steps": self.steps, "total": self.total, "max": self.max,
                "mean": round(self.total / self.steps, 2) if self.steps else 0.0, "recent": list(self.recent)}


def list_summary(sizes: list[int]) -> dict:
    """StepLog.summary() for a plain list of batch sizes (MicroBatcher's)."""
    log = StepLog()
    for n in sizes:
        log.append(n)
    return log.summary()
