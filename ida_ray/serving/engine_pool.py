"""`ReplicaPool`: the Engine interface over a set of replica actors.

The algorithm core makes one small call per tree node; sent one by one, each would cost an
actor round trip. The pool gathers the calls of one kind made in the same turn of the event
loop into one batch (up to `max_batch` items) and sends it to the least-loaded replica that
is up; the replica's engine batches further across batches (vLLM continuous batching).

Back-pressure: at most `max_in_flight_per_replica` items are outstanding on a replica;
beyond that, batches wait for capacity instead of piling up in actor queues.

Failures: a batch that fails because its replica died or is unreachable (RayActorError and
its subclasses ActorDiedError, ActorUnavailableError) is sent again to another replica, up to
`retries` times, and the replica is taken out of rotation. A background probe checks it with
back-off; when it answers again (Ray restarted it), it gets the latest weights if it is
behind and goes back into rotation. Every call carries the newest version this pool has
swapped in or been told of (`min_version`); a replica behind it (restarted on its creation
weights) refuses with StaleWeights, and is taken out and resynced the same way, so no answer
ever comes from weights older than the run has published. A batch that fails inside the replica (bad input, e.g. a
prompt over the engine's length limit) is split until the failing items are isolated, so one
bad request fails only its own tree. Every failure reaches the caller as an IDAError
(EngineFailure, or the replica's own IDAError kind), which the tree code records.

`swap_weights(payload, version)` puts the payload in the object store once, loads it into
every replica that is up, and checks that each reports the new version.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import ray
from ray.exceptions import ObjectLostError, RayActorError, RayTaskError

from ida_ray.engine import Engine, Generation
from ida_ray.errors import EngineFailure, IDAError, StaleWeights

log = logging.getLogger(__name__)

KINDS = ("generate", "logprob", "adversary")


@dataclass
class _Replica:
    handle: object
    name: str
    version: int = 0
    in_flight: int = 0  # items sent and not yet answered
    up: bool = True
    failures: int = 0
    batches: int = 0
    probe: asyncio.Task | None = field(default=None, repr=False)


class ReplicaPool(Engine):
    def __init__(self, replicas: list, *, max_batch: int = 256, max_in_flight_per_replica: int = 1024,
                 retries: int = 3, unavailable_timeout_s: float = 300.0, probe_max_interval_s: float = 10.0,
                 probe_give_up_s: float = 1800.0):
        if not replicas:
            raise ValueError("ReplicaPool needs at least one replica handle")
        self._replicas = [_Replica(h, f"replica[{i}]") for i, h in enumerate(replicas)]
        self.max_batch = max_batch
        self.max_in_flight_per_replica = max_in_flight_per_replica
        self.retries = retries
        self.unavailable_timeout_s = unavailable_timeout_s
        self.probe_max_interval_s = probe_max_interval_s
        self.probe_give_up_s = probe_give_up_s
        self._pending: dict[str, list[tuple[tuple, asyncio.Future]]] = {k: [] for k in KINDS}
        self._flush_scheduled: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        self._changed: asyncio.Event | None = None  # set when capacity frees or a replica comes up
        self._latest: tuple[object, int] | None = None  # (payload ref, version) of the last swap
        self._target_version = 0
        self.stats = {"batches": 0, "items": 0, "resent": 0, "split": 0, "failed_items": 0, "resyncs": 0,
                      "refused_stale": 0, "batch_sizes": []}

    # -- Engine interface ----------------------------------------------------------
    @property
    def weight_version(self) -> int:
        up = [r for r in self._replicas if r.up] or self._replicas
        return min(r.version for r in up)

    async def generate(self, prompts) -> list[Generation]:
        return await self._submit("generate", [(p,) for p in prompts])

    async def logprob(self, prompts, completions) -> list[float]:
        return await self._submit("logprob", list(zip(prompts, completions, strict=True)))

    async def adversary(self, prompts, completions) -> list[float]:
        return await self._submit("adversary", list(zip(prompts, completions, strict=True)))

    # -- batching ------------------------------------------------------------------
    async def _submit(self, kind: str, items: list[tuple]) -> list:
        if not items:
            return []
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        self._pending[kind].extend(zip(items, futures))
        if kind not in self._flush_scheduled:
            # Flush after the callbacks already queued have run: the other trees woken by the
            # same results add their requests to this batch first.
            self._flush_scheduled.add(kind)
            loop.call_soon(self._flush, kind)
        return list(await asyncio.gather(*futures))

    def _flush(self, kind: str) -> None:
        self._flush_scheduled.discard(kind)
        pending, self._pending[kind] = self._pending[kind], []
        for i in range(0, len(pending), self.max_batch):
            task = asyncio.ensure_future(self._dispatch(kind, pending[i: i + self.max_batch]))
            self._tasks.add(task)  # the loop holds tasks weakly: keep each until it is done
            task.add_done_callback(self._tasks.discard)

    async def _dispatch(self, kind: str, batch: list[tuple[tuple, asyncio.Future]], attempt: int = 0) -> None:
        try:
            rep = await self._acquire(len(batch))
        except EngineFailure as exc:
            self._fail(batch, exc)
            return
        columns = [list(col) for col in zip(*(item for item, _ in batch))]
        self.stats["batches"] += 1
        self.stats["items"] += len(batch)
        self.stats["batch_sizes"].append(len(batch))
        del self.stats["batch_sizes"][:-1000]
        rep.batches += 1
        try:
            results = await getattr(rep.handle, kind).remote(*columns, min_version=self._target_version)
        except RayActorError as exc:
            self._release(rep, len(batch))
            self._mark_down(rep, exc)
            if attempt >= self.retries:
                self._fail(batch, EngineFailure(f"{kind}: no replica answered after {attempt + 1} tries: {exc}"))
            else:
                self.stats["resent"] += 1
                await self._dispatch(kind, batch, attempt + 1)
            return
        except RayTaskError as exc:
            self._release(rep, len(batch))
            if isinstance(getattr(exc, "cause", None), StaleWeights):
                # Restarted behind our back: out of rotation until _probe resyncs it, and the
                # batch goes to a replica that holds the weights (not a failed attempt).
                self.stats["refused_stale"] += 1
                self._mark_down(rep, exc.cause)
                await self._dispatch(kind, batch, attempt)
                return
            await self._isolate(kind, batch, exc, attempt)
            return
        except Exception as exc:  # noqa: BLE001 - a transport error must reach the waiters
            self._release(rep, len(batch))
            self._fail(batch, EngineFailure(f"{kind} on {rep.name}: {type(exc).__name__}: {exc}"))
            return
        self._release(rep, len(batch))
        if len(results) != len(batch):  # never leave a waiter without an answer
            self._fail(batch, EngineFailure(f"{kind} on {rep.name}: {len(results)} results for {len(batch)} items"))
            return
        if kind == "generate":
            self._note_versions(rep, results)
        for (_, fut), res in zip(batch, results):
            if not fut.done():
                fut.set_result(res)

    async def _isolate(self, kind, batch, exc: RayTaskError, attempt: int) -> None:
        """An error raised inside the replica: split the batch so only failing items fail."""
        if len(batch) == 1:
            cause = getattr(exc, "cause", None)
            err = cause if isinstance(cause, IDAError) else EngineFailure(f"{kind} failed in the replica: {cause or exc}")
            self._fail(batch, err)
            return
        self.stats["split"] += 1
        half = len(batch) // 2
        await asyncio.gather(self._dispatch(kind, batch[:half], attempt), self._dispatch(kind, batch[half:], attempt))

    def _fail(self, batch, exc: BaseException) -> None:
        self.stats["failed_items"] += len(batch)
        for _, fut in batch:
            if not fut.done():
                fut.set_exception(exc)

    # -- replica selection and capacity --------------------------------------------
    def _wake(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    async def _acquire(self, n: int) -> _Replica:
        """The up replica with the fewest items in flight that has room for n more (a replica
        with nothing in flight always has room); waits while none has."""
        deadline = time.monotonic() + self.unavailable_timeout_s
        while True:
            up = [r for r in self._replicas if r.up]
            room = [r for r in up if r.in_flight == 0 or r.in_flight + n <= self.max_in_flight_per_replica]
            if room:
                # Ties go to the replica that has had fewer batches: idle replicas take turns.
                rep = min(room, key=lambda r: (r.in_flight, r.batches))
                rep.in_flight += n
                return rep
            remaining = deadline - time.monotonic()
            if not up and remaining <= 0:
                raise EngineFailure(f"no replica up for {self.unavailable_timeout_s:.0f}s "
                                    f"({len(self._replicas)} in the pool)")
            wake = self._wake()
            wake.clear()  # every waiter is woken by the next set() and checks again
            try:
                await asyncio.wait_for(wake.wait(), timeout=None if up else remaining)
            except TimeoutError:
                pass

    def _release(self, rep: _Replica, n: int) -> None:
        rep.in_flight -= n
        self._wake().set()

    # -- failures and recovery -----------------------------------------------------
    def _mark_down(self, rep: _Replica, exc: BaseException) -> None:
        rep.failures += 1
        if rep.up:
            log.warning("%s is down (%s: %s); retrying its work elsewhere", rep.name, type(exc).__name__,
                        str(exc)[:200])
        rep.up = False
        if rep.probe is None or rep.probe.done():
            rep.probe = asyncio.ensure_future(self._probe(rep))

    def _note_versions(self, rep: _Replica, gens: list[Generation]) -> None:
        if gens:
            rep.version = min(g.weight_version for g in gens)

    async def _probe(self, rep: _Replica) -> None:
        """Bring a replica back once it answers, with the latest weights; a replica that stays
        unreachable for probe_give_up_s is left out for good (one that answers but waits for
        a payload is not: the give-up clock restarts each time it answers)."""
        delay, give_up = 0.5, time.monotonic() + self.probe_give_up_s
        while time.monotonic() < give_up:
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.probe_max_interval_s)
            try:
                version = (await rep.handle.ready.remote())["version"]
                give_up = time.monotonic() + self.probe_give_up_s
                if self._latest is not None and version < self._latest[1]:
                    # Also mid-swap (the payload is known, the target not yet raised): load it
                    # now rather than come back on weights about to be refused.
                    ref, target = self._latest
                    version = await rep.handle.load_weights.remote(ref, target)
                    self.stats["resyncs"] += 1
                if version < self._target_version:
                    # Behind, and this pool holds no payload that new yet (a restarted
                    # expander's pool learns it from remember_weights): keep waiting.
                    continue
            except (RayActorError, RayTaskError, ObjectLostError) as exc:
                # ObjectLostError: the latest payload died with its owner (a learner worker that
                # Ray Train restarted); keep probing, the next swap or remember_weights gives a
                # live one.
                log.debug("%s still down: %s", rep.name, exc)
                continue
            rep.version, rep.up = version, True
            log.warning("%s is back at weight version %d", rep.name, version)
            self._wake().set()
            return
        log.warning("%s did not come back within %.0fs; it stays out of the pool", rep.name, self.probe_give_up_s)

    # -- weights -------------------------------------------------------------------
    def require_version(self, version: int) -> None:
        """Accept answers only from weights `version` or newer from now on (an ExpandJob's
        min_weight_version: the version the run had published when it made the job)."""
        self._target_version = max(self._target_version, version)

    def remember_weights(self, payload_ref, version: int) -> None:
        """Record the latest weights swapped by someone else (e.g. the coordinator's own pool),
        so this pool can bring a restarted replica up to date."""
        if version >= self._target_version:
            self._latest = (payload_ref, version)
            self.require_version(version)

    async def swap_weights(self, payload, version: int) -> dict[str, int]:
        """Load a WeightsPayload (or an ObjectRef to one) into every replica that is up (only its
        adversary into a replica whose model holds `version` already: weight_sync "broadcast"
        sends the model straight into the replicas), and check each reports `version`. Replicas
        that are down get it when they come back. When none is up (all died under the swap: in
        mode async a swap meets replicas mid-restart) it waits for one, up to
        unavailable_timeout_s, then fails naming the version."""
        ref = payload if isinstance(payload, ray.ObjectRef) else ray.put(payload)
        # Requests ask for `version` only once it is in: until then the replicas still on the
        # old weights serve them (the swap gate orders each replica's requests and swap).
        self._latest = (ref, version)
        deadline = time.monotonic() + self.unavailable_timeout_s
        while True:
            targets = [r for r in self._replicas if r.up]
            results = await asyncio.gather(*(self._load(r, ref, version) for r in targets), return_exceptions=True)
            loaded = {}
            for rep, res in zip(targets, results):
                if isinstance(res, RayActorError):
                    self._mark_down(rep, res)
                elif isinstance(res, BaseException):
                    cause = getattr(res, "cause", None)
                    raise (cause if isinstance(cause, IDAError) else EngineFailure(f"swap on {rep.name}: {res}")) \
                        from res
                else:
                    rep.version = res
                    loaded[rep.name] = res
            if loaded:
                break
            if time.monotonic() > deadline:
                raise EngineFailure(f"swap_weights: no replica up to load version {version} within "
                                    f"{self.unavailable_timeout_s:g}s")
            await asyncio.sleep(0.5)
        reported = await asyncio.gather(*(r.handle.weight_version.remote() for r in targets if r.name in loaded))
        wrong = {name: v for name, v in zip(loaded, reported) if v != version}
        if wrong:
            raise EngineFailure(f"swap_weights: replicas report {wrong}, expected version {version}")
        self.require_version(version)
        return dict(zip(loaded, reported))

    @staticmethod
    async def _load(rep: _Replica, ref, version: int) -> int:
        """The payload into one replica: its adversary only where the model holds `version`
        already (sent by weight_sync "broadcast")."""
        held = await rep.handle.weight_version.remote()
        return await rep.handle.load_weights.remote(ref, version, held != version)

    # -- status --------------------------------------------------------------------
    def health(self) -> dict:
        sizes = self.stats["batch_sizes"]
        return {"weight_version": self.weight_version, "target_version": self._target_version,
                "replicas": [{"name": r.name, "up": r.up, "version": r.version, "in_flight": r.in_flight,
                              "failures": r.failures, "batches": r.batches} for r in self._replicas],
                **{k: v for k, v in self.stats.items() if k != "batch_sizes"},
                "mean_batch": round(sum(sizes) / len(sizes), 2) if sizes else 0.0,
                "max_batch_seen": max(sizes, default=0)}

    def close(self) -> None:
        for r in self._replicas:
            if r.probe is not None:
                r.probe.cancel()
