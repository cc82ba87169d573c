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


def collate_lm_packed(tokenizer, examples: list[Example]) -> dict[str, torch.Tensor]:
    """The examples' sequences packed end to end into rows as wide as the longest (first-fit
    decreasing; none is split), position ids restarting at each sequence. Given position ids
    and no attention mask, transformers builds a block-diagonal causal mask from them (each
    sequence attends to itself alone), so the loss is the padded batch's, on about 60% fewer
    positions for IDA's mix of short answers and long fan-ins."""
    seqs = [encode(tokenizer, e.prompt, e.completion, eos=True) for e in examples]
    width = max(len(s) for s, _ in seqs)
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0])):
        n = len(seqs[i][0])
        row = next((r for r, f in enumerate(free) if f >= n), None)
        if row is None:
            rows.append([])
            free.append(width)
            row = len(rows) - 1
        rows[row].append(i)
        free[row] -= n
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            s, n_prompt = seqs[i]
            ids[r, at:at + len(s)] = torch.tensor(s)
            labels[r, at + n_prompt:at + len(s)] = torch.tensor(s[n_prompt:])
            positions[r, at:at + len(s)] = torch.arange(len(s))
            at += len(s)
        positions[r, at:] = torch.arange(width - at)  # the row's tail: a sequence of its own, unlabelled
    return {"input_ids": ids, "position_ids": positions, "labels": labels, "sequences": torch.tensor(len(seqs))}


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sequence summed NLL of the labelled positions (next-token shifted)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                          reduction="none").view(labels.shape)
    return nll.sum(1)


def model_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed NLL per sequence, averaged over the batch's sequences (padded or packed)."""
    # No KV cache: training never reuses one, and transformers reads packed rows from the
    # position ids only when there is none.
    if "position_ids" in batch:  # collate_lm_packed: rows hold several sequences
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        return sequence_nll(logits, batch["labels"]).sum() / batch["sequences"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
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
