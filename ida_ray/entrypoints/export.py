"""`ida-ray export`: a run's best (or last) model as a self-describing HF directory.

    ida-ray export runs/latest --out exports/sum-best            # the best iteration's model
    ida-ray export runs/latest --which last --out exports/sum-last

The directory is the model as `from_pretrained` and `vllm serve` load it (weights, config,
tokenizer), with
    adversary/     the adversary trained beside it (a scalar-head HF model)
    README.md      a model card: task, prompt format, iteration, held-out accuracy by size and
                   expert calls per tree per iteration, the config, the command that made it
    ida_ray.json   the same facts as data (`ida-ray eval` reads them: task, format, config)
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from ida_ray.errors import ConfigError
from ida_ray.run_dir import EXPORT_INFO_FILE, find_model, read_history, read_state


def export_model(run_dir: str | Path, out: str | Path, *, which: str = "best", command: str | None = None) -> Path:
    source = find_model(run_dir, which)
    if source.run_dir is None:
        raise ConfigError(f"{run_dir} is not a run directory: export takes a run (its best or last model)")
    out = Path(out).expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty: choose a new --out")
    state = read_state(source.run_dir) or {}
    history = read_history(source.run_dir, state.get("completed_iterations", 0))
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source.model_dir, tmp)
    if source.adversary_dir is not None:
        shutil.copytree(source.adversary_dir, tmp / "adversary")
    config = source.config or {}
    at = next((m for m in history if m["iteration"] == source.iteration), None)
    info = {
        "task": config.get("task"), "task_kwargs": config.get("task_kwargs"),
        "prompt_format": config.get("model", {}).get("prompt_format"), "which": source.which,
        "iteration": source.iteration, "run_dir": str(source.run_dir),
        "accuracy_by_size": at["accuracy_by_size"] if at else None,
        "history": [{"iteration": m["iteration"], "accuracy_by_size": m["accuracy_by_size"],
                     "expert_calls_per_tree": m["expert_calls_per_tree"]} for m in history],
        "config": config, "command": command or " ".join(["ida-ray", "export", *sys.argv[2:]]),
    }
    (tmp / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=1))
    (tmp / "README.md").write_text(model_card(info))
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


def model_card(info: dict) -> str:
    acc = info["accuracy_by_size"] or {}
    rows = "\n".join(f"| {m['iteration']} | " + " | ".join(f"{v:.2f}" for v in m["accuracy_by_size"].values())
                     + f" | {m['expert_calls_per_tree']:.2f} |" for m in info["history"])
    sizes = list(info["history"][0]["accuracy_by_size"]) if info["history"] else []
    head = "| iteration | " + " | ".join(f"size {s}" for s in sizes) + " | expert calls / tree |"
    line = "|---|" + "---|" * len(sizes) + "---|"
    config = json.dumps(info["config"], indent=1)
    return f"""---
library_name: transformers
tags: [ida-ray, iterated-amplification, distillation]
---
# {info['task']} model trained by ida-ray (adversarial IDA)

The {info['which']} model of the run `{info['run_dir']}`: its iteration {info['iteration']}, on the task
`{info['task']}` ({json.dumps(info['task_kwargs'])}), prompted in the `{info['prompt_format']}` format.
Held-out accuracy of the model alone at that iteration, by question size:
{', '.join(f'size {s}: {v:.2f}' for s, v in acc.items()) or 'not recorded'}.

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("<this directory>")
    # or: vllm serve <this directory>;  ida-ray eval <this directory>

`adversary/` holds the adversary trained beside it (a scalar head: how well the model is
expected to answer a prompt). Made by `{info['command']}`.

## Every iteration of the run

{head}
{line}
{rows}

## The run's config

```json
{config}
```
"""
