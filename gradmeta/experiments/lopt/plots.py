"""Figures of the learned-optimization tasks (matplotlib, Agg backend)."""
from __future__ import annotations

__all__ = ["plot_meta", "plot_curves"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_meta(history: dict):
    """Meta-loss per outer iteration and the periodic evaluation's final test loss."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    h, e = history["meta"], history["eval"]
    a.plot(h["step"], h["meta_loss"], lw=0.8)
    a.set(xlabel="outer iteration", ylabel="meta-loss (mean inner train loss)", title="meta-training")
    b.plot(e["step"], e["final_test_loss"], "o-", label="final test loss")
    b.plot(e["step"], e["best_test_loss"], "s--", label="best test loss")
    b.set(xlabel="outer iteration", ylabel="test loss (eval seeds)", title="learned optimizer on eval seeds")
    b.legend()
    fig.tight_layout()
    return fig


def plot_curves(curves: dict, title: str):
    """Test-loss curves: ``{label: (steps (E,), test (S, E))}``, mean ± std over seeds."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (steps, test) in curves.items():
        m = test.mean(0)
        sd = test.std(0) if test.shape[0] > 1 else 0 * m
        ax.plot(steps, m, label=label)
        ax.fill_between(steps, m - sd, m + sd, alpha=0.2)
    ax.set(xlabel="inner step", ylabel="test loss", title=title, yscale="log")
    ax.legend()
    fig.tight_layout()
    return fig
