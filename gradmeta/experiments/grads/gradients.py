"""Task ``gradients_digits``: gradient statistics along the training of an MLP on the digits.

Every ``collect.every`` steps a gradient set is collected (hooks path, one forward+backward) on a
fixed probe batch of ``collect.batch_size`` training examples, and :func:`gradient_statistics`
records per-layer gradient norms, the gradient-noise scale and the empirical Fisher-diagonal
spectrum. Train/test loss and accuracy are evaluated on the full splits every ``train.eval_every``
steps. One multi-panel plot, ``gradients.png``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import math
import time

import torch

from gradmeta.grads import GradientSet, collect_gradients
from gradmeta.models import classification_loss, mlp
from gradmeta.specs import OneOf, Range, Required, register_task

if TYPE_CHECKING:  # the runner passes a Run; experiments never import the runner
    from gradmeta.run import Run

__all__ = ["gradients_digits", "gradient_statistics", "DEFAULTS"]

DEFAULTS = {
    "seed": Range(0, low=0),
    # torch intra-op threads during the run: a model this small runs fastest on one thread, and
    # several threads on a busy machine were measured 30-100x slower per step (2-core CPU).
    "threads": Range(1, low=1),
    "data": {"split_seed": Range(0, low=0)},
    "model": {"widths": [64, 64, 32, 10], "activation": OneOf("relu", ("relu", "tanh", "gelu", "sigmoid"))},
    "train": {
        "steps": Required(int, "number of optimizer steps"),
        "batch_size": Range(64, low=1),
        "optimizer": OneOf("adam", ("adam", "sgd")),
        "lr": Range(1e-3, low=0, low_open=True),
        "momentum": 0.9,  # SGD only
        "weight_decay": 0.0,
        "eval_every": Range(25, low=1),
        "checkpoint_every": Range(100, low=1),
    },
    "collect": {
        "every": Range(25, low=1),
        "batch_size": Range(256, low=2),
        "quantiles": [0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0],
    },
}


def gradient_statistics(gs: GradientSet, quantiles: list[float]) -> dict[str, float | None]:
    """Scalar statistics of one gradient set, all computed from its factors.

    With ``g_b`` the gradient of example ``b``'s loss, ``ḡ = mean_b g_b`` and ``B`` examples:

    * ``grad_norm/<layer>`` = ``mean_b ‖g_b‖`` over that layer's parameters; ``grad_norm`` over all;
    * ``mean_grad_norm/<layer>`` = ``‖ḡ‖`` over that layer's parameters; ``mean_grad_norm`` over all;
    * ``trace_cov`` = ``tr Σ̂ = B/(B−1) (mean_b ‖g_b‖² − ‖ḡ‖²)`` (unbiased);
    * ``grad_sq_unbiased`` = ``‖ḡ‖² − tr Σ̂ / B``, an unbiased estimate of ``‖G‖²`` (may be < 0);
    * ``noise_scale`` = ``B_simple = tr Σ̂ / ‖G‖²`` with the unbiased ``‖G‖²`` (``None`` when that
      estimate is not positive); ``noise_scale_biased`` = ``tr Σ̂ / ‖ḡ‖²`` (at most about ``B``);
    * ``fisher_trace`` = ``Σ_i F_ii`` with ``F = (1/B) Σ_b g_b g_bᵀ``; ``fisher_q<q>`` = the ``q``
      quantile of the concatenated diagonal entries ``F_ii``; ``fisher_zero_frac`` = the share of
      entries that are exactly 0 (e.g. weights from always-blank pixels, dead ReLUs).

    Args:
        gs: a gradient set with ``B ≥ 2`` examples.
        quantiles: levels in ``[0, 1]`` for the Fisher-diagonal spectrum.
    """
    B = gs.batch_size
    if B < 2:
        raise ValueError(f"gradient_statistics needs at least 2 examples, got a gradient set of {B}")
    out: dict[str, float | None] = {}
    mean = gs.mean_grad()
    for name, norms in gs.layer_grad_norms().items():
        out[f"grad_norm/{name}"] = norms.mean().item()
        sq = sum(mean[p].square().sum() for p in gs[name].param_names.values())
        out[f"mean_grad_norm/{name}"] = float(sq) ** 0.5
    norms = gs.grad_norms().double()
    mean_sq = float(sum(v.double().square().sum() for v in mean.values()))
    trace_cov = B / (B - 1) * (norms.square().mean().item() - mean_sq)
    grad_sq = mean_sq - trace_cov / B
    out.update(grad_norm=norms.mean().item(), mean_grad_norm=mean_sq ** 0.5, trace_cov=trace_cov,
               grad_sq_unbiased=grad_sq, noise_scale=trace_cov / grad_sq if grad_sq > 0 else None,
               noise_scale_biased=trace_cov / mean_sq if mean_sq > 0 else None)
    fisher = torch.cat([v.detach().double().flatten() for v in gs.fisher_diagonal().values()])
    out["fisher_trace"] = fisher.sum().item()
    out["fisher_zero_frac"] = (fisher == 0).double().mean().item()
    levels = torch.tensor(quantiles, dtype=torch.float64)
    for q, v in zip(quantiles, torch.quantile(fisher, levels).tolist()):
        out[f"fisher_q{q:g}"] = v
    return out


def _check(run: Run, n_features: int, n_classes: int, n_train: int) -> None:
    s = run.spec
    w = s["model"]["widths"]
    if len(w) < 2 or w[0] != n_features or w[-1] != n_classes or min(w) < 1:
        raise run.spec_error("model.widths", f"{w} must start with {n_features} (pixels), end with "
                             f"{n_classes} (classes) and be positive")
    if s["train"]["steps"] < 1:  # the other counts and rates are checked by their Range defaults
        raise run.spec_error("train.steps", f"must be positive, got {s['train']['steps']}")
    if not 2 <= s["collect"]["batch_size"] <= n_train:
        raise run.spec_error("collect.batch_size", f"must lie in 2..{n_train}, got {s['collect']['batch_size']}")
    if not all(0.0 <= q <= 1.0 for q in s["collect"]["quantiles"]):
        raise run.spec_error("collect.quantiles", f"levels must lie in [0, 1], got {s['collect']['quantiles']}")


@torch.no_grad()
def _evaluate(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    logits = model(X)
    return classification_loss(logits, y).mean().item(), (logits.argmax(-1) == y).double().mean().item()


@register_task("gradients_digits", defaults=DEFAULTS)
def gradients_digits(run: Run) -> dict:
    """MLP on the scikit-learn digits; gradient norms, noise scale and Fisher spectrum over training."""
    from gradmeta.data import load_digits

    s, tr, co = run.spec, run.spec["train"], run.spec["collect"]
    train, test = (load_digits(split, seed=s["data"]["split_seed"]) for split in ("train", "test"))
    Xtr, ytr = train.images.flatten(1), train.labels
    Xte, yte = test.images.flatten(1), test.labels
    _check(run, Xtr.shape[1], len(train.classes), len(ytr))

    torch.manual_seed(s["seed"])
    model = mlp(s["model"]["widths"], activation=s["model"]["activation"])
    if tr["optimizer"] == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=tr["lr"], weight_decay=tr["weight_decay"])
    else:
        opt = torch.optim.SGD(model.parameters(), lr=tr["lr"], momentum=tr["momentum"],
                              weight_decay=tr["weight_decay"])
    gen = torch.Generator().manual_seed(s["seed"])
    probe = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(s["seed"] + 1))[: co["batch_size"]]
    history: dict[str, dict[str, list]] = {"train": {"step": [], "batch_loss": []}, "eval": {}, "gradients": {}}
    timing = {"step_s": 0.0, "steps": 0, "collect_s": 0.0, "collects": 0}

    def record(group: str, step: int, values: dict) -> None:
        h = history[group]
        for k, v in {"step": step, **values}.items():
            h.setdefault(k, []).append(v)

    def evaluate(step: int) -> None:
        (trl, tra), (tel, tea) = _evaluate(model, Xtr, ytr), _evaluate(model, Xte, yte)
        record("eval", step, {"train_loss": trl, "train_acc": tra, "test_loss": tel, "test_acc": tea})

    def collect(step: int) -> None:
        t0 = time.perf_counter()
        gs = collect_gradients(model, classification_loss, Xtr[probe], ytr[probe])
        stats = gradient_statistics(gs, co["quantiles"])
        timing["collect_s"] += time.perf_counter() - t0
        timing["collects"] += 1
        record("gradients", step, stats)

    state = run.restore(keys=("model", "optimizer", "generator", "history"))
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            gen.set_state(state["generator"])
        except (RuntimeError, ValueError, TypeError, KeyError) as e:
            raise run.checkpoint_error(" ".join(str(e).split())) from None
        history = state["history"]
        timing = state.get("timing", timing)  # summed over invocations (older checkpoints: none)
    start = run.start_step
    if start == 0:
        evaluate(0)
        collect(0)

    total = tr["steps"]
    end = start if run.should_stop(start) else total  # resumed with --max-steps already reached
    step = start
    bar = run.progress(total, initial=start, desc="gradients_digits")
    for step in range(start + 1, end + 1):
        t0 = time.perf_counter()
        idx = torch.randint(len(ytr), (tr["batch_size"],), generator=gen)
        loss = classification_loss(model(Xtr[idx]), ytr[idx]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        timing["step_s"] += time.perf_counter() - t0
        timing["steps"] += 1
        record("train", step, {"batch_loss": run.check_finite("train batch loss", loss, step)})
        if step % tr["eval_every"] == 0 or step == total:
            evaluate(step)
        if step % co["every"] == 0 or step == total:
            collect(step)
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        stop = run.should_stop(step)
        if step % tr["checkpoint_every"] == 0 or step == total or stop:
            run.checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict(),
                            "generator": gen.get_state(), "history": history, "timing": timing}, step)
        if stop:
            break
    bar.close()

    from .plots import plot_gradients

    layers = [k.split("/", 1)[1] for k in history["gradients"] if k.startswith("grad_norm/")]
    plots = [run.save_figure(plot_gradients(history, layers, co["quantiles"], co["batch_size"]), "gradients.png")]
    ev, gr = history["eval"], history["gradients"]
    summary = {
        "parameters": sum(p.numel() for p in model.parameters()),
        **{k: ev[k][-1] for k in ("train_loss", "train_acc", "test_loss", "test_acc")},
        **{k: gr[k][-1] for k in ("noise_scale", "noise_scale_biased", "grad_norm", "mean_grad_norm",
                                  "fisher_trace", "fisher_q0.5")  if k in gr},
        "ms_per_step": 1e3 * timing["step_s"] / max(timing["steps"], 1),
        "ms_per_collect": 1e3 * timing["collect_s"] / timing["collects"] if timing["collects"] else math.nan,
    }
    return {"step": step, "total_steps": total, "summary": summary, "history": history, "plots": plots}
