"""Task ``inr_editing``: build an INR zoo, train editors for one edit, report held-out pixel MSE.

``gradmeta run tasks/inr_digits_dilation.toml`` fits (or resumes) a SIREN zoo in
``<run>/zoo`` (or ``zoo.dir``), then for every seed and every editor variant in
``editor.features`` trains an :class:`~gradmeta.inr.INREditor` with the rendered-image loss and
evaluates the pixel MSE of the edited INRs against the edited images of the test split. One
checkpoint per finished (variant, seed), so ``--resume`` continues where it stopped. A variant
is ``"features[:product]"`` (e.g. ``"gradients++:bilinear"``); without a suffix the GradMetaNet
branch uses ``editor.product`` (default ``"gelu"``). Outputs: ``edits.png`` (original / target /
edited per variant on test INRs, per-cell MSE) and ``editors/<variant>-seed<s>.pt`` (each editor,
``INREditor.save`` format, so ``gradmeta.inr.load_editor(path)`` loads it; the shipped editors
in ``gradmeta/inr/editors/`` are copies of these).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import math
import time
from pathlib import Path

import torch

from gradmeta.specs import NonEmpty, OneOf, Range, register_task
from gradmeta.inr import (EDITS, INREditor, apply_edit, build_zoo, evaluate_editor, load_zoo,
                          fit_editor, parse_variant, render, zoo_images)

if TYPE_CHECKING:  # the runner passes a Run; experiments never import the runner
    from gradmeta.run import Run

__all__ = ["inr_editing", "DEFAULTS"]

DEFAULTS = {
    "seeds": NonEmpty([Range(0, low=0), 1, 2]),
    "data": {"source": OneOf("digits", ("digits", "mnist", "fashion_mnist", "cifar10")), "root": "",
             "size": Range(12, low=0), "train_limit": Range(256, low=0), "test_limit": Range(128, low=0),
             "edit": "dilation"},
    "zoo": {"dir": "", "steps": Range(60, low=1), "lr": Range(3e-3, low=0, low_open=True),
            "shard_size": Range(128, low=1), "seed": Range(0, low=0)},
    "editor": {"features": ["weights", "probing", "gradients"], "channels": 16, "layers": 2, "aux_channels": 4,
               "set_layers": 2, "num_coords": 64, "probe_grid": 8, "product": "gelu", "grad_grid": 0,
               "grad_target": 0.0, "aux_zero_init": False},
    "train": {"steps": Range(300, low=1), "batch_size": Range(32, low=1), "lr": Range(3e-3, low=0, low_open=True),
              "smoothness": Range(0.0, low=0)},
}


def _editor(spec: dict, channels: int, variant: str) -> INREditor:
    e = spec["editor"]
    features, product = parse_variant(variant, e["product"])
    return INREditor(channels, features=features, channels=e["channels"], layers=e["layers"],
                     aux_channels=e["aux_channels"], set_layers=e["set_layers"], num_coords=e["num_coords"],
                     probe_grid=e["probe_grid"], product=product, grad_grid=e["grad_grid"],
                     grad_target=e["grad_target"], aux_zero_init=e["aux_zero_init"])


def _zoo(run: Run, spec: dict) -> tuple[Path, dict]:
    d, z = spec["data"], spec["zoo"]
    folder = Path(z["dir"]) if z["dir"] else run.out / "zoo"
    limits = {"train": d["train_limit"], "test": d["test_limit"]}
    images = {s: zoo_images(d["source"], s, root=d["root"] or None, size=d["size"] or None,
                            limit=limits[s] or None) for s in ("train", "test")}
    info = build_zoo(folder, images, shard_size=z["shard_size"], steps=z["steps"], lr=z["lr"], seed=z["seed"],
                     progress=run._progress is not False,
                     config={"source": d["source"], "size": d["size"], **limits})
    return folder, info


@register_task("inr_editing", defaults=DEFAULTS)
def inr_editing(run: Run) -> dict:
    """INR editing: SIREN zoo, equivariant editors (weights / +probing / +GradMetaNet), held-out edit MSE."""
    spec = run.spec
    if spec["data"]["edit"] not in EDITS:
        raise run.spec_error("data.edit", f"unknown edit {spec['data']['edit']!r}; registered: {sorted(EDITS)}")
    for f in spec["editor"]["features"]:
        try:
            parse_variant(f, spec["editor"]["product"])
        except ValueError as err:
            key = "editor.product" if ":" not in f and "product must" in str(err) else "editor.features"
            raise run.spec_error(key, str(err)) from None
    state = run.restore() or {"results": {}, "editors": {}, "losses": {}, "zoo": {}}
    folder, info = _zoo(run, spec)
    if info["fitted"]:
        state["zoo"] = {"fitted": info["fitted"], "seconds": info["seconds"], "inrs_per_s": info["inrs_per_s"]}
    zoo = load_zoo(folder)
    train, test = zoo.split("train"), zoo.split("test")
    edit = spec["data"]["edit"]
    y_train, y_test = apply_edit(edit, train.images), apply_edit(edit, test.images)
    C = zoo.images.shape[1]
    jobs = {f"{f}/seed{s}": (f, s) for s in spec["seeds"] for f in spec["editor"]["features"]}
    sets: dict[str, tuple] = {}
    for key in run.pending(list(jobs), state["results"], desc="editors"):
        feat, seed = jobs[key]
        torch.manual_seed(seed)
        ed = _editor(spec, C, feat).calibrate(train.params)
        kind = {"gradients++": "gradients"}.get(ed.features, ed.features)
        if kind != "weights" and kind not in sets:
            t0 = time.perf_counter()
            with torch.no_grad():
                sets[kind] = (ed.aux_sets(train.params), ed.aux_sets(test.params), time.perf_counter() - t0)
        s_train, s_test, _ = sets.get(kind, (None, None, 0.0))
        t = spec["train"]
        hist = fit_editor(ed, train.params, y_train, steps=t["steps"], batch_size=t["batch_size"], lr=t["lr"],
                            seed=seed, sets=s_train, smoothness=t["smoothness"])
        mse = evaluate_editor(ed, test.params, y_test, sets=s_test)
        state["results"][key] = {"mse": mse.mean().item(), "train_seconds": hist["seconds"]}
        state["losses"][key] = hist["loss"]
        state["editors"][key] = {k: v.clone() for k, v in ed.state_dict().items()}
        run.checkpoint(state, len(state["results"]))
    summary = _summary(state, spec, zoo, evaluate_editor(None, test.params, y_test).mean().item())
    plots = [_plot(run, spec, state, test, y_test)] if state["editors"] else []
    _export(run, spec, state, zoo)
    history = {"train_loss": {k: v[:: max(1, len(v) // 100)] for k, v in state["losses"].items()}}
    return {"summary": summary, "history": history, "plots": plots, "step": len(state["results"]),
            "total_steps": len(jobs)}


def _summary(state: dict, spec: dict, zoo, identity: float) -> dict:
    out = {"identity_mse": identity, "zoo_psnr_mean": zoo.psnr.mean().item(), "zoo_psnr_min": zoo.psnr.min().item(),
           "zoo_size": len(zoo)}
    if state["zoo"]:
        out["zoo_inrs_per_s"] = state["zoo"]["inrs_per_s"]
    for f in spec["editor"]["features"]:
        vals = [r["mse"] for k, r in state["results"].items() if k.startswith(f + "/")]
        if vals:
            mean = sum(vals) / len(vals)
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
            out[f"mse/{f}"], out[f"mse_std/{f}"], out[f"seeds/{f}"] = mean, std, len(vals)
    base = out.get("mse/weights")
    for f in spec["editor"]["features"]:
        if base and f != "weights" and f"mse/{f}" in out:
            out[f"reduction_vs_weights/{f}"] = 1 - out[f"mse/{f}"] / base
    return out


def _trained(spec: dict, state: dict, key: str, zoo) -> INREditor:
    ed = _editor(spec, zoo.images.shape[1], key.split("/")[0])
    ed.load_state_dict(state["editors"][key])
    d, z = spec["data"], spec["zoo"]
    ed.trained_for = {"edit": d["edit"], "image_size": list(zoo.images.shape[-2:]), "channels": zoo.images.shape[1],
                      "fit": {"steps": z["steps"], "lr": z["lr"]},
                      "train": {"source": d["source"], "images": d["train_limit"], **spec["train"],
                                "seed": int(key.rsplit("seed", 1)[1])},
                      "heldout_mse": state["results"][key]["mse"]}
    return ed.eval()


def _export(run: Run, spec: dict, state: dict, zoo) -> None:
    folder = run.out / "editors"
    folder.mkdir(exist_ok=True)
    for key in state["editors"]:
        _trained(spec, state, key, zoo).save(folder / (key.replace(":", "-").replace("/", "-") + ".pt"))


def _plot(run: Run, spec: dict, state: dict, test, y_test, n: int = 6) -> str:
    import matplotlib.pyplot as plt

    n = min(n, len(test))
    feats = [f for f in spec["editor"]["features"] if any(k.startswith(f + "/") for k in state["editors"])]
    size = tuple(y_test.shape[-2:])
    rows = [("original (no edit)", test.images[:n]), ("target: " + spec["data"]["edit"], y_test[:n])]
    p = {k: v[:n] for k, v in test.params.items()}
    for f in feats:
        key = next(k for k in state["editors"] if k.startswith(f + "/"))
        ed = _editor(spec, test.images.shape[1], f)
        ed.load_state_dict(state["editors"][key])
        with torch.no_grad():
            rows.append((key, render(ed.edit(p), size, ed.omega0)))
    fig, axes = plt.subplots(len(rows), n, figsize=(1.5 * n + 1.2, 1.6 * len(rows)), squeeze=False)
    for r, (name, imgs) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            img = imgs[c].clamp(0, 1).permute(1, 2, 0)
            ax.imshow(img.squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if r != 1:  # MSE of the raw (unclipped) rendering against the target edit
                ax.set_title(f"MSE {(imgs[c] - y_test[c]).square().mean().item():.2e}", fontsize=6)
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.suptitle(f"{spec['data']['source']} {size[0]}x{size[1]}: {spec['data']['edit']} of held-out INRs", fontsize=9)
    fig.tight_layout()
    return run.save_figure(fig, "edits.png")
