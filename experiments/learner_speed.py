"""The learner's steps per second on this CPU: where a round's time goes, and what makes it faster.

    python -m experiments.learner_speed [--examples runs/default_run/seed_0/replay/examples.jsonl]
                                        [--steps 300] [--adversary-steps 50] [--repeats 3]
                                        [--out docs/results/learner_speed.json]

The workload is a real one: the examples a default run's replay buffer spilled (answers,
fan-outs, fan-ins and adversary examples, as `ida-ray train` made them; `python -m
experiments.default_run` or `ida-ray train` writes them). The model, tokenizer, batch size and
learning rate are the default run's (configs/default.yaml). Every arm trains one round
(`ida_ray.training.train_round`, the function the Ray Train worker runs) of `--steps` model
and `--adversary-steps` adversary steps from the same fresh weights on the same sampled
examples; arms alternate, `--repeats` times each, medians count. Arms:

  before        today's default learner here: one torch thread (what Ray gives a 1-CPU
                worker), minibatches in sampled order
  packed        train.pack_sequences: several sequences to a row, each attending to itself
                alone (the same loss and gradients, on fewer positions)
  two_threads   resources.learner_threads 2 (the replicas idle while a sync run trains)
  after         both

Each arm's held-out loss after its round (512 model examples of the spill that no arm trains
on) shows whether it learns as much per step. The profile: one baseline round's model steps
split into making the batch, forward and loss, backward, and clip and optimiser step.
"""
from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path

from experiments import common

ARMS = {"before": (1, False), "packed": (1, True), "two_threads": (2, False), "after": (2, True)}


def read_examples(path: Path):
    from ida_ray.examples import Example

    if not path.exists():
        raise SystemExit(f"{path}: no replay spill; run `ida-ray train` (or python -m experiments.default_run) first")
    return [Example(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def profile_steps(objective, batches) -> dict:
    """Seconds per model step by part (batch making on the training thread, for the split)."""
    import torch

    from ida_ray.losses import model_loss

    parts = {"make_batch": 0.0, "forward_and_loss": 0.0, "backward": 0.0, "clip_and_optimizer": 0.0}
    model, opt = objective.model, objective.model_opt
    for examples in batches:
        t0 = time.perf_counter()
        batch = objective.model_batch(examples)
        t1 = time.perf_counter()
        model.train()
        loss = model_loss(model, batch)
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), objective.cfg.grad_clip)
        opt.step()
        t4 = time.perf_counter()
        for name, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            parts[name] += dt
    return {k: round(v / len(batches), 5) for k, v in parts.items()}


def main(argv=None) -> dict:
    ap = common.parser(__doc__, "learner_speed")
    ap.add_argument("--examples", type=Path, default=common.ROOT / "runs/default_run/seed_0/replay/examples.jsonl")
    ap.add_argument("--steps", type=int, default=300, help="model steps per round (default: the default run's)")
    ap.add_argument("--adversary-steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import dataclasses

    import torch

    from ida_ray.config import load_config
    from ida_ray.examples import MODEL_KINDS
    from ida_ray.losses import collate_lm, model_loss
    from ida_ray.messages import TrainCommand
    from ida_ray.training import ImitationObjective, train_round

    log = common.timed_log("learner_speed")
    base = load_config("default")
    examples = read_examples(args.examples)
    rng = random.Random(0)
    rng.shuffle(examples)
    model_examples = [e for e in examples if e.kind in MODEL_KINDS]
    heldout, held_ids = model_examples[:512], {id(e) for e in model_examples[:512]}
    pool = [e for e in examples if id(e) not in held_ids]
    bs = base.train.batch_size
    drawn = {}  # every arm trains on these, in this order
    for k, (kinds, n) in enumerate(((MODEL_KINDS, args.steps), (("adversary",), args.adversary_steps))):
        of_kind, draw = [e for e in pool if e.kind in kinds], random.Random(k)
        drawn[kinds] = [draw.choice(of_kind) for _ in range(n * bs)]
    sample = lambda n, kinds, seed: drawn[tuple(kinds)][:n]  # noqa: E731
    # The mix as a random minibatch pads it: the share of positions that are padding.
    lengths = [len(e.prompt) + len(e.completion) + 2 for e in drawn[MODEL_KINDS]]
    batches = [lengths[i * bs:(i + 1) * bs] for i in range(args.steps)]
    padding = 1 - sum(lengths) / sum(max(b) * len(b) for b in batches)

    def heldout_loss(objective) -> float:
        with torch.no_grad():
            losses = [float(model_loss(objective.model, collate_lm(objective.tokenizer, heldout[i:i + bs])))
                      for i in range(0, len(heldout), bs)]
        return round(sum(losses) / len(losses), 4)

    def objective_for(pack: bool) -> ImitationObjective:
        """Fresh default-run weights, with or without packed minibatches."""
        return ImitationObjective.build(dataclasses.replace(base, train=dataclasses.replace(base.train,
                                                                                            pack_sequences=pack)))

    def run_arm(name: str) -> dict:
        threads, pack = ARMS[name]
        torch.set_num_threads(threads)
        objective = objective_for(pack)
        t0 = time.perf_counter()
        stats = train_round(objective, sample, TrainCommand(0, args.steps, args.adversary_steps), seed=0)
        seconds = time.perf_counter() - t0
        return {"seconds": round(seconds, 2), "model_seconds": stats.model_train_seconds,
                "adversary_seconds": round(stats.train_seconds - stats.model_train_seconds, 2),
                "heldout_loss": heldout_loss(objective), "train_loss": round(stats.model_loss, 4)}

    runs: dict[str, list[dict]] = {name: [] for name in ARMS}
    for r in range(args.repeats):
        for name in ARMS:
            runs[name].append(run_arm(name))
            log(f"repeat {r}: {name} {runs[name][-1]}")

    torch.set_num_threads(1)
    profile, n = {}, min(60, args.steps)
    profile_batches = [drawn[MODEL_KINDS][i * bs:(i + 1) * bs] for i in range(n)]
    for name, pack in (("one_thread_padded", False), ("one_thread_packed", True)):
        profile[name] = profile_steps(objective_for(pack), profile_batches)

    steps = args.steps + args.adversary_steps
    arms = {}
    for name, rows in runs.items():
        med = lambda key: statistics.median(row[key] for row in rows)  # noqa: E731
        arms[name] = {"threads": ARMS[name][0], "pack_sequences": ARMS[name][1],
                      "steps_per_second": round(steps / med("seconds"), 2),
                      "model_steps_per_second": round(args.steps / med("model_seconds"), 2),
                      "adversary_steps_per_second": round(args.adversary_steps / med("adversary_seconds"), 2),
                      "heldout_loss": med("heldout_loss"), "repeats": rows}
    before, after = arms["before"]["steps_per_second"], arms["after"]["steps_per_second"]
    result = {"steps_per_second_before": before, "steps_per_second_after": after,
              "speedup": round(after / before, 2), "goal_speedup": 2.0, "goal_met": after / before >= 2.0,
              "padding_share_sampled_order": round(padding, 3), "arms": arms, "profile_seconds_per_model_step": profile,
              "examples": str(args.examples), "examples_count": len(examples),
              "steps": args.steps, "adversary_steps": args.adversary_steps, "batch_size": bs}
    common.write_result(result, args.out, "learner_speed", argv)
    log(f"steps/s {before} -> {after} ({result['speedup']}x); padding {padding:.0%}; profile {profile}")
    return result


if __name__ == "__main__":
    main()
