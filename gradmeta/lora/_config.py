"""Checks shared by every adapter format: config values, factor tensors, per-module ``fan_in_fan_out``.

:func:`check_config` validates an ``adapter_config.json`` (or diffusers header metadata) and
:func:`build_factors` turns ``{module: {"A": lora_A, "B": lora_B}}`` into :class:`LoraFactors`,
refusing anything PEFT would not apply exactly (1-D or rank-0 factors, ranks that disagree with the
config, non-finite values). Every error names the file and the key or module.
"""
from __future__ import annotations

import math
import re
import warnings
from typing import Callable

import torch
from torch import Tensor

from ._adapter import AdapterFormatError, LoraFactors

__all__ = ["check_config", "build_factors", "pattern_value", "resolve_base", "fifo_warning", "NONZERO_INITS"]

#: ``init_lora_weights`` values (or prefixes) that start B non-zero and change the base weights.
NONZERO_INITS = ("pissa", "olora", "loftq", "eva", "corda", "lora_ga", "mica", "orthogonal")
# Leaf names of transformers ``Conv1D`` layers (GPT-2 family): weight stored (in, out).
_CONV1D_LEAVES = {"c_attn", "c_proj", "c_fc", "q_attn"}


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_config(config, where: str) -> dict:
    """Validated LoRA settings of a config: ``{r, lora_alpha, use_rslora, fan_in_fan_out, rank_pattern,
    alpha_pattern, init}``; ``where`` (a file, or file and key) starts every error message."""
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{where}: the adapter config must be a JSON object, got a {type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"{where}: peft_type {config.get('peft_type')!r} is not LORA")
    r = config.get("r", 8)
    if not (isinstance(r, int) and not isinstance(r, bool) and r >= 1):
        raise AdapterFormatError(f"{where}: key 'r' must be a positive integer, got {r!r}")
    alpha = config.get("lora_alpha", 8)
    if not (_is_number(alpha) and alpha > 0):
        raise AdapterFormatError(f"{where}: key 'lora_alpha' must be a positive number, got {alpha!r}")
    out = {"r": r, "lora_alpha": alpha}
    for key in ("use_rslora", "fan_in_fan_out", "use_dora"):
        v = config.get(key, False)
        v = False if v is None else v
        if not isinstance(v, bool):
            raise AdapterFormatError(f"{where}: key {key!r} must be true or false, got {v!r}")
        out[key] = v
    for key, ok, what in (("rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                           "a positive integer"),
                          ("alpha_pattern", lambda v: _is_number(v) and v > 0, "a positive number")):
        pat = config.get(key) or {}
        if not isinstance(pat, dict):
            raise AdapterFormatError(f"{where}: key {key!r} must be an object {{module regex: value}}, "
                                     f"got a {type(pat).__name__}")
        for k, v in pat.items():
            try:
                re.compile(k)
            except re.error as e:
                raise AdapterFormatError(f"{where}: key {key!r}: {k!r} is not a valid regular expression ({e})") from None
            if not ok(v):
                raise AdapterFormatError(f"{where}: key {key!r}: value of {k!r} must be {what}, got {v!r}")
        out[key] = pat
    init = config.get("init_lora_weights", True)
    if not isinstance(init, (bool, str)):
        raise AdapterFormatError(f"{where}: key 'init_lora_weights' must be true, false or a method name, got {init!r}")
    nonzero = isinstance(init, str) and init.lower().startswith(NONZERO_INITS)
    out["init"] = init if nonzero or config.get("loftq_config") else None
    return out


def nonzero_init_warning(where: str, init) -> str:
    """The warning for adapters whose B starts non-zero (PiSSA, OLoRA, LoftQ, EVA, ...)."""
    return (f"{where}: init_lora_weights={init!r} changes the base weights at initialisation and starts B "
            "non-zero, so delta() is the adapter's product scale·B·A, not the difference between the "
            "finetuned and the original base weights")


def pattern_value(patterns: dict, module: str, default):
    """PEFT's ``get_pattern_key``: the first pattern ``p`` with ``re.match(r"(.*\\.)?(p)$", module)``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def resolve_base(base_model):
    """An ``nn.Module`` for ``base_model``: the module itself, or for a transformers config (anything
    with ``model_type``) the model built on the ``meta`` device (shapes and classes only, no memory)."""
    if base_model is None or isinstance(base_model, torch.nn.Module):
        return base_model
    if hasattr(base_model, "model_type"):
        from transformers import AutoModel, AutoModelForCausalLM
        with torch.device("meta"):
            try:
                return AutoModelForCausalLM.from_config(base_model)
            except ValueError:
                return AutoModel.from_config(base_model)
    raise TypeError(f"base_model must be a torch.nn.Module or a transformers config, got {type(base_model).__name__}")


def _base_weight(base, module: str, where: str):
    try:
        layer = base.get_submodule(module)
    except AttributeError:
        raise AdapterFormatError(f"{where}: the base model has no module {module!r} that the adapter adapts "
                                 "(an adapter of another base model?)") from None
    w = getattr(layer, "weight", None)
    if not isinstance(w, Tensor):
        raise AdapterFormatError(f"{where}: base module {module!r} ({type(layer).__name__}) has no weight tensor")
    return layer, tuple(w.shape)


def fifo_warning(where: str, flag: bool, modules: list[str]) -> str | None:
    """A warning when a global ``fan_in_fan_out`` flag cannot be right for every module without a base
    model: set while some targets are not GPT-2 ``Conv1D`` names, or unset while some are."""
    leaves = {m: m.rsplit(".", 1)[-1] for m in modules}
    odd = [m for m, leaf in leaves.items() if (leaf in _CONV1D_LEAVES) != flag]
    if not odd:
        return None
    return (f"{where}: fan_in_fan_out={flag} is one flag for the whole adapter, but it cannot be resolved for "
            f"{odd[:4]}{' ...' if len(odd) > 4 else ''} (a mix of GPT-2 Conv1D and Linear targets?); "
            f"pass base_model= (the model or its config) to decide it per module from the weight shapes")


def build_factors(where: str, pairs: dict[str, dict[str, Tensor]], *, rank_of: Callable[[str], int | None],
                  scale_of: Callable[[str, int], float], fifo: bool = False, base=None) -> dict[str, LoraFactors]:
    """``{module: {"A": lora_A, "B": lora_B, "kind": "matrix" | "embedding"}}`` -> ``{module: LoraFactors}``.

    ``rank_of(module)``: the rank the config promises (``None``: take the tensors' rank);
    ``scale_of(module, r)``: the scale; ``fifo``: the global ``fan_in_fan_out`` flag, used only when
    ``base`` (an ``nn.Module``) is ``None`` — otherwise each Linear-like module's layout is read from
    its base weight's shape (``(out, in)`` or ``(in, out)``; a square weight by its class), and every
    delta must fit its base weight.
    """
    factors = {}
    for mod, p in pairs.items():
        if "A" not in p or "B" not in p:
            have, miss = ("A", "B") if "A" in p else ("B", "A")
            raise AdapterFormatError(f"{where}: module {mod!r} has lora_{have} but no lora_{miss}")
        A, B = p["A"], p["B"]
        if A.dim() < 2 or B.dim() < 2:
            raise AdapterFormatError(f"{where}: module {mod!r}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} "
                                     "must have at least 2 dimensions")
        r = A.shape[0]
        if r == 0 or B.shape[1] == 0:
            raise AdapterFormatError(f"{where}: module {mod!r} has rank-0 factors (lora_A {tuple(A.shape)}, "
                                     f"lora_B {tuple(B.shape)})")
        if B.shape[1] != r or any(s != 1 for s in B.shape[2:]):
            raise AdapterFormatError(f"{where}: module {mod!r}: lora_A {tuple(A.shape)} and lora_B "
                                     f"{tuple(B.shape)} disagree on the rank")
        want = rank_of(mod)
        if want is not None and want != r:
            raise AdapterFormatError(f"{where}: module {mod!r} has rank {r} but the config says r = {want} "
                                     "(key 'r' or 'rank_pattern')")
        if A.device.type != "meta" and not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise AdapterFormatError(f"{where}: module {mod!r} holds non-finite values (nan or inf); refusing to load")
        scale = scale_of(mod, r)
        if p.get("kind") == "embedding":  # PEFT: (B A)ᵀ, shape (num_embeddings, dim)
            f = LoraFactors(A.T, B, scale, (A.shape[1], B.shape[0]), "embedding")
        elif A.dim() > 2:  # conv: A (r, in, *k), B (out, r, 1..)
            f = LoraFactors(B.flatten(1), A.flatten(1).T, scale, (B.shape[0], *A.shape[1:]), "conv")
        else:
            t = fifo
            if base is not None:
                layer, ws = _base_weight(base, mod, where)
                out_in, in_out = (B.shape[0], A.shape[1]), (A.shape[1], B.shape[0])
                t = (type(layer).__name__ == "Conv1D") if out_in == in_out else ws == in_out
            f = (LoraFactors(A.T, B, scale, (A.shape[1], B.shape[0]), "linear", True) if t
                 else LoraFactors(B, A.T, scale, (B.shape[0], A.shape[1]), "linear"))
        if base is not None:
            _, ws = _base_weight(base, mod, where)
            if ws != f.weight_shape:
                raise AdapterFormatError(f"{where}: module {mod!r}: the adapter's delta {f.weight_shape} does not fit "
                                         f"the base weight {ws} (an adapter of another base model?)")
        factors[mod] = f
    return factors


def warn(message: str, stacklevel: int = 4) -> None:
    """``warnings.warn`` as a UserWarning from the caller of the public loader."""
    warnings.warn(message, UserWarning, stacklevel=stacklevel)
