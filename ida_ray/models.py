"""Tiny models the project builds itself: a Llama-architecture causal LM (the model M) and a
Llama sequence classifier with one output (the adversary), each saved with the project's
tokenizer as an HF directory (config.json, model.safetensors, tokenizer.json) that
transformers and vLLM both load. Nothing is downloaded."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

from ida_ray.tokenizer import build_tokenizer


@dataclass(kw_only=True)
class ModelSpec:
    """Shape of the tiny Llama the project builds for M (and for the adversary's trunk)."""

    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 384
    max_positions: int = 256
    """Context length: prompt plus completion must fit (checked by ida_ray.preflight)."""

    def problems(self) -> list[str]:
        sizes = {"hidden_size": self.hidden_size, "num_layers": self.num_layers, "num_heads": self.num_heads,
                 "intermediate_size": self.intermediate_size, "max_positions": self.max_positions}
        small = [k for k, v in sizes.items() if v < 1]
        if small:
            return [f"model sizes must be >= 1: {', '.join(f'model.{k}={sizes[k]}' for k in small)}"]
        if self.hidden_size % self.num_heads:
            return [f"model.hidden_size ({self.hidden_size}) must be a multiple of model.num_heads ({self.num_heads})"]
        return []

    def llama_config(self, tokenizer, **extra) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, num_key_value_heads=self.num_heads,
            max_position_embeddings=self.max_positions, rms_norm_eps=1e-5,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
            dtype="float32", **extra)


def build_model(spec: ModelSpec, seed: int = 0) -> tuple[LlamaForCausalLM, object]:
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(spec.llama_config(tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def build_adversary(spec: ModelSpec, seed: int = 1) -> tuple[LlamaForSequenceClassification, object]:
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    adversary = LlamaForSequenceClassification(spec.llama_config(tokenizer, num_labels=1))
    return adversary, tokenizer


def save_pretrained(model, tokenizer, directory: str | os.PathLike) -> Path:
    """Write an HF directory atomically enough for readers: files land, then config last."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def load_model(directory: str | os.PathLike) -> LlamaForCausalLM:
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)


def load_adversary(directory: str | os.PathLike) -> LlamaForSequenceClassification:
    return AutoModelForSequenceClassification.from_pretrained(directory, dtype=torch.float32)


def create_model_dirs(root: str | os.PathLike, spec: ModelSpec | None = None, seed: int = 0) -> tuple[Path, Path]:
    """Build and save a fresh model and adversary under root/model and root/adversary."""
    spec = spec or ModelSpec()
    root = Path(root)
    model, tok = build_model(spec, seed)
    adversary, _ = build_adversary(spec, seed + 1)
    return save_pretrained(model, tok, root / "model"), save_pretrained(adversary, tok, root / "adversary")


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
