"""The IDA iteration, written once (ALGORITHM.md sections 2-4).

    run = IDARun(cfg, LocalBackend(cfg))          # or RayBackend(cfg): the same loop
    await run.start()
    for it in range(run.completed, cfg.iterations):
        metrics = await run.run_iteration(it)

One iteration, over a small `Backend` interface:

  1. questions   the training distribution (over the curriculum's sizes, when it has one),
                 plus (after the first iteration) a share picked by the adversary, plus this
                 iteration's slice of the questions file
  2. expand      amplification trees with H' and distillation trees with the model alone
  3. record      commit the iteration's trees: the examples that the expanders staged in the
                 replay buffer become trainable, the trees' records go to run_dir/trees/
                 (the loop itself holds only each tree's summary: its counts)
  4. train       the model and the adversary, one round; a checkpoint
  5. swap        the new weights into whatever serves the model
  6. evaluate    the model alone on held-out questions of every size
  7. metrics     one record to metrics.jsonl, the plot, state.json (what resume needs)

Two backends implement the interface: `ida_ray.local_backend.LocalBackend` (one process, the
torch engine, no Ray) and `ida_ray.cluster.ray_backend.RayBackend` (vLLM replicas, tree
expanders and a Ray Train learner). Options a backend cannot serve are refused before anything
starts (`ida_ray.preflight.backend_problems`).

Resume: state.json names the checkpoint of the last completed iteration; the backend starts
from its weights and optimiser states and the replay buffer from its spill (minus anything
newer than the checkpoint); the question RNG from its saved state.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import shutil
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ida_ray.amplify import adversarial_question
from ida_ray.config import IDAConfig
from ida_ray.curriculum import curriculum_sizes
from ida_ray.engine import Engine, gather_limited
from ida_ray.errors import DiskFull
from ida_ray.evaluation import evaluate, heldout_questions
from ida_ray.expansion import failure_result
from ida_ray.messages import DispatchStats, ExpandJob, ExpandResult, TrainResult, TreeSummary
from ida_ray.prompts import COMPACT, PromptFormat
from ida_ray.questions import UserQuestion, for_iteration
from ida_ray.run_dir import (
    PLOT_FILE,
    STATE_FILE,
    append_metrics,
    best_score,
    check_run_dir,
    keep_best,
    read_best,
    read_history,
    rng_state_from_json,
    rng_state_to_json,
    write_json_atomic,
)
from ida_ray.storage import RunStorage, StorageError, bounded, checkpoint_on_disk
from ida_ray.tasks import get_task
from ida_ray.tasks.base import Task

log = logging.getLogger(__name__)

Progress = Callable[[int], None]


@dataclass
class Expansion:
    """An iteration's expanded trees (steps 1-2), staged in the replay buffer, with what drawing
    and expanding took."""

    trees: list[TreeSummary]
    dispatch: DispatchStats
    questions_seconds: float
    seconds: float


def expert_requests_of(trees: list[TreeSummary]) -> int:
    return sum(t.expert_usage.get("requests", 0) for t in trees if t.mode == "amplify")


class Backend(ABC):
    """Where the model is served, trees are expanded and the learner trains."""

    engine: Engine
    """Serves the loop's own model calls: adversarial question draws and evaluation."""

    @abstractmethod
    async def start(self, completed: int, checkpoint: str | None, report: Callable[[str], None]) -> dict:
        """Start serving (from `checkpoint`'s weights when resuming after `completed`
        iterations) and training, saying what starts through `report`; returns start-up
        figures (seconds per part)."""

    @abstractmethod
    async def expand(self, jobs: list[ExpandJob], on_done: Progress) -> tuple[list[TreeSummary], DispatchStats]:
        """Expand the jobs and stage each tree with its examples in the replay buffer
        (ReplayStore.stage); returns one summary per job, in job order (a failed tree's
        carries its error's kind)."""

    @abstractmethod
    async def stage(self, results: list[ExpandResult]) -> None:
        """Stage results the loop made itself (the failure records of rejected questions)."""

    @abstractmethod
    async def record(self, iteration: int, trees: list[tuple[str, str]]) -> int:
        """Commit the iteration's staged trees, exactly these (job id, tree id) pairs, in this
        order (so seeded sampling draws the same examples on every run of a configuration):
        their examples into the replay buffer, their records to run_dir/trees/; returns the
        buffer's size."""

    @abstractmethod
    async def drop_stale(self, min_version: int) -> int:
        """Drop replay examples made by weights older than `min_version` (max_staleness);
        returns how many."""

    @abstractmethod
    async def train(self, iteration: int) -> TrainResult:
        """One training round of the model and the adversary, checkpointed."""

    @abstractmethod
    async def swap(self, trained: TrainResult) -> dict[str, int]:
        """Serve the round's weights; returns each server's weight version."""

    async def set_expert_budget(self, calls: int | None) -> None:
        """Endpoint calls the LM expert may make this iteration, over all expanders (None: no
        cap); a backend without an LM expert ignores it."""

    async def figures(self) -> dict:
        """The backend's own figures for the iteration's metrics record."""
        return {}

    def publish(self, metrics: dict, trees: list[TreeSummary], phases: dict[str, float]) -> None:
        """Send the iteration's figures to live monitoring (the Ray dashboard)."""

    @abstractmethod
    async def close(self) -> None: ...


# ---------------------------------------------------------------------------------------
# Step 1: the iteration's questions.
# ---------------------------------------------------------------------------------------
async def draw_questions(task: Task, engine: Engine, cfg: IDAConfig, n: int, rng: random.Random,
                         adversarial: bool, sizes: tuple[int, ...], fmt: PromptFormat = COMPACT) -> list[tuple[str, str]]:
    """n (question, source) pairs: the training distribution over `sizes` plus, when
    `adversarial`, a share chosen by the adversary (k candidates of those sizes, Gumbel-max on
    predicted weakness)."""
    n_adv = int(round(n * cfg.amplify.adversarial_fraction)) if adversarial else 0
    plain = [(task.generate(rng.choice(sizes), rng), "train") for _ in range(n - n_adv)]
    seeds = [rng.randrange(2**31) for _ in range(n_adv)]
    adv = await gather_limited([adversarial_question(task, engine, sizes, cfg.amplify, random.Random(s), fmt)
                                for s in seeds], cfg.trees_in_flight)
    return plain + [(q, "adversarial") for q in adv]


def user_jobs(task: Task, cfg: IDAConfig, entries: list[UserQuestion], it: int,
              source_name: str, min_weight_version: int = 0) -> tuple[list[ExpandJob], list[ExpandResult]]:
    """This iteration's share of the questions file: amplification jobs for the well-formed
    entries, failure records (kind malformed_question) for the others."""
    jobs, rejected = [], []
    for q in for_iteration(entries, it, cfg.iterations):
        # Seeded by the entry alone: the run's own draws are unchanged by the file.
        job = ExpandJob(job_id=f"u{q.index}", question=q.question, mode="amplify", iteration=it, source="user",
                        seed=random.Random(f"user-{cfg.seed}-{q.index}").randrange(2**31),
                        min_weight_version=min_weight_version)
        if q.problem is None:
            jobs.append(job)
        else:
            rejected.append(failure_result(task, job, {"kind": "malformed_question",
                                                       "message": f"{source_name} line {q.line}: {q.problem}"}))
    return jobs, rejected


# ---------------------------------------------------------------------------------------
# Step 7: the iteration's figures.
# ---------------------------------------------------------------------------------------
def tree_metrics(trees: list[TreeSummary]) -> dict:
    """Expert calls per tree, who answered each node, errors by kind, for one batch of trees."""
    amp = [t for t in trees if t.mode == "amplify"]
    who: Counter = Counter()
    errors: Counter = Counter()
    for t in trees:
        if t.error_kind:
            errors[t.error_kind] += 1
        who.update(t.answered_by)
    by_size: dict[int, list[int]] = {}
    for t in amp:
        by_size.setdefault(t.size, []).append(t.expert_calls)
    return {
        "trees": len(trees),
        "amplify_trees": len(amp),
        "trees_failed": sum(1 for t in trees if t.error_kind),
        "expert_calls_per_tree": sum(t.expert_calls for t in amp) / max(1, len(amp)),
        "expert_calls_per_tree_by_size": {s: sum(v) / len(v) for s, v in sorted(by_size.items())},
        "model_calls_per_tree": sum(t.model_calls for t in trees) / max(1, len(trees)),
        "nodes": sum(t.nodes for t in trees),
        "answered_by": dict(who),
        "errors": dict(errors),
    }


class IDARun:
    """A run: the loop over iterations, its run directory and its resume state."""

    def __init__(self, cfg: IDAConfig, backend: Backend, *, resume: bool = False,
                 user_questions: list[UserQuestion] | None = None, questions_file: str | None = None):
        self.cfg = cfg.validate()
        self.backend = backend
        self.user_questions = list(user_questions or [])
        self.questions_file = questions_file
        self.run_dir = Path(cfg.run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.state = check_run_dir(cfg, resume)
        self.task = get_task(cfg.task, **cfg.task_kwargs)
        self.fmt = cfg.model.make_format()
        self.sizes = cfg.sizes(self.task)
        self.rng = random.Random(cfg.seed)
        self.completed = 0
        self.history: list[dict] = []
        self.initial_accuracy: dict[int, float] = {}
        if self.state:
            self.completed = self.state["completed_iterations"]
            self.rng.setstate(rng_state_from_json(self.state["rng_state"]))
            self.history = read_history(self.run_dir, self.completed)
            self.initial_accuracy = {int(k): v for k, v in self.state.get("initial_accuracy", {}).items()}
        self.heldout = heldout_questions(self.task, self.sizes, cfg.eval_questions_per_size, cfg.seed)
        self.setup_seconds: dict = {}
        self.next_expansion: asyncio.Future[Expansion] | None = None  # mode async: the next iteration's trees
        self.next_rng_state = None  # mode async: the question RNG before the next iteration drew
        self.progress_info = {"phase": "created", "iteration": self.completed, "done": 0, "total": 0}
        self.storage = RunStorage(cfg.storage, cfg.storage_timeout_s) if cfg.storage else None
        # Pushes before each record: its files copied so far, failed pushes, the last push's time.
        self.storage_figures = {"storage_files_pushed": 0, "storage_push_failures": 0, "storage_push_seconds": 0.0}

    def set_phase(self, phase: str, total: int = 0) -> None:
        """What the run is doing now (`total`: the work items of the phase), for progress bars."""
        self.progress_info.update(phase=phase, done=0, total=total, since=time.time())

    def progress(self) -> dict:
        return dict(self.progress_info, completed=self.completed)

    async def start(self) -> dict:
        """Start the backend and measure the model before training (a fresh run)."""
        (self.run_dir / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=1))
        t0 = time.time()
        self.set_phase("starting")
        self.setup_seconds = await self.backend.start(self.completed, self.state["checkpoint"] if self.state else None,
                                                      self.set_phase)
        if not self.state:  # the baseline the learning curve starts from
            self.set_phase("evaluating the initial model")
            self.initial_accuracy = await evaluate(self.task, self.backend.engine, self.heldout, self.fmt)
        self.setup_seconds["total"] = round(time.time() - t0, 2)
        self.set_phase("ready")
        return {"completed_iterations": self.completed, "setup_seconds": self.setup_seconds,
                "initial_accuracy": self.initial_accuracy}

    async def run_iteration(self, it: int) -> dict:
        if it != self.completed:
            raise ValueError(f"iteration {it} requested, but {self.completed} iterations are complete")
        phases: dict[str, float] = {}
        t_start = t = time.time()

        def lap(name):
            nonlocal t
            now = time.time()
            phases[name] = round(now - t, 3)
            t = now

        check_free_space(self.run_dir, self.cfg.records.min_free_mb)
        self.next_rng_state = None
        drawn_ahead = self.next_expansion is not None
        if not drawn_ahead:                                                               # 1. questions
            self.set_phase("drawing questions")                                           # 2. amplify, distil
            expansion = await self.plan_and_expand(it, self.expert_allowance())
        else:  # mode async: started while the last round trained
            self.set_phase("expanding trees (started during the last round)")
            expansion, self.next_expansion = await self.next_expansion, None
        trees, dispatch = expansion.trees, expansion.dispatch
        lap("expand")  # mode async: only what was left of the expansion when the last round ended
        phases["questions"] = expansion.questions_seconds
        if not drawn_ahead:
            phases["expand"] = round(phases["expand"] - expansion.questions_seconds, 3)

        buffer_size = await self.backend.record(it, [(t.job_id, t.tree_id) for t in trees])  # 3. record
        # Round `it` trains weights version `it`: examples more than max_staleness behind go.
        dropped = 0 if self.cfg.max_staleness is None else \
            await self.backend.drop_stale(it - self.cfg.max_staleness)
        lap("record_trees")

        if self.cfg.mode == "async" and it + 1 < self.cfg.iterations:
            # The next iteration's trees expand on the weights the replicas hold while the learner
            # trains; their questions are drawn from the RNG state saved with this iteration.
            self.next_rng_state = self.rng.getstate()
            allowance = self.expert_allowance(spent=expert_requests_of(trees))
            self.next_expansion = asyncio.ensure_future(self.plan_and_expand(it + 1, allowance, ahead=True))

        ahead = self.next_expansion is not None
        self.set_phase("training (the next trees expanding)" if ahead else "training")    # 4. train
        try:
            trained = await self.backend.train(it)
        except BaseException:
            await self.cancel_next_expansion()
            raise
        lap("train")

        self.set_phase("swapping weights")                                                # 5. swap
        swapped = await self.backend.swap(trained)
        lap("swap")

        self.set_phase("evaluating")                                                      # 6. evaluate
        accuracy = await evaluate(self.task, self.backend.engine, self.heldout, self.fmt)
        lap("eval")

        self.set_phase("recording")                                                       # 7. metrics
        m = self.metrics(it, trees, trained, swapped, accuracy, buffer_size, dispatch, phases)
        m.update(mode=self.cfg.mode, examples_dropped_stale=dropped, expansion_seconds=expansion.seconds,
                 nodes_per_second=round(m["nodes"] / expansion.seconds, 2) if expansion.seconds else 0.0,
                 oldest_weight_version_trained=trained.stats.oldest_weight_version,
                 sizes_drawn=list(self.sizes_to_draw(it)))
        m["largest_size_drawn"] = m["sizes_drawn"][-1]  # a number, for the trackers
        m.update(await self.backend.figures())
        m["best_iteration"] = await self.keep_if_best(it, accuracy, trained)
        if self.storage is not None:
            m.update(self.storage_figures)
        m["run_dir_mb"] = round(directory_bytes(self.run_dir) / 2**20, 2)
        m["disk_free_mb"] = round(shutil.disk_usage(self.run_dir).free / 2**20, 1)
        self.history.append(m)
        self.backend.publish(m, trees, phases)
        self.plot()
        lap("record")
        m["phase_seconds"] = phases
        m["seconds"] = round(time.time() - t_start, 2)
        # The record first, then the state that counts the iteration done: a crash between the
        # two re-runs the iteration, whose new line wins (read_history), and loses nothing.
        append_metrics(self.run_dir, m)
        self.completed = it + 1
        self.save_state(trained)
        await self.push_to_storage()
        if m.get("stop"):
            await self.cancel_next_expansion()
        self.set_phase("iteration done")
        return m

    async def plan_and_expand(self, it: int, expert_allowance: int | None, ahead: bool = False) -> Expansion:
        """Steps 1 and 2: the iteration's questions, and their trees. `ahead` (mode async): while
        the last round trains, which is the phase progress shows."""
        t0 = time.time()
        jobs, rejected = await self.plan(it)
        t1 = time.time()
        if not ahead:
            self.set_phase("expanding trees", len(jobs))
        await self.backend.set_expert_budget(expert_allowance)
        trees, dispatch = await self.backend.expand(jobs, (lambda n: None) if ahead else self._done)
        await self.backend.stage(rejected)
        dispatch.rejected = len(rejected)
        return Expansion(trees + [r.summary() for r in rejected], dispatch, round(t1 - t0, 3),
                         round(time.time() - t1, 3))

    async def close(self) -> None:
        await self.cancel_next_expansion()

    async def cancel_next_expansion(self) -> None:
        """A run that stops (an error, a stop asked for) stops the expansion started ahead."""
        if self.next_expansion is not None:
            self.next_expansion.cancel()
            await asyncio.gather(self.next_expansion, return_exceptions=True)
            self.next_expansion = None

    def sizes_to_draw(self, it: int) -> tuple[int, ...]:
        """Iteration `it`'s training sizes: the curriculum's, judged on the iterations before `it`
        that a straight run has evaluated when it plans `it` - all of them in mode sync; in mode
        async the plan is made while `it - 1` trains, so not that one. By number, so a resumed
        run draws what the straight run did, and the metrics read the same sizes the plan drew."""
        judged = self.history[:it] if self.cfg.mode == "sync" else self.history[:max(0, it - 1)]
        return curriculum_sizes(self.sizes, [m["accuracy_by_size"] for m in judged], self.cfg.curriculum)

    async def plan(self, it: int) -> tuple[list[ExpandJob], list[ExpandResult]]:
        """The iteration's jobs, and the failure records of malformed questions-file entries."""
        cfg = self.cfg
        sizes = self.sizes_to_draw(it)
        questions = await draw_questions(self.task, self.backend.engine, cfg, cfg.amplify_trees_per_iteration,
                                         self.rng, adversarial=it > 0, sizes=sizes, fmt=self.fmt)
        seeds = [self.rng.randrange(2**31) for _ in questions]
        distill_qs = [self.task.generate(self.rng.choice(sizes), self.rng)
                      for _ in range(cfg.distill_trees_per_iteration)]
        # Round k publishes weights version k + 1, so `completed` is the version now served (in
        # mode async the next iteration's jobs are made while the round that follows it trains).
        published = self.completed
        jobs = [ExpandJob(job_id=f"a{i}", question=q, mode="amplify", iteration=it, source=src, seed=s,
                          min_weight_version=published)
                for i, ((q, src), s) in enumerate(zip(questions, seeds))]
        jobs += [ExpandJob(job_id=f"d{i}", question=q, mode="distill", iteration=it, min_weight_version=published)
                 for i, q in enumerate(distill_qs)]
        where = Path(self.questions_file).name if self.questions_file else "questions file"
        extra, rejected = user_jobs(self.task, cfg, self.user_questions, it, where, published)
        return jobs + extra, rejected

    async def keep_if_best(self, it: int, accuracy: dict[int, float], trained: TrainResult) -> int | None:
        """Keep this iteration's checkpoint as the run's best/ if its held-out accuracy is the
        best so far (ties: the newer); returns the best iteration (None: none kept yet). A checkpoint in storage is
        copied here first; a copy that fails leaves best/ as it was, with a warning."""
        best = read_best(self.run_dir)
        if best is not None and best["iteration"] < it and best_score(best["accuracy_by_size"]) > best_score(accuracy):
            return best["iteration"]
        if trained.checkpoint_path:
            try:  # best/ holds links to the files of a fetched copy, which then goes
                async with checkpoint_on_disk(trained.checkpoint_path, self.run_dir, self.cfg.storage_timeout_s) as local:
                    keep_best(self.run_dir, local, {
                        "iteration": it, "weight_version": trained.weight_version, "accuracy_by_size": accuracy,
                        "checkpoint": trained.checkpoint_path, "task": self.cfg.task,
                        "task_kwargs": self.cfg.task_kwargs, "prompt_format": self.cfg.model.prompt_format})
            except StorageError as exc:
                log.warning("best/ not updated to iteration %d: %s", it, exc)
                return best["iteration"] if best else None
        return it

    def _done(self, n: int) -> None:
        self.progress_info["done"] += n

    def expert_allowance(self, spent: int = 0) -> int | None:
        """LM expert calls this iteration may make: the per-iteration cap, within what is left
        of the run's (None: no cap, or not an LM expert). `spent`: calls of trees not yet in
        the history (mode async plans an iteration before the last one's record is written)."""
        lm = self.cfg.lm_expert
        if self.cfg.expert != "lm":
            return None
        left = None if lm.max_calls_per_run is None else \
            max(0, lm.max_calls_per_run - self.expert_requests() - spent)
        caps = [c for c in (lm.max_calls_per_iteration, left) if c is not None]
        return min(caps) if caps else None

    def expert_requests(self) -> int:
        return sum(m.get("expert_requests", 0) for m in self.history)

    def metrics(self, it: int, trees: list[TreeSummary], trained: TrainResult,
                swapped: dict[str, int], accuracy: dict[int, float], buffer_size: int, dispatch: DispatchStats,
                phases: dict[str, float]) -> dict:
        s = trained.stats
        m = tree_metrics(trees)
        m.update(
            iteration=it, weight_version=trained.weight_version, examples=sum(t.examples for t in trees),
            buffer=buffer_size, model_loss=s.model_loss, adversary_loss=s.adversary_loss,
            model_steps=s.model_steps, adversary_steps=s.adversary_steps, learner_ranks_in_sync=trained.ranks_in_sync,
            accuracy_by_size=accuracy, swapped=swapped, replica_versions=swapped, jobs=asdict(dispatch),
            learner_round={"model_train_seconds": s.model_train_seconds, "train_seconds": s.train_seconds,
                           "checkpoint_seconds": s.checkpoint_seconds, "round_seconds": s.round_seconds},
            checkpoint=trained.checkpoint_path, expand_seconds=phases["expand"], setup_seconds=self.setup_seconds)
        if trained.broadcast is not None:
            m["weight_broadcast"] = asdict(trained.broadcast)
        if s.objective_stats:
            m[self.cfg.objective] = s.objective_stats
        if self.cfg.expert == "lm":
            from ida_ray.lm_expert import expert_figures

            m.update(expert_figures(trees, self.cfg.lm_expert))
            lm = self.cfg.lm_expert
            spent = lm.max_calls_per_run is not None and \
                self.expert_requests() + m["expert_requests"] >= lm.max_calls_per_run
            if spent and lm.on_budget == "stop":
                m["stop"] = f"the expert's budget of {lm.max_calls_per_run} calls is spent (lm_expert.on_budget stop)"
        return m

    async def push_to_storage(self) -> None:
        """The run directory's new and changed files to cfg.storage, state.json last. A push
        that fails or passes storage_timeout_s is a warning, not the run's end: the next
        iteration's push copies whatever is still missing."""
        if self.storage is None:
            return
        t0 = time.time()
        try:
            files = await asyncio.to_thread(bounded, lambda: self.storage.push_run_dir(self.run_dir),
                                            self.cfg.storage_timeout_s, f"copying the run to {self.cfg.storage}")
        except StorageError as exc:
            self.storage_figures["storage_push_failures"] += 1
            log.warning("%s; the next iteration's push retries", exc)
            return
        self.storage_figures["storage_files_pushed"] += files
        self.storage_figures["storage_push_seconds"] = round(time.time() - t0, 3)

    def plot(self) -> None:
        from ida_ray.plots import plot_history

        plot_history(self.history, self.run_dir / PLOT_FILE, title=f"ida-ray: {self.cfg.task} ({self.run_dir.name})")

    def save_state(self, trained: TrainResult) -> None:
        # Mode async has drawn the next iteration's questions already: a resume redraws them.
        rng_state = rng_state_to_json(self.next_rng_state or self.rng.getstate())
        # The question RNG after each of the last few iterations: resuming from an earlier
        # checkpoint (the last one unusable) draws what that iteration's successor drew.
        previous = (self.state or {}).get("rng_states", {})
        self.state = {**(self.state or {}), "rng_states": {
            **{k: v for k, v in previous.items() if int(k) >= self.completed - 3}, str(self.completed - 1): rng_state}}
        write_json_atomic(self.run_dir / STATE_FILE, {
            "completed_iterations": self.completed, "checkpoint": trained.checkpoint_path,
            "rng_state": rng_state, "rng_states": self.state["rng_states"], "config": self.cfg.to_dict(),
            "initial_accuracy": self.initial_accuracy, "questions_file": self.questions_file,
            "weight_version": trained.weight_version, "time": time.time()})


def directory_bytes(path: Path) -> int:
    """Bytes under path, each file once (best/ hard-links its checkpoint's files)."""
    total, seen = 0, set()
    for root, _, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except FileNotFoundError:  # removed while we walked (pruned checkpoints, renamed files)
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def check_free_space(run_dir: Path, min_free_mb: int) -> None:
    free = shutil.disk_usage(run_dir).free
    if free < min_free_mb * 2**20:
        raise DiskFull(f"{free / 2**20:.0f} MB free on the filesystem of {run_dir}, less than records.min_free_mb "
                       f"({min_free_mb} MB): free some space (or lower records.min_free_mb, or keep fewer tree records "
                       f"with records.keep_tree_iterations) and resume")


def format_accuracy(acc: dict) -> str:
    return " ".join(f"{s}:{a:.2f}" for s, a in sorted(((int(k), v) for k, v in acc.items())))


def format_honest(h: dict) -> str:
    """The honest objective's round figures (objective "honest")."""
    f = lambda v: "n/a" if v is None or v != v else f"{v:.2f}"  # noqa: E731
    return (f"honest: C {f(h.get('disagreement_c'))} on {h.get('trusted_examples')} trusted answers | where the "
            f"simple labeller errs ({h.get('questions')} held-out): intended head right "
            f"{f(h.get('intended_right_where_simple_errs'))}, instrumental copies simple "
            f"{f(h.get('instrumental_copies_simple_where_simple_errs'))}")


def iteration_line(m: dict) -> str:
    """One iteration as the console shows it (while a curriculum holds back sizes, the ones drawn)."""
    drawn = m.get("sizes_drawn")
    return (f"iter {m['iteration']}: acc {format_accuracy(m['accuracy_by_size'])}"
            + (f" (drew sizes {drawn[0]}-{drawn[-1]})" if drawn and len(drawn) < len(m['accuracy_by_size']) else "")
            + " | expert calls/tree "
            f"{m['expert_calls_per_tree']:.2f} | loss {m['model_loss']:.3f} adv {m['adversary_loss']:.3f} | "
            f"{m['seconds']:.0f}s ({', '.join(f'{k} {v:.0f}' for k, v in m['phase_seconds'].items())})"
            + (f"\n  {format_honest(m['honest'])}" if m.get("honest") else "")
            + (f"\n  expert: {m['expert_requests']} requests, {m['expert_cache_hits']} cache hits, "
               f"{m['expert_tokens_per_tree']:.0f} tokens/tree, cost {m['expert_cost']:g}"
               if "expert_requests" in m else "")
            + (f"\n  stopping: {m['stop']}" if m.get("stop") else ""))
