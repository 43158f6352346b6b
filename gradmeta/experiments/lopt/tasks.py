"""Tasks ``lopt_meta_train`` and ``lopt_eval`` for ``gradmeta run`` (specs ``tasks/lopt_*.toml``).

``lopt_meta_train`` meta-trains a learned optimizer (``[optimizer] kind``: a
:class:`~gradmeta.lopt.PerParamMLP`, or one with a GradMetaNet / GradMetaNet++ / weight-space
branch) with PES, full-unroll ES or truncated backprop and the Adam meta-optimiser; it checkpoints every ``checkpoint_every``
iterations (meta-parameters, meta-optimiser, particle states and the random generator), so
``--resume`` continues to exactly the result of an uninterrupted run. Under ``torchrun`` the
particles are split over the ranks (:mod:`gradmeta.lopt._distributed`). It writes the trained
optimizer as ``learned_optimizer.pt`` (loadable by ``LearnedOptimizer(params, checkpoint=...)``),
``meta_loss.png`` and ``inner_curves.png``.

``lopt_eval`` compares a checkpoint (or, with ``run = "<folder>"``, the optimizer of any kind in a
``lopt_meta_train`` run folder) with lr-tuned Adam (sweep :data:`~gradmeta.lopt.ADAM_LRS`) and
lr-tuned SGD with momentum on held-out initialisation seeds: step reduction, best test loss and,
for per-parameter checkpoints, the step-time ratio against Adam (``evaluation.png``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gradmeta.specs import OneOf, Required, register_task

from gradmeta._runtime import torch_threads
from gradmeta.lopt import (ADAM_LRS, ES, PES, SGDM_LRS, TASK_NAMES, GradMetaNetLO, PerParamMLP, TruncatedBackprop,
                           WeightSpaceLO, adam, comm_from_env, learned_curves, load_checkpoint, make_task,
                           save_checkpoint, sgdm, step_reduction, step_times, train_curves)

if TYPE_CHECKING:  # the runner passes a Run; experiments never import the runner
    from gradmeta.run import Run

__all__ = ["lopt_meta_train", "lopt_eval", "TRAIN_DEFAULTS", "EVAL_DEFAULTS"]

_TASK = {"name": OneOf("digits", TASK_NAMES), "hidden": [32], "batch_size": 128, "data_root": "", "valid_fraction": 0.0}
TRAIN_DEFAULTS = {
    "seed": 0,
    "threads": 1,
    "inner": _TASK,
    "optimizer": {"kind": OneOf("per_param_mlp", ("per_param_mlp", "gradmetanet", "gradmetanet++", "weightspace")),
                  "hidden": 32, "lr": 0.1, "step_mult": 0.03, "max_update": 0.1, "gmn_channels": 4,
                  "weight_aware": False},
    "outer": {"method": OneOf("pes", ("pes", "es", "tbptt")), "backend": OneOf("func", ("func", "higher")),
              "iterations": Required(int, "meta-gradient steps"), "particles": 8, "truncation": 20,
              "horizon": 200, "sigma": 0.01, "log_loss": False, "meta_lr": 3e-3, "grad_clip": 1.0,
              "objective": OneOf("train", ("train", "valid"))},
    "eval": {"every": 25, "steps": 200, "eval_every": 10, "seeds": [1000, 1001]},
    "checkpoint_every": 5,
}
EVAL_DEFAULTS = {
    "checkpoint": "",
    "run": "",  # a lopt_meta_train run folder: evaluate its optimizer (any kind) instead of `checkpoint`
    "threads": 1,
    "inner": _TASK,
    "seeds": [1, 2, 3, 4, 5],
    "steps": 300,
    "eval_every": 10,
    "data_seed": 0,
    "adam_lrs": list(ADAM_LRS),
    "sgdm_lrs": list(SGDM_LRS),
    "timing": {"batch_size": 128, "repeats": 200},
}


def _task(run: Run):
    t = run.spec["inner"]
    return make_task(t["name"], hidden=t["hidden"], batch_size=t["batch_size"], data_root=t["data_root"] or None,
                     valid_fraction=t["valid_fraction"])


def _make_lo(task, cfg: dict):
    """The learned optimizer of a spec's ``[optimizer]`` table."""
    base = {k: cfg[k] for k in ("hidden", "lr", "step_mult", "max_update")}
    if cfg["kind"] == "per_param_mlp":
        return PerParamMLP(**base)
    if cfg["kind"] == "weightspace":
        return WeightSpaceLO(task, out_channels=cfg["gmn_channels"], **base)
    variant = "plusplus" if cfg["kind"] == "gradmetanet++" else "base"
    return GradMetaNetLO(task, gmn_channels=cfg["gmn_channels"], variant=variant, weight_aware=cfg["weight_aware"],
                         **base)


def _from_run(folder: str, task):
    """``(optimizer, meta)`` of a ``lopt_meta_train`` run folder (its resolved spec and latest
    checkpoint, read with ``weights_only``), for optimizers of any kind on ``task``."""
    from gradmeta.specs import load_spec, resolve_spec

    folder = Path(folder)
    spec_path, ckpt_path = folder / "spec.resolved.toml", folder / "checkpoint.pt"
    for p in (spec_path, ckpt_path):
        if not p.is_file():
            raise FileNotFoundError(f"gradmeta.lopt: {folder} is not a lopt_meta_train run folder (no {p.name})")
    spec = resolve_spec(load_spec(spec_path), spec_path)
    if spec.get("task") != "lopt_meta_train":
        raise ValueError(f"gradmeta.lopt: {spec_path} is a {spec.get('task')!r} run, not lopt_meta_train")
    lo = _make_lo(task, spec["optimizer"])
    meta = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state"]["meta"]
    return lo, {k: v.detach() for k, v in meta.items()}


@register_task("lopt_meta_train", defaults=TRAIN_DEFAULTS)
def lopt_meta_train(run: Run) -> dict:
    """Meta-train a learned optimizer of the spec's ``[optimizer] kind`` (PES / ES / truncated backprop)."""
    # Small vmapped unrolls are dominated by per-op overhead; intra-op threads only add contention
    # (on a busy 2-core machine, 2 threads made a PES step 30x slower than 1).
    with torch_threads(run.spec["threads"]):
        return _meta_train(run)


def _meta_train(run: Run) -> dict:
    s, o, ev = run.spec, run.spec["outer"], run.spec["eval"]
    for key in ("iterations", "particles", "truncation", "horizon"):
        if o[key] < 1:
            raise run.spec_error(f"outer.{key}", f"must be positive, got {o[key]}")
    comm = comm_from_env()
    task = _task(run)
    lo = _make_lo(task, s["optimizer"])
    meta = {k: v.requires_grad_() for k, v in lo.init_meta(s["seed"]).items()}
    opt = torch.optim.Adam(meta.values(), lr=o["meta_lr"])
    common = dict(particles=o["particles"], horizon=o["horizon"], log_loss=o["log_loss"], comm=comm,
                  objective=o["objective"])
    if o["method"] == "tbptt":
        trainer = TruncatedBackprop(task, lo, truncation=o["truncation"], backend=o["backend"], **common)
    elif o["method"] == "es":
        trainer = ES(task, lo, sigma=o["sigma"], **common)
    else:
        trainer = PES(task, lo, truncation=o["truncation"], sigma=o["sigma"], **common)
    gen = torch.Generator().manual_seed(s["seed"])
    history = {"meta": {"step": [], "meta_loss": [], "grad_norm": [], "lr": [], "skipped": []},
               "eval": {"step": [], "final_test_loss": [], "best_test_loss": []}}
    saved = run.restore()
    if saved is not None:
        with torch.no_grad():
            for k, v in saved["meta"].items():
                meta[k].copy_(v)
        opt.load_state_dict(saved["opt"])
        gen.set_state(saved["generator"])
        state = trainer.from_leaves(meta, saved["trainer"])
        history = saved["history"]
    else:
        state = trainer.init(meta, gen)
    start, total = run.start_step, o["iterations"]
    lr_key = "log_lr" if "log_lr" in meta else "mlp.log_lr"

    def evaluate(it: int) -> None:
        c = learned_curves(task, lo, {k: v.detach() for k, v in meta.items()}, ev["seeds"], ev["steps"], ev["eval_every"])
        test = c["test_loss"][0]
        for k, v in (("step", it), ("final_test_loss", test[:, -1].mean().item()),
                     ("best_test_loss", test.min(-1).values.mean().item())):
            history["eval"][k].append(v)

    if start == 0:
        evaluate(0)
    it = start
    bar = run.progress(total, initial=start, desc="lopt_meta_train")
    for it in range(start + 1, total + 1) if not run.should_stop(start) else ():
        g, state, info = trainer.grad({k: v.detach() for k, v in meta.items()}, state, gen)
        norm = math.sqrt(sum(float(v.square().sum()) for v in g.values()))
        scale = min(1.0, o["grad_clip"] / norm) if norm > 0 and math.isfinite(norm) else 0.0
        for k, v in meta.items():
            v.grad = g[k] * scale
        opt.step()
        h = history["meta"]
        for k, v in (("step", it), ("meta_loss", info["meta_loss"]), ("grad_norm", norm),
                     ("lr", float(meta[lr_key].detach().exp())), ("skipped", info["skipped"])):
            h[k].append(v)
        if it % ev["every"] == 0 or it == total:
            evaluate(it)
        bar.update(1)
        bar.set_postfix(meta_loss=f"{info['meta_loss']:.3f}")
        stop = run.should_stop(it)
        if (it % s["checkpoint_every"] == 0 or it == total or stop) and comm.rank == 0:
            run.checkpoint({"meta": {k: v.detach() for k, v in meta.items()}, "opt": opt.state_dict(),
                            "generator": gen.get_state(), "trainer": trainer.to_leaves(state),
                            "history": history}, it)
        if stop:
            break
    bar.close()
    final = {k: v.detach() for k, v in meta.items()}
    plots = ["meta_loss.png", "inner_curves.png"]
    summary = {"iterations": it, "meta_loss_first": history["meta"]["meta_loss"][0] if history["meta"]["meta_loss"] else None,
               "meta_loss_last": history["meta"]["meta_loss"][-1] if history["meta"]["meta_loss"] else None,
               "lr": float(final[lr_key].exp()), "final_test_loss": history["eval"]["final_test_loss"][-1],
               "untrained_final_test_loss": history["eval"]["final_test_loss"][0]}
    if comm.rank == 0:
        if isinstance(lo, PerParamMLP):  # GradMetaNet optimizers keep their meta-parameters in checkpoint.pt
            save_checkpoint(run.out / "learned_optimizer.pt", lo, final, task=task.name, iterations=it,
                            horizon=o["horizon"])
        from .plots import plot_curves, plot_meta

        run.save_figure(plot_meta(history), plots[0])
        curves = {"learned (this run)": learned_curves(task, lo, final, ev["seeds"], ev["steps"], ev["eval_every"]),
                  f"SGDM lr={lo.lr:g} (untrained)": learned_curves(task, lo, lo.init_meta(s["seed"]), ev["seeds"],
                                                              ev["steps"], ev["eval_every"])}
        run.save_figure(plot_curves({k: (c["eval_steps"], c["test_loss"][0]) for k, c in curves.items()},
                                    f"{task.name}: test loss on seeds {ev['seeds']}"), plots[1])
    return {"step": it, "total_steps": total, "summary": summary, "history": history, "plots": plots}


def _mean_std(x: torch.Tensor) -> tuple[float, float]:
    return float(x.mean()), float(x.std()) if len(x) > 1 else 0.0


@register_task("lopt_eval", defaults=EVAL_DEFAULTS)
def lopt_eval(run: Run) -> dict:
    """Evaluate a learned-optimizer checkpoint against lr-tuned Adam and SGDM on held-out seeds."""
    with torch_threads(run.spec["threads"]):
        return _eval(run)


def _eval(run: Run) -> dict:
    s = run.spec
    task = _task(run)
    lo, meta = _from_run(s["run"], task) if s["run"] else load_checkpoint(s["checkpoint"] or None)
    seeds, steps, every = s["seeds"], s["steps"], s["eval_every"]
    if not seeds or steps < 1 or every < 1:
        raise run.spec_error("seeds/steps/eval_every", "need at least one seed and positive steps")
    bar = run.progress(4, desc="lopt_eval")
    runs = {}
    for name, make, grid in (("adam", adam, s["adam_lrs"]), ("sgdm", sgdm, s["sgdm_lrs"])):
        c = train_curves(task, make, torch.tensor(grid), seeds, steps, every, s["data_seed"])
        best = torch.nan_to_num(c["test_loss"], nan=float("inf")).min(-1).values.mean(-1)  # (H,)
        j = int(best.argmin())
        runs[name] = {"lr": grid[j], "test": c["test_loss"][j], "eval_steps": c["eval_steps"]}
        bar.update(1)
    c = learned_curves(task, lo, meta, seeds, steps, every, s["data_seed"])
    runs["learned"] = {"test": c["test_loss"][0], "eval_steps": c["eval_steps"], "skipped": int(c["skipped"].sum())}
    bar.update(1)
    steps_t = runs["adam"]["eval_steps"]
    summary = {"adam_lr": runs["adam"]["lr"], "sgdm_lr": runs["sgdm"]["lr"], "seeds": len(seeds)}
    history = {"curves": {"step": steps_t.tolist()}, "per_seed": {"seed": list(seeds)}}
    for name in ("learned", "sgdm", "adam"):
        test = runs[name]["test"]
        red = step_reduction(runs["adam"]["test"], test, steps_t)
        best = torch.nan_to_num(test, nan=float("inf")).min(-1).values
        summary[f"{name}_step_reduction_mean"], summary[f"{name}_step_reduction_std"] = _mean_std(red)
        summary[f"{name}_best_test_loss_mean"], summary[f"{name}_best_test_loss_std"] = _mean_std(best)
        history["curves"][f"{name}_test_loss_mean"] = test.mean(0).tolist()
        history["per_seed"][f"{name}_step_reduction"] = red.tolist()
        history["per_seed"][f"{name}_best_test_loss"] = best.tolist()
    summary["learned_skipped_steps"] = runs["learned"]["skipped"]
    if not isinstance(lo, PerParamMLP):  # step time: LearnedOptimizer runs PerParamMLP checkpoints only
        bar.close()
        return _eval_result(run, task, seeds, steps, summary, history, runs)
    tb = s["timing"]["batch_size"]
    gen = torch.Generator().manual_seed(s["data_seed"])
    timing_task = make_task(s["inner"]["name"], hidden=s["inner"]["hidden"], batch_size=tb,
                            data_root=s["inner"]["data_root"] or None) if tb != task.batch_size else task
    x, y = (b[0] for b in timing_task.batches(gen, 1))
    model = timing_task.model
    model.load_state_dict(timing_task.init(0))
    t = step_times(model, timing_task.loss_fn, (x, y), checkpoint=s["checkpoint"] or None,
                   adam_lr=runs["adam"]["lr"], repeats=s["timing"]["repeats"])
    summary.update({"step_time_ratio_vs_adam": t["ratio"], "lopt_step_ms": t["lopt_ms"], "adam_step_ms": t["adam_ms"],
                    "timing_batch_size": tb})
    bar.update(1)
    bar.close()
    return _eval_result(run, task, seeds, steps, summary, history, runs)


def _eval_result(run: Run, task, seeds, steps: int, summary: dict, history: dict, runs: dict) -> dict:
    from .plots import plot_curves

    steps_t = runs["adam"]["eval_steps"]
    curves = {f"learned ({summary['learned_step_reduction_mean']:.2f}× vs Adam)": (steps_t, runs["learned"]["test"]),
              f"Adam lr={runs['adam']['lr']:g} (tuned)": (steps_t, runs["adam"]["test"]),
              f"SGDM lr={runs['sgdm']['lr']:g} (tuned)": (steps_t, runs["sgdm"]["test"])}
    plots = [run.save_figure(plot_curves(curves, f"{task.name}: test loss, mean ± std over {len(seeds)} held-out seeds"),
                             "evaluation.png")]
    return {"step": steps, "total_steps": steps, "summary": summary, "history": history, "plots": plots}
