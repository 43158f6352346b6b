"""Train a model on your own labels: :func:`train` (validation split, model selection, device) and
:func:`predict` with the saved result."""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from gradmeta._training import minibatch_train

from ._adapter import Adapter
from ._dataset import LabelError, LoraDataset, stack_factors
from ._load import load_adapter
from ._models import MODELS, AdapterModel, load_model, save_model
from ._select import SELECTION_RULES, excess_over_best, select_variant

__all__ = ["train", "predict", "TrainResult", "MODEL_ALIASES", "model_class"]

#: Short names accepted by :func:`train` and ``gradmeta lora train --model``.
MODEL_ALIASES = {"glnet": "GLNet", "svd": "SVDMLP", "factor": "FactorMLP", "dense": "DenseMLP",
                 "procrustes": "ProcrustesMLP", "transformer": "LayerTransformer"}
_FLAT = ("FactorMLP", "ProcrustesMLP", "LayerTransformer")  # built with max_rank


def model_class(name: str) -> str:
    """Registered class name for ``name`` (an alias such as ``"glnet"`` / ``"svd"`` or a class name)."""
    key = name.lower()
    if key in MODEL_ALIASES:
        return MODEL_ALIASES[key]
    for cls in MODELS:
        if cls.lower() == key:
            return cls
    raise ValueError(f"unknown model {name!r}; choose from {sorted(MODEL_ALIASES)} or {sorted(MODELS)}")


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: the selected model (best validation score), in eval mode on the CPU.
        name: its class name.
        scores: ``{model name: validation metrics}`` of every candidate (``r2``, ``mse`` for
            regression, in target units; ``accuracy`` for classification) and its ``best_epoch``.
        info: what :func:`predict` needs (targets, task, target scaling or class names), saved with
            the model.
        path: the saved checkpoint (``out/model.pt``) when ``out`` was given.
        train_paths, val_paths: the adapters of each split.
        history: ``{model name: validation loss per epoch}``.
    """

    model: AdapterModel
    name: str
    scores: dict
    info: dict
    path: Path | None = None
    train_paths: list = field(default_factory=list, repr=False)
    val_paths: list = field(default_factory=list, repr=False)
    history: dict = field(default_factory=dict, repr=False)


def _split(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = max(1, int(round(val_fraction * n)))
    if n - n_val < 1:
        raise ValueError(f"{n} adapters are too few for a validation split of {val_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def _targets(ds: LoraDataset, cols: list[str], task: str):
    if task == "regression":
        return ds.label_tensor(cols), None
    if len(cols) != 1:
        raise ValueError("classification takes one target column")
    vals = [str(lab[cols[0]]).strip() if cols[0] in lab else None for lab in ds.labels]
    for i, v in enumerate(vals):
        if not v:
            line = ds.label_lines[i]
            raise LabelError(f"{ds.labels_file or 'labels'}{f' line {line}' if line else ''} (adapter "
                             f"{ds.paths[i].relative_to(ds.root).as_posix()!r}), column {cols[0]!r}: blank class")
    classes = sorted(set(vals), key=lambda c: (float(c), c) if _is_float(c) else (math.inf, c))
    if len(classes) < 2:
        raise ValueError(f"column {cols[0]!r} has one class only ({classes}); nothing to classify")
    return torch.tensor([classes.index(v) for v in vals]), classes


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _index(pairs, idx):
    return {k: (U[idx], V[idx]) for k, (U, V) in pairs.items()}


def _to(pairs, device):
    return {k: (U.to(device), V.to(device)) for k, (U, V) in pairs.items()}


def _scores(out: Tensor, y: Tensor, task: str, info: dict) -> dict:
    if task == "classification":
        return {"accuracy": float((out.argmax(-1) == y).double().mean()), "loss": float(F.cross_entropy(out, y))}
    pred = out.double() * info["target_std"].double() + info["target_mean"].double()
    yy = y.double()
    ss = ((yy - yy.mean(0)) ** 2).sum(0)
    r2 = 1 - ((pred - yy) ** 2).sum(0) / ss.clamp_min(1e-300)
    return {"r2": float(r2.mean()), "mse": float(((pred - yy) ** 2).mean()),
            "loss": float(F.mse_loss(out, (y - info["target_mean"]) / info["target_std"]))}


def _validation_errors(out: Tensor, y: Tensor, task: str, info: dict) -> Tensor:
    """Per-adapter errors whose mean is ``1 - R²`` (averaged over targets) or ``1 - accuracy``."""
    if task == "classification":
        return (out.argmax(-1) != y).double()
    pred = out.double() * info["target_std"].double() + info["target_mean"].double()
    yy = y.double()
    ss = ((yy - yy.mean(0)) ** 2).sum(0).clamp_min(1e-300)
    return (len(yy) * (pred - yy) ** 2 / ss).mean(-1)


class _EarlyStop(Exception):
    pass


def _fit_one(net: AdapterModel, pairs, y, tr, va, task, info, *, epochs, batch_size, lr, weight_decay, patience,
             seed, device):
    """AdamW epochs (the shared minibatch loop) with the validation loss after each; keeps the best epoch."""
    net.to(device)
    yt = y if task == "classification" else (y - info["target_mean"]) / info["target_std"]
    loss_fn = F.cross_entropy if task == "classification" else F.mse_loss
    p_va, y_va = _to(_index(pairs, va), device), yt[va].to(device)
    state = {"best": math.inf, "epoch": -1, "weights": None, "curve": []}

    def batch_loss(idx):
        rows = tr[idx]
        return loss_fn(net(_to(_index(pairs, rows), device)), yt[rows].to(device))

    def on_epoch(epoch, _train_loss):
        net.eval()
        with torch.no_grad():
            val = float(loss_fn(net(p_va), y_va))
        net.train()
        state["curve"].append(val)
        if val < state["best"]:
            state.update(best=val, epoch=epoch, weights={k: v.detach().clone() for k, v in net.state_dict().items()})
        elif epoch - state["epoch"] >= patience:
            raise _EarlyStop

    net.train()
    try:
        minibatch_train(net, batch_loss, len(tr), epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                        optimizer="adamw", weight_decay=weight_decay, on_log=on_epoch)
    except _EarlyStop:
        pass
    net.load_state_dict(state["weights"])
    net.to("cpu").eval()
    with torch.no_grad():
        sc = _scores(net(_index(pairs, va)), y[va], task, info)
    return net, {**sc, "best_epoch": state["epoch"], "epochs_run": len(state["curve"])}, state["curve"]


def train(adapters: str | os.PathLike | LoraDataset, labels: str | os.PathLike | None = None,
          target: str | Sequence[str] = "", *, task: str = "regression", model: str | Sequence[str] = "glnet",
          val_fraction: float = 0.2, epochs: int = 100, batch_size: int = 32, lr: float = 1e-3,
          weight_decay: float = 1e-4, patience: int = 20, seed: int = 0, device: str = "cpu",
          model_kwargs: dict | None = None, out: str | os.PathLike | None = None, selection: str = "min",
          **dataset_kwargs) -> TrainResult:
    """Train models on adapters with your own labels; select on a held-out validation split.

    Every candidate in ``model`` is trained with AdamW for up to ``epochs`` epochs (early stop after
    ``patience`` epochs without a better validation loss; the best epoch's weights are kept); the
    one with the best validation score (R² averaged over targets, or accuracy) is returned and, with
    ``out``, saved as ``out/model.pt`` (for :func:`predict` / ``gradmeta lora predict``) with
    ``out/metrics.json``. Regression targets are standardised on the training split. GLNet (unless
    ``model_kwargs`` fixes ``residual`` or ``sv_k``) is trained in each of its
    :data:`GLNet.VARIANTS` -- the exact singular-value path alone, and with the equivariant
    residual -- and the one :func:`select_variant` keeps under ``selection`` (``"min"``: the better
    validation score, the spectral path on ties, so GLNet never validates worse than its
    singular-value path, which is :class:`SVDMLP`; ``"one_se"``: the spectral path unless the
    residual is better by more than one standard error) is returned (``scores["GLNet"]["variant"]``).

    Args:
        adapters: a folder of adapters (see :class:`LoraDataset`) or a dataset.
        labels: CSV with an ``adapter`` column (ignored when ``adapters`` is a dataset).
        target: label column(s); ``task="classification"`` takes one column of class names.
        model: ``"glnet"``, ``"svd"``, ``"factor"``, ``"dense"``, ``"procrustes"``, ``"transformer"`` (or
            class names), a list of them, or ``"auto"`` (GLNet and SVDMLP).
        device: where to train (``"cpu"``, ``"cuda"``, ...); the returned model is on the CPU.
        model_kwargs: ``{class name: kwargs}`` for the model constructors.
        selection: how GLNet's variant is chosen on validation, ``"min"`` or ``"one_se"``.
        **dataset_kwargs: passed to :class:`LoraDataset` (``skip_bad``, ``modules``, ...).
    """
    for key, v in (("epochs", epochs), ("batch_size", batch_size), ("patience", patience)):
        if not (isinstance(v, int) and v >= 1):
            raise ValueError(f"{key} must be a positive integer, got {v!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if selection not in SELECTION_RULES:
        raise ValueError(f"selection must be one of {SELECTION_RULES}, got {selection!r}")
    if task not in ("regression", "classification"):
        raise ValueError(f"task must be 'regression' or 'classification', got {task!r}")
    ds = adapters if isinstance(adapters, LoraDataset) else LoraDataset(adapters, labels, **dataset_kwargs)
    cols = [target] if isinstance(target, str) else list(target)
    if not cols or not all(cols):
        raise ValueError("no target column given")
    names = ["GLNet", "SVDMLP"] if model == "auto" else [model_class(m) for m in ([model] if isinstance(model, str)
                                                                                   else model)]
    y, classes = _targets(ds, cols, task)
    tr, va = _split(len(ds), val_fraction, seed)
    pairs = stack_factors(list(ds.adapters), rank=max(ds.max_ranks))  # the training set, stacked in memory
    shapes = ds.shapes
    info: dict = {"targets": cols, "task": task, "regression": task == "regression"}
    if task == "regression":
        info.update(target_mean=y[tr].mean(0), target_std=y[tr].std(0).clamp_min(1e-8) if len(tr) > 1
                    else torch.ones(len(cols)), target_min=y[tr].min(0).values, target_max=y[tr].max(0).values)
    else:
        info["classes"] = classes
    scores, history, best = {}, {}, None
    score = (lambda sc: sc["accuracy"]) if task == "classification" else (lambda sc: sc["r2"])
    for name in names:
        kw = dict((model_kwargs or {}).get(name, {}))
        if name in _FLAT:
            kw.setdefault("max_rank", max(ds.max_ranks))
        variants = {"": {}}
        if name == "GLNet" and not {"residual", "sv_k"} & set(kw):
            variants = MODELS[name].VARIANTS  # in preference order: the spectral path alone first
        fits = []
        for extra in variants.values():
            torch.manual_seed(seed)
            net = MODELS[name](shapes, len(classes) if classes else len(cols), **kw, **extra)
            net.fit_input_scale(_index(pairs, tr))
            if name == "ProcrustesMLP":
                net.fit_template(_index(pairs, tr[:1]))
            fits.append(_fit_one(net, pairs, y, tr, va, task, info, epochs=epochs, batch_size=batch_size, lr=lr,
                                 weight_decay=weight_decay, patience=patience, seed=seed, device=device))
        best_i = 0
        if len(variants) > 1:  # GLNet: which paths the data needs, decided on validation (one-SE rule)
            with torch.no_grad():
                rows = {v: _validation_errors(f[0](_index(pairs, va)), y[va], task, info)
                        for v, f in zip(variants, fits)}
            best_i = list(variants).index(select_variant(rows, rule=selection))
        net, sc, curve = fits[best_i]
        if len(variants) > 1:
            sc = {**sc, "variant": list(variants)[best_i], "variants": {v: score(f[1]) for v, f in zip(variants, fits)},
                  "variants_excess": {v: list(e) for v, e in excess_over_best(rows).items()}}
        scores[name], history[name] = sc, curve
        if best is None or score(sc) > best[0]:
            best = (score(sc), name, net)
    result = TrainResult(best[2], best[1], scores, info, train_paths=[ds.paths[i] for i in tr.tolist()],
                         val_paths=[ds.paths[i] for i in va.tolist()], history=history)
    if out is not None:
        out = Path(out)
        result.path = save_model(result.model, out / "model.pt", **info)
        (out / "metrics.json").write_text(json.dumps({"selected": best[1], "validation": scores, "n_train": len(tr),
                                                      "n_val": len(va), "targets": cols, "task": task}, indent=1))
    return result


def predict(model: str | os.PathLike | AdapterModel, adapters, info: dict | None = None) -> list[dict]:
    """Predictions for adapters (folders / files / :class:`Adapter` objects) from a saved model.

    Returns one dict per adapter ``{"adapter": path, <target>: value, ...}``: regression targets in
    their units (clipped to the training range when it is recorded), multi-label targets as
    probabilities, classification as ``{<target>: class, "p_<class>": probability, ...}``.
    """
    if isinstance(model, AdapterModel):
        net, extra = model, dict(info or {})
    else:
        net, extra = load_model(model)
    targets = list(extra.get("targets", [f"out_{i}" for i in range(net.out_dim)]))
    rows = []
    for a in ([adapters] if isinstance(adapters, (str, os.PathLike, Adapter)) else adapters):
        ad = a if isinstance(a, Adapter) else load_adapter(a)
        try:
            with torch.no_grad():
                out = net(ad)[0]
        except (KeyError, ValueError) as e:
            raise ValueError(f"{ad.path or a}: does not fit the model ({e})") from None
        row = {"adapter": str(ad.path or a)}
        if extra.get("task") == "classification":
            p = torch.softmax(out, -1)
            row[targets[0]] = extra["classes"][int(p.argmax())]
            row.update({f"p_{c}": float(v) for c, v in zip(extra["classes"], p)})
        elif extra.get("regression", True):
            out = out * torch.as_tensor(extra.get("target_std", 1.0)) + torch.as_tensor(extra.get("target_mean", 0.0))
            if "target_min" in extra:
                out = out.clamp(torch.as_tensor(extra["target_min"]), torch.as_tensor(extra["target_max"]))
            row.update({t: float(v) for t, v in zip(targets, out)})
        else:
            row.update({t: float(v) for t, v in zip(targets, torch.sigmoid(out))})
        rows.append(row)
    return rows
