"""Tasks ``lopt_meta_train`` and ``lopt_eval`` for ``gradmeta run`` (specs ``tasks/lopt_*.toml``).

``lopt_meta_train`` meta-trains a learned optimizer (``[optimizer] kind``: a
:class:`~gradmeta.lopt.PerParamMLP`, or one with a GradMetaNet / GradMetaNet++ / weight-space
branch) with PES, full-unroll ES or truncated backprop and the Adam meta-optimiser; it checkpoints every ``checkpoint_every``
iterations (meta-parameters, meta-optimiser, particle states and the random generator), so
``--resume`` continues to exactly the result of an uninterrupted run. Under ``torchrun`` the
particles are split over the ranks (:mod:`gradmeta.lopt._distributed`). It writes the trained
optimizer as ``learned_optimizer.pt`` (per-parameter kind: ``LearnedOptimizer(params, checkpoint=...)``;
GradMetaNet / weight-space kinds: ``GradientSetOptimizer.from_checkpoint(model, loss_fn, path)``),
``meta_loss.png`` and ``inner_curves.png``.

``lopt_eval`` compares a checkpoint (or, with ``run = "<folder>"``, the optimizer of any kind in a
``lopt_meta_train`` run folder) with lr-tuned Adam (sweep :data:`~gradmeta.lopt.ADAM_LRS`) and
lr-tuned SGD with momentum on held-out initialisation seeds: step reduction, best and final test
loss and, for per-parameter checkpoints, the step-time ratio against Adam (``evaluation.png``).

Both take a built-in inner task (``[inner] name``) or your own: ``[inner] factory =
"mypkg.tasks:make_task"``, a function of no arguments returning a task
(:func:`gradmeta.lopt.load_task`); the other ``[inner]`` keys are then unused.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gradmeta.lopt import (ADAM_LRS, ES, PES, SGDM_LRS, TASK_NAMES, GeneralistRule, GradientStatsLO, GradMetaNetLO,
                           MetaTraining, PerParamMLP, TruncatedBackprop, WeightSpaceLO, comm_from_env, evaluate,
                           learned_curves, load_checkpoint, load_task, make_task, pretrain_branch, save_checkpoint, sgdm,
                           step_reduction, step_times, train_curves)
from gradmeta._io import safe_torch_load
from gradmeta.specs import OneOf, Range, Required, register_task

if TYPE_CHECKING:  # the runner passes a Run; experiments never import the runner
    from gradmeta.run import Run

__all__ = ["lopt_meta_train", "lopt_eval", "TRAIN_DEFAULTS", "EVAL_DEFAULTS", "PROTOCOL_DEFAULTS"]

_POS = dict(low=0, low_open=True)  # a positive number
PRETRAIN_SEED = 10_000  # first initialisation seed of the inner runs of [optimizer] pretrain_branch
_TASK = {"name": OneOf("digits", TASK_NAMES), "factory": "", "hidden": [Range(32, low=1)],
         "batch_size": Range(128, low=1), "data_root": "", "valid_fraction": Range(0.0, low=0, high=1, high_open=True)}
TRAIN_DEFAULTS = {
    "seed": Range(0, low=0),
    # Small vmapped unrolls are dominated by per-op overhead: on a busy 2-core machine 2 threads made a
    # PES step 30x slower than 1. The runner applies `threads` for the whole task (0: leave it).
    "threads": Range(1, low=0),
    "inner": _TASK,
    "optimizer": {"kind": OneOf("per_param_mlp", ("per_param_mlp", "gradmetanet", "gradmetanet++", "weightspace",
                                                 "gradient_stats")),
                  "hidden": Range(32, low=1), "lr": Range(0.1, **_POS), "step_mult": Range(0.03, low=0),
                  "max_update": Range(0.1, **_POS), "gmn_channels": Range(4, low=1), "weight_aware": False,
                  # GradMetaNet / weight-space branch: width, depth, heads (GradMetaNet++), examples of the
                  # batch fed to GradMetaNet (0: all), ids of input/output neurons ("relative": any size)
                  "gmn_width": Range(8, low=1), "gmn_layers": Range(4, low=1), "gmn_heads": Range(1, low=1),
                  "examples": Range(0, low=0), "neuron_ids": OneOf("relative", ("relative", "learned")),
                  # GradMetaNet++'s attention across neurons ("linear": cost linear in the neurons)
                  "gmn_neuron_attention": OneOf("softmax", ("softmax", "linear")),
                  # GradMetaNet's per-weight readout ("bilinear": means over the examples of per-datum
                  # products, e.g. the Fisher diagonal; "gelu": an MLP of data-pooled features)
                  "gmn_product": OneOf("gelu", ("gelu", "bilinear")),
                  # Adam iterations fitting GradMetaNet's first two channels to the gradient-set statistics
                  # before meta-training (gradmeta.lopt.pretrain_branch; 0: none)
                  "pretrain_branch": Range(0, low=0),
                  # the branch's features enter the MLP through learned gates starting at 0 (the
                  # rule starts as the per-parameter MLP of the same seed, PerParamMLP extra_gate)
                  "extra_gate": False,
                  # subtract each parameter tensor's mean from the branch's features (per channel)
                  # before the MLP normalises them by their RMS (GradMetaNetLO / WeightSpaceLO center_branch)
                  "center_branch": False,
                  # a lopt_meta_train run folder ("{seed}": this spec's seed) whose meta-parameters this
                  # rule starts from: a per-parameter MLP's become a branch rule's "mlp." part (same
                  # hidden, lr, step_mult, max_update), every other name must match in name and shape
                  "start_from": ""},
    "outer": {"method": OneOf("pes", ("pes", "es", "tbptt")), "backend": OneOf("func", ("func", "higher")),
              "iterations": Required(int, "meta-gradient steps"), "particles": Range(8, low=1),
              "truncation": Range(20, low=1), "horizon": Range(200, low=1), "sigma": Range(0.01, **_POS),
              "log_loss": False, "meta_lr": Range(3e-3, **_POS), "grad_clip": Range(1.0, **_POS),
              # meta learning rate of a branch's meta-parameters (and of its gates) ÷ meta_lr
              "branch_lr_scale": Range(1.0, **_POS),
              # which meta-parameters are meta-trained: "branch" holds the rest fixed (not perturbed,
              # not stepped), e.g. a branch and its gates on top of a rule from optimizer.start_from
              "train": OneOf("all", ("all", "branch")),
              "objective": OneOf("train", ("train", "valid", "valid_min"))},
    "eval": {"every": Range(25, low=1), "steps": Range(200, low=1), "eval_every": Range(10, low=1),
             "seeds": [Range(1000, low=0), 1001]},
    "checkpoint_every": Range(5, low=1),
}
#: The evaluation protocol shared by ``lopt_eval`` and ``lopt_table``: inner task, held-out
#: initialisation seeds, data order, Adam's and SGDM's learning-rate grids.
PROTOCOL_DEFAULTS = {
    "threads": Range(1, low=0),
    "inner": _TASK,
    "seeds": [Range(1, low=0), 2, 3, 4, 5],
    "data_seed": Range(0, low=0),
    "adam_lrs": [Range(x, **_POS) for x in ADAM_LRS],
    "sgdm_lrs": [Range(x, **_POS) for x in SGDM_LRS],
}
EVAL_DEFAULTS = {
    "checkpoint": "",
    "run": "",  # a lopt_meta_train run folder: evaluate its optimizer (any kind) instead of `checkpoint`
    **PROTOCOL_DEFAULTS,
    "steps": Range(300, low=1),
    "eval_every": Range(10, low=1),
    "timing": {"batch_size": Range(128, low=1), "repeats": Range(200, low=1)},
}


def _task(run: Run, objective: str = "train"):
    """The spec's inner task (built-in or from ``inner.factory``), checked for ``objective``."""
    t = run.spec["inner"]
    if t["factory"]:
        try:
            task = load_task(t["factory"])
        except (ValueError, TypeError) as e:
            raise run.spec_error("inner.factory", str(e)) from e
    else:
        task = make_task(t["name"], hidden=t["hidden"], batch_size=t["batch_size"],
                         data_root=t["data_root"] or None, valid_fraction=t["valid_fraction"])
    if objective != "train":
        if not callable(getattr(task, "valid_loss", None)):
            raise run.spec_error("outer.objective", f"'{objective}' needs a task with valid_loss(params); {task.name} has none")
        try:
            task.valid_loss(task.init(0))
        except ValueError as e:
            raise run.spec_error("outer.objective", f"'{objective}': {e}") from e
    return task


def _nonempty(run: Run, *keys: str) -> None:
    for key in keys:
        value = run.spec
        for part in key.split("."):
            value = value[part]
        if not value:
            raise run.spec_error(key, "must not be empty")


def _make_lo(task, cfg: dict):
    """The learned optimizer of a spec's ``[optimizer]`` table."""
    base = {k: cfg[k] for k in ("hidden", "lr", "step_mult", "max_update")}
    if cfg["kind"] == "per_param_mlp":
        return PerParamMLP(**base)
    ids = cfg.get("neuron_ids", "relative")
    if cfg.get("extra_gate", False):  # a run folder written before the key has no entry
        base["extra_gate"] = True
    if cfg.get("center_branch", False):  # likewise
        base["center_branch"] = True
    if cfg["kind"] == "gradient_stats":
        return GradientStatsLO(task, examples=cfg.get("examples") or None, **base)
    if cfg["kind"] == "weightspace":
        return WeightSpaceLO(task, out_channels=cfg["gmn_channels"], channels=cfg.get("gmn_width", 8),
                             neuron_ids=ids, **base)
    variant = "plusplus" if cfg["kind"] == "gradmetanet++" else "base"
    return GradMetaNetLO(task, gmn_channels=cfg["gmn_channels"], variant=variant, weight_aware=cfg["weight_aware"],
                         channels=cfg.get("gmn_width", 8), layers=cfg.get("gmn_layers", 4),
                         heads=cfg.get("gmn_heads", 1), examples=cfg.get("examples") or None, neuron_ids=ids,
                         neuron_attention=cfg.get("gmn_neuron_attention", "softmax"),
                         product=cfg.get("gmn_product", "gelu"), **base)


def _branch_prefixes(lo, seed: int) -> tuple[str, ...]:
    """Name prefixes of a branch's meta-parameters (``"<prefix>."``, and the gated rows and gates
    ``"mlp.w0_extra"``, ``"mlp.extra_gate"``) that ``lo`` has; ``()`` for a rule without a branch."""
    if not hasattr(lo, "prefix"):
        return ()
    names = lo.init_meta(seed)
    return tuple(p for p in (f"{lo.prefix}.", "mlp.w0_extra", "mlp.extra_gate") if any(k.startswith(p) for k in names))


def _branch_lr_scales(lo, scale: float, seed: int) -> dict[str, float] | None:
    """``MetaTraining``'s ``lr_scales`` for a branch's meta-parameters; ``None`` for a rule without one."""
    if scale == 1:
        return None
    return {p: scale for p in _branch_prefixes(lo, seed)} or None


#: ``[optimizer]`` keys that must agree between a rule and the run it starts from.
_SHARED_MLP_KEYS = ("hidden", "lr", "step_mult", "max_update")


def _start_meta(run: Run, meta: dict) -> dict:
    """The meta-parameters of the run folder ``optimizer.start_from`` under the names of ``meta`` (the
    rule's own): a per-parameter MLP's ``"w0"`` becomes ``"mlp.w0"`` when the rule has no ``"w0"``."""
    s = run.spec
    folder = Path(s["optimizer"]["start_from"].replace("{seed}", str(s["seed"])))
    try:
        spec, base = _read_run(str(folder))
    except (FileNotFoundError, ValueError) as e:
        raise run.spec_error("optimizer.start_from", str(e)) from e
    theirs = spec["optimizer"]
    differ = [f"{k} {theirs[k]!r} there, {s['optimizer'][k]!r} here" for k in _SHARED_MLP_KEYS
              if theirs[k] != s["optimizer"][k]]
    if differ:
        raise run.spec_error("optimizer.start_from", f"{folder} meta-trained a rule with other settings "
                             f"({'; '.join(differ)}); start from a run with the same [optimizer] {', '.join(_SHARED_MLP_KEYS)}")
    out, bad = {}, []
    for k, v in base.items():
        name = k if k in meta else f"mlp.{k}"
        if name not in meta or meta[name].shape != v.shape:
            bad.append(f"{k} {tuple(v.shape)}")
        else:
            out[name] = v
    if bad:
        raise run.spec_error("optimizer.start_from", f"the meta-parameters {', '.join(bad)} of {folder} "
                             f"({theirs['kind']}) have no counterpart of that shape in kind {s['optimizer']['kind']!r}")
    return out


def _read_run(folder: str) -> tuple[dict, dict]:
    """``(resolved spec, meta)`` of a ``lopt_meta_train`` run folder (its ``spec.resolved.toml`` and
    latest checkpoint, read with ``weights_only``)."""
    from gradmeta.specs import load_spec, resolve_spec

    folder = Path(folder)
    spec_path, ckpt_path = folder / "spec.resolved.toml", folder / "checkpoint.pt"
    for p in (spec_path, ckpt_path):
        if not p.is_file():
            raise FileNotFoundError(f"gradmeta.lopt: {folder} is not a lopt_meta_train run folder (no {p.name})")
    spec = resolve_spec(load_spec(spec_path), spec_path)
    if spec.get("task") != "lopt_meta_train":
        raise ValueError(f"gradmeta.lopt: {spec_path} is a {spec.get('task')!r} run, not lopt_meta_train")
    meta = safe_torch_load(ckpt_path, "run checkpoint")["state"]["meta"]
    return spec, {k: v.detach() for k, v in meta.items()}


def _from_run(folder: str, task):
    """``(optimizer, meta)`` of a ``lopt_meta_train`` run folder (:func:`_read_run`), for optimizers of
    any kind on ``task``."""
    spec, meta = _read_run(folder)
    return _make_lo(task, spec["optimizer"]), meta


@register_task("lopt_meta_train", defaults=TRAIN_DEFAULTS)
def lopt_meta_train(run: Run) -> dict:
    """Meta-train a learned optimizer of the spec's ``[optimizer] kind`` (PES / ES / truncated backprop)."""
    s, o, ev = run.spec, run.spec["outer"], run.spec["eval"]
    if o["iterations"] < 1:
        raise run.spec_error("outer.iterations", f"must be positive, got {o['iterations']}")
    _nonempty(run, "eval.seeds")
    kind = s["optimizer"]["kind"]
    attn = s["optimizer"].get("gmn_neuron_attention", "softmax")  # a run folder from before the key has none
    if attn != "softmax" and kind != "gradmetanet++":
        raise run.spec_error("optimizer.gmn_neuron_attention", "chooses the attention across neurons of "
                             f"GradMetaNet++ (kind = \"gradmetanet++\"); kind {kind!r} has none")
    if s["optimizer"]["pretrain_branch"] and kind not in ("gradmetanet", "gradmetanet++"):
        raise run.spec_error("optimizer.pretrain_branch", "fits a GradMetaNet branch (kind = \"gradmetanet\" or "
                             f"\"gradmetanet++\"); kind {kind!r} has none")
    if s["optimizer"].get("gmn_product", "gelu") != "gelu" and kind not in ("gradmetanet", "gradmetanet++"):
        raise run.spec_error("optimizer.gmn_product", "chooses GradMetaNet's per-weight readout (kind = "
                             f"\"gradmetanet\" or \"gradmetanet++\"); kind {kind!r} has none")
    comm = comm_from_env()
    task = _task(run, o["objective"])
    lo = _make_lo(task, s["optimizer"])
    fixed = ()
    if o["train"] == "branch":
        prefixes = _branch_prefixes(lo, s["seed"])
        if not prefixes:
            raise run.spec_error("outer.train", f"\"branch\" meta-trains a branch; kind {kind!r} has none")
        fixed = [k for k in lo.init_meta(s["seed"]) if not k.startswith(prefixes)]
    common = dict(particles=o["particles"], horizon=o["horizon"], log_loss=o["log_loss"], comm=comm,
                  objective=o["objective"], fixed=fixed)
    if o["method"] == "tbptt":
        trainer = TruncatedBackprop(task, lo, truncation=o["truncation"], backend=o["backend"], **common)
    elif o["method"] == "es":
        trainer = ES(task, lo, sigma=o["sigma"], **common)
    else:
        trainer = PES(task, lo, truncation=o["truncation"], sigma=o["sigma"], **common)
    saved = run.restore()
    init = _start_meta(run, lo.init_meta(s["seed"])) if saved is None and s["optimizer"]["start_from"] else None
    mt = MetaTraining(lo, trainer, meta_lr=o["meta_lr"], grad_clip=o["grad_clip"], seed=s["seed"],
                      lr_scales=_branch_lr_scales(lo, o["branch_lr_scale"], s["seed"]), init=init)
    meta = mt.meta
    history = {"meta": {"step": [], "meta_loss": [], "grad_norm": [], "lr": [], "skipped": []},
               "eval": {"step": [], "final_test_loss": [], "best_test_loss": []}}
    if saved is not None:
        mt.load_state_dict(saved)
        history = saved["history"]
    elif s["optimizer"]["pretrain_branch"]:
        # inner runs from initialisation seeds of their own, away from every evaluation's
        seeds = tuple(PRETRAIN_SEED + 3 * s["seed"] + i for i in range(3))
        fitted, history["pretrain"] = pretrain_branch(lo, task, mt.detached(), seeds=seeds, seed=s["seed"],
                                                      iterations=s["optimizer"]["pretrain_branch"])
        with torch.no_grad():
            for k, v in mt.meta.items():
                v.copy_(fitted[k])
    mt.start()
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
        info = mt.step()
        h = history["meta"]
        for k, v in (("step", it), ("meta_loss", info["meta_loss"]), ("grad_norm", info["grad_norm"]),
                     ("lr", float(meta[lr_key].detach().exp())), ("skipped", info["skipped"])):
            h[k].append(v)
        if it % ev["every"] == 0 or it == total:
            evaluate(it)
        bar.update(1)
        bar.set_postfix(meta_loss=f"{info['meta_loss']:.3f}")
        stop = run.should_stop(it)
        if (it % s["checkpoint_every"] == 0 or it == total or stop) and comm.rank == 0:
            run.checkpoint({**mt.state_dict(), "history": history}, it)
        if stop:
            break
    bar.close()
    final = {k: v.detach() for k, v in meta.items()}
    plots = ["meta_loss.png", "inner_curves.png"]
    summary = {"iterations": it, "meta_loss_first": history["meta"]["meta_loss"][0] if history["meta"]["meta_loss"] else None,
               "meta_loss_last": history["meta"]["meta_loss"][-1] if history["meta"]["meta_loss"] else None,
               "lr": float(final[lr_key].exp()), "final_test_loss": history["eval"]["final_test_loss"][-1],
               "untrained_final_test_loss": history["eval"]["final_test_loss"][0]}
    if "pretrain" in history:
        summary["pretrain"] = history["pretrain"]
    if comm.rank == 0:
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
    s = run.spec
    _nonempty(run, "seeds", "adam_lrs", "sgdm_lrs")
    task = _task(run)
    if s["run"]:
        lo, meta = _from_run(s["run"], task)
    else:
        lo, meta = load_checkpoint(s["checkpoint"] or None, model=getattr(task, "model", None))
    seeds, steps, every = s["seeds"], s["steps"], s["eval_every"]
    if isinstance(lo, GeneralistRule) and lo.total_steps is None:  # its schedule spans the evaluated run
        lo.total_steps = steps
    bar = run.progress(3, desc="lopt_eval")
    ev = evaluate(task, lo, meta, seeds=seeds, steps=steps, eval_every=every, adam_lrs=s["adam_lrs"],
                  data_seed=s["data_seed"])
    bar.update(1)
    c = train_curves(task, sgdm, torch.tensor(s["sgdm_lrs"]), seeds, steps, every, s["data_seed"])
    j = int(torch.nan_to_num(c["test_loss"], nan=float("inf")).min(-1).values.mean(-1).argmin())
    runs = {"adam": {"lr": ev["adam_lr"], "test": ev["adam_test_loss"], "eval_steps": ev["eval_steps"]},
            "sgdm": {"lr": s["sgdm_lrs"][j], "test": c["test_loss"][j]},
            "learned": {"test": ev["test_loss"], "skipped": int(ev["skipped"].sum())}}
    bar.update(1)
    steps_t = ev["eval_steps"]
    summary = {"adam_lr": runs["adam"]["lr"], "sgdm_lr": runs["sgdm"]["lr"], "seeds": len(seeds)}
    history = {"curves": {"step": steps_t.tolist()}, "per_seed": {"seed": list(seeds)}}
    for name in ("learned", "sgdm", "adam"):
        test = runs[name]["test"]
        red = step_reduction(runs["adam"]["test"], test, steps_t)
        best, final = torch.nan_to_num(test, nan=float("inf")).min(-1).values, test[:, -1]
        summary[f"{name}_step_reduction_mean"], summary[f"{name}_step_reduction_std"] = _mean_std(red)
        summary[f"{name}_best_test_loss_mean"], summary[f"{name}_best_test_loss_std"] = _mean_std(best)
        summary[f"{name}_final_test_loss_mean"], summary[f"{name}_final_test_loss_std"] = _mean_std(final)
        history["curves"][f"{name}_test_loss_mean"] = test.mean(0).tolist()
        history["per_seed"][f"{name}_step_reduction"] = red.tolist()
        history["per_seed"][f"{name}_best_test_loss"] = best.tolist()
        history["per_seed"][f"{name}_final_test_loss"] = final.tolist()
    summary["learned_skipped_steps"] = runs["learned"]["skipped"]
    # step time: LearnedOptimizer runs PerParamMLP and GeneralistRule checkpoints, on module-backed tasks
    if isinstance(lo, (PerParamMLP, GeneralistRule)) and hasattr(task, "model") and hasattr(task, "loss_fn"):
        tb = s["timing"]["batch_size"]
        if s["inner"]["factory"]:  # a user task: timed at its own batch size
            timing_task, tb = task, getattr(task, "batch_size", None)
        else:
            timing_task = make_task(s["inner"]["name"], hidden=s["inner"]["hidden"], batch_size=tb,
                                    data_root=s["inner"]["data_root"] or None) if tb != task.batch_size else task
        gen = torch.Generator().manual_seed(s["data_seed"])
        x, y = (b[0] for b in timing_task.batches(gen, 1))
        model = timing_task.model
        model.load_state_dict(timing_task.init(0))
        t = step_times(model, timing_task.loss_fn, (x, y), checkpoint=s["checkpoint"] or None,
                       adam_lr=runs["adam"]["lr"], repeats=s["timing"]["repeats"])
        summary.update({"step_time_ratio_vs_adam": t["ratio"], "lopt_step_ms": t["lopt_ms"],
                        "adam_step_ms": t["adam_ms"], "timing_batch_size": tb})
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
