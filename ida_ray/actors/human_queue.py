"""A person as the expert H of a distributed run: one `HumanQueue` (ida_ray/experts.py)
in a named async Ray actor, shared by every expander and the web page the driver serves.

    queue = start_human_queue(timeout_s=1800)                  # the driver, once per run
    expert = HumanExpert(task, HumanQueueClient(queue))        # in an expander: H for amplify_tree
    backend = RayHumanBackend(queue)                           # the /human page's view of it

The expanders' trees await `ask` on the actor, which holds each request until the person's
reply, checked by the task's parser, arrives through `submit` (a malformed reply stays pending,
its error shown on the page), or until the request's timeout: then the client raises
`HumanTimeout`, an ExpertFailure, which the tree records like any other expert failure.
`ida_ray` itself stays free of Ray: the client offers the same `ask` as HumanQueue, so
`HumanExpert` works over either unchanged.
"""
from __future__ import annotations

import asyncio
import os
import time

import ray

from ida_ray.actors import HEAD_NODE
from ida_ray.experts import HumanQueue, HumanTimeout, UnknownRequest
from ida_ray.tasks.base import Task

HUMAN_QUEUE_NAME = "ida-human-queue"


class HumanQueueActor:
    """The run's HumanQueue. Timeouts come back as values, not exceptions, so the tree records
    the queue's own message rather than a Ray traceback."""

    def __init__(self, timeout_s: float):
        self.queue = HumanQueue(timeout_s)
        self.started = time.time()

    async def ask(self, task: Task, kind: str, question: str, sub=None, timeout_s: float | None = None) -> dict:
        try:
            return {"value": await self.queue.ask(task, kind, question, sub, timeout_s)}
        except HumanTimeout as exc:
            return {"timeout": str(exc)}

    def pending(self) -> dict:
        return {"requests": self.queue.pending(), "answered": self.queue.answered, "timed_out": self.queue.timed_out}

    def submit(self, request_id: str, text: str) -> dict:
        """As HumanQueue.submit; an id that is not pending gives {"unknown": message}."""
        try:
            return self.queue.submit(request_id, text)
        except UnknownRequest as exc:
            return {"unknown": str(exc)}

    def health(self) -> dict:
        return {"pid": os.getpid(), "pending": len(self.queue.pending()), "answered": self.queue.answered,
                "timed_out": self.queue.timed_out, "timeout_s": self.queue.timeout_s}


def start_human_queue(timeout_s: float, name: str = HUMAN_QUEUE_NAME):
    """The run's queue actor: created, or the one of that name already running in the namespace.
    No CPU reserved: it only waits. Not restarted if it dies: the requests it held are gone, and
    the trees waiting on them fail (ExpertFailure) rather than wait for answers that cannot come."""
    cls = ray.remote(num_cpus=0, max_concurrency=10_000)(HumanQueueActor)
    handle = cls.options(name=name, get_if_exists=True, resources={HEAD_NODE: 0.001}).remote(timeout_s)
    ray.get(handle.health.remote())
    return handle


class HumanQueueClient:
    """HumanQueue's `ask`, forwarded to the actor: `HumanExpert(task, HumanQueueClient(handle))`."""

    def __init__(self, handle):
        self.handle = handle

    async def ask(self, task: Task, kind: str, question: str, sub=None, timeout_s: float | None = None):
        ref = self.handle.ask.remote(task, kind, question, sub, timeout_s)
        try:
            out = await ref
        except asyncio.CancelledError:  # the tree was cancelled: take its request off the page
            ray.cancel(ref)
            raise
        except ray.exceptions.RayActorError as exc:
            raise HumanTimeout(f"the human queue is gone ({type(exc).__name__}); no answer to {kind} of "
                               f"{question!r}") from None
        if "timeout" in out:
            raise HumanTimeout(out["timeout"])
        return out["value"]


class RayHumanBackend:
    """The /human page over the run's queue actor (see `ida_ray.viewer.app.HumanBackend`).

    Trees are the training run's own: the page answers their requests but starts none.
    `status` is a callable giving a line about the run (the driver's progress), or None."""

    can_start = False

    def __init__(self, handle, status=None, timeout_s: float = 30.0):
        self.handle, self._status, self.timeout_s = handle, status, timeout_s

    def requests(self) -> dict:
        return ray.get(self.handle.pending.remote(), timeout=self.timeout_s)

    def submit(self, request_id: str, text: str) -> dict:
        out = ray.get(self.handle.submit.remote(request_id, text), timeout=self.timeout_s)
        if "unknown" in out:
            raise UnknownRequest(out["unknown"])
        return out

    def list(self) -> list[dict]:
        return []

    def status(self) -> str | None:
        return self._status() if self._status is not None else None

    def start(self, question: str) -> dict:
        raise NotImplementedError("trees of a training run are started by the run, not the page")

    async def close(self) -> None:
        pass
