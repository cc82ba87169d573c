"""The learner's data path: a training round with its minibatches made ahead on a background
thread (`ida_ray.training.train_round`, `prefetched`) against the same steps with each
minibatch tokenised and collated in turn on the training thread.

    python -m experiments.learner_prefetch [--steps 100] [--repeats 3] [--out docs/results/learner_prefetch.json]

Model, tokenizer, batch size and learning rate of the default run (configs/default.yaml), one
process on this CPU, torch's default threads. Examples: answers to the default task's
questions at its training sizes, in the compact format (the lengths of what the default run's
replay buffer holds). Both arms start from the same weights and train on the same minibatches
(their losses are checked equal); the arms alternate, `--repeats` times each, and the medians
count. Reported: seconds per model step for each arm, and the share of a step that making
its batch takes (measured alone).
"""
from __future__ import annotations

import dataclasses
import random
import statistics
import time

from experiments import common


def build_examples(cfg, n: int, seed: int = 0):
    from ida_ray.examples import Example
    from ida_ray.tasks import get_task

    task, rng, fmt = get_task(cfg.task, **cfg.task_kwargs), random.Random(seed), cfg.model.make_format()
    sizes = cfg.sizes(task)
    out = []
    for _ in range(n):
        q = task.generate(rng.choice(sizes), rng)
        out.append(Example("answer", fmt.answer_prompt(q), task.solve(q)))
    return out


def main(argv=None) -> dict:
    ap = common.parser(__doc__, "learner_prefetch")
    ap.add_argument("--steps", type=int, default=100, help="model steps per round")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import torch

    from ida_ray.config import load_config
    from ida_ray.messages import TrainCommand
    from ida_ray.training import ImitationObjective, train_round

    cfg = load_config("default")
    bs = cfg.train.batch_size
    examples = build_examples(cfg, args.steps * bs)
    sample = lambda n, kinds, seed: examples[:n] if "adversary" not in kinds else []  # noqa: E731
    chunks = [examples[i * bs:(i + 1) * bs] for i in range(args.steps)]
    log = common.timed_log("learner_prefetch")

    def prefetched_round() -> tuple[float, float]:
        objective = ImitationObjective.build(cfg)
        t0 = time.perf_counter()
        stats = train_round(objective, sample, TrainCommand(0, args.steps, 0), seed=0)
        return time.perf_counter() - t0, stats.model_loss

    def in_turn_round() -> tuple[float, float]:
        objective = ImitationObjective.build(cfg)
        t0 = time.perf_counter()
        losses = [objective.model_step_on(objective.model_batch(c)) for c in chunks]
        return time.perf_counter() - t0, sum(losses[-20:]) / len(losses[-20:])

    objective = ImitationObjective.build(cfg)
    t0 = time.perf_counter()
    for c in chunks:
        objective.model_batch(c)
    batch_seconds = (time.perf_counter() - t0) / len(chunks)

    runs = {"prefetched": [], "in_turn": []}
    for r in range(args.repeats):
        for name, fn in (("prefetched", prefetched_round), ("in_turn", in_turn_round)):
            seconds, loss = fn()
            runs[name].append({"seconds": round(seconds, 3), "loss": loss})
            log(f"repeat {r}: {name} {seconds:.2f}s for {args.steps} steps (loss {loss:.4f})")
    losses = {name: [x["loss"] for x in rs] for name, rs in runs.items()}
    if max(abs(a - b) for a, b in zip(losses["prefetched"], losses["in_turn"])) > 1e-5:
        raise RuntimeError(f"the arms trained differently: {losses}")
    per_step = {name: round(statistics.median(x["seconds"] for x in rs) / args.steps, 4) for name, rs in runs.items()}
    result = {
        "seconds_per_step": per_step, "speedup": round(per_step["in_turn"] / per_step["prefetched"], 3),
        "batch_seconds": round(batch_seconds, 4), "batch_share_of_step": round(batch_seconds / per_step["in_turn"], 3),
        "steps": args.steps, "batch_size": bs, "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
        "model": dataclasses.asdict(cfg.model),
        "device": "cpu (2 cores)", "runs": runs}
    common.write_result(result, args.out, "learner_prefetch", argv)
    log(f"seconds per step: {per_step}; speed-up {result['speedup']}x; making a batch takes {batch_seconds:.4f}s "
        f"({result['batch_share_of_step']:.0%} of a step)")
    return result


if __name__ == "__main__":
    main()
