"""Task ``lora_zoo``: many real PEFT LoRA adapters of one small digits classifier, with labels.

A base MLP is trained on the digits (:func:`gradmeta.data.load_digits`) and saved as
``base.pt``. Adapter ``i`` is then finetuned with the real ``peft`` library (``get_peft_model`` on
every Linear layer, Adam, only LoRA parameters trainable) on a random subset of the classes, with
hyperparameters drawn from the spec's ranges by a generator seeded with ``(seed, i)`` -- so any
adapter can be rebuilt alone, in any order, by any process. Outputs in the run folder:

* ``adapters/<i:05d>/`` -- a PEFT folder (``save_pretrained``) plus ``labels.json`` written last;
* ``labels.csv`` -- one row per finished adapter: ``adapter`` (folder relative to ``adapters/``),
  ``test_acc``, ``test_loss``, ``subset_acc`` (test accuracy on the finetuning classes),
  ``class_0..class_{C-1}`` (1 if the class was in the finetuning subset), ``lr``, ``steps``,
  ``rank``, ``alpha``, ``dropout``, ``n_classes``, ``train_seconds``.

Resume: an adapter whose ``labels.json`` exists is skipped. Sharding: with ``RANK`` /
``WORLD_SIZE`` set (``torchrun``), process ``k`` builds adapters ``i ≡ k (mod WORLD_SIZE)``;
each process rewrites ``labels.csv`` from every finished adapter when it ends.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import copy
import csv
import io
import json
import math
import os
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from gradmeta.data import load_digits
from gradmeta.models import mlp
from gradmeta._io import atomic_write, safe_torch_load
from gradmeta.specs import Range, register_task

if TYPE_CHECKING:  # the runner passes a Run; experiments never import the runner
    from gradmeta.run import Run

__all__ = ["lora_zoo", "lora_llama_zoo", "LLAMA_ZOO_DEFAULTS", "ZOO_DEFAULTS", "zoo_hyperparameters", "load_base", "evaluate", "train_base",
           "finetune_adapter", "write_labels_csv", "build_adapters"]

ZOO_DEFAULTS = {
    "seed": Range(0, low=0),
    "n_adapters": Range(2000, low=1),
    "threads": Range(1, low=1),  # torch threads per process; tiny models run fastest single-threaded
    "base": {"widths": [64, 64, 32, 10], "steps": Range(400, low=1), "lr": Range(3e-3, low=0, low_open=True),
             "batch_size": Range(64, low=1)},
    "finetune": {
        "ranks": [Range(4, low=1), 8, 16],
        "alpha_mult": [0.5, 1.0, 2.0, 4.0],  # lora_alpha = mult * rank
        "lr_min": Range(1e-3, low=0, low_open=True), "lr_max": Range(3e-2, low=0, low_open=True),  # log-uniform
        "steps_min": Range(50, low=1), "steps_max": Range(250, low=1),
        "dropout": [0.0, 0.05, 0.1],
        "min_classes": 1, "max_classes": 10,
        "batch_size": Range(32, low=1),
    },
}


def _digits(seed: int):
    tr, te = load_digits("train", seed=seed), load_digits("test", seed=seed)
    return tr.flat(), tr.labels, te.flat(), te.labels


def train_base(widths: list[int], steps: int, lr: float, batch_size: int, seed: int) -> torch.nn.Module:
    """The base classifier: ``mlp(widths)`` trained with Adam on the digits training split."""
    X, y, _, _ = _digits(seed)
    torch.manual_seed(seed)
    return _train_adam(mlp(widths), X, y, lr=lr, steps=steps, batch_size=batch_size, seed=seed)


def _train_adam(model: torch.nn.Module, X, y, *, lr: float, steps: int, batch_size: int,
                seed: int) -> torch.nn.Module:
    """Adam on the trainable parameters, cross-entropy on minibatches drawn with ``seed``; eval mode after."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, foreach=False)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch_size,), generator=g)
        loss = F.cross_entropy(model(X[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def load_base(path: str | os.PathLike) -> torch.nn.Module:
    """Read ``base.pt`` (``{"widths", "state_dict"}``, weights_only) back into an MLP."""
    ckpt = safe_torch_load(path, "LoRA zoo base model")
    model = mlp(list(ckpt["widths"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


@torch.no_grad()
def evaluate(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, classes: list[int] | None = None) -> dict:
    """``{"acc", "loss"}`` on ``(X, y)`` (mean cross-entropy), plus ``subset_acc`` on ``classes``."""
    logits = model(X)
    pred = logits.argmax(-1)
    out = {"acc": (pred == y).double().mean().item(), "loss": F.cross_entropy(logits, y).item()}
    if classes is not None:
        mask = torch.isin(y, torch.tensor(classes))
        out["subset_acc"] = (pred[mask] == y[mask]).double().mean().item()
    return out


def zoo_hyperparameters(spec: dict, i: int, num_classes: int) -> dict:
    """Hyperparameters of adapter ``i`` from a generator seeded by ``(spec seed, i)``."""
    ft = spec["finetune"]
    g = torch.Generator().manual_seed(spec["seed"] * 1_000_003 + i)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=g))]
    u = torch.rand(1, generator=g).item()
    rank = int(pick(ft["ranks"]))
    k = int(torch.randint(ft["min_classes"], ft["max_classes"] + 1, (1,), generator=g))
    classes = sorted(torch.randperm(num_classes, generator=g)[:k].tolist())
    return {
        "rank": rank, "alpha": float(pick(ft["alpha_mult"])) * rank,
        "lr": math.exp(math.log(ft["lr_min"]) + u * (math.log(ft["lr_max"]) - math.log(ft["lr_min"]))),
        "steps": int(torch.randint(ft["steps_min"], ft["steps_max"] + 1, (1,), generator=g)),
        "dropout": float(pick(ft["dropout"])), "classes": classes, "seed": int(torch.randint(2**31, (1,), generator=g)),
    }


def finetune_adapter(base: torch.nn.Module, hp: dict, X: torch.Tensor, y: torch.Tensor, batch_size: int):
    """Finetune a LoRA on every Linear of a copy of ``base`` with real PEFT; returns the PEFT model."""
    from peft import LoraConfig, get_peft_model

    targets = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)]
    torch.manual_seed(hp["seed"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=hp["rank"], lora_alpha=hp["alpha"],
                                                            lora_dropout=hp["dropout"], target_modules=targets))
    mask = torch.isin(y, torch.tensor(hp["classes"]))
    Xs, ys = X[mask], y[mask]
    return _train_adam(pm, Xs, ys, lr=hp["lr"], steps=hp["steps"], batch_size=batch_size, seed=hp["seed"])


def write_labels_csv(adapters_dir: Path, out: Path, columns: int | list[str]) -> int:
    """Collect every ``adapters/*/labels.json`` into ``labels.csv`` (atomically); returns the row count.

    ``columns``: the CSV columns, or (digits zoo) the number of classes, which gives its columns.
    """
    rows = []
    for d in sorted(adapters_dir.iterdir()) if adapters_dir.exists() else []:
        f = d / "labels.json"
        if f.exists():
            rows.append(json.loads(f.read_text()))
    if isinstance(columns, int):
        columns = ["adapter", "test_acc", "test_loss", "subset_acc", *[f"class_{c}" for c in range(columns)],
                   "lr", "steps", "rank", "alpha", "dropout", "n_classes", "train_seconds"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write(out, lambda fh: fh.write(buf.getvalue()), mode="w")
    return len(rows)


def build_adapters(run: Run, n: int, build_one, desc: str) -> dict:
    """The resumable, sharded loop of a zoo: ``build_one(i, folder) -> labels row`` for every adapter
    ``i < n`` of this process (``i ≡ RANK (mod WORLD_SIZE)``) whose ``adapters/<i:05d>/labels.json``
    does not exist yet; that file is written last (atomically), so an interrupted adapter is rebuilt.
    Stops early at the run's ``max_steps``. Returns ``{"built_this_process", "rank", "world_size",
    "wall_s_this_process", "adapters_per_s_this_process"}``."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    adir = run.out / "adapters"
    adir.mkdir(exist_ok=True)
    mine = [i for i in range(n) if i % world == rank]
    todo = [i for i in mine if not (adir / f"{i:05d}" / "labels.json").exists()]
    done_before = len(mine) - len(todo)
    bar = run.progress(len(mine), initial=done_before, desc=f"{desc}[{rank}/{world}]")
    t0, built = time.perf_counter(), 0
    for i in todo:
        if run.should_stop(done_before + built):
            break
        folder = adir / f"{i:05d}"
        row = build_one(i, folder)
        atomic_write(folder / "labels.json", lambda f: f.write(json.dumps(row)), mode="w")
        built += 1
        bar.update(1)
    bar.close()
    wall = time.perf_counter() - t0
    return {"built_this_process": built, "rank": rank, "world_size": world, "wall_s_this_process": round(wall, 2),
            "adapters_per_s_this_process": round(built / wall, 3) if built and wall > 0 else None}


@register_task("lora_zoo", defaults=ZOO_DEFAULTS)
def lora_zoo(run: Run) -> dict:
    """LoRA zoo: real PEFT adapters of a digits MLP over lr/steps/rank/alpha/dropout/class subsets."""
    spec = run.spec
    X, y, Xte, yte = _digits(spec["seed"])
    C = spec["base"]["widths"][-1]
    base_path = run.out / "base.pt"
    if base_path.exists():
        base = load_base(base_path)
    else:  # deterministic, so concurrent shards that race here write identical files
        b = spec["base"]
        base = train_base(b["widths"], b["steps"], b["lr"], b["batch_size"], spec["seed"])
        atomic_write(base_path, lambda f: torch.save({"widths": b["widths"], "state_dict": base.state_dict()}, f))
    base_eval = evaluate(base, Xte, yte)

    def build_one(i: int, folder: Path) -> dict:
        hp = zoo_hyperparameters(spec, i, C)
        ts = time.perf_counter()
        pm = finetune_adapter(base, hp, X, y, spec["finetune"]["batch_size"])
        train_s = time.perf_counter() - ts
        ev = evaluate(pm, Xte, yte, hp["classes"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm.save_pretrained(str(folder))
        return {"adapter": folder.name, "test_acc": ev["acc"], "test_loss": ev["loss"], "subset_acc": ev["subset_acc"],
                **{f"class_{c}": int(c in hp["classes"]) for c in range(C)},
                **{k: hp[k] for k in ("lr", "steps", "rank", "alpha", "dropout")}, "n_classes": len(hp["classes"]),
                "train_seconds": round(train_s, 4)}

    n = spec["n_adapters"]
    info = build_adapters(run, n, build_one, "lora_zoo")
    total_done = write_labels_csv(run.out / "adapters", run.out / "labels.csv", C)
    summary = {"adapters_done": total_done, "n_adapters": n, **info,
               "base_test_acc": base_eval["acc"], "base_test_loss": base_eval["loss"]}
    return {"summary": summary, "history": {}, "plots": [], "step": total_done, "total_steps": n}


LLAMA_ZOO_DEFAULTS = {
    "seed": 0,
    "n_adapters": 300,
    "threads": 1,
    "model": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "vocab_size": 32},
    "ranks": [2, 4, 8],
    "targets": ["q_proj", "v_proj"],
    "log_scale_min": -2.0,  # each module's lora_B is multiplied by exp(U(min, max))
    "log_scale_max": 1.0,
    "probe_tokens": 64,
}


@register_task("lora_llama_zoo", defaults=LLAMA_ZOO_DEFAULTS)
def lora_llama_zoo(run: Run) -> dict:
    """Random-factor PEFT adapters of a tiny random-init Llama with spectral labels.

    Adapter ``i``: real PEFT (``init_lora_weights=False``: random A and B) on ``targets``, rank
    ``ranks[i % len(ranks)]``, ``lora_alpha = r``, each module's ``lora_B`` scaled by
    ``exp(U(log_scale_min, log_scale_max))``. Labels (``labels.csv``): ``lognorm`` = log of the
    Frobenius norm of all deltas together, ``logshift`` = log mean ‖logits(adapted) − logits(base)‖
    on ``probe_tokens`` fixed random tokens, ``rank``.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = run.spec
    g = torch.Generator().manual_seed(spec["seed"])
    cfg = LlamaConfig(num_key_value_heads=spec["model"]["num_attention_heads"], **spec["model"])
    probe = torch.randint(0, cfg.vocab_size, (4, spec["probe_tokens"] // 4), generator=g)
    adir = run.out / "adapters"
    rows, n = [], spec["n_adapters"]
    bar = run.progress(n, desc="lora_llama_zoo")
    for i in range(n):
        torch.manual_seed(spec["seed"])
        base = LlamaForCausalLM(cfg).eval()
        r = spec["ranks"][i % len(spec["ranks"])]
        torch.manual_seed(spec["seed"] * 100_003 + i + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(base, LoraConfig(r=r, lora_alpha=r, target_modules=list(spec["targets"]),
                                                 init_lora_weights=False))
        sq = 0.0
        with torch.no_grad():
            for _, m in pm.named_modules():
                if hasattr(m, "lora_B") and "default" in m.lora_B:
                    u = torch.empty(()).uniform_(spec["log_scale_min"], spec["log_scale_max"], generator=g)
                    m.lora_B["default"].weight.mul_(u.exp())
                    sq += float((m.get_delta_weight("default") ** 2).sum())
            adapted = pm(probe).logits
            with pm.disable_adapter():
                plain = pm(probe).logits
        shift = float((adapted - plain).norm(dim=-1).mean())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm.save_pretrained(str(adir / f"{i:05d}"))
        rows.append({"adapter": f"{i:05d}", "lognorm": 0.5 * math.log(sq), "logshift": math.log(shift), "rank": r})
        bar.update(1)
    bar.close()
    buf = io.StringIO()
    w = csv.DictWriter(buf, ["adapter", "lognorm", "logshift", "rank"], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write(run.out / "labels.csv", lambda fh: fh.write(buf.getvalue()), mode="w")
    return {"summary": {"adapters_done": n}, "history": {}, "plots": [], "step": n, "total_steps": n}
