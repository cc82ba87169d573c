"""A person as the expert H of a training run (`ida-ray train --expert human`).

`HumanPage` starts the run's queue actor (ida_ray/actors/human_queue.py), whose requests every
expander's amplification trees wait on, and serves the viewer's /human page over it from the
driver's process (bound to cfg.pages_host, 127.0.0.1 by default): the person answers each
fan-out and fan-in there, a malformed answer comes back with the task parser's error, and a
request left unanswered for cfg.human_timeout_s fails its tree (an ExpertFailure) while the
run goes on. `ida-ray train --expert human` sizes the run for one person (HUMAN_AMPLIFY_TREES).
"""
from __future__ import annotations

from ida_ray.config import IDAConfig

# Amplification trees per iteration when a person is the expert and nothing else is asked for:
# at the start each tree is ~4-15 requests (fewer as H' takes over), so an iteration is minutes.
HUMAN_AMPLIFY_TREES = 4


class HumanPage:
    """The queue actor and the /human page of an `expert: human` run; the page's status line
    is the run's progress, read from the coordinator once `coordinator` is set."""

    def __init__(self, cfg: IDAConfig, sock, log=print):
        """sock: the page's socket, bound to cfg.pages_host:cfg.pages_port before Ray started
        (`reserve_port`)."""
        from ida_ray.actors.human_queue import RayHumanBackend, start_human_queue
        from ida_ray.entrypoints.viewer import PageServer
        from ida_ray.viewer import create_app
        from ida_ray.viewer.app import page_guard

        self.cfg, self.coordinator = cfg, None
        self.queue = start_human_queue(cfg.human_timeout_s)
        try:
            token = page_guard(cfg.pages_host)  # off localhost, the page asks for this token
            app = create_app(cfg.run_dir, RayHumanBackend(self.queue, status=self.status), token=token)
            self.server = PageServer(app, cfg.pages_host, cfg.pages_port, sock=sock).start()
        except BaseException:
            self._kill_queue()
            raise
        self.url = f"{self.server.url}/human" + (f"?token={token}" if token else "")
        log(f"you are the expert: answer the run's requests at {self.url}\n"
            f"  (each waits up to {cfg.human_timeout_s:g}s; unanswered, its tree is recorded as failed and the run "
            f"goes on)")

    def status(self) -> str:
        import ray

        cfg = self.cfg
        if self.coordinator is None:
            return f"training run {cfg.run_dir}: starting"
        try:
            p = ray.get(self.coordinator.progress.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - a status line never breaks the page
            return f"training run {cfg.run_dir}: busy"
        line = f"training run {cfg.run_dir}: iteration {min(p['completed'] + 1, cfg.iterations)} of {cfg.iterations}"
        line += f", {p['phase']}" + (f" ({p['done']}/{p['total']} trees done)" if p["total"] else "")
        return line

    def _kill_queue(self) -> None:
        import ray

        try:
            ray.kill(self.queue, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def close(self) -> None:
        self.server.stop()
        self._kill_queue()
