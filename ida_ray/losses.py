"""Loss functions over batches of examples.

Sequences are [BOS] prompt completion [EOS] (BOS where the tokenizer has one), right-padded; only completion and EOS tokens
carry the imitation loss. The loss of a sequence is its summed negative log-likelihood
(-log M(completion | prompt), as in ALGORITHM.md), averaged over the batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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


def pack_rows(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Token sequences end to end in rows as wide as the longest (first-fit decreasing; none is
    split), with position ids restarting at each sequence: (ids, position ids, each sequence's
    (row, start)). Given position ids and no attention mask, transformers builds a
    block-diagonal causal mask from them, so each sequence attends to itself alone and a
    packed batch computes what the padded one does, on fewer positions (IDA's mix of short
    answers and long fan-ins leaves a padded random minibatch ~60% padding)."""
    width = max(len(s) for s in seqs)
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(seqs)), key=lambda i: -len(seqs[i])):
        row = next((r for r, f in enumerate(free) if f >= len(seqs[i])), None)
        if row is None:
            rows.append([])
            free.append(width)
            row = len(rows) - 1
        rows[row].append(i)
        free[row] -= len(seqs[i])
    ids = torch.full((len(rows), width), pad_id)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    places: list[tuple[int, int]] = [(0, 0)] * len(seqs)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            n = len(seqs[i])
            ids[r, at:at + n] = torch.tensor(seqs[i])
            positions[r, at:at + n] = torch.arange(n)
            places[i] = (r, at)
            at += n
        positions[r, at:] = torch.arange(width - at)  # the row's tail: a sequence of its own, unlabelled
    return ids, positions, places


def collate_lm_packed(tokenizer, examples: list[Example]) -> dict[str, torch.Tensor]:
    """collate_lm's batch packed (pack_rows): the same loss, on fewer positions."""
    seqs = [encode(tokenizer, e.prompt, e.completion, eos=True) for e in examples]
    ids, positions, places = pack_rows([s for s, _ in seqs], tokenizer.pad_token_id)
    labels = torch.full(ids.shape, -100)
    for (s, n_prompt), (r, at) in zip(seqs, places):
        labels[r, at + n_prompt:at + len(s)] = torch.tensor(s[n_prompt:])
    return {"input_ids": ids, "position_ids": positions, "labels": labels, "sequences": torch.tensor(len(seqs))}


def collate_adversary_packed(tokenizer, examples: list[Example]) -> dict[str, torch.Tensor]:
    """collate_adversary's batch packed (pack_rows), with where each sequence's last token is."""
    seqs = [encode(tokenizer, e.prompt, e.completion, eos=False)[0] for e in examples]
    ids, positions, places = pack_rows(seqs, tokenizer.pad_token_id)
    return {"input_ids": ids, "position_ids": positions,
            "last_row": torch.tensor([r for r, _ in places]),
            "last_col": torch.tensor([at + len(s) - 1 for s, (_, at) in zip(seqs, places)]),
            "target": torch.tensor([e.target for e in examples], dtype=torch.float32)}


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



