"""`LearnerControl`: the named actor between the learner's driver side and its ranks.

The Ray Train run's workers (ida_ray/cluster/learner_worker.py) wait here for each round's
`TrainCommand` and publish their `RankResult`s; the driver side (ida_ray/cluster/learner_group.py)
submits commands and collects results. Commands are kept by iteration, so a rank restarted by
Ray Train picks up the command that was pending when its predecessor died.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import ray

from ida_ray.messages import RankResult, TrainCommand

LEARNER_CONTROL_NAME = "learner-control"


@dataclass
class RoundResults:
    """What `LearnerControl.results` found: every rank's result, the run's failure, or neither yet."""

    ranks: dict[int, RankResult] = field(default_factory=dict)
    failure: str | None = None

    @property
    def pending(self) -> bool:
        return not self.ranks and self.failure is None


@ray.remote(num_cpus=0)
class LearnerControl:
    """Hands each training command to every rank and gathers their results.

    Commands are kept by iteration, so a rank restarted by Ray Train can pick up the command
    that was pending when its predecessor died."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self._commands: dict[int, TrainCommand] = {}
        self._stop = False
        self._results: dict[int, dict[int, RankResult]] = {}
        self._failure: str | None = None
        self._ready: dict[int, float] = {}
        self._changed = asyncio.Condition()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def submit(self, command: TrainCommand) -> None:
        self._commands[command.iteration] = command
        self._results.pop(command.iteration, None)
        await self._notify()

    async def stop(self) -> None:
        self._stop = True
        await self._notify()

    async def fail(self, message: str) -> None:
        self._failure = message
        await self._notify()

    async def next_command(self, after: int) -> TrainCommand | None:
        """The first command for an iteration > `after`; None once stopped."""
        async with self._changed:
            while True:
                pending = sorted(i for i in self._commands if i > after)
                if pending:
                    return self._commands[pending[0]]
                if self._stop:
                    return None
                await self._changed.wait()

    async def publish(self, result: RankResult) -> None:
        self._results.setdefault(result.stats.iteration, {})[result.rank] = result
        await self._notify()

    async def results(self, iteration: int, timeout_s: float) -> RoundResults:
        """Every rank's result once all have published, the run's failure if it failed, or
        neither (pending) after timeout_s."""
        async def ready():
            async with self._changed:
                while True:
                    if self._failure is not None:
                        return RoundResults(failure=self._failure)
                    got = self._results.get(iteration, {})
                    if len(got) >= self.world_size:
                        return RoundResults(ranks=dict(got))
                    await self._changed.wait()
        try:
            return await asyncio.wait_for(ready(), timeout_s)
        except TimeoutError:
            return RoundResults()

    async def ready(self, rank: int, last: int) -> None:
        """A rank has built its model and waits for commands after iteration `last`. A rank
        that Ray Train restarted drops what its predecessor published for later iterations,
        so a round's results all come from one attempt."""
        self._ready.setdefault(rank, time.time())
        for it, got in self._results.items():
            if it > last:
                got.pop(rank, None)
        await self._notify()

    async def ready_times(self) -> dict[int, float]:
        return dict(self._ready)
