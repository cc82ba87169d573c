"""A supervised probe for a natural-language task: how fast the run's tiny Qwen2 (its BPE
tokenizer trained on the task's prompts, the chat format) learns the direct answers when
given ground-truth labels. It sizes the IDA preset (configs/natural_language.yaml): IDA's
distillation cannot teach faster than this.

    python -m experiments.nl_probe [--hidden 64 --layers 2 --steps 4500 --lr 1e-3] [--pool N]
                                   [--task-kwargs '{"base_size": 1, "max_coins": 3, "shuffle": false}']

Prints the loss and held-out exact-match accuracy by size (teacher-forced greedy match of the
whole "Answer: N" completion) every 150 steps. Not the IDA system: a probe of the model alone.
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="coins")
    ap.add_argument("--task-kwargs", type=json.loads, default={"base_size": 1, "max_coins": 3, "shuffle": False})
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.01,
                    help="AdamW's (torch's default, as the probe's earlier figures; the learner's train.weight_decay is 0)")
    ap.add_argument("--sizes", default="1,2,3,4")
    ap.add_argument("--pool", type=int, default=0,
                    help="train on a fixed pool of this many questions a size, drawn again and again (as a "
                         "replay holds a few hundred of each), instead of a fresh question every draw")
    a = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from ida_ray.examples import Example
    from ida_ray.losses import collate_lm, model_loss
    from ida_ray.models import create_tiny_qwen2, load_tokenizer, task_corpus
    from ida_ray.prompts import prompt_format
    from ida_ray.tasks import get_task

    task, sizes = get_task(a.task, **a.task_kwargs), [int(s) for s in a.sizes.split(",")]
    directory = tempfile.mkdtemp(prefix="nl_probe_")
    corpus = task_corpus(task, sizes, n=600, fmt=prompt_format("chat")) + ["system\nuser\nassistant\n"] * 50
    create_tiny_qwen2(directory, corpus, hidden_size=a.hidden, num_layers=a.layers, num_heads=a.heads,
                      num_kv_heads=a.heads, max_positions=512, vocab_size=512)
    tok, model = load_tokenizer(directory), AutoModelForCausalLM.from_pretrained(directory)
    fmt = prompt_format("chat", tok)
    print(f"{sum(p.numel() for p in model.parameters())} parameters", flush=True)
    rng, heldout_rng = random.Random(0), random.Random(123)
    heldout = {s: [task.generate(s, heldout_rng) for _ in range(100)] for s in sizes}
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay)

    def example(q):
        return Example("answer", fmt.answer_prompt(q), fmt.format_answer(task.solve(q)))

    def accuracy() -> dict[int, float]:
        model.eval()
        out = {}
        with torch.no_grad():
            for s, qs in heldout.items():
                b = collate_lm(tok, [example(q) for q in qs])
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                pred, labels = logits[:, :-1].argmax(-1), b["labels"][:, 1:]
                out[s] = round(float(((pred == labels) | (labels == -100)).all(1).float().mean()), 2)
        model.train()
        return out

    pool = {s: [task.generate(s, rng) for _ in range(a.pool)] for s in sizes} if a.pool else None

    def draw() -> str:
        size = rng.choice(sizes)
        return rng.choice(pool[size]) if pool else task.generate(size, rng)

    t0 = time.time()
    for step in range(1, a.steps + 1):
        batch = [example(draw()) for _ in range(a.batch_size)]
        loss = model_loss(model, collate_lm(tok, batch))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 150 == 0:
            print(f"step {step}: loss {float(loss):.3f} accuracy {accuracy()} ({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
