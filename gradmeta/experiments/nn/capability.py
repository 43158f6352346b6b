"""Task ``nn_capability``: regress per-parameter statistics of a gradient set.

From a set of ``data.set_size`` per-example gradients of a random MLP (scikit-learn digits as
inputs), every model is trained to output, per parameter entry, one of

* ``mean_grad``: ``ḡ = mean_b g_b``;
* ``fisher_diag``: ``mean_b g_b²`` (empirical Fisher diagonal);
* ``adam_direction``: ``mean_b g_b / sqrt(mean_b g_b² + 1e-8)``;
* ``natural_grad_last_layer``: ``(F + λI)⁻¹ ḡ`` on the last layer's weight and bias, with
  ``F = mean_b g_b g_bᵀ`` and ``λ = natural_grad.damping · mean diag F``.

A set is first divided by the RMS of all its activations and all its backprops (two scalars per
set), and targets are computed from that set, so the task is scale-free. Then (``train.normalise``)
every gradient-set model sees each layer's ``A`` and ``Δ`` with every column divided by its RMS
over the data (``"neuron"``; ``"layer"``: one RMS per factor) and predicts the target in that
space; the prediction is mapped back with ``s^k`` (``s = r_Δ r_Aᵀ`` for a weight, ``r_Δ`` for a
bias; ``k`` = 1, 2, 0, −1 for the four targets, their degree in the gradient scale). Those scales
are equivariant to every neuron permutation and invariant to data order, so each model keeps its
symmetry. The averaged-gradient net sees ``ḡ`` divided by its RMS per parameter tensor and is
rescaled by that alone (it must not see anything but ``ḡ``). With ``model.features = "square"``
GradMetaNet(++) also get ``a²`` and ``δ²`` of every (datum, neuron) as input channels. Models
``"GradMetaNet (bilinear)"`` / ``"GradMetaNet++ (bilinear)"`` are the same networks with the
multiplicative per-weight readout (``product="bilinear"``: ``MLP(mean_b (U h_b[i]) ⊙ (V h_b[j]))``,
read per datum before any pooling), which represents means of per-example products. The loss and
the reported error are the relative error ``‖pred − target‖ / ‖target‖`` over all parameters of a
set, in the original space, mean over the test sets; :func:`kfac_fisher` gives a no-learning
reference for the Fisher diagonal.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import math
import statistics
import time

import torch

import gradmeta.nn as gnn
from gradmeta._training import minibatch_train
from gradmeta.grads import GradientSet, collect_gradients
from gradmeta.models import classification_loss, mlp
from gradmeta.specs import OneOf, Range, register_task

if TYPE_CHECKING:  # the runner passes a Run; experiments never import the runner
    from gradmeta.run import Run

__all__ = ["nn_capability", "make_sets", "targets_of", "normalise_layers", "kfac_fisher", "capability_models",
           "rel_err", "render_capability", "TARGETS", "MODELS", "DEFAULTS"]

TARGETS = ("mean_grad", "fisher_diag", "adam_direction", "natural_grad_last_layer")
MODELS = ("GradMetaNet", "GradMetaNet++", "GradMetaNet (bilinear)", "GradMetaNet++ (bilinear)",
          "per-param DeepSets", "flat-factor MLP", "averaged-gradient net")
_EXTRA = {"none": 0, "square": 2, "square_log": 4}
_DEGREE = {"mean_grad": 1, "fisher_diag": 2, "adam_direction": 0, "natural_grad_last_layer": -1}

DEFAULTS = {
    "seed": Range(0, low=0),
    "threads": Range(1, low=1),
    "data": {"inner_widths": [64, 24, 10], "set_size": Range(32, low=1), "train_sets": Range(256, low=1),
             "test_sets": Range(48, low=1), "train_seed": Range(0, low=0), "test_seed": Range(1, low=0)},
    "targets": list(TARGETS),
    "models": list(MODELS),
    "natural_grad": {"damping": 0.1},
    "model": {"channels": 16, "set_layers": 2, "neuron_layers": 2, "heads": 1, "flat_hidden": 256,
              "deepsets_hidden": 16,
              # extra input channels of GradMetaNet(++) per (datum, neuron): "square": a², δ²;
              # "square_log": also log(a² + 1e-4), log(δ² + 1e-4) (as in Andrychowicz et al.'s
              # learned-optimizer preprocessing); elementwise, so every symmetry is kept
              "features": OneOf("square", ("none", "square", "square_log")),
              # GradMetaNet++'s attention across neurons: "softmax" (the paper's) or "linear"
              "neuron_attention": OneOf("softmax", ("softmax", "linear")),
},
    "train": {"steps": Range(300, low=1), "batch_sets": Range(4, low=1), "lr": Range(3e-3, low=0, low_open=True),
              "warmup": Range(30, low=0), "clip": 1.0,
              "normalise": OneOf("neuron", ("neuron", "layer", "set")), "log_every": Range(10, low=1)},
}


# ------------------------------------------------------------------------------------ data
def _rms(ts) -> torch.Tensor:
    return torch.cat([t.flatten() for t in ts]).pow(2).mean().sqrt().clamp_min(1e-30)


def _rescaled(gs: GradientSet, scale: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> GradientSet:
    return gs.map_factors(lambda n, a, d: (a / scale[n][0], d / scale[n][1]))


def normalised_set(model, x, y) -> GradientSet:
    """Gradient set of ``model`` on ``(x, y)`` with all of ``A`` and all of ``Δ`` divided by their RMS."""
    gs = collect_gradients(model, classification_loss, x, y)
    sa = _rms(gs[n].activations for n in gs.layer_names)
    sd = _rms(gs[n].backprops for n in gs.layer_names)
    return _rescaled(gs, {n: (sa, sd) for n in gs.layer_names})


def normalise_layers(gs: GradientSet, per_neuron: bool = False) -> tuple[GradientSet, dict[str, torch.Tensor]]:
    """Divide each layer's ``A`` and ``Δ`` by their RMS; return the set and the per-parameter gradient scale.

    With ``per_neuron`` the RMS is taken over the data (and tokens) of every column separately
    (equivariant: permuting the neurons permutes the scales); otherwise over the whole factor.
    Returns ``(gs', s)`` with ``g'_b = g_b / s[param]`` for every per-example gradient entry
    (``s = r_Δ r_Aᵀ`` for weights, ``r_Δ`` for biases; scalars unless ``per_neuron``). Only Linear
    layers are handled; an all-zero column keeps scale ``1e-6`` of its layer's RMS.
    """
    def rms(t):
        r = t.pow(2).mean((0, 1)).sqrt() if per_neuron else _rms([t])
        return r.clamp_min(1e-6 * _rms([t]))

    scale, s = {}, {}
    for n in gs.layer_names:
        f = gs[n]
        if f.module_type != "Linear":
            raise ValueError(f"normalise_layers handles Linear layers; layer {n!r} is {f.module_type}")
        ra, rd = rms(f.activations), rms(f.backprops)
        scale[n] = (ra, rd)
        s[f.param_names["weight"]] = torch.outer(rd, ra) if per_neuron else ra * rd
        if "bias" in f.param_names:
            s[f.param_names["bias"]] = rd
    return _rescaled(gs, scale), s


def targets_of(gs: GradientSet, last: str, damping: float = 0.1) -> dict[str, dict[str, torch.Tensor]]:
    """``{target: {param_name: tensor shaped like the parameter}}`` for the four targets.

    ``last`` is the module name of the layer the natural gradient is restricted to.
    """
    m, v = gs.mean_grad(), gs.fisher_diagonal()
    adam = {k: m[k] / (v[k] + 1e-8).sqrt() for k in m}
    pe = gs.per_example_grads()
    names = list(gs[last].param_names.values())
    G = torch.cat([pe[n].flatten(1) for n in names], 1)             # (B, p) of the last layer
    F = G.T @ G / G.shape[0]
    lam = damping * F.diagonal().mean()
    ng = torch.linalg.solve(F + lam * torch.eye(F.shape[0], dtype=F.dtype), G.mean(0))
    out, k = {}, 0
    for n in names:
        out[n], k = ng[k:k + m[n].numel()].reshape(m[n].shape), k + m[n].numel()
    return {"mean_grad": m, "fisher_diag": v, "adam_direction": adam, "natural_grad_last_layer": out}


def make_sets(n: int, widths: list[int], set_size: int, seed: int, damping: float = 0.1) -> list[tuple]:
    """``n`` gradient sets of random tanh MLPs ``widths`` (weights scaled by U(0.5, 2)) on random digits.

    Returns ``[(gs, targets)]`` with ``gs`` RMS-normalised (:func:`normalised_set`) and ``targets``
    from :func:`targets_of` on it.
    """
    from gradmeta.data import load_digits
    data = load_digits("all")
    X, Y = data.flat(), data.labels
    if X.shape[1] != widths[0] or widths[-1] < int(Y.max()) + 1:
        raise ValueError(f"data.inner_widths={widths} must start with {X.shape[1]} (pixels) and end with "
                         f"at least {int(Y.max()) + 1} (classes)")
    g = torch.Generator().manual_seed(seed)
    last = str(2 * (len(widths) - 2))                               # mlp(): Linear, act, Linear, ...
    sets = []
    for i in range(n):
        torch.manual_seed(seed * 100003 + i)
        model = mlp(widths, activation="tanh")
        with torch.no_grad():                       # varied scales of random inits
            for p in model.parameters():
                p.mul_(0.5 + 1.5 * torch.rand((), generator=g))
        idx = torch.randint(0, len(Y), (set_size,), generator=g)
        gs = normalised_set(model, X[idx], Y[idx])
        sets.append((gs, targets_of(gs, last, damping)))
    return sets


def kfac_fisher(gs: GradientSet) -> dict[str, torch.Tensor]:
    """Rank-one (K-FAC-like) estimate of the Fisher diagonal, no learning: ``mean_b δ_i² · mean_b a_j²``
    for a weight ``[i, j]``, ``mean_b δ_i²`` for a bias (exact for biases)."""
    out = {}
    for n in gs.layer_names:
        f = gs[n]
        d2, a2 = f.backprops.pow(2).sum(1).mean(0), f.activations.pow(2).sum(1).mean(0)
        out[f.param_names["weight"]] = torch.outer(d2, a2)
        if "bias" in f.param_names:
            out[f.param_names["bias"]] = d2
    return out


# ---------------------------------------------------------------------------------- models
def capability_models(model: torch.nn.Module, m: dict, names=MODELS, seed: int = 0) -> dict[str, torch.nn.Module]:
    """The contestants for ``model``'s architecture (``m``: the spec's ``[model]`` table), each
    initialised from ``torch.manual_seed(seed)``."""
    def make_one(name):
        torch.manual_seed(seed)
        return make[name]()

    kw = dict(readout="weight", channels=m["channels"], set_layers=m["set_layers"],
              neuron_layers=m["neuron_layers"], heads=m["heads"], extra_channels=_EXTRA[m["features"]])
    kw_pp = dict(kw, neuron_attention=m.get("neuron_attention", "softmax"))
    make = {"GradMetaNet": lambda: gnn.GradMetaNet.for_model(model, variant="base", **kw),
            "GradMetaNet++": lambda: gnn.GradMetaNet.for_model(model, variant="plusplus", **kw_pp),
            "GradMetaNet (bilinear)": lambda: gnn.GradMetaNet.for_model(model, variant="base", product="bilinear", **kw),
            "GradMetaNet++ (bilinear)": lambda: gnn.GradMetaNet.for_model(model, variant="plusplus",
                                                                          product="bilinear", **kw_pp),
            "per-param DeepSets": lambda: gnn.PerParamDeepSets(hidden=m["deepsets_hidden"]),
            "flat-factor MLP": lambda: gnn.FlatFactorMLP.for_model(model, readout="weight", hidden=m["flat_hidden"]),
            "averaged-gradient net": lambda: gnn.AveragedGradientNet.for_model(model, channels=m["channels"])}
    return {n: make_one(n) for n in names}


def rel_err(pred: dict, tgt: dict, sq: bool = False) -> torch.Tensor:
    """``‖pred − tgt‖ / ‖tgt‖`` over all parameters (its square if ``sq``)."""
    num = sum(((pred[k] - tgt[k]) ** 2).sum() for k in tgt)
    den = sum((tgt[k] ** 2).sum() for k in tgt)
    return num / den if sq else (num / den).sqrt()


# --------------------------------------------------------------------------------- training
def _extra(f: torch.Tensor, features: str) -> torch.Tensor:
    sq = f[..., :2] ** 2                                            # a², δ² of (B, T, n, 4) channels
    return sq if features == "square" else torch.cat([sq, (sq + 1e-4).log()], -1)


def _prepare(sets, target: str, normalise: str, spec=None, features: str = "none", mean_only: bool = False):
    """``[(input, {param: scale^degree}, target dict, extra)]`` for one target.

    ``input`` is the gradient set normalised as ``normalise`` says, or with ``mean_only`` (the
    averaged-gradient net) ``{param: ḡ / RMS(ḡ)}`` (one scalar per parameter tensor, from ``ḡ``
    alone, unless ``normalise = "set"``). ``extra`` (when ``spec`` is a ``SymmetrySpec`` and
    ``features != "none"``): ``{space: (B, T, n, k)}`` elementwise functions of each neuron's ``a``
    and ``δ`` input channels (see ``model.features``).
    """
    k = _DEGREE[target]
    layout = gnn.NeuronLayout(spec) if spec is not None and features != "none" else None
    out = []
    for gs, t in sets:
        if mean_only:
            gs_in = gs.mean_grad()
            s = {p: _rms([v]) if normalise != "set" else torch.ones(()) for p, v in gs_in.items()}
            gs_in = {p: v / s[p] for p, v in gs_in.items()}
        elif normalise == "set":
            gs_in, s = gs, {p: torch.ones(()) for p in gs.param_names}
        else:
            gs_in, s = normalise_layers(gs, per_neuron=normalise == "neuron")
        mult = {p: s[p] ** k for p in t[target]}
        extra = None if layout is None else {n: _extra(f, features) for n, f in layout.features(gs_in).items()}
        out.append((gs_in, mult, t[target], extra))
    return out


def _predict(net, items):
    sets = [it[0] for it in items]
    if getattr(getattr(net, "layout", None), "extra_channels", 0):
        pred = net(sets, extra=[it[3] for it in items])             # one stacked pass over the sets
    else:
        pred = net(sets)
    return [{p: pred[p][j] * items[j][1][p] for p in items[j][2]} for j in range(len(items))]


def _evaluate(net, items, chunk: int = 8) -> float:
    with torch.no_grad():
        errs = []
        for i in range(0, len(items), chunk):
            part = items[i:i + chunk]
            errs += [rel_err(p, it[2]).item() for p, it in zip(_predict(net, part), part)]
    return statistics.mean(errs)


def train_eval(net, train, test, tr: dict, seed: int, log=None) -> dict:
    """Adam with linear warm-up and cosine decay on the mean squared relative error of ``tr["batch_sets"]``
    training sets drawn uniformly (``seed``); test error at the end. ``log(step, mean train loss)``."""
    def batch_loss(idx):
        items = [train[i] for i in idx.tolist()]
        return sum(rel_err(p, it[2], sq=True) for p, it in zip(_predict(net, items), items)) / len(items)

    t0 = time.perf_counter()
    hist = minibatch_train(net, batch_loss, len(train), steps=tr["steps"], batch_size=tr["batch_sets"], lr=tr["lr"],
                           seed=seed, sampling="uniform", schedule="cosine", warmup=tr["warmup"], clip=tr["clip"],
                           log_every=tr["log_every"], average=True, on_log=log)
    secs = time.perf_counter() - t0
    return {"rel_error": _evaluate(net, test), "train_rel_error": _evaluate(net, train[:len(test)]),
            "train_seconds": secs, "history": {"step": hist["step"], "train_loss": hist["loss"]}}


# ------------------------------------------------------------------------------------- task
def _check(run: Run) -> None:
    s = run.spec
    for key, allowed in (("targets", TARGETS), ("models", MODELS)):
        bad = [x for x in s[key] if x not in allowed]
        if bad or not s[key]:
            raise run.spec_error(key, f"{bad or 'empty'}; choose from {', '.join(map(repr, allowed))}")
    d, tr = s["data"], s["train"]
    for key, v in {"data.set_size": d["set_size"], "data.train_sets": d["train_sets"],
                   "data.test_sets": d["test_sets"], "train.steps": tr["steps"], "train.lr": tr["lr"],
                   "train.batch_sets": tr["batch_sets"], "train.log_every": tr["log_every"],
                   "threads": s["threads"], "model.channels": s["model"]["channels"]}.items():
        if not v > 0:
            raise run.spec_error(key, f"must be positive, got {v}")
    if tr["batch_sets"] > d["train_sets"]:
        raise run.spec_error("train.batch_sets", f"{tr['batch_sets']} is more than data.train_sets = {d['train_sets']}")
    if len(d["inner_widths"]) < 3:
        raise run.spec_error("data.inner_widths", f"needs a hidden layer, got {d['inner_widths']}")


@register_task("nn_capability", defaults=DEFAULTS)
def nn_capability(run: Run) -> dict:
    """Regress mean gradient, Fisher diagonal, Adam direction and a natural gradient from gradient sets."""
    _check(run)
    s, d, tr = run.spec, run.spec["data"], run.spec["train"]
    widths, damping = d["inner_widths"], s["natural_grad"]["damping"]
    train = make_sets(d["train_sets"], widths, d["set_size"], d["train_seed"], damping)
    test = make_sets(d["test_sets"], widths, d["set_size"], d["test_seed"], damping)
    pairs = [(t, m) for t in s["targets"] for m in s["models"]]
    if "fisher_diag" in s["targets"]:
        ref = [rel_err(kfac_fisher(gs), t["fisher_diag"]).item() for gs, t in test]
        reference = {"reference/kfac_fisher_diag": statistics.mean(ref)}
    else:
        reference = {}
    total = len(pairs) * tr["steps"]
    state = run.restore() or {"summary": {}, "history": {}, "done": 0}
    summary, history, done = state["summary"], state["history"], state["done"]
    bar = run.progress(total, initial=done * tr["steps"], desc="nn_capability")
    for i, (target, name) in enumerate(pairs):
        if i < done:
            continue
        if run.should_stop(i * tr["steps"]):
            break
        net = capability_models(mlp(widths), s["model"], [name], s["seed"])[name]
        spec = net.spec if isinstance(net, gnn.GradMetaNet) else None
        mean_only = isinstance(net, gnn.AveragedGradientNet)
        tr_items, te_items = (_prepare(x, target, tr["normalise"], spec, s["model"]["features"], mean_only)
                              for x in (train, test))
        res = train_eval(net, tr_items, te_items, tr, s["seed"] + 1,
                         log=lambda step, loss: (bar.update(tr["log_every"]), bar.set_postfix(loss=f"{loss:.3g}")))
        key = f"{target}/{name}"
        summary.update({f"rel_error/{key}": res["rel_error"], f"train_rel_error/{key}": res["train_rel_error"],
                        f"train_seconds/{key}": res["train_seconds"]})
        history[key] = res["history"]
        done = i + 1
        run.checkpoint({"summary": summary, "history": history, "done": done}, done * tr["steps"])
    bar.close()
    plots = [run.save_figure(_plot(history, s["targets"], s["models"]), "capability.png")] if history else []
    return {"step": done * tr["steps"], "total_steps": total, "summary": {**reference, **summary}, "history": history,
            "plots": plots}


def _plot(history: dict, targets: list[str], models: list[str]):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(targets), figsize=(3.6 * len(targets), 3.2), squeeze=False)
    for ax, t in zip(axes[0], targets):
        for m in models:
            h = history.get(f"{t}/{m}")
            if h:
                ax.plot(h["step"], [math.sqrt(v) for v in h["train_loss"]], label=m)
        ax.set_yscale("log"), ax.set_title(t, fontsize=9), ax.set_xlabel("step"), ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("train relative error (RMS)")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    return fig


def render_capability(spec: dict, summary: dict, environment: dict | None = None) -> str:
    """Markdown table of ``rel_error/<target>/<model>`` from a run's summary (train error in brackets)."""
    d, tr = spec["data"], spec["train"]
    models = [m for m in spec["models"] if any(k.endswith("/" + m) for k in summary)]
    env = f" Device {environment['device']}, {environment['torch_threads']} torch thread(s)." if environment else ""
    lines = [f"Relative test error ‖pred − target‖/‖target‖ (mean over {d['test_sets']} test sets; in brackets: "
             f"on {d['test_sets']} training sets). Random tanh MLPs {d['inner_widths']}, {d['set_size']} digits "
             f"per set, {d['train_sets']} training sets, {tr['steps']} Adam steps of {tr['batch_sets']} sets "
             f"(lr {tr['lr']:g}, warm-up {tr['warmup']}, cosine), normalisation: {tr['normalise']}, seed "
             f"{spec['seed']}.{env}", "", "| target | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for t in spec["targets"]:
        cells = []
        for m in models:
            k = f"{t}/{m}"
            cells.append(f"{summary[f'rel_error/{k}']:.3f} ({summary[f'train_rel_error/{k}']:.3f})"
                         if f"rel_error/{k}" in summary else "–")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    if "reference/kfac_fisher_diag" in summary:
        lines += ["", "Reference without learning: the rank-one (K-FAC-like) Fisher diagonal `mean_b δ_i² · "
                  f"mean_b a_j²` has relative test error {summary['reference/kfac_fisher_diag']:.3f}."]
    return "\n".join(lines) + "\n"
