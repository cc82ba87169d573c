"""Browse a run's trees in the browser, and answer expert requests as a person.

`create_app(run_dir, human=None)` builds the FastAPI app; `ida_ray.entrypoints.viewer` serves it."""
from ida_ray.viewer.app import create_app

__all__ = ["create_app"]
