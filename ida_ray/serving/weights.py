"""Weight payloads: the model and adversary weights of one version, as bytes that travel
through the Ray object store.

Nodes share no filesystem, so the learner serialises its state dicts to safetensors bytes
(`WeightsPayload.from_modules` / `from_state_dicts` / `from_dirs`), the pool puts the payload
in the object store once, and each replica writes it to node-local storage
(`write_dirs`) and reloads its engines in place from there (vLLM's `reload_weights` reads an
HF-format directory; the torch engine loads the state dicts straight from the bytes).

A payload may carry only the model or only the adversary; the missing side keeps the
replica's current weights.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ida_ray.errors import IDAError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class WeightsError(IDAError, ValueError):
    """A payload that cannot be built or does not fit the replica's models."""

    kind = "weights_error"


def state_dict_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """safetensors bytes of a state dict (tensors moved to CPU and made contiguous: safetensors
    refuses shared or strided storage, which optimiser-updated modules can hold)."""
    if not state:
        raise WeightsError("empty state dict")
    return st_save({k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()})


def untied_state(module) -> dict[str, torch.Tensor]:
    """The module's state dict with each shared tensor under its first name only."""
    seen, out = set(), {}
    for name, tensor in module.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype) if tensor.numel() else (name,)
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor
    return out


def _read_dir(directory: str | os.PathLike) -> tuple[bytes, dict]:
    directory = Path(directory)
    weights, config = directory / WEIGHTS_FILE, directory / CONFIG_FILE
    if not weights.is_file():
        raise WeightsError(f"{directory}: no {WEIGHTS_FILE} (expected an HF directory written by save_pretrained)")
    cfg = json.loads(config.read_text()) if config.is_file() else {}
    return weights.read_bytes(), cfg


@dataclass
class WeightsPayload:
    model: bytes | None  # safetensors of the causal LM's state dict
    adversary: bytes | None  # safetensors of the sequence-classifier adversary's state dict
    model_config: dict = field(default_factory=dict)  # HF config.json contents
    adversary_config: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.model is None and self.adversary is None:
            raise WeightsError("a weights payload needs the model, the adversary, or both")

    # -- building ------------------------------------------------------------------
    @classmethod
    def from_state_dicts(cls, model_state: dict | None, adversary_state: dict | None,
                         model_config: dict | None = None, adversary_config: dict | None = None) -> WeightsPayload:
        return cls(model=None if model_state is None else state_dict_bytes(model_state),
                   adversary=None if adversary_state is None else state_dict_bytes(adversary_state),
                   model_config=dict(model_config or {}), adversary_config=dict(adversary_config or {}))

    @classmethod
    def from_modules(cls, model=None, adversary=None) -> WeightsPayload:
        """From live transformers modules (e.g. the learner's, unwrapped from DDP). A tied
        weight (a model whose lm_head shares the embedding, as small Qwen and Llama models do)
        is sent once, under its first name, as `save_pretrained` writes it."""
        return cls.from_state_dicts(
            None if model is None else untied_state(model),
            None if adversary is None else untied_state(adversary),
            None if model is None else model.config.to_dict(),
            None if adversary is None else adversary.config.to_dict())

    @classmethod
    def from_dirs(cls, model_dir: str | os.PathLike | None, adversary_dir: str | os.PathLike | None) -> WeightsPayload:
        """From HF directories written by `ida_ray.models.save_pretrained`."""
        model, model_config = _read_dir(model_dir) if model_dir is not None else (None, {})
        adversary, adversary_config = _read_dir(adversary_dir) if adversary_dir is not None else (None, {})
        return cls(model, adversary, model_config, adversary_config)

    # -- using ---------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return len(self.model or b"") + len(self.adversary or b"")

    def model_state(self) -> dict[str, torch.Tensor] | None:
        return None if self.model is None else st_load(self.model)

    def adversary_state(self) -> dict[str, torch.Tensor] | None:
        return None if self.adversary is None else st_load(self.adversary)

    def write_dirs(self, root: str | os.PathLike) -> tuple[Path | None, Path | None]:
        """Write root/model and root/adversary (weights and config) on local storage.

        The weights file is written under a temporary name and renamed, so a reader never sees
        a half-written file."""
        root = Path(root)
        out = []
        for name, blob, cfg in (("model", self.model, self.model_config),
                                ("adversary", self.adversary, self.adversary_config)):
            if blob is None:
                out.append(None)
                continue
            d = root / name
            d.mkdir(parents=True, exist_ok=True)
            tmp = d / (WEIGHTS_FILE + ".part")
            tmp.write_bytes(blob)
            os.replace(tmp, d / WEIGHTS_FILE)
            if cfg:
                (d / CONFIG_FILE).write_text(json.dumps(cfg))
            out.append(d)
        return out[0], out[1]


def shapes_of_state(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def shapes_of_file(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a safetensors file, read from its header only."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def shapes_of_bytes(blob: bytes) -> dict[str, tuple[int, ...]]:
    return shapes_of_state(st_load(blob))


def check_shapes(expected: dict[str, tuple[int, ...]], got: dict[str, tuple[int, ...]], what: str) -> None:
    """Raise WeightsError naming the mismatching tensors when weights do not fit the served model
    (a payload from a different ModelSpec would otherwise fail deep inside the engine)."""
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or extra:
        raise WeightsError(f"{what} weights do not fit the served model: missing {missing[:5]}, "
                           f"unexpected {extra[:5]}")
    for k, shape in got.items():
        if tuple(shape) != tuple(expected[k]):
            raise WeightsError(f"{what} weight {k}: shape {tuple(shape)} != served {tuple(expected[k])}")


# -- whole model directories ---------------------------------------------------------
# A replica's initial model travels the same way as later weights: the driver packs the HF
# directory (weights, config, tokenizer files) into bytes, and each replica unpacks it on its
# own node, so starting (or restarting) a replica needs no shared filesystem.

def pack_dir(directory: str | os.PathLike) -> dict[str, bytes]:
    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file():
        raise WeightsError(f"{directory}: not an HF model directory (no {CONFIG_FILE})")
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def unpack_dir(files: dict[str, bytes], directory: str | os.PathLike) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        if "/" in name or name.startswith("."):
            raise WeightsError(f"refusing to unpack a file named {name!r}")
        (directory / name).write_bytes(blob)
    return directory
