"""Loss functions over batches of examples.

Sequences are [BOS] prompt completion [EOS] (BOS where the tokenizer has one), right-padded; only completion and EOS tokens
carry the imitation loss. The loss of a sequence is its summed negative log-likelihood
(-log M(completion | prompt), as in ALGORITHM.md), averaged over the batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ida_ray.engine import adversary_scores
from ida_ray.examples import Example
from ida_ray.tokenizer import bos_ids


def encode(tokenizer, prompt: str, completion: str, eos: bool) -> tuple[list[int], int]:
    p = bos_ids(tokenizer) + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if eos else [])
    return p + c, len(p)


def collate_lm(tokenizer, examples: list[Example]) -> dict[str, torch.Tensor]:
    seqs = [encode(tokenizer, e.prompt, e.completion, eos=True) for e in examples]
    width = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    labels = torch.full((len(seqs), width), -100)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, n_prompt) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, n_prompt: len(s)] = torch.tensor(s[n_prompt:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sequence summed NLL of the labelled positions (next-token shifted)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                          reduction="none").view(labels.shape)
    return nll.sum(1)


def model_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_nll(logits, batch["labels"]).mean()


def collate_adversary(tokenizer, examples: list[Example]) -> dict[str, torch.Tensor]:
    seqs = [encode(tokenizer, e.prompt, e.completion, eos=False)[0] for e in examples]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    target = torch.tensor([e.target for e in examples], dtype=torch.float32)
    return {"input_ids": ids, "attention_mask": mask, "target": target}


def adversary_loss(adversary, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """L_Adv = (Adv(q, M(q)) - log M(A | q))^2, averaged."""
    scores = adversary_scores(adversary, batch["input_ids"], batch["attention_mask"])
    return F.mse_loss(scores, batch["target"])
