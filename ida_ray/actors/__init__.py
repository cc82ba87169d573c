"""The Ray actors of a run: thin hosts of the parts in ida_ray/ (ARCHITECTURE.md)."""

HEAD_NODE = "node:__internal_head__"
"""The resource Ray gives the head node alone: asking for a sliver of it (0.001) places an
actor there (the coordinator and the replay buffer, which write the driver's run directory)."""


def node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray: the actors' classes run plain in tests)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
