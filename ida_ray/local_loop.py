"""The whole IDA loop in one process, on the in-process torch engine (no Ray).

Each iteration: draw questions (training distribution plus adversarial ones), expand
amplification trees with H' and distillation trees with the model alone, all concurrently
so the engine batches their calls; add their examples to the replay buffer; train the model
and the adversary; swap the new weights into the engine; evaluate the model alone on
held-out questions by size. The Ray version (ida_ray/actors/coordinator.py) runs the same steps with
the work spread over actors.
"""
from __future__ import annotations

import asyncio
import copy
import json
import random
import time
from pathlib import Path

from ida_ray.amplify import amplify_tree, distill_tree
from ida_ray.config import IDAConfig
from ida_ray.engine import TorchEngine, gather_limited
from ida_ray.evaluation import evaluate, heldout_questions
from ida_ray.examples import tree_examples
from ida_ray.iteration import draw_questions, tree_metrics
from ida_ray.models import build_adversary, build_model
from ida_ray.replay import ReplayBuffer
from ida_ray.tasks import get_task
from ida_ray.training import Trainer


class LocalIDA:
    def __init__(self, cfg: IDAConfig, log=print):
        self.cfg = cfg.validate()
        self.log = log
        self.task = get_task(cfg.task, **cfg.task_kwargs)
        model, tokenizer = build_model(cfg.model, cfg.seed)
        adversary, _ = build_adversary(cfg.model, cfg.seed + 1)
        self.trainer = Trainer(model, adversary, tokenizer, cfg.train, cfg.seed)
        # The engine serves its own copy of the weights: like a replica, it sees new weights
        # only when they are swapped in after training.
        self.engine = TorchEngine(copy.deepcopy(model), copy.deepcopy(adversary), tokenizer,
                                  max_new_tokens=cfg.amplify.max_new_tokens)
        self.buffer = ReplayBuffer(cfg.train.replay_capacity, seed=cfg.seed)
        self.rng = random.Random(cfg.seed)
        self.heldout = heldout_questions(self.task, cfg.sizes(self.task), cfg.eval_questions_per_size, cfg.seed)
        self.history: list[dict] = []
        self.trees = []

    async def run_iteration(self, it: int) -> dict:
        cfg, t0 = self.cfg, time.time()
        questions = await draw_questions(self.task, self.engine, cfg, cfg.amplify_trees_per_iteration, self.rng,
                                         adversarial=it > 0)
        seeds = [self.rng.randrange(2**31) for _ in questions]
        amp = gather_limited([amplify_tree(self.task, self.engine, q, cfg.amplify, random.Random(s), it, source=src)
                              for (q, src), s in zip(questions, seeds)], cfg.trees_in_flight)
        sizes = cfg.sizes(self.task)
        dq = [self.task.generate(self.rng.choice(sizes), self.rng) for _ in range(cfg.distill_trees_per_iteration)]
        dis = gather_limited([distill_tree(self.task, self.engine, q, cfg.amplify, it) for q in dq],
                             cfg.trees_in_flight)
        amp_trees, dis_trees = await asyncio.gather(amp, dis)
        trees = amp_trees + dis_trees
        t_expand = time.time() - t0
        examples = [e for t in trees for e in tree_examples(t)]
        self.buffer.add(examples)
        stats = self.trainer.fit(self.buffer.all())
        self.engine.load_state(self.trainer.model.state_dict(), self.trainer.adversary.state_dict(), it + 1)
        accuracy = await evaluate(self.task, self.engine, self.heldout)
        m = tree_metrics(trees)
        m.update(iteration=it, weight_version=self.engine.weight_version, examples=len(examples),
                 buffer=len(self.buffer), model_loss=stats.model_loss, adversary_loss=stats.adversary_loss,
                 accuracy_by_size=accuracy, expand_seconds=round(t_expand, 2),
                 seconds=round(time.time() - t0, 2))
        self.history.append(m)
        self.trees = trees
        return m

    async def run(self) -> list[dict]:
        run_dir = Path(self.cfg.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "metrics.jsonl", "a") as f:
            for it in range(self.cfg.iterations):
                m = await self.run_iteration(it)
                f.write(json.dumps(m) + "\n")
                f.flush()
                acc = " ".join(f"{s}:{a:.2f}" for s, a in m["accuracy_by_size"].items())
                self.log(f"iter {it}: expert calls/tree {m['expert_calls_per_tree']:.2f} "
                         f"loss {m['model_loss']:.3f} adv {m['adversary_loss']:.3f} acc {acc} ({m['seconds']}s)")
        return self.history
