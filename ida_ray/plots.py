"""PNG plots of a run's per-iteration metrics: held-out accuracy by size, and expert calls
per amplification tree (H' at work)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_history(history: list[dict], path: str | Path, title: str = "ida-ray") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    its = [m["iteration"] for m in history]
    sizes = sorted({int(s) for m in history for s in m["accuracy_by_size"]})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    cmap = plt.get_cmap("viridis")
    for i, s in enumerate(sizes):
        acc = [m["accuracy_by_size"].get(s, m["accuracy_by_size"].get(str(s))) for m in history]
        ax1.plot(its, acc, marker="o", ms=3, color=cmap(i / max(1, len(sizes) - 1)), label=f"size {s}")
    ax1.set(xlabel="iteration", ylabel="held-out accuracy (model alone)", ylim=(-0.02, 1.02),
            title="accuracy by question size")
    ax1.legend(fontsize=7, ncol=2)
    ax2.plot(its, [m["expert_calls_per_tree"] for m in history], marker="o", color="C3")
    ax2.set(xlabel="iteration", ylabel="expert calls per tree", title="expert calls per amplification tree")
    ax2.set_ylim(bottom=0)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
