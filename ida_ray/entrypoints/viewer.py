"""Browse a run's trees in the browser; optionally be the expert yourself.

    python -m ida_ray.entrypoints.viewer --run-dir runs/latest [--port 8266] [--host 127.0.0.1]
    python -m ida_ray.entrypoints.viewer --run-dir D --human --task sum --question 1,2,3,4

With --human, every fan-out and fan-in the expert H would take goes to the page /human,
where you answer it; the model is the project's tiny Llama (fresh, or --model-dir with
model/ and adversary/ HF directories), served in-process by TorchEngine. Finished trees are
written to <run-dir>/trees/human.jsonl and listed on the tree page. Binds to 127.0.0.1 unless
--host says otherwise: the page lets whoever reaches it act as the expert.

`ida-ray train --expert human` serves the same page beside a training run (`serve_in_thread`).
"""
from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from pathlib import Path

from ida_ray.config import AmplifyConfig
from ida_ray.errors import IDAError


def build_human_runs(run_dir: Path, task_name: str, timeout_s: float, seed: int, model_dir: str | None,
                     max_new_tokens: int):
    """HumanRuns on the tiny model served in-process (the engine of the local backend)."""
    from ida_ray.engine import TorchEngine
    from ida_ray.experts import HumanQueue
    from ida_ray.models import ModelSpec, build_adversary, build_model, load_adversary, load_model, load_tokenizer
    from ida_ray.tasks import get_task
    from ida_ray.viewer.human_runs import HumanRuns

    task = get_task(task_name)
    if model_dir:
        model, adversary = load_model(Path(model_dir) / "model"), load_adversary(Path(model_dir) / "adversary")
        tokenizer = load_tokenizer(Path(model_dir) / "model")  # the model's own
    else:
        model, tokenizer = build_model(ModelSpec(), seed)
        adversary, _ = build_adversary(ModelSpec(), seed + 1)
    engine = TorchEngine(model, adversary, tokenizer, max_new_tokens=max_new_tokens)
    cfg = AmplifyConfig(max_new_tokens=max_new_tokens)
    return HumanRuns(task, engine, cfg, HumanQueue(timeout_s), run_dir, seed=seed)


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, for a page that is served on it later (`PageServer(sock=)`).

    Bound at once and held: between a run's checks and its page coming up, the driver starts
    Ray, whose processes bind ports of their own, so a port that was merely found free could be
    taken by then (it was, once, in CI). OSError names the cause when the port is taken."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen()  # listening, not only bound: a bound socket does not keep out others' SO_REUSEADDR binds
    except OSError:
        sock.close()
        raise
    return sock


class PageServer:
    """A viewer app served by uvicorn in a daemon thread of this process (the training driver).

    `start()` returns once the socket listens, or raises OSError if uvicorn could not bind."""

    def __init__(self, app, host: str, port: int, sock: socket.socket | None = None):
        """sock: a socket already bound to host:port (`reserve_port`), served on instead of
        binding here; closed with the server."""
        import uvicorn

        self.host, self.port, self.sock = host, port, sock
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self._run, name="ida-run-pages", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            # No signal handlers off the main thread: Ctrl-C stays the driver's.
            self.server.run(sockets=None if self.sock is None else [self.sock])
        except BaseException as exc:  # noqa: BLE001 - uvicorn exits (SystemExit) when it cannot bind
            self.error = exc

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> PageServer:
        self.thread.start()
        deadline = time.time() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                self.stop()
                raise OSError(f"could not serve the run's pages on {self.host}:{self.port}"
                              + (f" ({self.error!r})" if self.error else ""))
            time.sleep(0.05)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout_s)
        if self.sock is not None:
            self.sock.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs/latest")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8266)
    ap.add_argument("--human", action="store_true", help="enable the human expert queue at /human")
    ap.add_argument("--task", default="sum", help="task of the human trees")
    ap.add_argument("--question", action="append", default=[], help="start a human tree on this question "
                                                                     "(repeatable; more can be started on the page)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for each of your replies")
    ap.add_argument("--model-dir", help="directory with model/ and adversary/ (default: a fresh tiny model)")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    run_dir = Path(args.run_dir)
    if args.question and not args.human:
        ap.error("--question needs --human")
    if not args.human and not run_dir.is_dir():
        ap.error(f"run directory {run_dir} does not exist")
    human = None
    try:
        if args.human:
            human = build_human_runs(run_dir, args.task, args.timeout, args.seed, args.model_dir, args.max_new_tokens)
            for q in args.question:
                human.task.parse(q)  # a bad question fails here, before the server starts
    except (IDAError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import uvicorn

    from ida_ray.viewer import create_app
    from ida_ray.viewer.app import page_guard

    token = page_guard(args.host)  # off localhost, the pages ask for this token
    app = create_app(run_dir, human, tuple(args.question), token=token)
    page = ("/human" if args.human else "/") + (f"?token={token}" if token else "")
    print(f"ida-ray viewer for {run_dir}: http://{args.host}:{args.port}{page}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
