"""Task ``lora_predict``: learn properties of finetuned models from their LoRA adapters alone.

Reads a zoo (``<zoo>/adapters`` and ``<zoo>/labels.csv``, from ``lora_zoo``, ``lora_llama_zoo`` or
``lora_char_lm_zoo``), splits it, trains every model in ``models`` for every seed, and reports on
the held-out adapters:

* ``target = "accuracy"`` / ``"loss"``: regression of ``test_acc`` / ``log(test_loss)`` (the loss
  spans orders of magnitude: diverged finetunes reach 10⁴), standardised MSE; metrics ``r2`` (on
  that scale) and Kendall ``tau`` (tau-b). Every model's predictions are clipped to the range of
  the training targets (a model should not extrapolate a bounded property such as an accuracy
  beyond what it has seen); ``r2_raw`` / ``mse_raw`` are the metrics before clipping;
* ``target = "membership"``: which classes (or sources) the adapter was finetuned on (every 0 / 1
  column starting with ``membership_prefix``: ``class_*``, ``src_*``; multi-label BCE); metric
  ``label_acc`` (mean per-label accuracy) and ``exact`` (all labels right);
* any other ``target``: a numeric column of the labels CSV (``labels``, default ``<zoo>/labels.csv``),
  as regression with the same metrics as ``accuracy`` (``lognorm``, ``eval_loss``, ...).

``split = "random"`` holds out ``test_fraction`` of the adapters; ``split = "rank"`` trains on
the adapters of rank ``train_ranks`` and tests on those of ``test_ranks`` (rank generalisation).
GLNet's variant (exact singular-value path alone, or with the equivariant residual) is chosen
on a held-out share (``glnet_val_fraction``) of the *training* adapters
(:func:`fit_glnet_selected`): the one with the lower loss there, the spectral path on ties
(``glnet_select = "min"``; ``"one_se"``: the spectral path unless the residual is better by more
than one standard error); for a
rank split with several training ranks, optionally on those of the largest training rank
(``glnet_val = "largest_rank"``).
``speed`` measures, side by side on the same test adapters, the time to *predict* the property
(``load_adapter`` + GLNet) and to *evaluate* the adapter (PEFT ``PeftModel.from_pretrained`` on the
base model + the evaluation that made the label: the digits test set, or every source's
evaluation windows of the char-LM zoo), from disk and in memory. The GLNet of the first seed is
saved as ``glnet.pt`` for ``gradmeta lora predict``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import copy
import math
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from gradmeta._training import minibatch_train
from gradmeta.specs import OneOf, Range, Required, register_task

from gradmeta.lora import (MODELS, SELECTION_RULES, AdapterModel, GLNet, LoraDataset, excess_over_best, save_model,
                           select_variant, stack_factors)

if TYPE_CHECKING:  # the runner passes a Run; experiments never import the runner
    from gradmeta.run import Run

__all__ = ["lora_predict", "PREDICT_DEFAULTS", "TARGETS", "regression_metrics", "membership_metrics",
           "kendall_tau", "train_model", "fit_glnet_selected", "measure_speed", "zoo_evaluator", "results_table"]

TARGETS = {"accuracy": ["test_acc"], "loss": ["test_loss"], "membership": [f"class_{c}" for c in range(10)]}

PREDICT_DEFAULTS = {
    "zoo": Required(str, "run folder of a lora_zoo run (holds adapters/ and labels.csv)"),
    "target": "accuracy",  # one of TARGETS, or any numeric column of the labels (regression)
    "membership_prefix": "class_",  # target "membership": every label column starting with this (0 / 1)
    "labels": "",  # labels CSV; default <zoo>/labels.csv
    "split": OneOf("random", ("random", "rank")),
    "test_fraction": Range(0.2, low=0, high=1, low_open=True, high_open=True),
    "train_ranks": [4],
    "test_ranks": [8, 16],
    "max_adapters": Range(0, low=0),  # 0: all
    "models": ["GLNet", "FactorMLP", "DenseMLP", "SVDMLP", "ProcrustesMLP", "LayerTransformer"],
    "seeds": [Range(0, low=0), 1, 2],
    "max_rank": Range(16, low=1),  # of the flattened baselines (FactorMLP, ProcrustesMLP, LayerTransformer)
    "glnet": {"hidden": 8, "channels": 4, "depth": 2, "svd_k": 4, "mlp_hidden": 64, "sv_k": 16},
    # GLNet's variant (spectral / spectral+equivariant) is chosen on this share of the
    # training adapters (trained on the rest), then retrained on all of them. 0: spectral+equivariant.
    "glnet_val_fraction": Range(0.2, low=0, high=1, high_open=True),
    # "largest_rank": with split = "rank" and two or more train_ranks, GLNet's variant is chosen on the
    # adapters of the largest training rank (trained on the smaller ones), a rank shift like the test's
    "glnet_val": OneOf("random", ("random", "largest_rank")),
    # how the validation losses choose: "min", the lowest (the spectral path on ties); "one_se", the
    # first variant (spectral, spectral+equivariant) within one standard error of the lowest (paired)
    "glnet_select": OneOf("min", SELECTION_RULES),
    "train": {"epochs": Range(40, low=1), "batch_size": Range(64, low=1), "lr": Range(1e-3, low=0, low_open=True),
              "weight_decay": 1e-4},
    "speed": {"enabled": True, "n_adapters": Range(50, low=1)},
    "threads": Range(1, low=1),  # tiny models: one thread is fastest on a shared CPU
}


def kendall_tau(x: torch.Tensor, y: torch.Tensor) -> float:
    """Kendall tau-b of two 1-D tensors (ties counted as neither concordant nor discordant)."""
    sx = torch.sign(x[:, None] - x[None, :]).double()
    sy = torch.sign(y[:, None] - y[None, :]).double()
    den = math.sqrt(float((sx * sx).sum()) * float((sy * sy).sum()))
    return float((sx * sy).sum()) / den if den > 0 else float("nan")


def regression_metrics(pred: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """``{"r2", "tau", "mse"}`` for 1-D predictions and targets (in target units)."""
    pred, y = pred.double().flatten(), y.double().flatten()
    ss = float(((y - y.mean()) ** 2).sum())
    return {"r2": 1 - float(((pred - y) ** 2).sum()) / ss if ss > 0 else float("nan"),
            "tau": kendall_tau(pred, y), "mse": float(((pred - y) ** 2).mean())}


def membership_metrics(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """``{"label_acc", "exact"}``: mean per-label accuracy and share of adapters with every label right."""
    right = (logits > 0) == (y > 0.5)
    return {"label_acc": right.double().mean().item(), "exact": right.all(-1).double().mean().item()}


def _build(name: str, shapes, out_dim: int, max_rank: int, glnet: dict | None = None) -> AdapterModel:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    kw = {"max_rank": max_rank} if name in ("FactorMLP", "ProcrustesMLP", "LayerTransformer") else {}
    if name == "GLNet" and glnet:
        kw.update(glnet)
    return MODELS[name](shapes, out_dim, **kw)


def _index(pairs, idx):
    return {k: (U[idx], V[idx]) for k, (U, V) in pairs.items()}


def train_model(net: AdapterModel, pairs, y: torch.Tensor, loss_fn, epochs: int, batch_size: int, lr: float,
                weight_decay: float, seed: int, on_epoch=None) -> AdapterModel:
    """AdamW on stacked ``pairs`` (``{module: (U (N,n,r), V (N,m,r))}``) and targets ``y (N, k)``.

    ``epochs`` passes over a fresh permutation (``seed``) in batches of ``batch_size``, cosine
    learning rate stepped once an epoch; ``on_epoch(epoch, mean training loss)``.
    """
    net.train()
    minibatch_train(net, lambda idx: loss_fn(net(_index(pairs, idx)), y[idx]), y.shape[0], epochs=epochs,
                    batch_size=batch_size, lr=lr, seed=seed, schedule="cosine", optimizer="adamw",
                    weight_decay=weight_decay, on_log=on_epoch)
    return net.eval()


def fit_glnet_selected(build, pairs, y: torch.Tensor, loss_fn, seed: int, val_fraction: float, train: dict,
                       on_epoch=None, held_out: list[int] | None = None,
                       rule: str = "min") -> tuple[AdapterModel, dict]:
    """Train the :data:`GLNet.VARIANTS <gradmeta.lora.GLNet.VARIANTS>` variant that validates best.

    ``build(variant kwargs) -> GLNet``. A seeded ``val_fraction`` of the training adapters is held
    out; every variant (spectral path alone, with the equivariant residual) is trained on the
    rest (same seed and loop) and scored by ``loss_fn`` on it; the variant
    :func:`gradmeta.lora.select_variant` keeps under ``rule`` (``"min"``: the lowest loss, the
    spectral path on ties; ``"one_se"``: the first whose loss is within one standard error of the
    lowest, paired per adapter) is rebuilt and trained on every training adapter.
    ``val_fraction = 0``: no selection, the spectral path with the residual.
    ``held_out``: explicit validation rows instead of the random share (e.g. the adapters of the
    largest training rank, so that the validation sees a rank shift as the test does). Returns ``(model, {"variant": name, "val_loss_<variant>": mean loss,
    "val_excess_<variant>": (mean excess over the lowest, its standard error), ...})``.
    """
    variants = GLNet.VARIANTS
    chosen, info, per_row = "spectral+equivariant", {}, {}
    if val_fraction > 0 or held_out:
        n = y.shape[0]
        if held_out:
            va = torch.tensor(sorted(set(held_out)))
            fit = torch.tensor([i for i in range(n) if i not in set(held_out)])
            if not len(fit):
                raise ValueError("fit_glnet_selected: held_out leaves no adapter to train on")
        else:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(2000 + seed))
            n_val = min(max(1, int(round(val_fraction * n))), n - 1)
            va, fit = perm[:n_val].sort().values, perm[n_val:].sort().values
        for name, kw in variants.items():
            torch.manual_seed(seed)
            net = build(kw).fit_input_scale(_index(pairs, fit))
            train_model(net, _index(pairs, fit), y[fit], loss_fn, seed=seed, **train)
            with torch.no_grad():
                per_row[name] = loss_fn(net(_index(pairs, va)), y[va], reduction="none").flatten(1).mean(1)
            info[f"val_loss_{name}"] = float(per_row[name].mean())
        chosen = select_variant(per_row, rule=rule)
        info.update({f"val_excess_{k}": e for k, e in excess_over_best(per_row).items()})
    torch.manual_seed(seed)
    net = build(variants[chosen]).fit_input_scale(pairs)
    train_model(net, pairs, y, loss_fn, seed=seed, on_epoch=on_epoch, **train)
    return net, {"variant": chosen, **info}


def _split(ds: LoraDataset, spec: dict, seed: int) -> tuple[list[int], list[int]]:
    ranks = [max(a.ranks.values()) for a in ds.adapters]
    if spec["split"] == "rank":
        return ([i for i, r in enumerate(ranks) if r in spec["train_ranks"]],
                [i for i, r in enumerate(ranks) if r in spec["test_ranks"]])
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1000 + seed)).tolist()
    n_test = int(round(spec["test_fraction"] * len(ds)))
    return sorted(perm[n_test:]), sorted(perm[:n_test])


def measure_speed(net: AdapterModel, ds: LoraDataset, idx: list[int], base: torch.nn.Module,
                  evaluate_fn) -> dict[str, float]:
    """Seconds per adapter to predict a property vs to evaluate the adapted model, side by side.

    ``evaluate_fn(model)`` runs the evaluation that defines the label (e.g. the test set or every
    source's evaluation windows). ``*_disk_s``: from the adapter folder (``load_adapter`` + ``net``
    vs PEFT ``from_pretrained`` on a copy of ``base`` + ``evaluate_fn``); ``*_mem_s``: adapters
    already in memory, one at a time (``net`` vs merging ``W + ΔW`` into a copy of ``base`` +
    ``evaluate_fn``); ``predict_batch_s``: ``net`` on all of them in one batch (median of 5 calls).
    """
    from peft import PeftModel

    from gradmeta.lora import load_adapter

    paths = [ds.paths[i] for i in idx]
    out = {"n_adapters": len(paths)}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        for p in paths:  # predict from disk: read the adapter, run the model
            net(load_adapter(p))
        out["predict_disk_s"] = (time.perf_counter() - t) / len(paths)
        t = time.perf_counter()
        for p in paths:  # evaluate from disk: PEFT load on the base model, run the evaluation
            evaluate_fn(PeftModel.from_pretrained(copy.deepcopy(base), str(p)))
        out["evaluate_disk_s"] = (time.perf_counter() - t) / len(paths)
        ads = [ds.adapters[i] for i in idx]
        t = time.perf_counter()
        for a in ads:  # in memory: model forward on one adapter
            net(a)
        out["predict_mem_s"] = (time.perf_counter() - t) / len(ads)
        t = time.perf_counter()
        for a in ads:  # in memory: merge W + ΔW, run the evaluation
            model = copy.deepcopy(base)
            for name, f in a.items():
                model.get_submodule(name).weight += f.delta().to(model.get_submodule(name).weight.dtype)
            evaluate_fn(model)
        out["evaluate_mem_s"] = (time.perf_counter() - t) / len(ads)
        pairs = stack_factors(ads)
        net(pairs)  # warm-up
        times = []
        for _ in range(5):  # in memory, all adapters in one batch; the median of 5 calls
            t = time.perf_counter()
            net(pairs)
            times.append(time.perf_counter() - t)
        out["predict_batch_s"] = sorted(times)[2] / len(ads)
    out["speedup_disk"] = out["evaluate_disk_s"] / out["predict_disk_s"]
    out["speedup_mem"] = out["evaluate_mem_s"] / out["predict_mem_s"]
    out["speedup_batch"] = out["evaluate_mem_s"] / out["predict_batch_s"]
    return out


def zoo_evaluator(zoo: Path, target: str):
    """``(base model, evaluate_fn)`` that produces the zoo's labels, or ``None`` when unknown: the
    char-LM zoo (``lm_base.pt``: every source's evaluation windows) or the digits zoo (``base.pt``,
    targets accuracy / loss / membership: the digits test set)."""
    from .char_lm_zoo import LM_BASE, evaluate_sources, load_lm_base
    from .zoo import evaluate, load_base

    if (zoo / LM_BASE).exists():
        base, ckpt = load_lm_base(zoo / LM_BASE)
        return base, lambda model: evaluate_sources(model, ckpt)
    if target in TARGETS and (zoo / "base.pt").exists():
        from gradmeta.data import load_digits

        te = load_digits("test", seed=0)
        X, y = te.flat(), te.labels
        return load_base(zoo / "base.pt"), lambda model: evaluate(model, X, y)
    return None


@register_task("lora_predict", defaults=PREDICT_DEFAULTS)
def lora_predict(run: Run) -> dict:
    """Predict accuracy / loss / class membership of finetuned models from their LoRA adapters."""
    spec = run.spec
    zoo = Path(spec["zoo"])
    labels = Path(spec["labels"]) if spec["labels"] else zoo / "labels.csv"
    if not labels.exists():
        raise run.spec_error("zoo", f"{labels} does not exist; build the zoo first: "
                                    f"gradmeta run tasks/lora_zoo.toml --out {zoo}")
    ds = LoraDataset(zoo / "adapters", labels)
    cols = TARGETS.get(spec["target"], [spec["target"]])
    if spec["target"] == "membership":
        cols = [c for c in ds.labels[0] if c.startswith(spec["membership_prefix"])]
        if not cols:
            raise run.spec_error("membership_prefix", f"no column of {labels} starts with "
                                                      f"{spec['membership_prefix']!r} (columns: {sorted(ds.labels[0])})")
    if any(c not in ds.labels[0] for c in cols):
        raise run.spec_error("target", f"{spec['target']!r} is neither one of {sorted(TARGETS)} nor a column of "
                                       f"{labels} (columns: {sorted(ds.labels[0])})")
    Y = ds.label_tensor(cols)
    if spec["target"] == "loss":
        Y = Y.log()
    if spec["max_adapters"]:
        keep = list(range(min(len(ds), spec["max_adapters"])))
    else:
        keep = list(range(len(ds)))
    regression = spec["target"] != "membership"
    pairs_all = stack_factors([ds.adapters[i] for i in keep], rank=max(max(a.ranks.values()) for a in ds.adapters))
    summary: dict = {}
    history: dict = {}
    per_seed: dict[str, list[dict]] = {}
    first_seed: dict = {}  # regression: {model: (predictions, targets)} of the first seed, for the figure
    shapes = ds.adapters[0].shapes
    total = len(spec["seeds"]) * len(spec["models"])
    bar = run.progress(total, desc="lora_predict")
    for seed in spec["seeds"]:
        tr, te = _split(ds, spec, seed)
        tr, te = [i for i in tr if i in set(keep)], [i for i in te if i in set(keep)]
        if not tr or not te:
            raise run.spec_error("split", f"empty train ({len(tr)}) or test ({len(te)}) set")
        r_tr = max(max(ds.adapters[i].ranks.values()) for i in tr)
        p_tr = {k: (U[tr][..., :r_tr], V[tr][..., :r_tr]) for k, (U, V) in pairs_all.items()}
        p_te = _index(pairs_all, te)
        y_tr, y_te = Y[tr], Y[te]
        mu, sd = (y_tr.mean(0), y_tr.std(0).clamp_min(1e-8)) if regression else (0.0, 1.0)
        y_lo, y_hi = y_tr.min(0).values, y_tr.max(0).values  # predictions are clipped to this range
        loss_fn = F.mse_loss if regression else F.binary_cross_entropy_with_logits
        for name in spec["models"]:
            curve, chosen = [], {}
            t0 = time.perf_counter()
            if name == "GLNet" and spec["glnet"]["sv_k"]:
                build = lambda kw: _build(name, shapes, len(cols), spec["max_rank"], {**spec["glnet"], **kw})
                held = None
                if (spec["glnet_val"] == "largest_rank" and spec["split"] == "rank"
                        and len(set(spec["train_ranks"])) > 1):
                    top = max(spec["train_ranks"])
                    held = [j for j, i in enumerate(tr) if max(ds.adapters[i].ranks.values()) == top]
                net, chosen = fit_glnet_selected(build, p_tr, (y_tr - mu) / sd, loss_fn, seed,
                                                 spec["glnet_val_fraction"], spec["train"], held_out=held,
                                                 rule=spec["glnet_select"],
                                                 on_epoch=lambda e, l: curve.append(l))
            else:
                torch.manual_seed(seed)
                net = _build(name, shapes, len(cols), spec["max_rank"], spec["glnet"]).fit_input_scale(p_tr)
                if name == "ProcrustesMLP":
                    net.fit_template(_index(p_tr, [0]))
                train_model(net, p_tr, (y_tr - mu) / sd, loss_fn, seed=seed,
                            on_epoch=lambda e, l: curve.append(l), **spec["train"])
            train_s = time.perf_counter() - t0
            with torch.no_grad():
                out = net(p_te)
            if regression:
                pred = out[:, 0] * sd + mu
                if seed == spec["seeds"][0]:
                    first_seed[name] = (pred.clamp(y_lo, y_hi).detach(), y_te[:, 0])
                m = regression_metrics(pred.clamp(y_lo, y_hi), y_te[:, 0])
                m.update({f"{k}_raw": v for k, v in regression_metrics(pred, y_te[:, 0]).items() if k != "tau"})
            else:
                m = membership_metrics(out, y_te)
            m["train_s"] = train_s
            for v in (GLNet.VARIANTS if chosen else ()):  # mean over seeds: share that chose it
                m[f"variant_{v}"] = float(chosen["variant"] == v)
            per_seed.setdefault(name, []).append(m)
            history[f"{name}/seed{seed}"] = {"epoch": list(range(len(curve))), "train_loss": curve}
            if seed == spec["seeds"][0] and name == "GLNet":
                save_model(net, run.out / "glnet.pt", targets=cols, target_mean=torch.as_tensor(mu).flatten(),
                           target_std=torch.as_tensor(sd).flatten(), target_min=y_lo.flatten(),
                           target_max=y_hi.flatten(), regression=regression)
                evaluator = zoo_evaluator(zoo, spec["target"]) if spec["speed"]["enabled"] else None
                if evaluator is not None:  # the base model and evaluation behind the labels are known
                    speed = measure_speed(net, ds, te[:spec["speed"]["n_adapters"]], *evaluator)
                    summary.update({f"speed/{k}": v for k, v in speed.items()})
            bar.update(1)
    bar.close()
    for name, ms in per_seed.items():
        for key in ms[0]:
            vals = torch.tensor([m[key] for m in ms], dtype=torch.float64)
            summary[f"{name}/{key}_mean"] = vals.mean().item()
            summary[f"{name}/{key}_std"] = vals.std().item() if len(ms) > 1 else 0.0
    summary.update(n_train=len(tr), n_test=len(te), n_seeds=len(spec["seeds"]))
    plots = []
    if first_seed:
        from .plots import prediction_figure

        plots.append(run.save_figure(prediction_figure(first_seed, spec["target"], spec["seeds"][0]),
                                     "predicted_vs_true.png"))
    return {"summary": summary, "history": history, "plots": plots, "step": total, "total_steps": total}


def results_table(run_dirs: dict[str, str | Path]) -> str:
    """Markdown table (model × task, ``mean ± std`` over seeds) from ``lora_predict`` run folders.

    ``run_dirs``: ``{column title: run folder or a copy of its metrics.json}``; each column shows
    ``r2`` and ``tau`` (regression) or ``label_acc`` (membership).
    """
    import json

    cols, models = [], []
    for title, d in run_dirs.items():
        f = Path(d) if Path(d).suffix == ".json" else Path(d) / "metrics.json"
        s = json.loads(f.read_text())["summary"]
        for m in (k.split("/")[0] for k in s if k.endswith("_mean")):
            if m not in models:
                models.append(m)
        keys = ["r2", "tau"] if any(k.endswith("/r2_mean") for k in s) else ["label_acc"]
        cols += [(f"{title} {k}", s, k) for k in keys]
    lines = ["| model | " + " | ".join(c[0] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m in models:
        cells = [f"{s[f'{m}/{k}_mean']:.3f} ± {s[f'{m}/{k}_std']:.3f}" if f"{m}/{k}_mean" in s else "-"
                 for _, s, k in cols]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
