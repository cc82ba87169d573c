"""Tree jobs spread over TreeExpander actors with nothing lost and nothing counted twice.

    summaries, failed, stats = await dispatch_jobs(expanders, jobs, task, chunk_size=8)

Jobs go out in chunks, chunk i to expander i mod n. An expander stages a chunk's trees and
examples in the replay buffer itself (TreeExpander.expand_and_stage) and returns their
summaries all at once, so a chunk is either wholly answered or wholly lost: when its expander dies (Ray
raises RayActorError: ActorDiedError, or ActorUnavailableError while it restarts), the whole
chunk is sent again, to the next expander in turn (which may be the same one once Ray has
restarted it). Calls to an actor that Ray is restarting fail at once rather than wait, so
before a re-send the expander is probed with back-off until it answers (up to
`restart_timeout_s`); one that is dead for good (ActorDiedError) is passed over. Trees are
seeded per job, so a re-issued tree is the tree the first attempt would have built. After
`max_attempts` tries, or when an expander raises inside `expand` (a bug or an invalid job:
retrying would fail the same way), each job of the chunk gets a failed tree record instead,
with the error's kind, so the caller still gets exactly one record per job: these come back
whole (`failed`), for the caller to stage, with their summaries among the others. Summaries
are checked by job_id: a duplicate or a missing id is a bug and raises. A chunk staged by an
expander that died before it answered is staged again by the next; the buffer holds every
copy, and the commit takes the one whose summary (tree id) the caller got (ReplayStore).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from ray.exceptions import ActorDiedError, RayActorError, RayTaskError

from ida_ray.errors import IDAError
from ida_ray.expansion import failure_result
from ida_ray.messages import DispatchStats, ExpandJob, ExpandResult, TreeSummary
from ida_ray.tasks.base import Task
from ida_ray.tree import error_record

log = logging.getLogger(__name__)


class ExpanderLost(IDAError):
    """A chunk of jobs found no live expander after every attempt."""

    kind = "expander_lost"


class ExpanderError(IDAError):
    """An expander raised inside `expand` (not a tree's own, recorded, failure)."""

    kind = "expander_error"


async def expander_reachable(handle, timeout_s: float) -> bool:
    """Whether the expander answers within timeout_s (it may be restarting); False at once if
    it is dead for good."""
    loop = asyncio.get_running_loop()
    deadline, delay = loop.time() + timeout_s, 0.2
    while True:
        try:
            await asyncio.wait_for(handle.health.remote(), max(0.1, deadline - loop.time()))
            return True
        except ActorDiedError:
            return False
        except (TimeoutError, RayActorError):
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(delay)
            delay = min(2 * delay, 2.0)


async def _run_chunk(expanders: list, index: int, chunk: list[ExpandJob], task: Task, max_attempts: int,
                     stats: DispatchStats, on_reissue: Callable[[object], Awaitable] | None,
                     restart_timeout_s: float) -> tuple[list[TreeSummary], list[ExpandResult]]:
    ids = [j.job_id for j in chunk]
    for attempt in range(max_attempts):
        handle = expanders[(index + attempt) % len(expanders)]
        if attempt:
            if not await expander_reachable(handle, restart_timeout_s):
                last = ExpanderLost(f"no expander answered after {attempt + 1} tries (the last did not come back "
                                    f"within {restart_timeout_s:.0f}s)")
                continue
            stats.reissued_chunks += 1
            stats.reissued_jobs += len(chunk)
            if on_reissue is not None:
                try:  # e.g. tell a restarted expander the latest weights; best effort
                    await on_reissue(handle)
                except RayActorError:
                    pass
        try:
            summaries = await handle.expand_and_stage.remote(chunk)
        except RayActorError as exc:
            log.warning("chunk %d (%d jobs): expander died (%s); %s", index, len(chunk), type(exc).__name__,
                        "re-issuing" if attempt + 1 < max_attempts else "giving up")
            last = ExpanderLost(f"no expander answered after {attempt + 1} tries: {type(exc).__name__}: "
                                f"{str(exc)[:200]}")
            continue
        except RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            last = cause if isinstance(cause, IDAError) else ExpanderError(f"{type(cause or exc).__name__}: {cause or exc}")
            break
        got = [s.job_id for s in summaries]
        if got != ids:
            raise RuntimeError(f"expander answered jobs {got[:5]}... for {ids[:5]}...: job bookkeeping is broken")
        return summaries, []
    stats.failed_chunks += 1
    stats.lost_jobs += len(chunk)
    err = error_record(last)
    failed = [failure_result(task, j, err) for j in chunk]
    return [r.summary() for r in failed], failed


async def dispatch_jobs(expanders: list, jobs: list[ExpandJob], task: Task, *, chunk_size: int,
                        max_attempts: int | None = None, on_chunk_done: Callable[[int], None] | None = None,
                        on_reissue: Callable[[object], Awaitable] | None = None,
                        restart_timeout_s: float = 300.0) -> tuple[list[TreeSummary], list[ExpandResult], DispatchStats]:
    """Expand every job; returns one summary per job, in job order, the failure records of jobs
    no expander answered (not staged: the caller stages them), and what it took."""
    if not expanders:
        raise ValueError("dispatch_jobs needs at least one expander")
    ids = [j.job_id for j in jobs]
    if len(set(ids)) != len(ids):
        raise ValueError("job ids must be unique")
    max_attempts = max_attempts or len(expanders) + 2
    stats = DispatchStats(submitted=len(jobs))
    chunks = [jobs[i:i + chunk_size] for i in range(0, len(jobs), max(1, chunk_size))]
    stats.chunks = len(chunks)

    async def run(i: int, chunk: list[ExpandJob]) -> tuple[list[TreeSummary], list[ExpandResult]]:
        out = await _run_chunk(expanders, i, chunk, task, max_attempts, stats, on_reissue, restart_timeout_s)
        if on_chunk_done is not None:
            on_chunk_done(len(chunk))
        return out

    parts = await asyncio.gather(*(run(i, c) for i, c in enumerate(chunks)))
    summaries = [s for part, _ in parts for s in part]
    if [s.job_id for s in summaries] != ids:
        raise RuntimeError("dispatch lost or duplicated a job")  # cannot happen: each chunk answers its own ids
    return summaries, [r for _, failed in parts for r in failed], stats
