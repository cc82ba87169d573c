"""The soak's short version (`python -m experiments.soak --quick`): a tiny default-task run as
its own driver process, killed from outside by process id - a replica, an expander, a learner
worker and once the driver itself (then resumed) - and the same run undisturbed. Nothing is
lost: every question drawn has exactly one tree record and every checkpoint the run names is
intact. The full soak (30 minutes, many kills) is the same script without --quick."""
from __future__ import annotations

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_a_quick_soak_recovers_from_every_kind_of_kill_and_loses_nothing(tmp_path):
    from experiments import soak

    result = soak.main(["--quick", "--root", str(tmp_path / "soak"), "--out", str(tmp_path / "soak.json"),
                        "--timeout", "1200"])
    assert result["faults"] == {"replica": 1, "expander": 1, "learner": 1, "driver": 1}, result["fault_log"]
    assert result["recoveries"] == result["faults"], result["fault_log"]
    assert result["driver_starts"] == 2
    assert result["questions"] == result["tree_records"] == 8 * (24 + 16)
    assert result["trees_lost"] == result["trees_duplicated"] == result["checkpoints_lost"] == 0
    assert set(result["accuracy_disturbed"]) == set(result["accuracy_undisturbed"]) == {"1", "2", "3", "4"}
