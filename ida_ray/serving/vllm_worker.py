"""What ida-ray adds to every vLLM worker process (vLLM's `worker_extension_cls`: the class is
mixed into the worker, and its methods are reached with `collective_rpc` by name).

`reload_weights_from` is the in-place weight swap the replicas use. vLLM's own `reload_weights`
re-processes each layer whose weights it loads; on CPU, processing packs a layer's weight for the
GEMM kernels (`dispatch_cpu_unquantized_gemm`), and the packed copy is what computes the layer.
An LM head tied to the input embedding (Qwen2 and many small checkpoints) loads nothing of its
own, so in vLLM 0.32 it kept the weights packed when the engine started: after a swap the
replica's logits came from the new trunk and the old head. Measured on the natural-language
preset's Qwen2 (runs/nl_32, iteration 30): greedy answers mostly right, their log-probs about
-5 a token instead of about 0, fan-in replies garbled, so 40% of the distillation trees failed to
parse and H' never found the model confident. Re-packing the tied head after each reload serves
the new weights exactly (tests/test_hf_model.py checks the log-probs after a swap).
"""
from __future__ import annotations

from ida_ray.serving import weight_broadcast


def repack_lm_heads(model) -> int:
    """Re-run the weight processing of every unquantized LM head tied to an input embedding (on
    CPU: re-pack its GEMM weight from the weight it holds now); returns how many. An untied head
    loads its own weight, so the reload has processed it already. A no-op off CPU, where the
    head computes from its weight tensor directly. Quantized heads are left alone: processing
    one twice may quantize it twice."""
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        ParallelLMHead,
        UnquantizedEmbeddingMethod,
        VocabParallelEmbedding,
    )
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return 0
    embeddings = [m.weight for m in model.modules()
                  if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)]
    heads = [m for m in model.modules() if isinstance(m, ParallelLMHead)
             and isinstance(m.quant_method, UnquantizedEmbeddingMethod)
             and any(m.weight is weight for weight in embeddings)]
    for head in heads:
        head.quant_method.process_weights_after_loading(head)
    return len(heads)


class WorkerExtension:
    """Mixed into vLLM's worker class (engine argument worker_extension_cls)."""

    def reload_weights_from(self, weights_path: str) -> int:
        """vLLM's in-place reload from an HF directory, then the tied LM heads re-packed (see
        the module docstring); returns how many heads were re-packed."""
        self.reload_weights(weights_path=weights_path)
        return repack_lm_heads(self.model_runner.get_model())


# Every engine ida-ray starts imports this module in its worker processes (worker_extension_cls),
# so the "gloo" weight-transfer backend is known there before the engine asks vLLM's factory.
weight_broadcast.register()
