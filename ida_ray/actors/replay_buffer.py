"""The replay buffer as a named Ray actor ("replay-buffer"): `ida_ray.replay.ReplayStore`
(capacity, FIFO eviction, seeded sampling, JSONL spill, tree records, resume) hosted where the
learner ranks and the coordinator can all reach it. Its methods run one at a time (a plain
actor), so adds and samples never interleave."""
from __future__ import annotations

from pathlib import Path

import ray

from ida_ray.actors import HEAD_NODE
from ida_ray.replay import ReplayStore

REPLAY_BUFFER_NAME = "replay-buffer"


@ray.remote(num_cpus=0)
class ReplayBufferActor(ReplayStore):
    """ReplayStore's methods, called remotely."""


def start_replay_buffer(capacity: int, run_dir: str | Path, seed: int = 0, completed_iterations: int | None = None,
                        name: str = REPLAY_BUFFER_NAME, records=None):
    # On the head node: the run directory it writes is the driver's (multi-node: the head's).
    return ReplayBufferActor.options(name=name, resources={HEAD_NODE: 0.001}).remote(
        capacity, str(run_dir), seed, completed_iterations, records)
