"""The model M and the adversary.

M is either the tiny Llama-architecture causal LM the project builds itself, with its
character tokenizer (the embedded default), or any Hugging Face causal LM a user names by
`ModelSpec.path` (a local directory, or a hub id where the user's site can download: nothing
here downloads), with its own tokenizer. The adversary is a small Llama sequence classifier
with one output, over M's tokenizer, shaped by the spec. Each is saved as an HF directory
(config.json, model.safetensors, tokenizer files) that transformers and vLLM both load."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

from ida_ray.prompts import PromptFormat, prompt_format
from ida_ray.tokenizer import build_tokenizer


@dataclass(kw_only=True)
class ModelSpec:
    """M, and the shape of the tiny Llama the project builds (for M when no path is given, and
    always for the adversary)."""

    path: str | None = None
    """An HF causal LM to start M from: a local directory or a hub id. None: the tiny model
    below, built here. Replicas, learner and evaluation all load these weights."""
    architecture: Literal["llama", "qwen2"] = "llama"
    """The tiny model built when no path is given: "llama" (character tokenizer, compact
    format, built from the seed in every process) or "qwen2" (a byte-level BPE tokenizer
    trained on the task's own text, with a chat template: built once into
    <run_dir>/base_model, which then is the path)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights' dtype for M, in the learner and the replicas (bf16/fp16 on GPU; float32 on CPU)."""
    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 384
    max_positions: int = 256
    """Context length: prompt plus completion must fit (checked by ida_ray.preflight)."""
    prompt_format: Literal["compact", "chat"] = "compact"
    """How M's prompts and replies are written (ida_ray.prompts): "compact" for the built-in
    character model and the symbolic tasks; "chat" (one user message in plain English through
    the tokenizer's chat template, replies "Answer: ..." or "Subquestion 1: ..." lines) for
    language models and natural-language tasks. "chat" needs a model with its own tokenizer."""

    def __post_init__(self):
        if self.path is not None and Path(self.path).expanduser().exists():
            # Absolute, so every process of the run reads the same directory (on a cluster it
            # must be on a filesystem every node shares, or be a hub id).
            self.path = str(Path(self.path).expanduser().resolve())

    lora_rank: int = 0
    """LoRA (peft) for M: the learner trains rank-r adapters on M's linear layers and keeps
    the base weights frozen, so a large model trains on one GPU; the replicas serve the merged
    weights. 0: every weight trains."""
    lora_alpha: float = 16.0
    """LoRA's scale numerator (the update is alpha / rank * B A)."""
    lora_target_modules: str | list[str] = "all-linear"
    """The layers given adapters: "all-linear" (peft: every linear layer but the output head)
    or a list of module names (e.g. [q_proj, v_proj])."""

    def problems(self) -> list[str]:
        if self.lora_rank < 0 or self.lora_alpha <= 0:
            return [f"model.lora_rank must be >= 0 and model.lora_alpha > 0, got {self.lora_rank}, {self.lora_alpha}"]
        sizes = {"hidden_size": self.hidden_size, "num_layers": self.num_layers, "num_heads": self.num_heads,
                 "intermediate_size": self.intermediate_size, "max_positions": self.max_positions}
        small = [k for k, v in sizes.items() if v < 1]
        if small:
            return [f"model sizes must be >= 1: {', '.join(f'model.{k}={sizes[k]}' for k in small)}"]
        if self.hidden_size % self.num_heads:
            return [f"model.hidden_size ({self.hidden_size}) must be a multiple of model.num_heads ({self.num_heads})"]
        if self.prompt_format == "chat" and self.path is None and self.architecture == "llama":
            return ["model.prompt_format chat needs a model with its own tokenizer (model.path, or "
                    "model.architecture qwen2): the built-in character tokenizer has only the compact format's "
                    "48 characters"]
        return []

    def make_format(self, tokenizer=None) -> PromptFormat:
        """M's prompt format (the chat format renders with M's tokenizer's chat template)."""
        if self.prompt_format == "chat":
            return prompt_format("chat", tokenizer if tokenizer is not None else model_tokenizer(self))
        return prompt_format(self.prompt_format)

    def context_length(self) -> int:
        """Prompt plus completion must fit in this: the path's own config, or max_positions."""
        if self.path is None:
            return self.max_positions
        config = AutoConfig.from_pretrained(self.path)
        return int(getattr(config, "max_position_embeddings", None) or self.max_positions)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def llama_config(self, tokenizer, **extra) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, num_key_value_heads=self.num_heads,
            max_position_embeddings=self.max_positions, rms_norm_eps=1e-5,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
            dtype="float32", **extra)


def load_tokenizer(source: str | os.PathLike):
    """A model's own tokenizer, with a pad token (its EOS when it defines none: batches are
    padded, and masked, so the pad's identity does not matter)."""
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    tokenizer.padding_side = "left"  # generation batches are padded on the left
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        from ida_ray.errors import ConfigError

        raise ConfigError(f"{source}: the tokenizer defines no EOS token, so generations could never finish")
    return tokenizer


def model_tokenizer(spec: ModelSpec):
    """M's tokenizer: the model's own for a path, else the project's character tokenizer."""
    return build_tokenizer() if spec.path is None else load_tokenizer(spec.path)


def build_model(spec: ModelSpec, seed: int = 0) -> tuple[torch.nn.Module, object]:
    """M and its tokenizer: loaded from spec.path, or the tiny Llama built from `seed`."""
    tokenizer = model_tokenizer(spec)
    if spec.path is not None:
        model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=spec.torch_dtype)
    else:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(spec.llama_config(tokenizer)).to(spec.torch_dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def with_lora(model, spec: ModelSpec):
    """M wrapped with fresh LoRA adapters (B = 0: the same function as M until trained)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_alpha, lora_dropout=0.0, bias="none",
                        target_modules=spec.lora_target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def merged_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The plain state dict of M with its LoRA updates merged in (W + alpha/r * B A), under
    the base model's own key names: what the replicas and `from_pretrained` load."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    lora_layers = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    out = {}
    with torch.no_grad():
        for key, value in base.state_dict().items():
            if ".lora_" in key:
                continue
            layer_name, _, leaf = key.replace(".base_layer.", ".").rpartition(".")
            layer = lora_layers.get(layer_name)
            if layer is not None and leaf == "weight":
                value = value + layer.get_delta_weight("default").to(value.dtype)
            out[key.replace(".base_layer.", ".")] = value.detach()
    return out


def build_adversary(spec: ModelSpec, seed: int = 1) -> tuple[LlamaForSequenceClassification, object]:
    """A fresh adversary over M's tokenizer (a small separate model, shaped by the spec)."""
    tokenizer = model_tokenizer(spec)
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


def load_model(directory: str | os.PathLike, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)


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


# ---------------------------------------------------------------------------------------
# A second architecture, built here: a tiny Qwen2 with a byte-level BPE tokenizer trained on
# the task's own text. It stands in for a user's checkpoint (its own tokenizer, no BOS token,
# tied embeddings, a chat template) on a machine that downloads nothing.
# ---------------------------------------------------------------------------------------
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def train_bpe_tokenizer(texts, vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on `texts` (any text: every byte has a token), with
    ChatML specials and template, EOS <|im_end|>, pad <|endoftext|> and no BOS, as Qwen's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   padding_side="left", clean_up_tokenization_spaces=False)
    fast.chat_template = CHATML_TEMPLATE
    return fast


def create_tiny_qwen2(directory: str | os.PathLike, texts, *, hidden_size: int = 64, num_layers: int = 2,
                      num_heads: int = 2, num_kv_heads: int = 1, intermediate_size: int | None = None,
                      max_positions: int = 256, vocab_size: int = 320, seed: int = 0) -> Path:
    """An HF directory holding a fresh Qwen2ForCausalLM (head size hidden/heads: 32 by default,
    which vLLM-CPU supports) and its BPE tokenizer trained on `texts`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = train_bpe_tokenizer(texts, vocab_size)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, dtype="float32")
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return save_pretrained(model, tokenizer, directory)


def task_corpus(task, sizes, n: int = 400, seed: int = 0, fmt: PromptFormat | None = None) -> list[str]:
    """Text of the task's own prompts and completions in `fmt` (default compact; a chat format
    without a template, since the template's markers are special tokens), to train a tokenizer on."""
    import random

    from ida_ray.steps import Answer

    fmt = fmt or prompt_format("compact")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        q = task.generate(rng.choice(list(sizes)), rng)
        step = task.expert_fan_out(q)
        out += [fmt.answer_prompt(q) + fmt.format_answer(task.solve(q)), fmt.fan_out_prompt(q) + fmt.format_step(step)]
        if not isinstance(step, Answer):
            sub = tuple((s, task.solve(s)) for s in step.questions)
            out.append(fmt.fan_in_prompt(q, sub) + fmt.format_step(task.expert_fan_in(q, sub)))
    return out


def build_base_model(cfg):
    """The run's config with M's starting weights on disk: for model.architecture qwen2 with
    no path, the tiny Qwen2 and its BPE tokenizer (trained on the task's prompts in the run's
    format) are built once into <run_dir>/base_model, and that directory becomes model.path (a
    resumed run finds it there). Any other config is returned as it is."""
    from dataclasses import replace

    from ida_ray.tasks import get_task

    spec = cfg.model
    if spec.path is not None or spec.architecture != "qwen2":
        return cfg
    directory = Path(cfg.run_dir).expanduser().resolve() / "base_model"
    if not (directory / "config.json").exists():
        try:
            task = get_task(cfg.task, **cfg.task_kwargs)
        except Exception:  # noqa: BLE001 - the pre-flight check reports a task that does not build
            return cfg
        plain = prompt_format(spec.prompt_format)  # the chat template's markers are special tokens
        corpus = task_corpus(task, cfg.sizes(task), n=600, seed=cfg.seed, fmt=plain) + ["system\nuser\nassistant\n"] * 50
        create_tiny_qwen2(directory, corpus,
                          hidden_size=spec.hidden_size, num_layers=spec.num_layers, num_heads=spec.num_heads,
                          num_kv_heads=spec.num_heads, intermediate_size=spec.intermediate_size,
                          max_positions=spec.max_positions, vocab_size=512, seed=cfg.seed)
    return replace(cfg, model=replace(spec, path=str(directory)))
