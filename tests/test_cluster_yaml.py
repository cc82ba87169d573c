"""cluster.yaml is a valid Ray cluster-launcher config (the schema shipped inside the ray
package, and the launcher's own checks after its AWS defaults are merged in), and its
resources fit what ida-ray asks for."""
from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
# GPUs per instance type (AWS). A change of InstanceType must keep the declared GPU count true.
GPUS_PER_INSTANCE = {"g5.xlarge": 1, "g5.2xlarge": 1, "g5.12xlarge": 4, "g6.xlarge": 1, "p4d.24xlarge": 8,
                     "m5.large": 0, "m5.xlarge": 0, "m5.2xlarge": 0, "m5.4xlarge": 0}
VCPUS_PER_INSTANCE = {"g5.xlarge": 4, "g5.2xlarge": 8, "g5.12xlarge": 48, "g6.xlarge": 4, "p4d.24xlarge": 96,
                      "m5.large": 2, "m5.xlarge": 4, "m5.2xlarge": 8, "m5.4xlarge": 16}


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_valid_against_rays_cluster_schema(config):
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validate(config, schema)


def test_valid_for_the_launcher_after_defaults(config):
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    validate_config(config)
    filled = fillout_defaults(config)  # merges ray/autoscaler/aws/defaults.yaml, offline
    validate_config(filled)
    assert filled["provider"]["type"] == "aws"


def test_schema_rejects_a_broken_config(config):
    broken = dict(config, available_node_types={"head": {"resources": {}}})  # node_config missing
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, json.loads(SCHEMA.read_text()))


def test_resources_make_sense(config):
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    for name, t in types.items():
        it = t["node_config"]["InstanceType"]
        assert t["resources"].get("GPU", 0) == GPUS_PER_INSTANCE[it], f"{name}: GPU count does not match {it}"
        assert 0 < t["resources"]["CPU"] <= VCPUS_PER_INSTANCE[it], f"{name}: CPU count does not match {it}"
    # The head is CPU-only: replicas and learner workers (num_gpus=1) must land on GPU workers.
    assert head["resources"].get("GPU", 0) == 0
    gpu_capacity = sum(t["max_workers"] * t["resources"].get("GPU", 0) for t in workers.values())
    # The documented GPU run: 2 replicas + 2 learner workers, one GPU each.
    assert gpu_capacity >= 2 + 2
    assert sum(t.get("min_workers", 0) for t in workers.values()) <= config["max_workers"]
    assert all(t["max_workers"] <= config["max_workers"] for t in workers.values())
    # A GPU worker has CPUs for its replica or learner worker (1 each) and Ray's own processes.
    assert all(t["resources"]["CPU"] >= 2 for t in workers.values() if t["resources"].get("GPU"))


def test_setup_installs_the_gpu_extra_and_ray_runs_from_the_venv(config):
    setup = " ".join(config["setup_commands"])
    assert "install.sh gpu" in setup
    assert "~/ida-ray" in config["file_mounts"]
    for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray " in cmd:
            assert "~/ida-ray/.venv/bin/ray" in cmd
    # The install script really takes the gpu extra.
    assert re.search(r'extra="\$\{1:-cpu\}"', (ROOT / "install.sh").read_text())
    assert "gpu" in (ROOT / "pyproject.toml").read_text()


def test_dashboard_binds_to_localhost(config):
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    assert "0.0.0.0" not in yaml.safe_dump(config)
