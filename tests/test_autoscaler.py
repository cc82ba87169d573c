"""IDA on a cluster whose worker nodes the Ray autoscaler starts from zero, simulated on this
machine: Ray's fake multi-node provider (`AutoscalingCluster`), whose worker node types
declare their own resources as cluster.yaml's do. The head carries the coordinator, replay
buffer and expander; the run's replicas ask for `replica_node` and its learner for
`learner_node`, which no node has at the start: the autoscaler must launch those node types
for the run to go. Checked: the run finishes, its replicas and learner ran on nodes the
autoscaler launched (not the head), and every job has one tree record.

`AutoscalingCluster` as installed from the registry reads a base config, fake_multi_node/
example.yaml, that the wheel does not ship (FACTS.md); `FakeAutoscalingCluster` gives it
that base here. `start()` runs `ray stop --force` first, as Ray's own tests do: nothing else
of Ray may run on the machine meanwhile (the test modules run one at a time).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import ray
from run_checks import nothing_lost

from ida_ray.config import AmplifyConfig, ClusterResources, IDAConfig, TrainConfig
from ida_ray.entrypoints.train import train
from ida_ray.models import ModelSpec

pytestmark = [pytest.mark.ray, pytest.mark.slow]
AMPLIFY, DISTILL = 24, 16

# The fake provider's cluster config, but for the node types (the AutoscalingCluster sets them).
BASE_CONFIG = {
    "cluster_name": "ida-fake-multinode", "max_workers": 4, "head_node_type": "ray.head.default",
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 5, "docker": {},
    "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
    "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
    "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
}
WORKER_TYPES = {
    "replica_worker": {"resources": {"CPU": 1, "replica_node": 1, "object_store_memory": 200 * 2**20},
                       "node_config": {}, "min_workers": 0, "max_workers": 1},
    "learner_worker": {"resources": {"CPU": 1, "learner_node": 1, "object_store_memory": 200 * 2**20},
                       "node_config": {}, "min_workers": 0, "max_workers": 1},
}


@pytest.fixture(scope="module")
def autoscaling_cluster():
    import copy

    from ray.cluster_utils import AutoscalingCluster

    class FakeAutoscalingCluster(AutoscalingCluster):
        def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
            config = copy.deepcopy(BASE_CONFIG)
            config["available_node_types"] = {
                **worker_node_types, "ray.head.default": {"resources": head_resources, "node_config": {}, "max_workers": 0}}
            config.update(config_kwargs)
            return config

    # `ray start` and `ray stop` are run as commands: the ones beside this interpreter.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    cluster = FakeAutoscalingCluster(head_resources={"CPU": 2}, worker_node_types=copy.deepcopy(WORKER_TYPES))
    cluster.start()
    try:
        ray.init(address="auto", namespace="test-autoscaler")
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_workers_started_by_the_autoscaler_from_zero_carry_the_run(autoscaling_cluster, tmp_path):
    head = ray.get_runtime_context().get_node_id()
    assert [n["NodeID"] for n in ray.nodes() if n["Alive"]] == [head]  # no worker node yet
    cfg = IDAConfig(
        task="sum", task_kwargs={"base_size": 2}, train_sizes=(1, 2, 3, 4), iterations=2, seed=1,
        amplify_trees_per_iteration=AMPLIFY, distill_trees_per_iteration=DISTILL, eval_questions_per_size=5,
        amplify=AmplifyConfig(max_new_tokens=8),
        model=ModelSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        train=TrainConfig(steps_per_iteration=10, adversary_steps_per_iteration=3, replay_capacity=5000),
        engine="torch", replicas=1, expanders=1, learner_workers=1, run_dir=str(tmp_path / "run"),
        resources=ClusterResources(replica_cpus=1, expander_cpus=0.5, learner_cpus=1, start_timeout_s=300,
                                   replica_resources={"replica_node": 1}, learner_resources={"learner_node": 1}))
    history = train(cfg, progress=False)
    assert [m["iteration"] for m in history] == [0, 1]

    launched = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != head}
    replica_nodes = {k for k, r in launched.items() if "replica_node" in r}
    learner_nodes = {k for k, r in launched.items() if "learner_node" in r}
    assert len(replica_nodes) == 1 and len(learner_nodes) == 1  # one of each type, launched for the run
    for m in history:
        assert set(m["replica_nodes"].values()) == replica_nodes
        assert set(m["learner_nodes"].values()) == learner_nodes
        nothing_lost(cfg.run_dir, m, AMPLIFY + DISTILL)
    assert history[-1]["replica_versions"] == {"replica-0": 2}
