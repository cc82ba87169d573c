"""IDA on a multi-node Ray cluster simulated on this machine (`ray.cluster_utils.Cluster`: a
head and three worker nodes, each its own raylet), in the shape of cluster.yaml: the head
carries the coordinator, the learner's control actor, the replay buffer and the expander; two worker nodes declare a
`replica_node` resource and one a `learner_node` resource, and the run's
`resources.replica_resources` / `learner_resources` ask for them. Checked: every actor lands
where its resources say; then one replica node is removed while iteration 1's trees expand,
and the run goes on with the other replica and loses no tree.

Worker nodes started by the autoscaler from zero: tests/test_autoscaler.py.
"""
from __future__ import annotations

import threading

import pytest
import ray
from run_checks import nothing_lost

from ida_ray.actors.coordinator import COORDINATOR_NAME
from ida_ray.actors.learner import LEARNER_CONTROL_NAME
from ida_ray.actors.replay_buffer import REPLAY_BUFFER_NAME
from ida_ray.config import AmplifyConfig, ClusterResources, IDAConfig, TrainConfig
from ida_ray.entrypoints.train import train
from ida_ray.models import ModelSpec

pytestmark = [pytest.mark.ray, pytest.mark.slow]
AMPLIFY, DISTILL = 24, 16


@pytest.fixture(scope="module")
def multinode():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    nodes = {"replica_a": cluster.add_node(num_cpus=1, resources={"replica_node": 1}),
             "replica_b": cluster.add_node(num_cpus=1, resources={"replica_node": 1}),
             "learner": cluster.add_node(num_cpus=1, resources={"learner_node": 1})}
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="test-multinode")
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


class RemoveNodeWhileExpanding(threading.Thread):
    def __init__(self, cluster, node, at: int):
        super().__init__(daemon=True)
        self.cluster, self.node, self.at = cluster, node, at
        self.removed, self.coordinator_node, self.error = False, None, None
        self.head_actor_nodes: dict[str, str] = {}  # the run's head-node actors, by name
        self.stop = threading.Event()

    def run(self):
        try:
            while not self.stop.wait(0.05):
                try:
                    coordinator = ray.get_actor(COORDINATOR_NAME)
                    progress = ray.get(coordinator.progress.remote(), timeout=5)
                    if self.coordinator_node is None:
                        self.coordinator_node = ray.get(coordinator.health.remote(), timeout=30)["node_id"]
                except (ValueError, ray.exceptions.RayError):
                    continue
                if progress["completed"] == self.at and progress["phase"] == "expanding trees":
                    # Before the node goes: an actor of the run's control path left on it would die with it.
                    for name in (LEARNER_CONTROL_NAME, REPLAY_BUFFER_NAME):
                        actor = ray.get_actor(name)
                        self.head_actor_nodes[name] = ray.get(actor.__ray_call__.remote(
                            lambda _self: ray.get_runtime_context().get_node_id()), timeout=30)
                    self.cluster.remove_node(self.node)
                    self.removed = True
                    return
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def test_actors_go_where_their_resources_are_and_a_lost_node_loses_no_tree(multinode, tmp_path):
    cluster, nodes = multinode
    head = ray.get_runtime_context().get_node_id()
    cfg = IDAConfig(
        task="sum", task_kwargs={"base_size": 2}, train_sizes=(1, 2, 3, 4), iterations=3, seed=1,
        amplify_trees_per_iteration=AMPLIFY, distill_trees_per_iteration=DISTILL, eval_questions_per_size=5,
        amplify=AmplifyConfig(max_new_tokens=8),
        model=ModelSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        train=TrainConfig(steps_per_iteration=10, adversary_steps_per_iteration=3, replay_capacity=5000),
        engine="torch", replicas=2, expanders=1, learner_workers=1, run_dir=str(tmp_path / "run"),
        resources=ClusterResources(replica_cpus=1, expander_cpus=0.5, learner_cpus=1,
                                   replica_resources={"replica_node": 1}, learner_resources={"learner_node": 1}))
    chaos = RemoveNodeWhileExpanding(cluster, nodes["replica_b"], at=1)
    chaos.start()
    try:
        history = train(cfg, progress=False)
    finally:
        chaos.stop.set()
        chaos.join(10)
    assert chaos.error is None, chaos.error
    assert chaos.removed, "the node was never removed"

    first, last = history[0], history[-1]
    # Placement: replicas one per replica node, the learner on its node, the coordinator on the head.
    assert sorted(first["replica_nodes"].values()) == sorted(n.node_id for k, n in nodes.items() if k != "learner")
    assert first["learner_nodes"] == {"0": nodes["learner"].node_id}
    assert chaos.coordinator_node == head
    assert chaos.head_actor_nodes == {LEARNER_CONTROL_NAME: head, REPLAY_BUFFER_NAME: head}
    # The run went on with the replica left, on the latest weights.
    assert [m["iteration"] for m in history] == [0, 1, 2]
    survivor = next(name for name, n in first["replica_nodes"].items() if n == nodes["replica_a"].node_id)
    assert last["replica_versions"] == {survivor: 3}
    # Nothing lost: one record per job, each tree once, none failed for the lost node.
    for m in history:
        nothing_lost(cfg.run_dir, m, AMPLIFY + DISTILL)
