"""What the learner optimises, behind one interface, and one training round.

An `Objective` owns the trainable model, the adversary and their optimisers: it builds them
from the config, takes a model step and an adversary step on a minibatch of examples, reports
the round's own figures, saves and loads them, and names the model the replicas serve. Two
objectives:

  imitation  -log M(target) on every model example (ALGORITHM.md sections 2-3)
  honest     section 5: a two-headed model, the trees' labels through the intended head plus
             honest.lam * C on the trusted answers (ida_ray/honest/ida_trainer.py)

`train_round` is one iteration's training on one rank, the same in one process (the local
backend) and on every Ray Train rank (ida_ray/cluster/learner_worker.py): `wrap` is
`ray.train.torch.prepare_model` there (DDP when the world has more than one rank) and the
identity here. Pure torch: no Ray.
"""
from __future__ import annotations

import hashlib
import math
import random
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F

from ida_ray.config import IDAConfig, TrainConfig
from ida_ray.engine import adversary_scores
from ida_ray.examples import MODEL_KINDS, Example
from ida_ray.losses import collate_adversary, collate_adversary_packed, collate_lm, collate_lm_packed, model_loss
from ida_ray.messages import RoundStats, TrainCommand

Wrap = Callable[[torch.nn.Module], torch.nn.Module]


class Sample(Protocol):
    """The replay's draw (ReplayStore.sample, or a learner rank's call to the replay actor)."""

    def __call__(self, n: int, kinds: tuple[str, ...], seed: int, balance_sizes: bool = False) -> list[Example]: ...


def no_wrap(module: torch.nn.Module) -> torch.nn.Module:
    return module


class AdversaryScorer(torch.nn.Module):
    """The adversary's scalar score as a module's forward. DDP syncs the gradients of what runs
    through the wrapped module's forward; `adversary_scores` calls `adversary.model` and
    `adversary.score` directly, which would bypass a DDP wrapper around the adversary."""

    def __init__(self, adversary):
        super().__init__()
        self.adversary = adversary

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "position_ids" in batch:  # collate_adversary_packed: read at each sequence's last token
            hidden = self.adversary.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                          use_cache=False).last_hidden_state
            return self.adversary.score(hidden[batch["last_row"], batch["last_col"]]).squeeze(-1).float()
        return adversary_scores(self.adversary, batch["input_ids"], batch["attention_mask"])


def scorer_loss(scorer, batch) -> torch.Tensor:
    """L_Adv = (Adv(q, M(q)) - log M(A | q))^2, averaged."""
    return F.mse_loss(scorer(batch), batch["target"])


@dataclass
class TrainStats:
    model_loss: float = float("nan")
    adversary_loss: float = float("nan")
    model_steps: int = 0
    adversary_steps: int = 0


class Objective(ABC):
    """The trainable model, the adversary and their optimisers, and how one step trains them."""

    name: ClassVar[str]
    model: torch.nn.Module
    """What the objective trains (for honest, the two-headed model)."""
    adversary: torch.nn.Module
    tokenizer: object

    def __init__(self, adversary, tokenizer, train_cfg: TrainConfig, seed: int, device, wrap: Wrap):
        self.adversary, self.tokenizer, self.cfg, self.device = adversary.to(device), tokenizer, train_cfg, device
        self.adversary_opt = torch.optim.AdamW(adversary.parameters(), lr=train_cfg.adversary_lr)
        self.scorer = wrap(AdversaryScorer(self.adversary))
        self.rng = random.Random(seed)

    @classmethod
    @abstractmethod
    def build(cls, cfg: IDAConfig, *, rank: int = 0, world_size: int = 1, device="cpu",
              wrap: Wrap = no_wrap) -> Objective:
        """Fresh weights from cfg.model and cfg.seed: the same on every rank, as DDP's broadcast
        would make them."""

    @property
    @abstractmethod
    def served_model(self) -> torch.nn.Module:
        """The causal LM the replicas serve."""

    def prepare_round(self, examples: list[Example]) -> None:
        """Called with a round's model examples before its steps."""

    @abstractmethod
    def model_optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimisers of the model (not the adversary): what the learning-rate schedule sets."""

    def set_model_lr_factor(self, factor: float) -> None:
        """Every model parameter group at `factor` times the rate it was built with."""
        for opt in self.model_optimizers():
            for group in opt.param_groups:
                group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor

    def model_step(self, examples: list[Example]) -> float:
        return self.model_step_on(self.model_batch(examples))

    @abstractmethod
    def model_batch(self, examples: list[Example]):
        """A minibatch of model examples as the step takes it: tokenised, collated, on the
        device. Pure data work, so `train_round` makes the next ones on a background thread
        while the current step runs."""

    @abstractmethod
    def model_step_on(self, batch) -> float:
        """One optimiser step on a `model_batch`; returns the loss."""

    def adversary_step(self, examples: list[Example]) -> float:
        return self.adversary_step_on(self.adversary_batch(examples))

    def adversary_batch(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        return self._batch(collate_adversary_packed if self.cfg.pack_sequences else collate_adversary, examples)

    def adversary_step_on(self, batch: dict[str, torch.Tensor]) -> float:
        return self._step(self.scorer, self.adversary_opt, scorer_loss, batch)

    def round_stats(self, model_steps: int) -> dict:
        """The objective's own figures of the round just taken (none for imitation)."""
        return {}

    @abstractmethod
    def save_model(self, directory: Path) -> None:
        """The trained model as an HF directory (what `from_pretrained` and vLLM load)."""

    @abstractmethod
    def load_model(self, directory: Path) -> None: ...

    @abstractmethod
    def optimizer_states(self) -> dict: ...

    @abstractmethod
    def load_optimizer_states(self, states: dict) -> None: ...

    # -- shared machinery ------------------------------------------------------------------
    def _batch(self, collate, examples: list[Example]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in collate(self.tokenizer, examples).items()}

    def _step(self, module, opt, loss_fn, batch) -> float:
        module.train()
        loss = loss_fn(module, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), self.cfg.grad_clip)
        opt.step()
        module.eval()
        return float(loss.detach())

    def fit(self, examples: list[Example], steps: int | None = None, adversary_steps: int | None = None) -> TrainStats:
        """Minibatches drawn uniformly from `examples` (tests and experiments on one process)."""
        steps = self.cfg.steps_per_iteration if steps is None else steps
        adversary_steps = self.cfg.adversary_steps_per_iteration if adversary_steps is None else adversary_steps
        lm = [e for e in examples if e.kind in MODEL_KINDS]
        adv = [e for e in examples if e.kind == "adversary"]
        self.prepare_round(lm)
        stats, bs = TrainStats(), self.cfg.batch_size
        losses = [self.model_step([self.rng.choice(lm) for _ in range(bs)]) for _ in range(steps if lm else 0)]
        if losses:
            stats.model_loss, stats.model_steps = tail_mean(losses), len(losses)
        losses = [self.adversary_step([self.rng.choice(adv) for _ in range(bs)])
                  for _ in range(adversary_steps if adv else 0)]
        if losses:
            stats.adversary_loss, stats.adversary_steps = tail_mean(losses), len(losses)
        return stats


class ImitationObjective(Objective):
    """-log M(completion + EOS | prompt) on answer, fan-out and fan-in examples.

    With LoRA (M a peft model, `ida_ray.models.with_lora`) only the adapters train; what the
    replicas serve and checkpoints hold as `model/` is M with the adapters merged in, and the
    adapters themselves go to `model/lora/`, from which a resumed run continues."""

    name = "imitation"

    def __init__(self, model, adversary, tokenizer, train_cfg: TrainConfig, seed: int = 0, device="cpu",
                 wrap: Wrap = no_wrap):
        super().__init__(adversary, tokenizer, train_cfg, seed, device, wrap)
        self.model = model.to(device)
        self.lora = hasattr(model, "peft_config")
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.model_opt = torch.optim.AdamW(trainable, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
        # The optimiser holds the unwrapped parameters, which DDP shares, not copies.
        self.model_wrapped = wrap(self.model)
        self._merged = None  # with LoRA: the plain model the replicas are served, kept in step

    @classmethod
    def build(cls, cfg: IDAConfig, *, rank: int = 0, world_size: int = 1, device="cpu",
              wrap: Wrap = no_wrap) -> ImitationObjective:
        from ida_ray.models import build_adversary, build_model, with_lora

        model, tokenizer = build_model(cfg.model, cfg.seed)
        if cfg.model.lora_rank:
            model = with_lora(model, cfg.model)
        adversary, _ = build_adversary(cfg.model, cfg.seed + 1)
        return cls(model, adversary, tokenizer, cfg.train, cfg.seed + rank, device, wrap)

    @property
    def served_model(self) -> torch.nn.Module:
        if not self.lora:
            return self.model
        from ida_ray.models import merged_state_dict

        if self._merged is None:  # the base architecture, without adapters (a copy of M's size)
            from transformers import AutoModelForCausalLM

            base = self.model.get_base_model()
            self._merged = AutoModelForCausalLM.from_config(base.config, dtype=base.dtype).to(self.device)
            self._merged.generation_config = base.generation_config
            self._merged.eval()
        self._merged.load_state_dict(merged_state_dict(self.model))
        return self._merged

    def model_optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.model_opt]

    def model_batch(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        return self._batch(collate_lm_packed if self.cfg.pack_sequences else collate_lm, examples)

    def model_step_on(self, batch: dict[str, torch.Tensor]) -> float:
        return self._step(self.model_wrapped, self.model_opt, model_loss, batch)

    def save_model(self, directory: Path) -> None:
        from ida_ray.models import save_pretrained

        save_pretrained(self.served_model, self.tokenizer, directory)
        if self.lora:
            self.model.save_pretrained(Path(directory) / "lora")  # adapter_config.json, adapter_model.safetensors

    def load_model(self, directory: Path) -> None:
        if self.lora:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            from ida_ray.checkpoint import LearnerFailure

            adapter = Path(directory) / "lora" / "adapter_model.safetensors"
            if not adapter.exists():
                raise LearnerFailure(f"{directory} holds no LoRA adapter (lora/): it was not trained with LoRA")
            set_peft_model_state_dict(self.model, load_file(adapter))
            return
        from ida_ray.models import load_model

        self.model.load_state_dict(load_model(directory).state_dict())

    def optimizer_states(self) -> dict:
        return {"model_opt": self.model_opt.state_dict(), "adversary_opt": self.adversary_opt.state_dict()}

    def load_optimizer_states(self, states: dict) -> None:
        self.model_opt.load_state_dict(states["model_opt"])
        self.adversary_opt.load_state_dict(states["adversary_opt"])


def objective_class(name: str) -> type[Objective]:
    if name == "honest":
        from ida_ray.honest.ida_trainer import HonestObjective

        return HonestObjective
    return ImitationObjective


def build_objective(cfg: IDAConfig, **kwargs) -> Objective:
    """cfg.objective's Objective, built fresh (kwargs: rank, world_size, device, wrap)."""
    return objective_class(cfg.objective).build(cfg, **kwargs)


# ---------------------------------------------------------------------------------------
# One training round.
# ---------------------------------------------------------------------------------------
def tail_mean(losses: list[float], n: int = 20) -> float:
    """Mean of the last n losses: the round's end, not its start."""
    return sum(losses[-n:]) / len(losses[-n:]) if losses else float("nan")


def local_batch_size(global_batch: int, world_size: int) -> int:
    """Per-rank batch so the DDP-averaged step sees about the configured global batch."""
    return max(1, math.ceil(global_batch / world_size))


def round_seed(seed: int, iteration: int, rank: int) -> int:
    """Each rank's sampling seed for a round: reproducible, different per rank and iteration."""
    return (seed * 1_000_003 + iteration) * 1009 + rank


def _all_reduce(t: torch.Tensor, world_size: int, op=None) -> torch.Tensor:
    import torch.distributed as dist

    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def train_command(cfg: IDAConfig, iteration: int, model_steps: int | None = None,
                  adversary_steps: int | None = None, broadcast_to: tuple = ()) -> TrainCommand:
    """Iteration `iteration`'s round, with where it stands in the run's learning-rate schedule
    (every earlier round took train.steps_per_iteration steps)."""
    t = cfg.train
    return TrainCommand(iteration=iteration, model_steps=t.steps_per_iteration if model_steps is None else model_steps,
                        adversary_steps=t.adversary_steps_per_iteration if adversary_steps is None else adversary_steps,
                        first_step=iteration * t.steps_per_iteration, total_steps=cfg.iterations * t.steps_per_iteration,
                        broadcast_to=tuple(broadcast_to))


def model_examples(sample: Sample, n: int, answer_share: float | None, base_seed: int,
                   balance_answer_sizes: bool = False) -> list[Example]:
    """The round's n model examples: drawn alike from the replay's answer, fan-out and fan-in
    examples, or with `answer_share` (train.answer_share) that share of answers and the rest of
    fan-outs and fan-ins, shuffled together (each minibatch holds the share on average). Where the
    replay holds only one of the two groups, every draw comes from what it holds. With
    `balance_answer_sizes` the answers are drawn equally from each question size; without an
    answer_share they are then the share of answers the replay holds."""
    if answer_share is None and not balance_answer_sizes:
        return sample(n, MODEL_KINDS, base_seed * 2)
    if answer_share is None:  # the kinds as the trees made them, the answers among them by size
        drawn = sample(n, MODEL_KINDS, base_seed * 2)
        answers = iter(sample(sum(e.kind == "answer" for e in drawn), ("answer",), base_seed * 4 + 2,
                              balance_sizes=True))
        return [next(answers) if e.kind == "answer" else e for e in drawn]
    n_answers = round(n * answer_share)
    answers = sample(n_answers, ("answer",), base_seed * 4 + 2, balance_sizes=balance_answer_sizes)
    steps = sample(n - n_answers, ("fan_out", "fan_in"), base_seed * 4 + 3)
    if not answers or (n_answers < n and not steps):
        return sample(n, MODEL_KINDS, base_seed * 2)
    drawn = answers + steps
    random.Random(base_seed * 4 + 1).shuffle(drawn)
    return drawn


def train_round(objective: Objective, sample: Sample, command: TrainCommand, *, seed: int, rank: int = 0,
                world_size: int = 1) -> RoundStats:
    """One iteration's training on this rank: sample, model steps, adversary steps. Every rank
    takes the same number of DDP steps (each is a collective), so the ranks agree by
    all-reduce on whether there is data of each kind before stepping."""
    import torch.distributed as dist

    it, bs = command.iteration, local_batch_size(objective.cfg.batch_size, world_size)
    base = round_seed(seed, it, rank)
    lm = model_examples(sample, command.model_steps * bs, objective.cfg.answer_share, base,
                        objective.cfg.balance_answer_sizes)
    adv = sample(command.adversary_steps * bs, ("adversary",), base * 2 + 1)
    # On the objective's device: NCCL, the GPU process group, reduces no CPU tensors.
    have = torch.tensor([len(lm) > 0, len(adv) > 0], dtype=torch.int64, device=objective.device)
    if world_size > 1:
        _all_reduce(have, world_size, dist.ReduceOp.MIN)
    objective.prepare_round(lm)
    t0 = time.time()
    have = have.tolist()
    chunks = [lm[i * bs:(i + 1) * bs] for i in range(command.model_steps if have[0] else 0)]
    m_losses = []
    for i, batch in enumerate(prefetched(objective.model_batch, chunks)):
        if command.total_steps:
            objective.set_model_lr_factor(objective.cfg.lr_factor(command.first_step + i, command.total_steps))
        m_losses.append(objective.model_step_on(batch))
    t_model = time.time() - t0
    a_chunks = [adv[i * bs:(i + 1) * bs] for i in range(command.adversary_steps if have[1] else 0)]
    a_losses = [objective.adversary_step_on(b) for b in prefetched(objective.adversary_batch, a_chunks)]
    losses = torch.tensor([tail_mean(m_losses), tail_mean(a_losses)], dtype=torch.float64, device=objective.device)
    _all_reduce(losses, world_size)
    losses /= world_size
    losses = losses.cpu()
    trained = [e.weight_version for c in chunks[:len(m_losses)] + a_chunks[:len(a_losses)] for e in c]
    return RoundStats(iteration=it, weight_version=it + 1, model_loss=float(losses[0]),
                      oldest_weight_version=min(trained) if trained else None,
                      adversary_loss=float(losses[1]), model_steps=len(m_losses), adversary_steps=len(a_losses),
                      model_train_seconds=round(t_model, 3), train_seconds=round(time.time() - t0, 3),
                      local_batch_size=bs, objective_stats=objective.round_stats(len(m_losses)))


def prefetched(make: Callable, items: list, depth: int = 2):
    """make(item) for each item, in order, made up to `depth` items ahead on one background
    thread: the learner's tokenisation and collation run while the previous step computes
    (torch releases the GIL in its kernels). One thread, in order, so results - and any RNG
    that `make` draws from - are what a plain loop gives."""
    if not items:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="ida-prefetch") as pool:
        pending = deque(pool.submit(make, x) for x in items[:depth])
        for x in items[depth:]:
            ready = pending.popleft().result()
            pending.append(pool.submit(make, x))
            yield ready
        while pending:
            yield pending.popleft().result()


def param_digest(objective: Objective) -> str:
    """sha256 over every trained parameter's bytes: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for module in (objective.model, objective.adversary):
        for name, p in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
