"""Answers from one head of a two-headed model: greedy, or sampled, on answer prompts.

Decoding runs on the plain `LlamaForCausalLM` a replica serving that head would run
(`TwoHeadedLM.as_causal_lm`), through transformers' `generate`.
"""
from __future__ import annotations

import torch

from ida_ray.honest.two_headed import TwoHeadedLM
from ida_ray.prompts import COMPACT


@torch.inference_mode()
def decode(lm, tokenizer, prompts: list[str], samples: int = 1, temperature: float | None = None,
           max_new_tokens: int = 6, batch: int = 512) -> list[list[str | None]]:
    """For each prompt, `samples` completions (greedy when temperature is None). A completion
    that does not end within max_new_tokens is None."""
    out: list[list[str | None]] = []
    sampling = temperature is not None
    device = next(lm.parameters()).device  # the learner's device: the prompts go where the model is
    for i in range(0, len(prompts), batch):
        enc = tokenizer(prompts[i: i + batch], return_tensors="pt", padding=True).to(device)
        seqs = lm.generate(**enc, max_new_tokens=max_new_tokens, do_sample=sampling,
                           temperature=temperature if sampling else None, top_k=None, top_p=None,
                           num_return_sequences=samples, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id)
        new = seqs[:, enc["input_ids"].shape[1]:].tolist()
        texts = []
        for row in new:
            if tokenizer.eos_token_id in row:
                texts.append(tokenizer.decode(row[: row.index(tokenizer.eos_token_id)], skip_special_tokens=True))
            else:
                texts.append(None)
        out += [texts[j * samples:(j + 1) * samples] for j in range(len(texts) // samples)]
    return out


def head_answers(model: TwoHeadedLM, tokenizer, questions: list[str], head: str) -> list[str | None]:
    """Greedy answer of `head` ("intended" | "instrumental") to each question."""
    lm = model.as_causal_lm(head)
    return [c[0] for c in decode(lm, tokenizer, [COMPACT.answer_prompt(q) for q in questions])]
