"""Single-file LoRA formats: diffusers ``pytorch_lora_weights.safetensors`` and kohya / A1111 files.

Keys understood (``<c>`` an optional component prefix ``unet.`` / ``text_encoder.`` / ...; a
``.processor.`` in a key is dropped as diffusers does):

=====================================================  ==================================
key                                                    written by
=====================================================  ==================================
``<c><module>.lora_A.weight`` / ``.lora_B.weight``     diffusers ``save_lora_weights`` and
                                                       ``save_lora_adapter`` (PEFT keys)
``<c><module>.lora.down.weight`` / ``.lora.up.weight``  diffusers' own LoRA layers
``<c><module>.lora_linear_layer.down.weight`` / up     diffusers text-encoder layers
``<c><attn>.processor.to_q_lora.down.weight`` / up     diffusers attention processors
``lora_unet_<module_with_underscores>.lora_down.weight``
/ ``.lora_up.weight`` / ``.alpha`` (also ``lora_te_``,   kohya sd-scripts, A1111, ComfyUI
``lora_te1_``, ``lora_te2_``, ``lora_transformer_``)
=====================================================  ==================================

Scale of a module: from the header metadata ``lora_adapter_metadata`` (the PEFT config diffusers
stores, per component) when present; otherwise ``alpha / r`` with the module's ``.alpha`` key;
otherwise 1 (diffusers and kohya both take ``alpha = r`` then).
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from torch import Tensor

from ._adapter import Adapter, AdapterFormatError
from ._config import build_factors, check_config, nonzero_init_warning, pattern_value, resolve_base, warn
from ._load import DIFFUSERS_COMPONENTS, read_state, warn_other

__all__ = ["load_lora_file", "KOHYA_PREFIXES"]

#: kohya / A1111 name prefixes and the diffusers component they adapt.
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2", "lora_te3_": "text_encoder_3", "lora_transformer_": "transformer"}
_KOHYA = re.compile(r"^(?P<pre>lora_(?:unet|te\d?|transformer)_)(?P<mod>[^.]+)\.(?:lora_(?P<du>down|up)\.weight|(?P<alpha>alpha))$")
_DIFF = re.compile(r"^(?P<mod>.+?)\.(?:lora_(?P<ab>[AB])\.weight|lora\.(?P<du>down|up)\.weight|"
                   r"lora_linear_layer\.(?P<du2>down|up)\.weight|(?P<proc>to_[qkv]|to_out)_lora\.(?P<du3>down|up)\.weight|"
                   r"lora_embedding_(?P<eab>[AB]))$")
_ALPHA = re.compile(r"^(?P<mod>.+)\.alpha$")
_UNSUPPORTED = ("hada_w", "lokr_w", "lora_mid", ".oft_", "lycoris")
_PROC = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
         "text": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}


def _split_component(key: str) -> tuple[str | None, str]:
    head, _, rest = key.partition(".")
    return (head, rest) if head in DIFFUSERS_COMPONENTS and rest else (None, key)


def _component_configs(meta: dict, file: Path, components: set) -> dict:
    """``{component or None: raw config}`` from the ``lora_adapter_metadata`` header entry."""
    if "lora_adapter_metadata" not in meta:
        return {}
    where = f"{file} (header metadata 'lora_adapter_metadata')"
    try:
        raw = json.loads(meta["lora_adapter_metadata"])
    except json.JSONDecodeError as e:
        raise AdapterFormatError(f"{where}: not JSON ({e})") from None
    if not isinstance(raw, dict):
        raise AdapterFormatError(f"{where}: must be a JSON object, got a {type(raw).__name__}")
    out: dict = {}
    for k, v in raw.items():
        comp, rest = _split_component(k)
        if comp is not None and comp in components:
            out.setdefault(comp, {})[rest] = v
        else:
            out.setdefault(None, {})[k] = v
    return out


def _parse(state: dict[str, Tensor], file: Path):
    """``({(component, module): {"A", "B", "kind"}}, {(component, module): alpha}, other, kohya)``."""
    pairs: dict = {}
    alphas: dict = {}
    other: dict = {}
    kohya = False
    for key, value in state.items():
        if any(u in key for u in _UNSUPPORTED):
            raise AdapterFormatError(f"{file}: key {key!r} belongs to a LyCORIS / LoCon / LoHa / LoKr / OFT "
                                     "adapter, which is not a LoRA factor pair; not supported")
        m = _KOHYA.match(key)
        if m is not None:
            kohya = True
            where = (KOHYA_PREFIXES[m["pre"]], m["mod"])
            if m["alpha"]:
                alphas[where] = value
            else:
                pairs.setdefault(where, {"kind": "matrix"})["A" if m["du"] == "down" else "B"] = value
            continue
        k = key.replace(".processor.", ".")
        comp, rest = _split_component(k)
        m = _DIFF.match(rest)
        if m is not None:
            mod = _module(comp, m)
            du = m["du"] or m["du2"] or m["du3"]
            ab = m["ab"] or m["eab"] or ("A" if du == "down" else "B")
            p = pairs.setdefault((comp, mod), {"kind": "embedding" if m["eab"] else "matrix"})
            p[ab] = value
            continue
        m = _ALPHA.match(rest)
        if m is not None and value.numel() == 1:
            mod = m["mod"]
            sub = _DIFF.match(mod) if mod.endswith(".weight") else None
            alphas[(comp, _module(comp, sub) if sub else mod)] = value
            continue
        other[key] = value
    return pairs, alphas, other, kohya


def _module(comp, m: re.Match) -> str:
    if not m["proc"]:
        return m["mod"]
    return f"{m['mod']}.{_PROC['unet' if comp in (None, 'unet', 'transformer') else 'text'][m['proc']]}"


def _kohya_names(base, names: list[str], file: Path, comp) -> dict[str, str]:
    """kohya's underscored names -> the base model's dotted module names."""
    lookup = {n.replace(".", "_"): n for n, _ in base.named_modules() if n}
    missing = [n for n in names if n not in lookup]
    if missing:
        raise AdapterFormatError(f"{file}: the base model has no module for kohya names {missing[:3]} "
                                 f"(component {comp}; an adapter of another base model?)")
    return {n: lookup[n] for n in names}


def load_lora_file(path: str | os.PathLike, *, base_model=None, shapes_only: bool = False) -> Adapter:
    """Read a diffusers or kohya / A1111 LoRA file (see the module docstring for the keys).

    Module names are ``"<component>.<module>"`` when the file names a component (``unet``,
    ``text_encoder``, ...), else ``"<module>"``; kohya names keep their underscores
    (``unet.down_blocks_0_..._to_q``) unless ``base_model`` is given, which maps them back to the
    model's dotted names. ``base_model``: an ``nn.Module`` (or transformers config) for a
    one-component file, or ``{component: module}``; each delta is then checked against its weight.
    """
    file = Path(path)
    state, meta = read_state(file, shapes_only)
    pairs, alphas, other, kohya = _parse(state, file)
    if not pairs:
        raise AdapterFormatError(f"{file}: no LoRA factors (keys like '...lora_A.weight', '...lora.down.weight' or "
                                 f"'lora_unet_....lora_down.weight'); found {len(state)} other keys")
    comps = {c for c, _ in pairs}
    configs = _component_configs(meta, file, {c for c in comps if c})
    if isinstance(base_model, dict):
        bases = {c: resolve_base(base_model.get(c)) for c in comps}
    elif base_model is not None:
        if len(comps) > 1:
            raise AdapterFormatError(f"{file}: adapts several components {sorted(c or '' for c in comps)}; pass "
                                     "base_model as {component: model}")
        bases = {c: resolve_base(base_model) for c in comps}
    else:
        bases = {c: None for c in comps}
    factors = {}
    for comp in sorted(comps, key=lambda c: c or ""):
        mine = {mod: p for (c, mod), p in pairs.items() if c == comp}
        base = bases[comp]
        if kohya and base is not None:
            names = _kohya_names(base, list(mine), file, comp)
            mine = {names[m]: p for m, p in mine.items()}
            my_alpha = {names.get(m, m): a for (c, m), a in alphas.items() if c == comp}
        else:
            my_alpha = {m: a for (c, m), a in alphas.items() if c == comp}
        raw = configs.get(comp) or (configs.get(None) if len(comps) == 1 else None)
        where = f"{file}" + (f" (component {comp})" if comp else "")
        if raw:
            cfg = check_config(raw, f"{file} (header metadata 'lora_adapter_metadata'{', ' + comp if comp else ''})")
            rank_of = lambda mod, cfg=cfg: pattern_value(cfg["rank_pattern"], mod, cfg["r"])

            def scale_of(mod, r, cfg=cfg):
                a = pattern_value(cfg["alpha_pattern"], mod, cfg["lora_alpha"])
                return a / math.sqrt(r) if cfg["use_rslora"] else a / r
            if cfg["init"] is not None:
                warn(nonzero_init_warning(where, cfg["init"]), stacklevel=3)
        else:
            rank_of = lambda mod: None
            scale_of = lambda mod, r, my_alpha=my_alpha, where=where: _alpha_scale(my_alpha, mod, r, where)
        built = build_factors(where, mine, rank_of=rank_of, scale_of=scale_of, base=base)
        factors.update({f"{comp}.{k}" if comp else k: f for k, f in built.items()})
    warn_other(file, other)
    return Adapter(factors, {c or "": v for c, v in configs.items()}, file, other)


def _alpha_scale(alphas: dict, mod: str, r: int, where: str) -> float:
    if mod not in alphas:
        return 1.0
    t = alphas[mod]
    if t.device.type == "meta":
        return 1.0  # shapes only: values are not read
    a = float(t.reshape(()))
    if not (math.isfinite(a) and a > 0):
        raise AdapterFormatError(f"{where}: module {mod!r}: alpha must be a positive number, got {a}")
    return a / r
