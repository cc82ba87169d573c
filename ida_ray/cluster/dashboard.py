"""Dashboard metrics for an IDA run, through `ray.util.metrics` (exported by Ray's metrics
agent to Prometheus / the Ray dashboard's Metrics view).

Every series carries a `run` tag (the run directory's name), so two runs on one cluster stay
apart. The coordinator records, per iteration: trees completed (by mode and source) and
failed (by error kind), nodes expanded per second, expert calls per amplification tree
(histogram, tagged by question size), a language-model expert's requests, tokens, cache hits
and cost, who answered each node (expert / model /
model_via_hprime), the model and adversary losses, held-out accuracy by size, the weight
version each replica serves and its queue depth, the replay buffer's size, and the seconds
spent in each phase.

`IDAMetrics.snapshot` keeps the last value recorded for each series, so the run summary and
tests can read what was sent without scraping Prometheus.
"""
from __future__ import annotations

from collections import Counter as _Counter

from ray.util.metrics import Counter, Gauge, Histogram

from ida_ray.messages import TreeSummary

EXPERT_CALL_BOUNDARIES = [0.5, 1.5, 2.5, 3.5, 5.5, 8.5, 12.5, 16.5, 24.5, 32.5, 64.5]


class IDAMetrics:
    def __init__(self, run: str):
        self.run = run
        r = ("run",)
        self.trees_completed = Counter("ida_trees_completed", "Trees expanded", r + ("mode", "source"))
        self.trees_failed = Counter("ida_trees_failed", "Trees that recorded an error", r + ("kind",))
        self.nodes_per_second = Gauge("ida_nodes_per_second", "Tree nodes expanded per second, last iteration", r)
        self.expert_calls = Histogram("ida_expert_calls_per_tree", "Expert calls per amplification tree",
                                      EXPERT_CALL_BOUNDARIES, r + ("size",))
        self.expert_calls_mean = Gauge("ida_expert_calls_per_tree_mean",
                                       "Mean expert calls per amplification tree, last iteration", r)
        self.answered = Counter("ida_nodes_answered", "Tree nodes by who answered them", r + ("who",))
        self.loss = Gauge("ida_loss", "Training loss at the end of the last round", r + ("which",))
        self.accuracy = Gauge("ida_eval_accuracy", "Held-out accuracy of the model alone", r + ("size",))
        self.weight_version = Gauge("ida_replica_weight_version", "Weight version a replica serves", r + ("replica",))
        self.queue_depth = Gauge("ida_replica_queue_depth", "Requests waiting in a replica's engine", r + ("replica",))
        self.replay_size = Gauge("ida_replay_buffer_examples", "Examples held by the replay buffer", r)
        self.iteration = Gauge("ida_iteration", "Iterations completed", r)
        self.honest = Gauge("ida_honest", "Honest objective, last round: heads' disagreement C on the trusted set; "
                            "intended head right / instrumental head copying the simple label where it errs",
                            r + ("which",))
        self.phase_seconds = Gauge("ida_phase_seconds", "Seconds spent in each phase, last iteration", r + ("phase",))
        self.expert_cost = Gauge("ida_expert", "A language-model expert's cost, last iteration: requests, cache "
                                 "hits, parse retries, prompt and completion tokens, tokens per tree, cost",
                                 r + ("which",))
        self.snapshot: dict[str, dict] = {}

    def _tags(self, **extra) -> dict[str, str]:
        return {"run": self.run, **{k: str(v) for k, v in extra.items()}}

    def _keep(self, series: str, key, value) -> None:
        self.snapshot.setdefault(series, {})[str(key)] = value

    def record_trees(self, m: dict, trees: list[TreeSummary]) -> None:
        """The iteration's trees: failures, who answered and the mean expert calls as its
        metrics record counted them (`loop.tree_metrics`); from the summaries themselves only
        what the record does not keep (trees by mode and source, each tree's expert calls)."""
        by_mode = _Counter((t.mode, t.source) for t in trees)
        for (mode, source), n in by_mode.items():
            self.trees_completed.inc(n, self._tags(mode=mode, source=source))
            self._keep("trees_completed", f"{mode}/{source}",
                       self.snapshot.get("trees_completed", {}).get(f"{mode}/{source}", 0) + n)
        for kind, n in m["errors"].items():
            self.trees_failed.inc(n, self._tags(kind=kind))
            self._keep("trees_failed", kind, self.snapshot.get("trees_failed", {}).get(kind, 0) + n)
        for name, n in m["answered_by"].items():
            self.answered.inc(n, self._tags(who=name))
            self._keep("nodes_answered", name, self.snapshot.get("nodes_answered", {}).get(name, 0) + n)
        seconds = m["expansion_seconds"]
        rate = m["nodes"] / seconds if seconds > 0 else 0.0
        self.nodes_per_second.set(rate, self._tags())
        self._keep("nodes_per_second", "", rate)
        for t in trees:
            if t.mode == "amplify":
                self.expert_calls.observe(t.expert_calls, self._tags(size=t.size))
        self.expert_calls_mean.set(m["expert_calls_per_tree"], self._tags())
        self._keep("expert_calls_per_tree", "", m["expert_calls_per_tree"])

    def record_losses(self, model_loss: float, adversary_loss: float) -> None:
        for which, v in (("model", model_loss), ("adversary", adversary_loss)):
            if v == v:  # NaN when no step of that kind ran
                self.loss.set(v, self._tags(which=which))
                self._keep("loss", which, v)

    def record_accuracy(self, accuracy_by_size: dict) -> None:
        for size, acc in accuracy_by_size.items():
            self.accuracy.set(acc, self._tags(size=size))
            self._keep("eval_accuracy", size, acc)

    def record_replicas(self, health: list[dict]) -> None:
        for h in health:
            self.weight_version.set(h["version"], self._tags(replica=h["name"]))
            self.queue_depth.set(h.get("queue_depth", 0), self._tags(replica=h["name"]))
            self._keep("replica_weight_version", h["name"], h["version"])
            self._keep("replica_queue_depth", h["name"], h.get("queue_depth", 0))

    def record_iteration(self, completed: int, replay_size: int, phase_seconds: dict[str, float]) -> None:
        self.iteration.set(completed, self._tags())
        self.replay_size.set(replay_size, self._tags())
        self._keep("iteration", "", completed)
        self._keep("replay_buffer_examples", "", replay_size)
        for phase, s in phase_seconds.items():
            self.phase_seconds.set(s, self._tags(phase=phase))
            self._keep("phase_seconds", phase, s)

    def record_expert(self, m: dict) -> None:
        """An LM expert's figures of the iteration (expert "lm" only: the expert_* keys of metrics)."""
        for key, v in m.items():
            if key.startswith("expert_") and key != "expert_calls_per_tree" and isinstance(v, (int, float)):
                which = key.removeprefix("expert_")
                self.expert_cost.set(float(v), self._tags(which=which))
                self._keep("expert", which, v)

    def record_honest(self, honest: dict | None) -> None:
        """The honest objective's round figures (objective "honest" only)."""
        for which, v in (honest or {}).items():
            if isinstance(v, (int, float)) and v == v:
                self.honest.set(float(v), self._tags(which=which))
                self._keep("honest", which, v)
