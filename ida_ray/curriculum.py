"""A curriculum over question sizes: training questions start at the smallest sizes, and the
largest size drawn goes up by one each time the model alone answers held-out questions of the
current largest size at `threshold` or better (Christiano, Shlegeris and Amodei 2018 raised the
difficulty when accuracy passed 0.85). Held-out evaluation always covers every size.

    sizes = curriculum_sizes((1, 2, 3, 4), [m["accuracy_by_size"] for m in history], cfg.curriculum)

The sizes follow from the run's history alone, so a resumed run (same config) draws what the
straight run would have drawn. At most one size is added per iteration: a size is trained on for at least
one iteration before the next one is judged.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(kw_only=True)
class CurriculumConfig:
    threshold: float | None = None
    """Held-out accuracy (model alone) at the largest size drawn so far at which the next size
    joins the training questions; null: every size from the first iteration (no curriculum)."""
    first_sizes: int = 1
    """How many of the smallest training sizes are drawn before any is passed."""

    def problems(self) -> list[str]:
        p = []
        if self.threshold is not None and not 0 < self.threshold <= 1:
            p.append(f"curriculum.threshold must be in (0, 1] or null, got {self.threshold}")
        if self.first_sizes < 1:
            p.append(f"curriculum.first_sizes must be >= 1, got {self.first_sizes}")
        return p


def curriculum_sizes(sizes: Sequence[int], accuracy_history: Sequence[Mapping[int, float]],
                     cfg: CurriculumConfig) -> tuple[int, ...]:
    """The sizes to draw training questions from after the iterations whose held-out accuracy by
    size is `accuracy_history` (oldest first): all of `sizes` without a threshold, else the
    smallest `first_sizes` plus one for every iteration that passed the largest of them."""
    ordered = tuple(sorted(set(sizes)))
    if cfg.threshold is None:
        return ordered
    n = min(cfg.first_sizes, len(ordered))
    for accuracy in accuracy_history:
        if n < len(ordered) and accuracy.get(ordered[n - 1], 0.0) >= cfg.threshold:
            n += 1
    return ordered[:n]
