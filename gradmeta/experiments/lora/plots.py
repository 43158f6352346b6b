"""Figures of the ``lora_predict`` task."""
from __future__ import annotations

import torch


def prediction_figure(first_seed: dict[str, tuple[torch.Tensor, torch.Tensor]], target: str, seed: int):
    """Predicted vs true on the held-out adapters, one colour per model (regression targets).

    ``first_seed``: ``{model: (predictions (N,), targets (N,))}`` of one seed.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    lo = min(float(y.min()) for _, y in first_seed.values())
    hi = max(float(y.max()) for _, y in first_seed.values())
    for name, (pred, y) in first_seed.items():
        ax.scatter(y.numpy(), pred.numpy(), s=8, alpha=0.6, label=name)
    ax.plot([lo, hi], [lo, hi], color="k", lw=0.8, ls="--", label="predicted = true")
    ax.set_xlabel(f"true {target}")
    ax.set_ylabel(f"predicted {target}")
    ax.set_title(f"{target} of held-out adapters, seed {seed}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
