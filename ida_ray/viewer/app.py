"""The viewer's web app: a JSON API over a run directory's trees, the static pages that use it,
and, when a `HumanRuns` is given, the queue through which a person acts as the expert.

    /                 tree list with filters          GET /api/trees?task=&size=&...
    /tree/<id>        one tree, nodes expandable      GET /api/trees/<id>
    /human            pending expert requests         GET /api/human/requests
                                                       POST /api/human/requests/<id> {"text"}
                                                       GET|POST /api/human/runs {"question"}
"""
from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from ida_ray.errors import MalformedQuestion
from ida_ray.human_expert import UnknownRequest
from ida_ray.viewer.human_runs import HumanRuns
from ida_ray.viewer.store import TreeStore, annotated, facets, matches

STATIC = Path(__file__).parent / "static"


class Reply(BaseModel):
    text: str


class NewRun(BaseModel):
    question: str


def create_app(run_dir: str | Path, human: HumanRuns | None = None, start_questions: tuple[str, ...] = ()) -> FastAPI:
    """The app for one run directory. `start_questions` are started as human trees at startup."""
    store = TreeStore(run_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for q in start_questions:
            human.start(q)
        yield
        if human is not None:
            await human.cancel_all()

    if start_questions and human is None:
        raise ValueError("start_questions needs a HumanRuns")
    app = FastAPI(title="ida-ray tree viewer", lifespan=lifespan)
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

    @app.get("/human", include_in_schema=False)
    def human_page():
        return FileResponse(STATIC / "human.html")

    # -- trees -----------------------------------------------------------------------
    @app.get("/api/info")
    def info():
        summaries = store.summaries()
        return {"run_dir": str(store.run_dir), "trees_dir_exists": store.trees_dir.is_dir(),
                "trees": len(summaries), "problems": store.problems, "human": human is not None}

    @app.get("/api/trees")
    def list_trees(task: str | None = None, size: int | None = None, iteration: int | None = None,
                   mode: str | None = None, source: str | None = None,
                   correct: Literal["true", "false", "unknown"] | None = None, error: str | None = None,
                   offset: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=1000)):
        summaries = store.summaries()
        filters = dict(task=task, size=size, iteration=iteration, mode=mode, source=source, correct=correct,
                       error=error)
        chosen = [s for s in reversed(summaries) if matches(s, filters)]  # newest first
        return {"total": len(chosen), "offset": offset, "trees": chosen[offset:offset + limit],
                "facets": facets(summaries)}

    @app.get("/api/trees/{tree_id}")
    def get_tree(tree_id: str):
        tree = store.load(tree_id)
        if tree is None:
            raise HTTPException(404, f"no tree {tree_id!r} in {store.trees_dir}")
        return annotated(tree, store.correctness)

    # -- the person as expert --------------------------------------------------------
    def need_human() -> HumanRuns:
        if human is None:
            raise HTTPException(404, "the human expert is not enabled: start the viewer with --human")
        return human

    @app.get("/api/human/requests")
    def pending_requests():
        h = need_human()
        return {"requests": h.queue.pending(), "answered": h.queue.answered, "timed_out": h.queue.timed_out}

    @app.post("/api/human/requests/{request_id}")
    def answer_request(request_id: str, reply: Reply):
        h = need_human()
        try:
            result = h.queue.submit(request_id, reply.text)
        except UnknownRequest as exc:
            raise HTTPException(404, str(exc)) from None
        if not result["accepted"]:
            return JSONResponse(status_code=422, content={"detail": result["error"]})
        return result

    @app.get("/api/human/runs")
    def list_runs():
        return {"runs": need_human().list()}

    @app.post("/api/human/runs")
    async def start_run(new: NewRun):  # async: the tree starts on the server's event loop
        h = need_human()
        try:
            return h.start(new.question)
        except MalformedQuestion as exc:
            raise HTTPException(422, str(exc)) from None

    return app
