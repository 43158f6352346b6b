"""Plots of the ``gradients_digits`` history (matplotlib, Agg backend)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display needed; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _series(h: dict, key: str) -> tuple[list, list]:
    """Steps and values of ``h[key]`` with ``None`` (undefined) entries dropped."""
    pairs = [(s, v) for s, v in zip(h["step"], h.get(key, [])) if v is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_gradients(history: dict, layers: list[str], quantiles: list[float], probe_batch: int):
    """Six panels: loss, accuracy, per-layer gradient norms, noise scale, Fisher spectrum, its quantiles."""
    tr, ev, gr = history["train"], history["eval"], history["gradients"]
    fig, ax = plt.subplots(2, 3, figsize=(15, 8.5), layout="constrained")
    ax = ax.ravel()

    ax[0].plot(tr["step"], _smooth(tr["batch_loss"], 20), color="0.6", lw=1, label="minibatch (smoothed)")
    ax[0].plot(*_series(ev, "train_loss"), label="train")
    ax[0].plot(*_series(ev, "test_loss"), label="test")
    ax[0].set(title="loss", xlabel="step", yscale="log")

    ax[1].plot(*_series(ev, "train_acc"), label="train")
    ax[1].plot(*_series(ev, "test_acc"), label="test")
    ax[1].set(title="accuracy", xlabel="step")

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(layers):
        c = colors[i % len(colors)]
        ax[2].plot(*_series(gr, f"grad_norm/{name}"), color=c, label=f"layer {name}: mean_b ‖g_b‖")
        ax[2].plot(*_series(gr, f"mean_grad_norm/{name}"), color=c, ls="--", label=f"layer {name}: ‖ḡ‖")
    ax[2].set(title="per-layer gradient norms", xlabel="step", yscale="log")

    ax[3].plot(*_series(gr, "noise_scale"), label="B_simple = tr Σ / ‖G‖² (unbiased ‖G‖²)")
    ax[3].plot(*_series(gr, "noise_scale_biased"), ls="--", label="tr Σ / ‖ḡ‖²")
    ax[3].axhline(probe_batch, color="0.5", lw=0.8, ls=":", label=f"probe batch B = {probe_batch}")
    ax[3].set(title="gradient-noise scale", xlabel="step", yscale="log")

    steps = gr["step"]
    picks = sorted({round(i * (len(steps) - 1) / 5) for i in range(6)}) if steps else []
    cmap = plt.get_cmap("viridis")
    for j, i in enumerate(picks):
        vals = [gr[f"fisher_q{q:g}"][i] for q in quantiles]
        ax[4].plot(quantiles, vals, marker=".", color=cmap(j / max(len(picks) - 1, 1)), label=f"step {steps[i]}")
    zero = gr.get("fisher_zero_frac", [None])[-1]
    note = f"; last: {100 * zero:.1f}% exactly 0" if zero is not None else ""
    ax[4].set(title=f"Fisher-diagonal spectrum (quantiles of F_ii{note})", xlabel="quantile level", ylabel="F_ii")
    ax[4].set_yscale("log", nonpositive="mask")

    for q in (0.5, 0.9, 0.99, 1.0):
        if q in quantiles:
            ax[5].plot(*_series(gr, f"fisher_q{q:g}"), label=f"q = {q:g}")
    if "fisher_trace" in gr:
        ax[5].plot(*_series(gr, "fisher_trace"), color="k", ls="--", label="trace")
    ax[5].set(title="Fisher diagonal over training", xlabel="step")
    ax[5].set_yscale("log", nonpositive="mask")

    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle("gradients_digits: gradient sets along training")
    return fig
