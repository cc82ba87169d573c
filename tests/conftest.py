"""Fixtures shared by the test modules.

A local Ray cluster
    `ray_cluster` (module scope; `cluster` is the same fixture under the name most modules use)
    runs `ray.init(**RAY_DEFAULTS, **RAY_INIT)` once per module and `ray.shutdown()` at its end.
    Ray can be initialised only once per process, so every Ray module gets its own cluster,
    sized by a module-level `RAY_INIT` dict (e.g. `RAY_INIT = dict(num_cpus=6, namespace="x")`;
    any `ray.init` keyword). A module that sets `RAY_PICKLE_BY_VALUE = True` has its own
    functions shipped by value (for Ray Train workers, which cannot import a test module).

Tiny models
    `tiny_spec` is the smallest `ModelSpec` the tests build models from (torch engine).
    `model_dirs` is `(model_dir, adversary_dir)`, a fresh HF model and adversary saved by
    `ida_ray.models.create_model_dirs` (seed 0) once per module, from `model_spec`: `tiny_spec`
    unless the module overrides the `model_spec` fixture (vLLM-CPU needs head size 32).

Torch threads
    `one_thread` (per test) and `one_thread_module` (per module, for
    `pytestmark = pytest.mark.usefixtures("one_thread_module")`) run torch on one intra-op
    thread: tiny models gain nothing from more and lose much when the 2 cores are shared.

Ray, torch and the models are imported inside the fixtures, so modules that need none of
them collect without paying for the imports.
"""
from __future__ import annotations

import contextlib

import pytest

RAY_DEFAULTS = dict(num_cpus=2, include_dashboard=False, log_to_driver=False)


@pytest.fixture(scope="module")
def ray_cluster(request):
    """A local Ray cluster for the module, configured by its `RAY_INIT` (see the docstring above)."""
    import ray

    options = {**RAY_DEFAULTS, **getattr(request.module, "RAY_INIT", {})}
    if getattr(request.module, "RAY_PICKLE_BY_VALUE", False):
        ray.cloudpickle.register_pickle_by_value(request.module)
    context = ray.init(**options)
    yield context
    ray.shutdown()


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    """The module's `ray_cluster`, under the name most Ray test modules use."""
    return ray_cluster


@pytest.fixture(scope="session")
def tiny_spec():
    """The smallest ModelSpec the tests build models from (torch engine; head size 16)."""
    from ida_ray.models import ModelSpec

    return ModelSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def model_spec(tiny_spec):
    """The spec `model_dirs` builds from; a module overrides this fixture to build another."""
    return tiny_spec


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, request, model_spec):
    """(model_dir, adversary_dir): a fresh model and adversary from `model_spec`, seed 0."""
    from ida_ray.models import create_model_dirs

    name = request.module.__name__.rpartition(".")[2].removeprefix("test_")
    return create_model_dirs(tmp_path_factory.mktemp(f"{name}_models"), model_spec, seed=0)


@contextlib.contextmanager
def _torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """Torch on one intra-op thread for the test."""
    with _torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_module():
    """Torch on one intra-op thread for the whole module."""
    with _torch_threads(1):
        yield
