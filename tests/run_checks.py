"""Checks that tests of whole runs share: what a run directory must hold after each iteration."""
from __future__ import annotations

from pathlib import Path

from ida_ray.replay import read_tree_records

LOST_KINDS = ("engine_failure", "expander_lost")
"""Failure kinds of a tree that a lost replica or expander caused (what recovery must prevent)."""


def nothing_lost(run_dir: str | Path, metrics: dict, jobs: int) -> list[dict]:
    """The tree records of the iteration `metrics` describes (plain, or gzipped once the run
    moved past it), checked: one per job (`jobs` of them, as metrics counts), each tree once,
    none failed because a replica or an expander was lost."""
    trees = read_tree_records(run_dir, metrics["iteration"])
    assert len(trees) == metrics["trees"] == jobs, (metrics["iteration"], len(trees), metrics["trees"], jobs)
    assert len({t["tree_id"] for t in trees}) == len(trees)
    lost = [t for t in trees if t["error"] and t["error"]["kind"] in LOST_KINDS]
    assert not lost, lost[:3]
    return trees
