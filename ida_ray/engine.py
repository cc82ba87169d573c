"""The engine interface the algorithm core talks to, and an in-process engine on
transformers/torch.

The core issues one small request per tree node and awaits it; many trees are in flight at
once, so an engine must batch concurrent requests. `TorchEngine` does that with a
micro-batcher per request kind; the vLLM replica (ida_ray/actors/replica.py) gets it from vLLM's
continuous batching. Every result carries the weight version that produced it.
"""
from __future__ import annotations

import asyncio
import math
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ida_ray.errors import NoAdversary
from ida_ray.tokenizer import bos_ids


@dataclass(frozen=True)
class Generation:
    text: str  # completion, end-of-sequence stripped
    logprob: float  # sum of token log-probs, end-of-sequence included when produced
    finished: bool  # False when max_new_tokens was hit before end-of-sequence
    weight_version: int

    @property
    def prob(self) -> float:
        return math.exp(self.logprob)


class Engine(ABC):
    """Batched model and adversary calls. All methods take lists so callers can batch too."""

    @abstractmethod
    async def generate(self, prompts: Sequence[str]) -> list[Generation]:
        """Greedy completions with their log-probs."""

    @abstractmethod
    async def logprob(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """log M(completion + EOS | prompt) for each pair."""

    @abstractmethod
    async def adversary(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """Adv(prompt, completion): the predicted log-likelihood the amplified answer will have."""

    @property
    @abstractmethod
    def weight_version(self) -> int: ...


class MicroBatcher:
    """Collects single requests made concurrently and runs them as one batch.

    A flush waits for the event loop to go round once (so every coroutine that is ready
    enqueues its request) and then runs `fn` on up to `max_batch` items in a worker thread,
    so requests that arrive while a batch computes are gathered into the next one.
    """

    def __init__(self, fn: Callable[[list[Any]], list[Any]], max_batch: int = 256):
        self.fn = fn
        self.max_batch = max_batch
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._runner: asyncio.Task | None = None
        self.batch_sizes: list[int] = []  # observed, for tests and metrics

    async def submit(self, item: Any) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((item, fut))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        return await fut

    async def submit_many(self, items: Sequence[Any]) -> list[Any]:
        return list(await asyncio.gather(*(self.submit(i) for i in items)))

    async def _run(self) -> None:
        await asyncio.sleep(0)
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch:]
            self.batch_sizes.append(len(batch))
            try:
                results = await asyncio.to_thread(self.fn, [item for item, _ in batch])
            except Exception as exc:  # every waiter sees the failure, none hangs
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), result in zip(batch, results):
                if not fut.done():
                    fut.set_result(result)
            await asyncio.sleep(0)


class TorchEngine(Engine):
    """In-process engine on transformers: for tests, single-process runs, and the fallback
    where vLLM is absent. Holds the model and adversary modules; `load_state` swaps weights."""

    def __init__(self, model, adversary, tokenizer, max_new_tokens: int = 24, max_batch: int = 256,
                 cache_size: int = 200_000):
        self.model = model.eval()
        self.adversary_model = adversary.eval() if adversary is not None else None
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self._version = 0
        # One batch computes at a time: the tokenizer's backend is not thread-safe, and two
        # batches sharing the cores would each run slower anyway.
        self._lock = threading.Lock()
        self._gen = MicroBatcher(self._locked(self._generate_batch), max_batch)
        self._lp = MicroBatcher(self._locked(self._logprob_batch), max_batch)
        self._adv = MicroBatcher(self._locked(self._adversary_batch), max_batch)
        # Greedy decoding is deterministic per weight version, so trees reuse results.
        self._cache: OrderedDict[str, Generation] = OrderedDict()
        self._cache_size = cache_size
        self.calls = {"generate": 0, "logprob": 0, "adversary": 0}

    @property
    def weight_version(self) -> int:
        return self._version

    def _locked(self, fn):
        def run(items):
            with self._lock:
                return fn(items)
        return run

    def load_state(self, model_state: dict | None, adversary_state: dict | None, version: int) -> None:
        with self._lock:
            self._load_state(model_state, adversary_state, version)

    def _load_state(self, model_state, adversary_state, version: int) -> None:
        if model_state is not None:
            self.model.load_state_dict(model_state)
        if adversary_state is not None and self.adversary_model is not None:
            self.adversary_model.load_state_dict(adversary_state)
        self._version = version
        self._cache.clear()

    # -- async API -------------------------------------------------------------------
    async def generate(self, prompts):
        out: list[Generation | None] = [self._cache.get(p) for p in prompts]
        missing = [i for i, g in enumerate(out) if g is None]
        self.calls["generate"] += len(missing)
        results = await self._gen.submit_many([prompts[i] for i in missing])
        for i, g in zip(missing, results):
            out[i] = g
            self._cache[prompts[i]] = g
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return out

    async def logprob(self, prompts, completions):
        self.calls["logprob"] += len(prompts)
        return await self._lp.submit_many(list(zip(prompts, completions)))

    async def adversary(self, prompts, completions):
        if self.adversary_model is None:
            raise NoAdversary("adversary scores asked of a TorchEngine that was started without an adversary "
                              "(adversary=None)")
        self.calls["adversary"] += len(prompts)
        return await self._adv.submit_many(list(zip(prompts, completions)))

    # -- batched torch work (runs in a worker thread) --------------------------------
    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[str]) -> list[Generation]:
        version = self._version
        tok = self.tokenizer
        enc = self._left_padded(prompts)
        out = self.model.generate(
            **enc, max_new_tokens=self.max_new_tokens, do_sample=False, output_scores=True,
            return_dict_in_generate=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        new = out.sequences[:, enc["input_ids"].shape[1]:]
        step_lp = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1)
        tok_lp = step_lp.gather(-1, new.unsqueeze(-1)).squeeze(-1)
        results = []
        for row, lps in zip(new.tolist(), tok_lp.tolist()):
            if tok.eos_token_id in row:
                n = row.index(tok.eos_token_id)
                text_ids, lp, finished = row[:n], sum(lps[: n + 1]), True
            else:
                text_ids, lp, finished = row, sum(lps), False
            text = tok.decode(text_ids, skip_special_tokens=True)
            results.append(Generation(text, float(lp), finished, version))
        return results

    def _left_padded(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """[BOS] prompt, left-padded for generation: the same ids training sees
        (`ida_ray.losses.encode`), whatever the tokenizer's own special-token rules."""
        seqs = [bos_ids(self.tokenizer) + self._ids(p) for p in prompts]
        device = next(self.model.parameters()).device
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    def _teacher_forced(self, pairs: list[tuple[str, str]], with_eos: bool):
        """Right-padded [BOS] prompt completion [EOS] batch, and each completion's span."""
        tok = self.tokenizer
        seqs, spans = [], []
        for prompt, completion in pairs:
            p = bos_ids(self.tokenizer) + self._ids(prompt)
            c = self._ids(completion) + ([tok.eos_token_id] if with_eos else [])
            seqs.append(p + c)
            spans.append((len(p), len(p) + len(c)))
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), tok.pad_token_id)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        return ids, mask, spans

    @torch.inference_mode()
    def _logprob_batch(self, pairs: list[tuple[str, str]]) -> list[float]:
        ids, mask, spans = self._teacher_forced(pairs, with_eos=True)
        logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
        lps = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        return [float(lps[i, a - 1: b - 1].sum()) for i, (a, b) in enumerate(spans)]

    @torch.inference_mode()
    def _adversary_batch(self, pairs: list[tuple[str, str]]) -> list[float]:
        ids, mask, spans = self._teacher_forced(pairs, with_eos=False)
        return adversary_scores(self.adversary_model, ids, mask).tolist()


def adversary_scores(adversary, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scalar score read at each right-padded sequence's last real token."""
    hidden = adversary.model(input_ids=ids, attention_mask=mask).last_hidden_state
    last = mask.sum(1) - 1
    return adversary.score(hidden[torch.arange(ids.shape[0]), last]).squeeze(-1).float()


async def gather_limited(coros: Sequence[Awaitable], limit: int) -> list:
    """asyncio.gather with at most `limit` coroutines running: bounded trees in flight."""
    sem = asyncio.Semaphore(limit)

    async def run(c):
        async with sem:
            return await c

    return list(await asyncio.gather(*(run(c) for c in coros)))
