"""The viewer's web app: a JSON API over a run directory's trees, the static pages that use it,
and, when a human backend is given, the queue through which a person acts as the expert.

    /                 progress plot, tree list with filters and search
                                                      GET /api/trees?task=&size=&q=&...
                                                      GET /api/metrics (metrics.jsonl, per iteration)
    /tree/<id>        one tree, nodes expandable      GET /api/trees/<id>
    /question?q=      one question's trees across iterations, side by side
                                                      GET /api/question?q=
    /human            pending expert requests         GET /api/human/requests
                                                       POST /api/human/requests/<id> {"text"}
                                                       GET|POST /api/human/runs {"question"}

Off localhost (`page_guard(host)` gives a token for any host that is not loopback) every
page and API call needs the run's token, given once as `?token=...` (the URL printed at start,
as Jupyter does; it is then kept in a same-site cookie) or as an `Authorization: token ...`
header; a POST from another site (its Origin is not this server) is refused, and so is a body
over MAX_BODY_BYTES. On 127.0.0.1 none of this is asked: only this machine reaches the page.

The human backend is `ida_ray.viewer.human_runs.HumanRuns` for `ida-ray view --human` (trees
run in the server's process and are started from the page) or
`ida_ray.actors.human_queue.RayHumanBackend` for `ida-ray train --expert human` (the training run's
trees wait on a Ray actor; the page answers them and starts none).
"""
from __future__ import annotations

import ipaddress
import json
import secrets
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal, Protocol
from urllib.parse import urlsplit

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from ida_ray.errors import MalformedQuestion
from ida_ray.experts import UnknownRequest
from ida_ray.run_dir import METRICS_FILE
from ida_ray.viewer.store import TreeStore, annotated, facets, matches

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 64 * 1024  # a reply or a question is a line of text
MAX_TEXT = 8192
TOKEN_COOKIE = "ida_ray_token"


class Reply(BaseModel):
    text: str = Field(max_length=MAX_TEXT)


class NewRun(BaseModel):
    question: str = Field(max_length=MAX_TEXT)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def page_guard(host: str) -> str | None:
    """The token the pages served on `host` require: a fresh random one off loopback, else None."""
    return None if is_loopback(host) else secrets.token_urlsafe(24)


def _guard(app: FastAPI, token: str | None) -> None:
    @app.middleware("http")
    async def guard(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY_BYTES):
            return JSONResponse(status_code=413, content={"detail": f"request bodies are limited to {MAX_BODY_BYTES} bytes"})
        if token is None:
            return await call_next(request)
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            origin = request.headers.get("origin")
            if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
                return JSONResponse(status_code=403, content={"detail": "cross-site request refused"})
        given = request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE)
        header = request.headers.get("authorization", "")
        if header.lower().startswith("token "):
            given = header[6:].strip()
        if request.url.path.startswith("/static/") or (given and secrets.compare_digest(given, token)):
            response = await call_next(request)
            if request.query_params.get("token"):
                response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
            return response
        return JSONResponse(status_code=403, content={"detail": "this page needs the run's token: open the URL "
                                                                 "printed when it started (…?token=...)"})


class HumanBackend(Protocol):
    """What the /human page needs from wherever the person's requests wait.

    The sync methods may block briefly (the app calls them from worker threads); `start` is
    called on the server's event loop, so a backend may start trees there."""

    can_start: bool  # whether the page may start trees of its own

    def requests(self) -> dict:
        """{"requests": [HumanRequest.to_dict(), ...], "answered": int, "timed_out": int}"""

    def submit(self, request_id: str, text: str) -> dict:
        """As HumanQueue.submit: {"accepted": True, ...} or {"accepted": False, "error"}; raises
        UnknownRequest for an id that is not pending."""

    def list(self) -> list[dict]:
        """The trees the page started, newest first (empty when it starts none)."""

    def start(self, question: str) -> dict:
        """Start a tree on the question; MalformedQuestion for a bad one."""

    def status(self) -> str | None:
        """A line about what the requests belong to (e.g. a training run's progress), or None."""

    async def close(self) -> None:
        """Called when the server stops."""


def create_app(run_dir: str | Path, human: HumanBackend | None = None,
               start_questions: tuple[str, ...] = (), token: str | None = None) -> FastAPI:
    """The app for one run directory. `start_questions` are started as human trees at startup;
    `token` (see `page_guard`) is required of every request when given."""
    store = TreeStore(run_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for q in start_questions:
            human.start(q)
        yield
        if human is not None:
            await human.close()

    if start_questions and (human is None or not human.can_start):
        raise ValueError("start_questions needs a human backend that starts trees (HumanRuns)")
    app = FastAPI(title="ida-ray tree viewer", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        # FastAPI's own handler echoes the input back, and a body such as `Infinity` (which
        # Python's JSON parser accepts) cannot be written as JSON: a 500. Say where and why only.
        return JSONResponse(status_code=422, content={"detail": [
            {"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in exc.errors()]})
    _guard(app, token)
    app.state.store = store
    app.state.human = human
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # -- pages -----------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def index_page():
        return FileResponse(STATIC / "index.html")

    @app.get("/tree/{tree_id}", include_in_schema=False)
    def tree_page(tree_id: str):
        return FileResponse(STATIC / "tree.html")

    @app.get("/question", include_in_schema=False)
    def question_page():
        return FileResponse(STATIC / "question.html")

    @app.get("/human", include_in_schema=False)
    def human_page():
        return FileResponse(STATIC / "human.html")

    # -- trees -----------------------------------------------------------------------
    @app.get("/api/info")
    def info():
        summaries = store.summaries()
        return {"run_dir": str(store.run_dir), "trees_dir_exists": store.trees_dir.is_dir(),
                "trees": len(summaries), "problems": store.problems, "human": human is not None,
                "human_can_start": bool(human is not None and human.can_start)}

    @app.get("/api/trees")
    def list_trees(task: str | None = None, size: int | None = None, iteration: int | None = None,
                   mode: str | None = None, source: str | None = None,
                   correct: Literal["true", "false", "unknown"] | None = None, error: str | None = None,
                   q: str | None = None, offset: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=1000)):
        summaries = store.summaries()
        filters = dict(task=task, size=size, iteration=iteration, mode=mode, source=source, correct=correct,
                       error=error, q=q)
        chosen = [s for s in reversed(summaries) if matches(s, filters)]  # newest first
        return {"total": len(chosen), "offset": offset, "trees": chosen[offset:offset + limit],
                "facets": facets(summaries)}

    @app.get("/api/metrics")
    def metrics():
        """Each completed iteration's record of metrics.jsonl (a re-run iteration's later line wins)."""
        path = Path(store.run_dir) / METRICS_FILE
        by_iteration: dict[int, dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    m = json.loads(line)
                    by_iteration[int(m["iteration"])] = m
                except (ValueError, KeyError, TypeError):
                    continue  # a line being written, or not a record
        return {"iterations": [by_iteration[i] for i in sorted(by_iteration)]}

    @app.get("/api/question")
    def question_trees(q: str = Query(..., min_length=1), limit: int = Query(24, ge=1, le=200)):
        """Every tree of question q, oldest iteration first, each whole (for the side-by-side page)."""
        found = store.with_question(q)
        trees = [store.load(s["tree_id"]) for s in found[-limit:]]
        return {"question": q, "total": len(found),
                "trees": [annotated(t, store.correctness) for t in trees if t is not None]}

    @app.get("/api/trees/{tree_id}")
    def get_tree(tree_id: str):
        tree = store.load(tree_id)
        if tree is None:
            raise HTTPException(404, f"no tree {tree_id!r} in {store.trees_dir}")
        return annotated(tree, store.correctness)

    # -- the person as expert --------------------------------------------------------
    def need_human() -> HumanBackend:
        if human is None:
            raise HTTPException(404, "the human expert is not enabled: start the viewer with --human "
                                     "(or the run with --expert human)")
        return human

    @app.get("/api/human/requests")
    def pending_requests():
        return need_human().requests()

    @app.post("/api/human/requests/{request_id}")
    def answer_request(request_id: str, reply: Reply):
        h = need_human()
        try:
            result = h.submit(request_id, reply.text)
        except UnknownRequest as exc:
            raise HTTPException(404, str(exc)) from None
        if not result["accepted"]:
            return JSONResponse(status_code=422, content={"detail": result["error"]})
        return result

    @app.get("/api/human/runs")
    def list_runs():
        h = need_human()
        return {"runs": h.list(), "can_start": h.can_start, "status": h.status()}

    @app.post("/api/human/runs")
    async def start_run(new: NewRun):  # async: the tree starts on the server's event loop
        h = need_human()
        if not h.can_start:
            raise HTTPException(409, "this page answers a training run's requests; its trees are started by the run")
        try:
            return h.start(new.question)
        except MalformedQuestion as exc:
            raise HTTPException(422, str(exc)) from None

    return app
