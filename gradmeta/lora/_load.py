"""Reading adapters: PEFT folders (:func:`load_adapter`, :func:`list_adapters`) and the dispatch to the
single-file formats of :mod:`._formats` (diffusers, kohya / A1111)."""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from torch import Tensor

from ._adapter import Adapter, AdapterFormatError, natural_key
from ._config import (build_factors, check_config, fifo_warning, nonzero_init_warning, pattern_value, resolve_base,
                      warn)

__all__ = ["load_adapter", "list_adapters", "read_state", "CONFIG_FILE", "WEIGHT_FILES", "DIFFUSERS_COMPONENTS",
           "LORA_FILE_SUFFIXES"]

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
#: Sub-folder names that diffusers pipelines use for per-component adapters; combined into one adapter.
DIFFUSERS_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior")
#: Suffixes of single-file adapters (diffusers ``pytorch_lora_weights.safetensors``, kohya / A1111 files).
LORA_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")

_PREFIX = "base_model.model."
# lora_A / lora_B (optionally with an adapter name, as in older files) and embedding factors.
_KEY = re.compile(r"^(?P<mod>.+)\.(?:lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight|lora_embedding_(?P<eab>[AB])(?:\.[^.]+)?)$")


def read_state(file: Path, shapes_only: bool = False) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``({key: tensor}, safetensors header metadata)``. ``.safetensors`` files are memory-mapped and,
    with ``shapes_only``, read as ``meta`` tensors (shapes and dtypes, no data); other files are read
    with ``torch.load(weights_only=True)``: tensors only, never code."""
    if file.suffix == ".safetensors":
        try:
            from safetensors import safe_open
            with safe_open(str(file), "pt") as f:
                meta = f.metadata() or {}
                if shapes_only:
                    state = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
                else:
                    state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises several types for corrupt headers; say which file
            raise AdapterFormatError(f"{file}: cannot read adapter weights ({type(e).__name__}: {e})") from e
        return state, meta
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise AdapterFormatError(f"{file} is not a state dict of tensors or contains code; refusing to load "
                                 f"({reason})") from e
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise AdapterFormatError(f"{file} is not a state dict of tensors; refusing to load")
    if shapes_only:
        state = {k: torch.empty(v.shape, device="meta") for k, v in state.items()}
    return state, {}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFormatError(f"{path}: cannot read adapter config: {e}") from e


def other_kind(key: str) -> str:
    """What a non-factor key holds, for the warning."""
    if "lora_magnitude_vector" in key or "dora_scale" in key:
        return "DoRA magnitudes"
    if (".lora_B." in key or "lora_up" in key) and key.endswith("bias"):
        return "LoRA biases"
    return "other weights (e.g. modules_to_save)"


def warn_other(file, other: dict) -> None:
    """Warn once about keys kept in ``Adapter.other``."""
    if other:
        kinds = sorted({other_kind(k) for k in other})
        warn(f"{file}: {len(other)} keys are not LoRA factors ({', '.join(kinds)}); they are kept in "
             f"Adapter.other and ignored by delta() and the models", stacklevel=5)


def _load_folder(folder: Path, base_model=None, shapes_only: bool = False) -> Adapter:
    cfg_file = folder / CONFIG_FILE
    raw = _read_json(cfg_file)
    cfg = check_config(raw, str(cfg_file))
    for name in WEIGHT_FILES:
        file = folder / name
        if file.exists():
            break
    else:
        raise AdapterFormatError(f"{folder}: no adapter weights ({' or '.join(WEIGHT_FILES)})")
    state, _ = read_state(file, shapes_only)
    pairs: dict[str, dict] = {}
    other: dict[str, Tensor] = {}
    for key, value in state.items():
        short = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        m = _KEY.match(short)
        if m is None:
            other[short] = value
            continue
        p = pairs.setdefault(m["mod"], {})
        p[m["ab"] or m["eab"]] = value
        p["kind"] = "embedding" if m["eab"] else "matrix"
    if not pairs:
        raise AdapterFormatError(f"{file}: no LoRA factors (keys like '...lora_A.weight'); found {len(state)} other keys")

    def scale_of(mod, r):
        a = pattern_value(cfg["alpha_pattern"], mod, cfg["lora_alpha"])
        return a / math.sqrt(r) if cfg["use_rslora"] else a / r

    base = resolve_base(base_model)
    factors = build_factors(str(file), pairs, rank_of=lambda mod: pattern_value(cfg["rank_pattern"], mod, cfg["r"]),
                            scale_of=scale_of, fifo=cfg["fan_in_fan_out"], base=base)
    if base is None:
        lin = [k for k, f in factors.items() if f.kind == "linear"]
        msg = fifo_warning(str(cfg_file), cfg["fan_in_fan_out"], lin)
        if msg:
            warn(msg)
    if cfg["init"] is not None:
        warn(nonzero_init_warning(str(cfg_file), cfg["init"]))
    warn_other(file, other)
    return Adapter(factors, raw, folder, other)


def list_adapters(path: str | os.PathLike) -> list[str]:
    """Names of the adapters in a PEFT folder: ``"default"`` (the folder itself) and named sub-folders."""
    path = Path(path)
    names = ["default"] if (path / CONFIG_FILE).exists() else []
    subs = sorted((d.name for d in path.iterdir() if d.is_dir() and (d / CONFIG_FILE).exists()), key=natural_key) \
        if path.is_dir() else []
    return names + [s for s in subs if s not in DIFFUSERS_COMPONENTS or names]


def _single_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in LORA_FILE_SUFFIXES
                  and p.name not in WEIGHT_FILES)


def load_adapter(path: str | os.PathLike, adapter_name: str | None = None, *, base_model=None,
                 dtype: torch.dtype | None = None, shapes_only: bool = False) -> Adapter:
    """Read a LoRA adapter: a PEFT folder, a diffusers folder or file, or a kohya / A1111 file.

    * PEFT: a folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (or
      ``adapter_model.bin``); a named (non-default) adapter lives in the sub-folder ``<adapter_name>/``;
      a folder of diffusers components ``unet/``, ``text_encoder/``, ... (each a PEFT folder) is one
      adapter whose module names are prefixed ``"unet."``, ``"text_encoder."``.
    * A single file (or a folder holding one, without ``adapter_config.json``): diffusers
      ``pytorch_lora_weights.safetensors`` (``save_lora_weights``, ``save_lora_adapter``, the
      diffusers training scripts) and kohya / A1111 ``.safetensors``; see :func:`load_lora_file`.

    ``.bin`` / ``.pt`` files are read with ``torch.load(weights_only=True)``; safetensors files are
    memory-mapped.

    Args:
        path: the adapter folder or file.
        adapter_name: which named adapter to read; ``None`` reads the folder's own adapter (or its
            only named adapter).
        base_model: optional base model (an ``nn.Module``, or a transformers config whose model is
            then built on the ``meta`` device). When given, ``fan_in_fan_out`` is decided per module
            from its weight's shape (a mixed GPT-2 adapter with ``c_attn`` and ``lm_head`` is right),
            every adapted module must exist in it and every delta must fit its weight; kohya module
            names are mapped back to the base model's dotted names.
        dtype: cast ``U`` and ``V`` to this dtype.
        shapes_only: read shapes only (``meta`` tensors, no values; used to scan large datasets).

    Returns:
        an :class:`Adapter`; keys that are not LoRA factors are in ``Adapter.other`` (with a warning).

    Warns:
        UserWarning: non-factor keys (DoRA magnitudes, biases, ``modules_to_save``); a global
        ``fan_in_fan_out`` that cannot be right for every module; a non-zero-B initialisation
        (PiSSA, OLoRA, LoftQ, EVA, ...), for which ``delta()`` is not the finetuning difference.

    Raises:
        AdapterFormatError: a missing, unreadable, corrupt or inconsistent file or config (the
            message names the file and the key or module), or an ambiguous folder.
    """
    from ._formats import load_lora_file

    path = Path(path)
    if path.is_file():
        if path.name in WEIGHT_FILES and (path.parent / CONFIG_FILE).exists():
            ad = _load_folder(path.parent, base_model, shapes_only)
        else:
            ad = load_lora_file(path, base_model=base_model, shapes_only=shapes_only)
        return ad.to(dtype) if dtype is not None else ad
    if not path.is_dir():
        raise AdapterFormatError(f"{path}: no such adapter folder or file")
    if adapter_name not in (None, "default"):
        sub = path / adapter_name
        if not (sub / CONFIG_FILE).exists():
            raise AdapterFormatError(f"{path}: no adapter named {adapter_name!r}; found {list_adapters(path)}")
        ad = _load_folder(sub, base_model, shapes_only)
    elif (path / CONFIG_FILE).exists():
        ad = _load_folder(path, base_model, shapes_only)
    else:
        subs = [d for d in sorted(path.iterdir()) if d.is_dir() and (d / CONFIG_FILE).exists()]
        comps = [d for d in subs if d.name in DIFFUSERS_COMPONENTS]
        files = _single_files(path)
        if comps and len(comps) == len(subs):
            parts = {d.name: _load_folder(d, None, shapes_only) for d in comps}
            factors = {f"{c}.{k}": f for c, a in parts.items() for k, f in a.factors.items()}
            other = {f"{c}.{k}": t for c, a in parts.items() for k, t in a.other.items()}
            ad = Adapter(factors, {c: a.config for c, a in parts.items()}, path, other)
        elif len(subs) == 1:
            ad = _load_folder(subs[0], base_model, shapes_only)
        elif subs:
            raise AdapterFormatError(f"{path}: holds several adapters {[d.name for d in subs][:6]}; pass one of "
                                     "them, or adapter_name (--adapter-name on the command line)")
        elif len(files) == 1 or any(f.name == "pytorch_lora_weights.safetensors" for f in files):
            file = files[0] if len(files) == 1 else path / "pytorch_lora_weights.safetensors"
            ad = load_lora_file(file, base_model=base_model, shapes_only=shapes_only)
        elif files:
            raise AdapterFormatError(f"{path}: holds several weight files {[f.name for f in files][:6]}; "
                                     "pass the file itself")
        else:
            raise AdapterFormatError(f"{path}: no {CONFIG_FILE} here or in a sub-folder, and no LoRA weight file")
    return ad.to(dtype) if dtype is not None else ad
