"""The two ways a replica serves the adversary Adv(prompt, completion), batched:

- `VllmAdversaryScorer`: a second vLLM engine with the pooling runner; the Llama sequence
  classifier's single output is read at the last token with no activation, so the score is
  the raw regression value the learner trains.
- `TorchAdversaryScorer`: the transformers module in the replica process, with concurrent
  requests gathered by `ida_ray.engine.MicroBatcher`.

Measured with `python -m experiments.throughput --adversary-only` (the project's default tiny
model, 2 CPU cores shared with other jobs; adversary calls per second for a batch of 256
pairs, median of 5, the two backends interleaved), in two runs:

                                                   vLLM pooling     torch + MicroBatcher
    one actor call with 256 pairs (what the pool     1468 / 1436        1135 / 1683
      sends)
    256 concurrent single-pair actor calls            641 /  520         952 /  902

On CPU the two are the same within the noise of a shared machine, and torch needs no second
engine (one start-up, ~30-90 s, and its memory saved), so on CPU a replica serves the
adversary with torch by default. On GPU the pooling engine keeps the adversary on the
accelerator with vLLM's batching and memory management, so it is the default there.

Both score [BOS] prompt completion (no EOS), as `ida_ray.losses.collate_adversary` does for
training.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
from pathlib import Path

import torch

from ida_ray.engine import MicroBatcher, adversary_scores
from ida_ray.examples import Example
from ida_ray.losses import collate_adversary, encode
from ida_ray.models import load_adversary
from ida_ray.serving.step_log import StepLog


class TorchAdversaryScorer:
    def __init__(self, adversary_dir: str | Path, tokenizer, max_batch: int = 256):
        self.module = load_adversary(adversary_dir).eval()
        self.tokenizer = tokenizer
        self._lock = threading.Lock()  # one batch at a time; reloads wait for it
        self._batcher = MicroBatcher(self._score_batch, max_batch)

    @property
    def batch_sizes(self) -> list[int]:
        return self._batcher.batch_sizes

    @torch.inference_mode()
    def _score_batch(self, pairs: list[tuple[str, str]]) -> list[float]:
        batch = collate_adversary(self.tokenizer, [Example("adversary", p, c, 0.0) for p, c in pairs])
        with self._lock:
            return adversary_scores(self.module, batch["input_ids"], batch["attention_mask"]).tolist()

    async def score(self, prompts, completions) -> list[float]:
        return await self._batcher.submit_many(list(zip(prompts, completions)))

    async def reload(self, adversary_dir: str | Path) -> None:
        from safetensors.torch import load_file

        state = load_file(str(Path(adversary_dir) / "model.safetensors"))

        def load():
            with self._lock:
                self.module.load_state_dict(state)
        await asyncio.to_thread(load)

    def shutdown(self) -> None:
        pass


class VllmAdversaryScorer:
    def __init__(self, engine_args, tokenizer):
        from vllm.v1.engine.async_llm import AsyncLLM

        self.tokenizer = tokenizer
        self.llm = AsyncLLM.from_engine_args(engine_args)
        self._ids = itertools.count()
        self.batch_sizes = StepLog()  # filled by ida_ray.serving.vllm_engine.record_step_sizes

    async def _score_one(self, prompt: str, completion: str) -> float:
        from vllm import PoolingParams
        from vllm.inputs.engine import tokens_input

        ids, _ = encode(self.tokenizer, prompt, completion, eos=False)
        params = PoolingParams(task="classify", use_activation=False)
        last = None
        async for out in self.llm.encode(tokens_input(ids), params, f"adv-{next(self._ids)}"):
            last = out
        return float(last.outputs.data.reshape(-1)[0])

    async def score(self, prompts, completions) -> list[float]:
        return list(await asyncio.gather(*(self._score_one(p, c) for p, c in zip(prompts, completions))))

    async def reload(self, adversary_dir: str | Path) -> None:
        await self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(adversary_dir)})
        await self.llm.reset_prefix_cache()

    def shutdown(self) -> None:
        self.llm.shutdown()
