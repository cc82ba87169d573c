"""Amplification trees with a person as the expert, started from the browser or the command
line, each written to <run_dir>/trees/human.jsonl when it finishes so the viewer lists it.

The trees run as tasks on the web server's event loop: the engine computes in worker
threads, so the page stays responsive while the model and the person take turns.
`HumanRuns` is the /human page's backend for `ida-ray view --human` (see
`ida_ray.viewer.app.HumanBackend`); a training run's backend is `ida_ray.actors.human_queue.RayHumanBackend`.
"""
from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from pathlib import Path

from ida_ray.amplify import amplify_tree
from ida_ray.config import AmplifyConfig
from ida_ray.engine import Engine
from ida_ray.experts import HumanExpert, HumanQueue
from ida_ray.tasks.base import Task

TREE_FILE = "human.jsonl"


class HumanRuns:
    can_start = True  # the page may start trees

    def __init__(self, task: Task, engine: Engine, cfg: AmplifyConfig, queue: HumanQueue, run_dir: str | Path,
                 seed: int = 0, iteration: int = 0):
        self.task, self.engine, self.cfg, self.queue = task, engine, cfg, queue
        self.expert = HumanExpert(task, queue)
        self.tree_path = Path(run_dir) / "trees" / TREE_FILE
        self.rng = random.Random(seed)
        self.iteration = iteration
        self.runs: dict[str, dict] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._write_lock = threading.Lock()

    def start(self, question: str) -> dict:
        """Start one tree on the running event loop; MalformedQuestion for a bad question."""
        question = (question or "").strip()
        self.task.parse(question)  # raises MalformedQuestion with the task's own message
        run = {"run_id": uuid.uuid4().hex[:12], "task": self.task.name, "question": question, "state": "running",
               "tree_id": None, "answer": None, "error": None, "expert_calls": None,
               "started": time.time(), "finished": None}
        self.runs[run["run_id"]] = run
        self._tasks[run["run_id"]] = asyncio.get_running_loop().create_task(self._run(run, self.rng.randrange(2**31)))
        return dict(run)

    async def _run(self, run: dict, seed: int) -> None:
        try:
            tree = await amplify_tree(self.task, self.engine, run["question"], self.cfg, random.Random(seed),
                                      iteration=self.iteration, source="user", expert=self.expert)
            self._append(tree.to_json())
            run.update(tree_id=tree.tree_id, answer=tree.answer, expert_calls=tree.expert_calls,
                       error=tree.error, state="failed" if tree.error else "done")
        except Exception as exc:  # e.g. the engine died: the page says so instead of spinning forever
            run.update(state="failed", error={"kind": type(exc).__name__, "message": str(exc)[:500]})
        finally:
            run["finished"] = time.time()

    def _append(self, line: str) -> None:
        with self._write_lock:
            self.tree_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.tree_path, "a") as f:
                f.write(line + "\n")

    def list(self) -> list[dict]:
        return sorted((dict(r) for r in self.runs.values()), key=lambda r: -r["started"])

    # -- the page's backend (ida_ray.viewer.app.HumanBackend) --------------------------
    def requests(self) -> dict:
        q = self.queue
        return {"requests": q.pending(), "answered": q.answered, "timed_out": q.timed_out}

    def submit(self, request_id: str, text: str) -> dict:
        return self.queue.submit(request_id, text)

    def status(self) -> str | None:
        return None

    async def close(self) -> None:
        await self.cancel_all()

    async def wait(self, run_id: str) -> dict:
        await self._tasks[run_id]
        return dict(self.runs[run_id])

    async def cancel_all(self) -> None:
        for t in self._tasks.values():
            t.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

