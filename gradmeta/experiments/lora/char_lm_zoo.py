"""Task ``lora_char_lm_zoo``: real PEFT LoRA adapters of a character-level transformer LM, finetuned
on different text sources, labelled with their evaluation loss on every source.

The base is :class:`gradmeta.models.GPT` (default about 1.2M parameters: 6 blocks, width 128),
pretrained briefly on the docstrings of the standard-library modules that belong to no source
(:func:`gradmeta.data.stdlib_docstring_corpus`). A *source* is the docstrings of a group of
packages (:data:`SOURCES`: ``email``, ``web`` = ``http`` + ``urllib``, ``logging``, ``typing``,
``numbers``, ``files``); every source has its own train stream and evaluation windows (its
validation documents), all in one character vocabulary. Adapter ``i`` finetunes LoRA factors of
``finetune.targets`` (default the attention ``q`` and ``v`` of every block) with Adam on a random
mix of 1–3 sources, with rank, alpha, lr and steps drawn by a generator seeded with
``(seed, i)``, so any adapter can be rebuilt alone, by any process.

Outputs in the run folder:

* ``lm_base.pt`` -- the base (config, weights, vocabulary, source names, the evaluation windows);
* ``adapters/<i:05d>/`` -- a PEFT folder plus ``labels.json`` (written last);
* ``labels.csv`` -- ``adapter``, ``loss_<source>`` (mean next-character cross-entropy, nats, on the
  source's evaluation windows), ``eval_loss`` (their mean), ``src_<source>`` (1 if finetuned on
  it), ``rank``, ``alpha``, ``lr``, ``steps``, ``n_sources``, ``train_seconds``.

Resume and ``torchrun`` sharding as in ``lora_zoo`` (:func:`~gradmeta.experiments.lora.zoo.build_adapters`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import copy
import math
import os
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from gradmeta._io import atomic_write, safe_torch_load
from gradmeta.data import DEFAULT_MODULES, lm_batches, stdlib_docstring_corpus
from gradmeta.models import GPT
from gradmeta.specs import NonEmpty, Range, register_task

from .zoo import build_adapters, write_labels_csv

if TYPE_CHECKING:  # the runner passes a Run; experiments never import the runner
    from gradmeta.run import Run

__all__ = ["lora_char_lm_zoo", "CHAR_LM_ZOO_DEFAULTS", "SOURCES", "LM_BASE", "source_streams", "train_lm_base",
           "load_lm_base", "evaluate_sources", "lm_hyperparameters", "finetune_lm_adapter"]

#: Text sources: name -> standard-library modules / packages whose docstrings make it.
SOURCES = {
    "email": ("email",),
    "web": ("http", "urllib"),
    "logging": ("logging",),
    "typing": ("typing", "inspect", "abc", "dataclasses", "enum"),
    "numbers": ("decimal", "fractions", "statistics", "random"),
    "files": ("pathlib", "shutil", "tarfile", "zipfile", "tempfile", "glob", "fnmatch"),
}
#: File name of the base checkpoint in the run folder.
LM_BASE = "lm_base.pt"

CHAR_LM_ZOO_DEFAULTS = {
    "seed": Range(0, low=0),
    "n_adapters": Range(240, low=1),
    "threads": Range(1, low=1),
    "sources": NonEmpty(list(SOURCES)),
    "base": {"d_model": Range(128, low=1), "n_heads": Range(4, low=1), "n_blocks": Range(6, low=1),
             "seq_len": Range(64, low=2), "steps": Range(400, low=1), "lr": Range(3e-3, low=0, low_open=True),
             "batch_size": Range(16, low=1)},
    "finetune": {"ranks": [Range(2, low=1), 4, 8], "alpha_mult": [1.0, 2.0],  # lora_alpha = mult * rank
                 "lr_min": Range(1e-3, low=0, low_open=True), "lr_max": Range(2e-2, low=0, low_open=True),
                 "steps_min": Range(10, low=1), "steps_max": Range(40, low=1), "batch_size": Range(8, low=1),
                 "min_sources": Range(1, low=1), "max_sources": Range(3, low=1), "targets": NonEmpty(["q", "v"])},
    "eval": {"windows": Range(24, low=1)},  # evaluation windows (of seq_len) per source
}


def source_streams(sources: list[str], seed: int = 0):
    """``(tokenizer, general train ids, {source: (train ids, validation ids)})`` in one vocabulary.

    The general stream is every :data:`gradmeta.data.DEFAULT_MODULES` entry in no source; the
    vocabulary is every character of all of them. ``seed`` chooses the document split.
    """
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise ValueError(f"unknown sources {unknown}; known: {list(SOURCES)}")
    in_sources = {m for s in sources for m in SOURCES[s]}
    general = [m for m in DEFAULT_MODULES if m not in in_sources]
    full = stdlib_docstring_corpus(general + sorted(in_sources), seed=seed)
    tok = full.tokenizer

    def ids(modules):
        c = stdlib_docstring_corpus(list(modules), seed=seed)
        return tok.encode(c.tokenizer.decode(c.train)), tok.encode(c.tokenizer.decode(c.val))

    return tok, ids(general)[0], {s: ids(SOURCES[s]) for s in sources}


def _adam_lm(model: torch.nn.Module, stream: torch.Tensor, *, steps: int, lr: float, batch_size: int, seq_len: int,
             seed: int) -> torch.nn.Module:
    """Adam on the trainable parameters, next-character cross-entropy on random windows of ``stream``."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, foreach=False)
    model.train()
    for _ in range(steps):
        x, y = lm_batches(stream, batch_size, seq_len, g)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def train_lm_base(spec: dict) -> dict:
    """Pretrain the base GPT on the general stream; returns the ``lm_base.pt`` content."""
    b, names = spec["base"], list(spec["sources"])
    tok, general, streams = source_streams(names, spec["seed"])
    config = {"vocab": tok.vocab_size, "d_model": b["d_model"], "n_heads": b["n_heads"], "n_blocks": b["n_blocks"],
              "max_len": b["seq_len"]}
    torch.manual_seed(spec["seed"])
    model = _adam_lm(GPT(**config), general, steps=b["steps"], lr=b["lr"], batch_size=b["batch_size"],
                     seq_len=b["seq_len"], seed=spec["seed"])
    xs, ys, src = [], [], []
    for k, s in enumerate(names):
        val = streams[s][1]
        w = min(spec["eval"]["windows"], (val.numel() - 1) // b["seq_len"])
        if w < 1:
            raise ValueError(f"source {s!r}: its validation stream ({val.numel()} characters) holds no window of "
                             f"{b['seq_len']}")
        xs.append(val[: w * b["seq_len"]].view(w, -1))
        ys.append(val[1: w * b["seq_len"] + 1].view(w, -1))
        src += [k] * w
    return {"config": config, "state_dict": model.state_dict(), "chars": tok.chars, "sources": names,
            "eval_x": torch.cat(xs), "eval_y": torch.cat(ys), "eval_source": torch.tensor(src)}


def load_lm_base(path: str | os.PathLike) -> tuple[GPT, dict]:
    """``(base GPT in eval mode, the whole checkpoint)`` from ``lm_base.pt`` (weights_only)."""
    ckpt = safe_torch_load(path, "char-LM LoRA zoo base model")
    model = GPT(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt


@torch.no_grad()
def evaluate_sources(model: torch.nn.Module, ckpt: dict, chunk: int = 64) -> dict[str, float]:
    """``{"loss_<source>": mean next-character cross-entropy on its windows, "eval_loss": their mean}``.

    The windows are ``ckpt["eval_x"]`` / ``ckpt["eval_y"]`` ``(W, T)``, ``ckpt["eval_source"]``
    ``(W,)`` the source index of each; forwarded in chunks of ``chunk`` windows.
    """
    x, y, src = ckpt["eval_x"], ckpt["eval_y"], ckpt["eval_source"]
    per_window = torch.cat([F.cross_entropy(model(x[i:i + chunk]).transpose(1, 2), y[i:i + chunk],
                                            reduction="none").mean(1) for i in range(0, len(x), chunk)])
    out = {f"loss_{s}": float(per_window[src == k].mean()) for k, s in enumerate(ckpt["sources"])}
    out["eval_loss"] = sum(out.values()) / len(ckpt["sources"])
    return out


def lm_hyperparameters(spec: dict, i: int) -> dict:
    """Hyperparameters of adapter ``i`` from a generator seeded by ``(spec seed, i)``."""
    ft, names = spec["finetune"], list(spec["sources"])
    g = torch.Generator().manual_seed(spec["seed"] * 1_000_003 + i)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=g))]
    rank = int(pick(ft["ranks"]))
    u = torch.rand(1, generator=g).item()
    k = int(torch.randint(ft["min_sources"], min(ft["max_sources"], len(names)) + 1, (1,), generator=g))
    return {
        "rank": rank, "alpha": float(pick(ft["alpha_mult"])) * rank,
        "lr": math.exp(math.log(ft["lr_min"]) + u * (math.log(ft["lr_max"]) - math.log(ft["lr_min"]))),
        "steps": int(torch.randint(ft["steps_min"], ft["steps_max"] + 1, (1,), generator=g)),
        "sources": [names[j] for j in sorted(torch.randperm(len(names), generator=g)[:k].tolist())],
        "seed": int(torch.randint(2**31, (1,), generator=g)),
    }


def finetune_lm_adapter(base: GPT, hp: dict, streams: dict, targets: list[str], batch_size: int, seq_len: int):
    """LoRA on ``targets`` of a copy of ``base`` with real PEFT, Adam on the concatenated train
    streams of ``hp["sources"]`` (so each source is drawn in proportion to its size); the PEFT model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(hp["seed"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=hp["rank"], lora_alpha=hp["alpha"],
                                                            target_modules=list(targets)))
    stream = torch.cat([streams[s][0] for s in hp["sources"]])
    return _adam_lm(pm, stream, steps=hp["steps"], lr=hp["lr"], batch_size=batch_size, seq_len=seq_len,
                    seed=hp["seed"])


@register_task("lora_char_lm_zoo", defaults=CHAR_LM_ZOO_DEFAULTS)
def lora_char_lm_zoo(run: Run) -> dict:
    """LoRA zoo of a char-level transformer LM finetuned on mixes of docstring sources."""
    spec = run.spec
    names = list(spec["sources"])
    if spec["finetune"]["min_sources"] > min(spec["finetune"]["max_sources"], len(names)):
        raise run.spec_error("finetune.min_sources", f"{spec['finetune']['min_sources']} exceeds max_sources "
                                                     f"({spec['finetune']['max_sources']}) or the {len(names)} sources")
    if any(s not in SOURCES for s in names):
        raise run.spec_error("sources", f"unknown sources {[s for s in names if s not in SOURCES]}; "
                                        f"known: {list(SOURCES)}")
    base_path = run.out / LM_BASE
    if not base_path.exists():  # deterministic, so concurrent shards that race here write identical files
        content = train_lm_base(spec)
        atomic_write(base_path, lambda f: torch.save(content, f))
    base, ckpt = load_lm_base(base_path)
    if list(ckpt["sources"]) != names:
        raise run.spec_error("sources", f"{base_path} was built for sources {ckpt['sources']}, not {names}")
    _, _, streams = source_streams(names, spec["seed"])
    base_eval = evaluate_sources(base, ckpt)
    ft, seq_len = spec["finetune"], spec["base"]["seq_len"]

    def build_one(i: int, folder: Path) -> dict:
        hp = lm_hyperparameters(spec, i)
        ts = time.perf_counter()
        pm = finetune_lm_adapter(base, hp, streams, ft["targets"], ft["batch_size"], seq_len)
        train_s = time.perf_counter() - ts
        ev = evaluate_sources(pm, ckpt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm.save_pretrained(str(folder))
        return {"adapter": folder.name, **ev, **{f"src_{s}": int(s in hp["sources"]) for s in names},
                **{k: hp[k] for k in ("rank", "alpha", "lr", "steps")}, "n_sources": len(hp["sources"]),
                "train_seconds": round(train_s, 4)}

    n = spec["n_adapters"]
    info = build_adapters(run, n, build_one, "lora_char_lm_zoo")
    cols = ["adapter", *[f"loss_{s}" for s in names], "eval_loss", *[f"src_{s}" for s in names], "rank", "alpha",
            "lr", "steps", "n_sources", "train_seconds"]
    total_done = write_labels_csv(run.out / "adapters", run.out / "labels.csv", cols)
    summary = {"adapters_done": total_done, "n_adapters": n, **info,
               "base_params": sum(p.numel() for p in base.parameters()), "eval_windows": len(ckpt["eval_x"]),
               **{f"base_{k}": v for k, v in base_eval.items()}}
    return {"summary": summary, "history": {}, "plots": [], "step": total_done, "total_steps": n}
