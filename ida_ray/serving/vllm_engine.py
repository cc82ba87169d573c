"""`VllmEngine`: the Engine interface on vLLM's AsyncLLM, the engine a replica actor serves.

Every request is tokenized here exactly as the project does everywhere else
([BOS] + prompt characters, completion, [EOS]; `ida_ray.losses.encode`) and handed to vLLM as
token ids, so vLLM and transformers see the same sequences:

- generate: greedy decoding, the sampled token's log-prob at every step; the text is the
  decoded completion without EOS, the log-prob includes EOS, `finished` means EOS was produced.
- logprob: log M(completion + EOS | prompt) from vLLM's prompt_logprobs on the whole
  sequence, summed over the completion and EOS positions.
- adversary: a separate scorer (ida_ray/serving/adversary_scorer.py); an engine started
  without an adversary raises NoAdversary rather than scoring 0.0.

Continuous batching comes from vLLM: every concurrent call is its own request and the
scheduler batches them (each request returns only its final output, and log-probs come in
vLLM's flat form: at this model size the frontend's per-token bookkeeping costs more than the
forward pass); the batch each engine step ran is recorded (`record_step_sizes`).
Greedy results are cached per weight version, as in TorchEngine.

Weights are reloaded in place from an HF-format directory (`reload`): the engine's workers
run vLLM's `reload_weights` (the CPU backend repacks linear weights on load, so writing into
`model.load_weights` directly does not work there) and then re-pack a tied LM head, which that
reload leaves on its old weights on CPU (`ida_ray/serving/vllm_worker.py`, the worker
extension); then the prefix cache is reset so no key/value block computed with the old weights
is reused. A `SwapGate` keeps requests and reloads apart, so each result's weight_version is the
one that produced it.
"""
from __future__ import annotations

import asyncio
import itertools
import json
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ida_ray.engine import Engine, Generation
from ida_ray.errors import ConfigError, IDAError, NoAdversary
from ida_ray.losses import encode
from ida_ray.serving.adversary_scorer import TorchAdversaryScorer, VllmAdversaryScorer
from ida_ray.serving.step_log import StepLog, list_summary
from ida_ray.serving.swap_gate import SwapGate
from ida_ray.tokenizer import bos_ids


class RequestTooLong(IDAError, ValueError):
    """A prompt (plus completion) longer than the engine's max_model_len."""

    kind = "request_too_long"


@dataclass
class VllmSettings:
    use_gpu: bool = False
    tensor_parallel_size: int = 1
    dtype: str = "float32"
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_seqs: int = 256  # the largest batch the scheduler runs
    gpu_memory_utilization: float = 0.45  # per engine: the model and the adversary share a GPU
    adversary_gpu_memory_utilization: float = 0.15
    seed: int = 0
    # "nccl": enable vLLM's weight-transfer engine so a GPU learner can broadcast the model's
    # weights straight into the replica (see ida_ray/actors/replica.py).
    weight_transfer: str | None = None


def record_step_sizes(llm, log: StepLog) -> None:
    """Record how many requests each engine step returned output for (the batch it ran), by
    wrapping the engine client's output reader: one EngineCoreOutputs per step. vLLM's stat
    loggers would report this too, but turning them on adds per-request statistics that cost
    the frontend about a fifth of its CPU time at this model size."""
    client = llm.engine_core
    read = client.get_output_async

    async def get_output_async():
        out = await read()
        n = len(getattr(out, "outputs", None) or ())
        if n:
            log.append(n)
        return out

    client.get_output_async = get_output_async


class PromptEncoder:
    """Token ids of [BOS] prompt (completion [EOS]) exactly as `ida_ray.losses.encode` makes
    them. The project's tokenizer maps one character to one token, so a dict lookup gives the
    same ids many times faster than a call into the tokenizer (it showed as 12% of the
    frontend's CPU time at thousands of requests a second). The fast path is checked against
    the tokenizer at start-up, and text that could hold a special token ('<') or any other
    tokenizer takes the tokenizer's path."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        chars = {t: i for t, i in vocab.items() if len(t) == 1}
        self.chars, self.unk = chars, tokenizer.unk_token_id
        probe = "".join(sorted(c for c in chars if c != "<")) + "\u00e9"
        if not chars or self._fast(probe, probe, True) != encode(tokenizer, probe, probe, eos=True):
            self.chars = None

    def _fast(self, prompt: str, completion: str, eos: bool) -> tuple[list[int], int]:
        get, unk, tok = self.chars.get, self.unk, self.tokenizer
        p = bos_ids(tok) + [get(c, unk) for c in prompt]
        c = [get(ch, unk) for ch in completion] + ([tok.eos_token_id] if eos else [])
        return p + c, len(p)

    def __call__(self, prompt: str, completion: str = "", eos: bool = False) -> tuple[list[int], int]:
        if self.chars is None or "<" in prompt or "<" in completion:
            return encode(self.tokenizer, prompt, completion, eos=eos)
        return self._fast(prompt, completion, eos)


def check_cpu_head_size(config: dict) -> None:
    """vLLM's CPU attention supports only some head sizes; fail before starting an engine,
    not at its first request (where it kills the engine with a bare RuntimeError)."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    head = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head not in supported:
        raise ConfigError(f"vLLM on CPU supports attention head sizes {supported}; this model has "
                          f"{head} (hidden_size {config['hidden_size']} / {config['num_attention_heads']} heads)")


# Mixed into every vLLM worker: the weight swap that also re-packs a tied LM head on CPU.
WORKER_EXTENSION = "ida_ray.serving.vllm_worker.WorkerExtension"


def engine_args(model_dir: str | Path, s: VllmSettings, *, pooling: bool = False):
    from vllm.engine.arg_utils import AsyncEngineArgs

    config = json.loads((Path(model_dir) / "config.json").read_text())
    if not s.use_gpu:
        check_cpu_head_size(config)
    max_len = s.max_model_len or config.get("max_position_embeddings", 256)
    kwargs = dict(
        model=str(model_dir), dtype=s.dtype, enforce_eager=True, max_model_len=max_len,
        max_num_seqs=s.max_num_seqs, seed=s.seed, disable_log_stats=True,
        tensor_parallel_size=s.tensor_parallel_size, worker_extension_cls=WORKER_EXTENSION)
    if s.use_gpu:
        kwargs["gpu_memory_utilization"] = (s.adversary_gpu_memory_utilization if pooling
                                            else s.gpu_memory_utilization)
        if s.tensor_parallel_size > 1:
            # Inside a Ray actor the workers are Ray actors in the caller's placement group.
            kwargs["distributed_executor_backend"] = "ray"
    if pooling:
        kwargs["runner"] = "pooling"
    elif s.weight_transfer:
        from vllm.config.weight_transfer import WeightTransferConfig

        kwargs["weight_transfer_config"] = WeightTransferConfig(backend=s.weight_transfer)
    return AsyncEngineArgs(**kwargs)


def _token_logprob(logprobs, position: int, token: int) -> float:
    """The log-prob of `token` at `position` in vLLM's logprobs, flat (FlatLogprobs: a few
    flat lists instead of a dict per token, much cheaper for the frontend) or not."""
    if hasattr(logprobs, "start_indices"):
        for k in range(logprobs.start_indices[position], logprobs.end_indices[position]):
            if logprobs.token_ids[k] == token:
                return logprobs.logprobs[k]
        raise KeyError(f"no log-prob for token {token} at position {position}")
    return logprobs[position][token].logprob


class VllmEngine(Engine):
    def __init__(self, model_dir: str | Path, adversary_dir: str | Path | None, *, max_new_tokens: int = 48,
                 adversary_backend: str = "vllm", settings: VllmSettings | None = None,
                 cache_size: int = 200_000):
        from vllm.v1.engine.async_llm import AsyncLLM

        from ida_ray.models import load_tokenizer

        if adversary_backend not in ("vllm", "torch"):
            raise ValueError(f"adversary_backend must be 'vllm' or 'torch', got {adversary_backend!r}")
        self.settings = s = settings or VllmSettings()
        self.tokenizer = load_tokenizer(model_dir)
        self.encode = PromptEncoder(self.tokenizer)
        self.max_new_tokens = max_new_tokens
        self.model_batches = StepLog()

        def build_scorer():
            if adversary_dir is None:
                return None
            if adversary_backend == "vllm":
                scorer = VllmAdversaryScorer(engine_args(adversary_dir, s, pooling=True), self.tokenizer)
                record_step_sizes(scorer.llm, scorer.batch_sizes)
                return scorer
            return TorchAdversaryScorer(adversary_dir, self.tokenizer)

        # Both engines start at once (most of a start is process spawning and imports). An
        # AsyncLLM built outside an event loop attaches to the loop of its first request.
        with ThreadPoolExecutor(1) as pool:
            scorer = pool.submit(build_scorer)
            try:
                self.llm = AsyncLLM.from_engine_args(engine_args(model_dir, s))
                record_step_sizes(self.llm, self.model_batches)
            except BaseException:
                if scorer.exception() is None and scorer.result() is not None:
                    scorer.result().shutdown()  # leave no engine process behind
                raise
            try:
                self.scorer = scorer.result()
            except BaseException:
                self.llm.shutdown()
                raise
        self.max_model_len = self.llm.model_config.max_model_len
        self.adversary_backend = adversary_backend
        self.gate = SwapGate()
        self._version = 0
        self._ids = itertools.count()
        self._cache: OrderedDict[str, Generation] = OrderedDict()
        self._cache_size = cache_size

    @property
    def weight_version(self) -> int:
        return self._version

    def adversary_batch_summary(self) -> dict:
        sizes = StepLog() if self.scorer is None else self.scorer.batch_sizes
        if isinstance(sizes, StepLog):
            return sizes.summary()
        return list_summary(sizes)

    def queue_depth(self) -> int:
        return self.llm.get_num_unfinished_requests()

    def _check_length(self, n_tokens: int, what: str) -> None:
        if n_tokens > self.max_model_len:
            raise RequestTooLong(f"{what} of {n_tokens} tokens exceeds max_model_len {self.max_model_len}")

    # -- model ---------------------------------------------------------------------
    async def _run(self, ids: list[int], params):
        from vllm.inputs.engine import tokens_input

        last = None
        async for out in self.llm.generate(tokens_input(ids), params, f"r{next(self._ids)}"):
            last = out
        return last

    async def _generate_one(self, prompt: str) -> Generation:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        ids, _ = self.encode(prompt)
        self._check_length(len(ids) + 1, "prompt")
        # The sampled token's log-prob at every step. (Rescoring prompt + generation with one
        # prompt_logprobs prefill afterwards gives the same value; measured, it saves frontend
        # time but costs more in the engine, ~15% fewer nodes/s overall on CPU.)
        params = SamplingParams(temperature=0.0, max_tokens=self.max_new_tokens, detokenize=False, logprobs=0,
                                flat_logprobs=True, output_kind=RequestOutputKind.FINAL_ONLY)
        async with self.gate.request():
            version = self._version
            out = (await self._run(ids, params)).outputs[0]
        tokens = list(out.token_ids)
        logprob = sum(_token_logprob(out.logprobs, i, t) for i, t in enumerate(tokens))
        eos = self.tokenizer.eos_token_id
        finished = bool(tokens) and tokens[-1] == eos
        text = self.tokenizer.decode(tokens[:-1] if finished else tokens, skip_special_tokens=True)
        return Generation(text, float(logprob), finished, version)

    async def _sequence_logprob(self, ids: list[int], start: int) -> float:
        """Sum of log p(ids[i] | ids[:i]) for i >= start, from one prefill with prompt_logprobs."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False,
                                output_kind=RequestOutputKind.FINAL_ONLY, flat_logprobs=True)
        out = await self._run(ids, params)
        # prompt_logprobs[i] is log p(ids[i] | ids[:i]); entry 0 (BOS) has none.
        return float(sum(_token_logprob(out.prompt_logprobs, i, ids[i]) for i in range(start, len(ids))))

    async def generate(self, prompts):
        out: list[Generation | None] = [self._cache.get(p) for p in prompts]
        missing = [i for i, g in enumerate(out) if g is None]
        results = await asyncio.gather(*(self._generate_one(prompts[i]) for i in missing))
        for i, g in zip(missing, results):
            out[i] = g
            if self._cache_size > 0 and g.weight_version == self._version:  # never cache older weights' results
                self._cache[prompts[i]] = g
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return out

    async def _logprob_one(self, prompt: str, completion: str) -> float:
        ids, n_prompt = self.encode(prompt, completion, eos=True)
        self._check_length(len(ids) + 1, "prompt and completion")
        async with self.gate.request():
            return await self._sequence_logprob(ids, n_prompt)

    async def logprob(self, prompts, completions):
        return list(await asyncio.gather(*(self._logprob_one(p, c) for p, c in zip(prompts, completions))))

    async def adversary(self, prompts, completions):
        if self.scorer is None:
            raise NoAdversary("adversary scores asked of a VllmEngine that was started without an adversary "
                              "(adversary_dir=None)")
        async with self.gate.request():
            return await self.scorer.score(prompts, completions)

    # -- weights -------------------------------------------------------------------
    async def reload(self, model_dir: str | Path | None, adversary_dir: str | Path | None, version: int) -> None:
        """Swap in the weights under the given HF directories (either may be None: kept)."""
        async with self.gate.exclusive():
            await self._reload_model(model_dir)
            if adversary_dir is not None and self.scorer is not None:
                await self.scorer.reload(adversary_dir)
            self._set_version(version)

    async def _reload_model(self, model_dir) -> None:
        if model_dir is not None:
            # Not vLLM's reload_weights alone: on CPU it leaves a tied LM head on its old weights
            # (ida_ray/serving/vllm_worker.py).
            await self.llm.collective_rpc("reload_weights_from", kwargs={"weights_path": str(model_dir)})
            await self.llm.reset_prefix_cache()

    def _set_version(self, version: int) -> None:
        self._version = version
        self._cache.clear()

    # vLLM's weight-transfer protocol (NCCL on GPU clusters), driven by the learner through
    # vllm.distributed.weight_transfer.clients.RayVLLMWeightSyncClient on the replica actor.
    async def init_weight_transfer_engine(self, request) -> None:
        await self.llm.init_weight_transfer_engine(request)

    async def start_weight_update(self) -> None:
        self.gate.close()
        await self.gate.drained()
        await self.llm.start_weight_update()

    async def update_weights(self, request) -> None:
        await self.llm.update_weights(request)

    async def finish_weight_update(self) -> None:
        try:
            await self.llm.finish_weight_update()
            await self.llm.reset_prefix_cache()
            self._cache.clear()
        finally:
            self.gate.reopen()

    def shutdown(self) -> None:
        if self.scorer is not None:
            self.scorer.shutdown()
        self.llm.shutdown()
