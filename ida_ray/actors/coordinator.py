"""The iteration coordinator: a named async Ray actor ("ida-coordinator") that runs IDA over
the cluster, step for step as `ida_ray.local_loop.LocalIDA` does in one process:

  1. draw the iteration's questions: the training distribution, plus (after the first
     iteration) a share picked by the adversary (`ida_ray.iteration.draw_questions`);
  2. expand amplification trees with H' and distillation trees with the model alone, spread
     over the TreeExpander actors in chunks, all model calls going to the replicas (H is the
     task's coded expert, or with cfg.expert == "human" a person answering through the run's
     queue actor, ida_ray/actors/human_queue.py);
  3. add every tree's examples to the replay buffer actor and its record to run_dir/trees/;
  4. train the model and the adversary (the Ray Train learner, ida_ray/actors/learner.py), which
     checkpoints and hands back the new weights;
  5. swap the new weights into every replica and check each serves the new version;
  6. evaluate the model alone on held-out questions of every size;
  7. write run_dir/metrics.jsonl, the PNG plots and run_dir/state.json (what `resume` needs:
     iterations completed, the checkpoint, the question RNG's state), and the dashboard
     metrics.

Resume: state.json names the learner checkpoint of the last completed iteration; replicas
start from its weights, the learner from its weights and optimizer states, the replay buffer
from its spill file (minus anything newer than the checkpoint), the RNG from its saved state.
"""
from __future__ import annotations

import asyncio
import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import ray

from ida_ray.cluster.job_dispatch import dispatch_jobs, failure_result
from ida_ray.actors.learner import Learner
from ida_ray.cluster.dashboard import IDAMetrics
from ida_ray.actors.replay_buffer import REPLAY_BUFFER_NAME, start_replay_buffer
from ida_ray.config import IDAConfig
from ida_ray.errors import ConfigError
from ida_ray.evaluation import evaluate, heldout_questions
from ida_ray.iteration import draw_questions, tree_metrics
from ida_ray.questions import UserQuestion, for_iteration
from ida_ray.tasks import get_task
from ida_ray.tree import Tree

COORDINATOR_NAME = "ida-coordinator"
STATE_FILE = "state.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "plots/progress.png"
DASHBOARD_FILE = "dashboard_metrics.json"  # the last values sent to the Ray dashboard


@dataclass
class ClusterResources:
    """Logical resources each actor asks Ray for. Expansion and training alternate, so on a
    small machine the actors may ask for more logical CPUs than there are cores: a local
    cluster is started with enough logical CPUs for all of them (ida_ray/entrypoints/train.py)."""

    replica_cpus: float = 1.0
    expander_cpus: float = 0.5
    learner_cpus: float = 1.0  # per learner worker
    learner_threads: int | None = None  # torch threads per learner worker; None: Ray's default
    kv_cache_gib: int = 1  # vLLM-CPU KV cache per engine
    round_timeout_s: float = 3600.0

    def required_cpus(self, cfg: IDAConfig) -> float:
        return (cfg.replicas * self.replica_cpus + cfg.expanders * self.expander_cpus
                + cfg.learner_workers * self.learner_cpus)

    @classmethod
    def from_dict(cls, d: dict | None) -> ClusterResources:
        if d is not None and not isinstance(d, dict):
            raise ConfigError(f"resources must be a mapping, got {d!r}")
        d = dict(d or {})
        known = set(cls.__dataclass_fields__)
        bad = set(d) - known
        if bad:
            raise ConfigError(f"unknown keys in resources: {sorted(bad)} (known: {sorted(known)})")
        return cls(**d).validate()

    def validate(self) -> ClusterResources:
        """Numbers Ray would reject only once actors start, rejected before any start."""
        problems = []
        for name in ("replica_cpus", "expander_cpus", "learner_cpus", "round_timeout_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                problems.append(f"resources.{name} must be a number >= 0, got {v!r}")
        if self.round_timeout_s == 0:
            problems.append("resources.round_timeout_s must be > 0")
        if isinstance(self.kv_cache_gib, bool) or not isinstance(self.kv_cache_gib, int) or self.kv_cache_gib < 1:
            problems.append(f"resources.kv_cache_gib must be a whole number >= 1, got {self.kv_cache_gib!r}")
        if self.learner_threads is not None and (isinstance(self.learner_threads, bool) or
                                                 not isinstance(self.learner_threads, int) or self.learner_threads < 1):
            problems.append(f"resources.learner_threads must be a whole number >= 1 or null, got {self.learner_threads!r}")
        if problems:
            raise ConfigError("invalid resources:\n  - " + "\n  - ".join(problems))
        return self


# ---------------------------------------------------------------------------------------
# Run directory: what a run leaves behind and what resume reads.
# ---------------------------------------------------------------------------------------
def read_state(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / STATE_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is corrupt ({exc}); cannot resume from it") from exc


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def read_history(run_dir: str | Path, completed: int) -> list[dict]:
    """The metrics of iterations 0..completed-1 from metrics.jsonl (later lines win, so a
    re-run iteration replaces the record of the attempt that crashed)."""
    path = Path(run_dir) / METRICS_FILE
    by_it: dict[int, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                m = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a crash
            if m.get("iteration", completed) < completed:
                by_it[m["iteration"]] = _int_keys(m)
    return [by_it[i] for i in sorted(by_it)]


def _int_keys(m: dict) -> dict:
    """JSON turned the size keys into strings; the live history has ints."""
    for key in ("accuracy_by_size", "expert_calls_per_tree_by_size"):
        if isinstance(m.get(key), dict):
            m[key] = {int(k): v for k, v in m[key].items()}
    return m


def check_run_dir(cfg: IDAConfig, resume: bool) -> dict | None:
    """Before any resource is taken: refuse to overwrite a run, and refuse to resume one whose
    model shape differs. Returns the state to resume from (None: a fresh run)."""
    state = read_state(cfg.run_dir)
    if state is None:
        return None
    if not resume:
        raise ConfigError(f"{cfg.run_dir} already holds a run ({state['completed_iterations']} iterations done); "
                          "pass --resume to continue it, or choose another --run-dir")
    old = state.get("config", {})
    if old.get("model") != asdict(cfg.model) or old.get("task") != cfg.task or \
            old.get("task_kwargs", {}) != cfg.task_kwargs:
        raise ConfigError(f"cannot resume {cfg.run_dir}: its task or model differs from this configuration "
                          f"(saved: task={old.get('task')!r} model={old.get('model')})")
    if not Path(state["checkpoint"]).exists():
        raise ConfigError(f"cannot resume {cfg.run_dir}: checkpoint {state['checkpoint']} is missing")
    return state


def _rng_state_to_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_state_from_json(data) -> tuple:
    version, internal, gauss = data
    return version, tuple(internal), gauss


# ---------------------------------------------------------------------------------------
# The coordinator actor.
# ---------------------------------------------------------------------------------------
class IDACoordinator:
    def __init__(self, cfg: dict, resume: bool = False, resources: dict | None = None,
                 user_questions: list[dict] | None = None, questions_file: str | None = None):
        """user_questions: the entries of a questions file (`ida_ray.questions.read_questions`,
        as dicts), read and checked by the driver; each is amplified once over the run."""
        self.cfg = IDAConfig.from_dict(cfg).validate()
        self.user_questions = [UserQuestion(**q) for q in user_questions or []]
        self.questions_file = questions_file
        self.resources = ClusterResources.from_dict(resources)
        self.run_dir = Path(self.cfg.run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.state = check_run_dir(self.cfg, resume)
        self.task = get_task(self.cfg.task, **self.cfg.task_kwargs)
        self.sizes = self.cfg.sizes(self.task)
        self.rng = random.Random(self.cfg.seed)
        self.completed = 0
        self.history: list[dict] = []
        if self.state:
            self.completed = self.state["completed_iterations"]
            self.rng.setstate(_rng_state_from_json(self.state["rng_state"]))
            self.history = read_history(self.run_dir, self.completed)
        self.heldout = heldout_questions(self.task, self.sizes, self.cfg.eval_questions_per_size, self.cfg.seed)
        self.metrics = IDAMetrics(self.run_dir.name)
        self.progress_info = {"phase": "created", "iteration": self.completed, "done": 0, "total": 0}
        self.replicas: list = []
        self.expanders: list = []
        self.pool = None
        self.latest_weights: tuple[object, int] | None = None  # (payload ref, version) last swapped
        self.buffer = None
        self.learner: Learner | None = None
        self.setup_seconds: dict[str, float] = {}
        self.initial_accuracy: dict[int, float] = {}
        self.max_queue_depth: dict[str, int] = {}

    # -- progress, for the driver's progress bars --------------------------------------
    def _phase(self, phase: str, total: int = 0) -> None:
        self.progress_info.update(phase=phase, done=0, total=total, since=time.time())

    def progress(self) -> dict:
        return dict(self.progress_info, completed=self.completed)

    # -- start-up ------------------------------------------------------------------------
    async def setup(self) -> dict:
        """Start the replay buffer, replicas, expanders and learner; returns start timings."""
        from ida_ray.serving.engine_pool import ReplicaPool
        from ida_ray.actors.expander import start_expanders
        from ida_ray.actors.replica import start_replicas
        from ida_ray.serving.weights import WeightsPayload
        from ida_ray.models import create_model_dirs

        cfg, res = self.cfg, self.resources
        (self.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        t0 = time.time()
        self._phase("starting replay buffer")
        self.buffer = start_replay_buffer(cfg.train.replay_capacity, self.run_dir, cfg.seed,
                                          completed_iterations=self.completed if self.state else None)
        buffer_stats = await self.buffer.stats.remote()

        # The learner's workers start (model build, process group) while the replicas start.
        self._phase("starting learner")
        self.learner = Learner(cfg, self.run_dir, buffer_name=REPLAY_BUFFER_NAME, start_iteration=self.completed,
                               resume_from=self.state["checkpoint"] if self.state else None,
                               cpus_per_worker=res.learner_cpus, torch_threads=res.learner_threads,
                               round_timeout_s=res.round_timeout_s)
        self.learner.start()

        self._phase(f"starting {cfg.replicas} {cfg.engine} replica(s)")
        t1 = time.time()
        if self.state:
            ckpt = Path(self.state["checkpoint"])
            model_dir, adversary_dir = ckpt / "model", ckpt / "adversary"
        else:
            model_dir, adversary_dir = create_model_dirs(self.run_dir / "initial", cfg.model, cfg.seed)
        # start_replicas blocks until every engine is up: run it off the actor's event loop.
        self.replicas = await asyncio.to_thread(
            start_replicas, cfg.replicas, str(model_dir), str(adversary_dir), engine=cfg.engine,
            use_gpu=cfg.use_gpu, max_new_tokens=cfg.amplify.max_new_tokens, num_cpus=res.replica_cpus,
            kv_cache_gib=res.kv_cache_gib)
        self.setup_seconds["replicas"] = round(time.time() - t1, 2)
        self.pool = ReplicaPool(self.replicas)
        if self.state:  # the checkpoint's weights are served; give them their version number
            ref = ray.put(WeightsPayload.from_dirs(model_dir, adversary_dir))
            await self.pool.swap_weights(ref, self.completed)
            self.latest_weights = (ref, self.completed)
        per_expander = max(1, math.ceil(cfg.trees_in_flight / cfg.expanders))
        human_queue = None
        if cfg.expert == "human":  # the driver's queue actor (the one its /human page answers)
            from ida_ray.actors.human_queue import start_human_queue

            human_queue = await asyncio.to_thread(start_human_queue, cfg.human_timeout_s)
        self.expanders = start_expanders(cfg.expanders, self.replicas, num_cpus=res.expander_cpus, task=cfg.task,
                                         task_kwargs=cfg.task_kwargs, amplify=cfg.amplify,
                                         trees_in_flight=per_expander, human_queue=human_queue)
        await asyncio.gather(*(e.health.remote() for e in self.expanders))
        if self.state:
            self.initial_accuracy = {int(k): v for k, v in self.state.get("initial_accuracy", {}).items()}
        else:  # the baseline the learning curve starts from
            self._phase("evaluating the initial model")
            self.initial_accuracy = await evaluate(self.task, self.pool, self.heldout)
        self.setup_seconds["total"] = round(time.time() - t0, 2)
        self._phase("ready")
        return {"completed_iterations": self.completed, "setup_seconds": self.setup_seconds,
                "initial_accuracy": self.initial_accuracy,
                "replay_buffer": buffer_stats, "replicas": [await r.health.remote() for r in self.replicas]}

    # -- one iteration -------------------------------------------------------------------
    async def _expand(self, it: int, jobs: list[dict], rejected: list[dict] | None = None) -> tuple[list[dict], dict]:
        """Expand all jobs over the expanders in chunks (so progress shows), re-issuing the
        chunks of an expander that dies (ida_ray/cluster/job_dispatch.py); returns one result per job in
        job order, then `rejected` (failure records made without expanding), all already in the
        replay buffer, and the dispatch stats."""
        n_exp = len(self.expanders)
        chunk = max(4, math.ceil(len(jobs) / (n_exp * 8)))
        self._phase("expanding trees", len(jobs))

        def done(n: int) -> None:
            self.progress_info["done"] += n

        async def tell_weights(handle) -> None:  # a restarted expander's pool starts without them
            if self.latest_weights is not None:
                ref, version = self.latest_weights
                await handle.remember_weights.remote([ref], version)

        await asyncio.gather(*(tell_weights(e) for e in self.expanders), return_exceptions=True)
        watcher = asyncio.ensure_future(self._watch_replicas())
        try:
            results, stats = await dispatch_jobs(self.expanders, jobs, self.task, chunk_size=chunk,
                                                 on_chunk_done=done, on_reissue=tell_weights)
        finally:
            watcher.cancel()
        results += rejected or []
        # Added in job order, not completion order: seeded sampling then draws the same
        # examples on every run of the same configuration (and on a resumed run).
        await asyncio.gather(self.buffer.add.remote([e for r in results for e in r["examples"]]),
                             self.buffer.add_trees.remote(it, [r["tree"] for r in results]))
        return results, dict(stats.to_dict(), rejected=len(rejected or []))

    def _user_jobs(self, it: int) -> tuple[list[dict], list[dict]]:
        """This iteration's share of the questions file: amplification jobs for the well-formed
        entries, failure records (kind malformed_question) for the others."""
        jobs, rejected = [], []
        for q in for_iteration(self.user_questions, it, self.cfg.iterations):
            job = {"question": q.question, "mode": "amplify", "iteration": it, "source": "user",
                   "job_id": f"u{q.index}",
                   # Seeded by the entry alone: the run's own draws are unchanged by the file.
                   "seed": random.Random(f"user-{self.cfg.seed}-{q.index}").randrange(2**31)}
            if q.problem is None:
                jobs.append(job)
            else:
                where = Path(self.questions_file).name if self.questions_file else "questions file"
                rejected.append(failure_result(self.task, job, {"kind": "malformed_question",
                                                                "message": f"{where} line {q.line}: {q.problem}"}))
        return jobs, rejected

    async def _watch_replicas(self, every_s: float = 2.0) -> None:
        """While trees expand, send each replica's queue depth and weight version to the
        dashboard and keep the deepest queue seen (an idle replica's queue is always empty)."""
        while True:
            health = await self._replica_health()
            self.metrics.record_replicas(health)
            for h in health:
                self.max_queue_depth[h["name"]] = max(self.max_queue_depth.get(h["name"], 0), h.get("queue_depth", 0))
            await asyncio.sleep(every_s)

    async def _replica_health(self, timeout_s: float = 10.0) -> list[dict]:
        """health() of every replica that answers; one that is dead or restarting is left out
        (the pools route around it), so a lost replica never stops the loop."""
        async def one(r):
            return await asyncio.wait_for(r.health.remote(), timeout_s)
        got = await asyncio.gather(*(one(r) for r in self.replicas), return_exceptions=True)
        return [h for h in got if isinstance(h, dict)]

    async def _pool_faults(self) -> dict:
        """Replica faults the expanders' pools handled so far (batches re-sent after a replica
        died, items failed for good, restarted replicas brought back to the latest weights),
        summed over the expanders that answer; an expander restarted by Ray starts from 0."""
        got = await asyncio.gather(*(e.health.remote() for e in self.expanders), return_exceptions=True)
        pools = [h["pool"] for h in got if isinstance(h, dict)]
        return {k: sum(p.get(k, 0) for p in pools) for k in ("resent", "failed_items", "resyncs")}

    async def run_iteration(self, it: int) -> dict:
        if it != self.completed:
            raise ValueError(f"iteration {it} requested, but {self.completed} iterations are complete")
        cfg, phases = self.cfg, {}
        t_start = t = time.time()

        def lap(name):
            nonlocal t
            now = time.time()
            phases[name] = round(now - t, 3)
            t = now

        self.max_queue_depth: dict[str, int] = {}
        self._phase("drawing questions")
        questions = await draw_questions(self.task, self.pool, cfg, cfg.amplify_trees_per_iteration, self.rng,
                                         adversarial=it > 0)
        seeds = [self.rng.randrange(2**31) for _ in questions]
        distill_qs = [self.task.generate(self.rng.choice(self.sizes), self.rng)
                      for _ in range(cfg.distill_trees_per_iteration)]
        jobs = [{"question": q, "mode": "amplify", "seed": s, "iteration": it, "source": src, "job_id": f"a{i}"}
                for i, ((q, src), s) in enumerate(zip(questions, seeds))]
        jobs += [{"question": q, "mode": "distill", "seed": 0, "iteration": it, "source": "train", "job_id": f"d{i}"}
                 for i, q in enumerate(distill_qs)]
        user_jobs, rejected = self._user_jobs(it)
        jobs += user_jobs
        lap("questions")

        results, dispatch = await self._expand(it, jobs, rejected)
        trees = [Tree.from_dict(r["tree"]) for r in results]
        n_examples = sum(len(r["examples"]) for r in results)
        lap("expand")

        self._phase("training")
        trained = await self.learner.train(it)
        lap("train")

        self._phase("swapping weights")
        swapped = await self.pool.swap_weights(trained.payload_ref, trained.weight_version)
        self.latest_weights = (trained.payload_ref, trained.weight_version)
        for e in self.expanders:  # their pools resync replicas that Ray restarts
            e.remember_weights.remote([trained.payload_ref], trained.weight_version)
        lap("swap")

        self._phase("evaluating")
        accuracy = await evaluate(self.task, self.pool, self.heldout)
        lap("eval")

        self._phase("recording")
        health = await self._replica_health()
        pool_faults = await self._pool_faults()
        buffer_stats = await self.buffer.stats.remote()
        m = tree_metrics(trees)
        m.update(
            iteration=it, weight_version=trained.weight_version, examples=n_examples, buffer=buffer_stats["size"],
            model_loss=trained.model_loss, adversary_loss=trained.adversary_loss,
            model_steps=trained.model_steps, adversary_steps=trained.adversary_steps,
            learner_ranks_in_sync=trained.ranks_in_sync, accuracy_by_size=accuracy,
            replica_versions={h["name"]: h["version"] for h in health}, swapped=swapped,
            replica_max_queue_depth=dict(self.max_queue_depth), jobs=dispatch, replica_faults=pool_faults,
            nodes_per_second=round(m["nodes"] / phases["expand"], 2) if phases["expand"] else 0.0,
            learner_round={k: trained.rank_metrics[0].get(k) for k in
                           ("model_train_seconds", "train_seconds", "checkpoint_seconds", "round_seconds")},
            checkpoint=trained.checkpoint_path, expand_seconds=phases["expand"],
            learner_start_seconds=self.learner.start_seconds, setup_seconds=self.setup_seconds)
        if "honest" in trained.rank_metrics[0]:
            m["honest"] = trained.rank_metrics[0]["honest"]
        self.completed = it + 1
        self.history.append(m)
        self._record(m, trees, health, buffer_stats, phases)
        lap("record")
        m["phase_seconds"] = phases
        m["seconds"] = round(time.time() - t_start, 2)
        with open(self.run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(m) + "\n")
        write_json_atomic(self.run_dir / STATE_FILE, {
            "completed_iterations": self.completed, "checkpoint": trained.checkpoint_path,
            "rng_state": _rng_state_to_json(self.rng.getstate()), "config": cfg.to_dict(),
            "initial_accuracy": self.initial_accuracy, "questions_file": self.questions_file,
            "weight_version": trained.weight_version, "time": time.time()})
        self._phase("iteration done")
        return m

    def _record(self, m: dict, trees: list[Tree], health: list[dict], buffer_stats: dict, phases: dict) -> None:
        from ida_ray.plots import plot_history

        self.metrics.record_trees(trees, phases["expand"])
        self.metrics.record_losses(m["model_loss"], m["adversary_loss"])
        self.metrics.record_accuracy(m["accuracy_by_size"])
        self.metrics.record_honest(m.get("honest"))
        self.metrics.record_replicas(health)
        self.metrics.record_iteration(self.completed, buffer_stats["size"], phases)
        write_json_atomic(self.run_dir / DASHBOARD_FILE, self.metrics.snapshot)
        plot_history(self.history, self.run_dir / PLOT_FILE, title=f"ida-ray: {self.cfg.task} ({self.run_dir.name})")

    # -- status and shutdown -------------------------------------------------------------
    def get_history(self) -> list[dict]:
        return copy.deepcopy(self.history)

    def dashboard_snapshot(self) -> dict:
        return copy.deepcopy(self.metrics.snapshot)

    async def health(self) -> dict:
        return {"completed": self.completed, "progress": self.progress(),
                "replicas": await self._replica_health(),
                "expanders": list(await asyncio.gather(*(e.health.remote() for e in self.expanders))),
                "replay_buffer": await self.buffer.stats.remote() if self.buffer else None,
                "learner_start_seconds": self.learner.start_seconds if self.learner else None}

    async def shutdown(self) -> None:
        """Stop the learner's run, then the actors this coordinator started."""
        self._phase("shutting down")
        if self.learner is not None:
            await asyncio.to_thread(self.learner.stop)
            if self.learner.control is not None:
                ray.kill(self.learner.control)
        for r in self.replicas:
            try:
                await asyncio.wait_for(r.shutdown.remote(), 30)
            except Exception:  # a dead replica has nothing left to shut down
                pass
        for h in self.expanders + self.replicas + ([self.buffer] if self.buffer else []):
            ray.kill(h, no_restart=True)
        if self.pool is not None:
            self.pool.close()
        self._phase("stopped")


def start_coordinator(cfg: IDAConfig, resume: bool = False, resources: ClusterResources | None = None,
                      name: str = COORDINATOR_NAME, user_questions: list[UserQuestion] | None = None,
                      questions_file: str | None = None):
    # The learner's fit() thread blocks in ray.get by design (it is not the event loop);
    # Ray's warning about blocking gets in async actors would only mislead.
    env = {"env_vars": {"RAY_WARN_BLOCKING_GET_INSIDE_ASYNC": "0"}}
    cls = ray.remote(num_cpus=0, max_concurrency=1000)(IDACoordinator)
    return cls.options(name=name, runtime_env=env).remote(
        cfg.to_dict(), resume, asdict(resources or ClusterResources()),
        [q.to_dict() for q in user_questions or []], None if questions_file is None else str(questions_file))
