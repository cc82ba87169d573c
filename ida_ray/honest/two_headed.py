"""A two-headed language model (seed 001, "Answering questions honestly"): one trunk (the
"world model"), an intended head and an instrumental head.

The trunk and the intended head are an ordinary `LlamaForCausalLM` (the project's tiny Llama,
`ida_ray.models.ModelSpec`): its `lm_head` *is* the intended head. The instrumental head is a
second linear map from the trunk's final hidden state to the vocabulary.

On disk (`save_two_headed`) a directory is a normal HF model directory, so transformers and
vLLM replicas load it as a plain `LlamaForCausalLM` that answers with the intended head; the
instrumental head lives beside it in `instrumental_head.safetensors`, which only
`load_two_headed` reads.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaForCausalLM

from ida_ray.errors import ConfigError
from ida_ray.models import ModelSpec, build_model, load_model, save_pretrained

INSTRUMENTAL_FILE = "instrumental_head.safetensors"
MARKER_FILE = "two_headed.json"
HEADS = ("intended", "instrumental")


@dataclass
class HeadLogits:
    intended: torch.Tensor  # [batch, seq, vocab]
    instrumental: torch.Tensor


class TwoHeadedLM(nn.Module):
    """`lm` holds the trunk (`lm.model`) and the intended head (`lm.lm_head`)."""

    def __init__(self, lm: LlamaForCausalLM, instrumental_head: nn.Linear | None = None):
        super().__init__()
        self.lm = lm
        if instrumental_head is None:
            instrumental_head = nn.Linear(lm.config.hidden_size, lm.config.vocab_size, bias=False)
            # Same initialisation scheme as the intended head, different draw.
            nn.init.normal_(instrumental_head.weight, std=lm.config.initializer_range)
        self.instrumental_head = instrumental_head

    @property
    def config(self):
        return self.lm.config

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.lm.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> HeadLogits:
        h = self.hidden(input_ids, attention_mask)
        return HeadLogits(self.lm.lm_head(h), self.instrumental_head(h))

    def head_parameter_names(self) -> dict[str, list[str]]:
        """Parameter names (as in `named_parameters()`) of each head."""
        return {"intended": [n for n, _ in self.named_parameters() if n.startswith("lm.lm_head.")],
                "instrumental": [n for n, _ in self.named_parameters() if n.startswith("instrumental_head.")]}

    def as_causal_lm(self, head: str) -> LlamaForCausalLM:
        """A standalone plain LlamaForCausalLM (a copy) answering with `head`: what a replica
        serving that head would run."""
        if head not in HEADS:
            raise ConfigError(f"head must be one of {HEADS}, got {head!r}")
        lm = copy.deepcopy(self.lm)
        if head == "instrumental":
            with torch.no_grad():
                lm.lm_head.weight.copy_(self.instrumental_head.weight)
        return lm.eval()


def build_two_headed(spec: ModelSpec, seed: int = 0) -> tuple[TwoHeadedLM, object]:
    lm, tokenizer = build_model(spec, seed)
    # build_model seeded torch before building lm; the next draw initialises the second head.
    return TwoHeadedLM(lm), tokenizer


def save_two_headed(model: TwoHeadedLM, tokenizer, directory: str | os.PathLike) -> Path:
    """HF directory whose model.safetensors carries the intended head; the instrumental head
    goes to an extra safetensors file (plus a marker saying which head is which)."""
    directory = save_pretrained(model.lm, tokenizer, directory)
    save_file({"weight": model.instrumental_head.weight.detach().contiguous()}, str(directory / INSTRUMENTAL_FILE))
    (directory / MARKER_FILE).write_text(json.dumps(
        {"lm_head": "intended", "extra_heads": {"instrumental": INSTRUMENTAL_FILE}}, indent=1))
    return directory


def load_two_headed(directory: str | os.PathLike) -> TwoHeadedLM:
    directory = Path(directory)
    extra = directory / INSTRUMENTAL_FILE
    if not extra.exists():
        raise ConfigError(f"{directory} is not a two-headed model directory: no {INSTRUMENTAL_FILE}")
    lm = load_model(directory)
    weight = load_file(str(extra))["weight"]
    expected = (lm.config.vocab_size, lm.config.hidden_size)
    if tuple(weight.shape) != expected:
        raise ConfigError(f"{extra}: instrumental head has shape {tuple(weight.shape)}, expected {expected}")
    head = nn.Linear(lm.config.hidden_size, lm.config.vocab_size, bias=False)
    with torch.no_grad():
        head.weight.copy_(weight)
    return TwoHeadedLM(lm, head)
