"""PEFT LoRA adapters as factor pairs: :class:`LoraFactors`, :class:`Adapter`, :func:`load_adapter`.

One adapted layer is ``ΔW = s · U Vᵀ`` with ``U: n×r``, ``V: m×r`` and the scalar ``s`` from the
adapter config. ``U`` is the factor indexed by the *first* axis of the base layer's weight tensor,
``V`` by the (flattened) remaining axes, so that ``delta()`` has exactly the shape and layout of the
weight that PEFT's ``get_delta_weight`` returns:

=========================  ==========================  ==========================  ================
layer (PEFT class)         ``U``                       ``V``                       ``delta()``
=========================  ==========================  ==========================  ================
Linear                     ``lora_B`` (out×r)          ``lora_Aᵀ`` (in×r)          (out, in)
Linear, fan_in_fan_out     ``lora_Aᵀ`` (in×r)          ``lora_B`` (out×r)          (in, out)
Embedding                  ``lora_embedding_Aᵀ`` (N×r)  ``lora_embedding_B`` (d×r)  (N, d)
Conv1d/2d/3d (groups=1)    ``lora_B`` (out×r)          ``lora_A.flatten(1)ᵀ``       (out, in, *k)
=========================  ==========================  ==========================  ================

``(U, V) → (U R, V R⁻ᵀ)`` for any ``R ∈ GL(r)`` leaves ``delta()`` unchanged.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import Tensor

__all__ = ["LoraFactors", "Adapter", "load_adapter", "list_adapters", "natural_key",
           "AdapterFormatError", "CONFIG_FILE", "WEIGHT_FILES", "DIFFUSERS_COMPONENTS"]

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
#: Sub-folder names that diffusers pipelines use for per-component adapters; combined into one adapter.
DIFFUSERS_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior")

_PREFIX = "base_model.model."
# lora_A / lora_B (optionally with an adapter name, as in older files) and embedding factors.
_KEY = re.compile(r"^(?P<mod>.+)\.(?:lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight|lora_embedding_(?P<eab>[AB])(?:\.[^.]+)?)$")


class AdapterFormatError(ValueError):
    """An adapter folder or file cannot be read or is not a LoRA adapter; the message names the file."""


def natural_key(name: str) -> tuple:
    """Sort key putting ``layers.2`` before ``layers.10`` (digit runs compare as integers)."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t)


@dataclass(frozen=True)
class LoraFactors:
    """The LoRA of one layer: ``delta() = scale · U Vᵀ`` reshaped to ``weight_shape``.

    Attributes:
        U: ``(n, r)``, the factor on the first axis of the weight tensor (see the module table).
        V: ``(m, r)``, the factor on the flattened other axes; ``m = prod(weight_shape[1:])``.
        scale: ``lora_alpha / r`` (``/ √r`` with rsLoRA), after ``rank_pattern`` / ``alpha_pattern``.
        weight_shape: shape of PEFT's delta weight, e.g. ``(out, in)`` or ``(out, in, kh, kw)``.
        kind: ``"linear"``, ``"embedding"`` or ``"conv"``.
        fan_in_fan_out: the layer stores its weight as ``(in, out)`` (GPT-2 ``Conv1D``).
    """

    U: Tensor
    V: Tensor
    scale: float
    weight_shape: tuple[int, ...]
    kind: str = "linear"
    fan_in_fan_out: bool = False

    def __post_init__(self):
        if self.U.dim() != 2 or self.V.dim() != 2 or self.U.shape[1] != self.V.shape[1]:
            raise ValueError(f"LoraFactors: U {tuple(self.U.shape)} and V {tuple(self.V.shape)} must be (n, r) and (m, r)")
        n, m = self.weight_shape[0], math.prod(self.weight_shape[1:])
        if (self.U.shape[0], self.V.shape[0]) != (n, m):
            raise ValueError(f"LoraFactors: U {tuple(self.U.shape)}, V {tuple(self.V.shape)} do not match "
                             f"weight_shape {self.weight_shape} (expected ({n}, r) and ({m}, r))")

    @property
    def rank(self) -> int:
        """``r``, the number of factor columns."""
        return self.U.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, m)``, the shape of the matrix ``U Vᵀ``."""
        return self.U.shape[0], self.V.shape[0]

    def delta(self) -> Tensor:
        """``scale · U Vᵀ`` reshaped to ``weight_shape``: PEFT's ``get_delta_weight``."""
        return (self.scale * (self.U @ self.V.T)).reshape(self.weight_shape)

    def matrix(self) -> Tensor:
        """``scale · U Vᵀ`` as an ``(n, m)`` matrix."""
        return self.scale * (self.U @ self.V.T)

    def to(self, *args, **kwargs) -> "LoraFactors":
        """A copy with ``U`` and ``V`` moved/cast like :meth:`torch.Tensor.to`."""
        return replace(self, U=self.U.to(*args, **kwargs), V=self.V.to(*args, **kwargs))

    def transform(self, R: Tensor) -> "LoraFactors":
        """``(U R, V R⁻ᵀ)`` for an invertible ``R`` (r×r); the delta is unchanged."""
        return replace(self, U=self.U @ R, V=self.V @ torch.linalg.inv(R).T)

    def pad_rank(self, r: int) -> "LoraFactors":
        """Append zero columns to ``U`` and ``V`` up to rank ``r``; the delta and ``scale`` are unchanged."""
        if r < self.rank:
            raise ValueError(f"pad_rank: target rank {r} is below the adapter's rank {self.rank}")
        pad = lambda X: torch.cat([X, X.new_zeros(X.shape[0], r - self.rank)], dim=1)
        return replace(self, U=pad(self.U), V=pad(self.V))


@dataclass(frozen=True)
class Adapter(Mapping):
    """A LoRA adapter: an immutable mapping ``module name -> LoraFactors`` in natural order.

    Attributes:
        factors: the adapted layers, keyed by module name (without ``base_model.model.``).
        config: the ``adapter_config.json`` contents (for diffusers layouts: ``{component: config}``).
        path: the folder it came from, if any.
        other: keys of the file that are not LoRA factors (DoRA magnitudes, LoRA biases,
            ``modules_to_save`` weights), name -> tensor; reported, never mixed into the factors.
    """

    factors: dict[str, LoraFactors]
    config: dict = field(default_factory=dict, repr=False)
    path: Path | None = None
    other: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "factors", {k: self.factors[k] for k in sorted(self.factors, key=natural_key)})

    @property
    def module_names(self) -> list[str]:
        """Adapted module names, naturally sorted (``layers.2`` before ``layers.10``)."""
        return list(self.factors)

    @property
    def ranks(self) -> dict[str, int]:
        """``{module: r}``."""
        return {k: f.rank for k, f in self.factors.items()}

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """``{module: (n, m)}``, the matrix shape of each ``U Vᵀ``."""
        return {k: f.shape for k, f in self.factors.items()}

    def __getitem__(self, name: str) -> LoraFactors:
        try:
            return self.factors[name]
        except KeyError:
            where = f" in {self.path}" if self.path else ""
            raise KeyError(f"no adapted module {name!r}{where}; modules: {', '.join(self.factors)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.factors)

    def __len__(self) -> int:
        return len(self.factors)

    def __repr__(self) -> str:
        ranks = sorted(set(self.ranks.values()))
        return f"Adapter({len(self)} modules, rank {ranks[0] if len(ranks) == 1 else ranks}, path={self.path})"

    def deltas(self) -> dict[str, Tensor]:
        """``{module: delta()}``, each shaped like PEFT's delta weight."""
        return {k: f.delta() for k, f in self.factors.items()}

    def map(self, fn) -> "Adapter":
        """A new adapter with ``fn(name, LoraFactors) -> LoraFactors`` applied to every module."""
        return replace(self, factors={k: fn(k, f) for k, f in self.factors.items()})

    def to(self, *args, **kwargs) -> "Adapter":
        """A copy with every factor moved/cast like :meth:`torch.Tensor.to`."""
        return self.map(lambda _, f: f.to(*args, **kwargs))

    def transform(self, Rs: Mapping[str, Tensor]) -> "Adapter":
        """Apply ``R ∈ GL(r)`` per module (``{module: R}``); the deltas are unchanged."""
        return self.map(lambda k, f: f.transform(Rs[k]) if k in Rs else f)

    def pad_rank(self, r: int) -> "Adapter":
        """Zero-pad every module to rank ``r`` (same deltas)."""
        return self.map(lambda _, f: f.pad_rank(r))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFormatError(f"{path}: cannot read adapter config: {e}") from e


def _read_weights(folder: Path) -> tuple[dict[str, Tensor], Path]:
    for name in WEIGHT_FILES:
        file = folder / name
        if file.exists():
            break
    else:
        raise AdapterFormatError(f"{folder}: no adapter weights ({' or '.join(WEIGHT_FILES)})")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(file)
        else:  # a pickled state dict: tensors only, never arbitrary objects
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and pickle raise many types; say which file
        raise AdapterFormatError(f"{file}: cannot read adapter weights ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise AdapterFormatError(f"{file}: not a state dict of tensors")
    return state, file


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's ``get_pattern_key``: the first pattern ``p`` with ``re.match(r"(.*\\.)?(p)$", module)``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _is_conv1d_gpt2(base_model, module: str) -> bool | None:
    if base_model is None:
        return None
    try:
        layer = base_model.get_submodule(module)
    except AttributeError:
        raise AdapterFormatError(f"base_model has no module {module!r} that the adapter adapts") from None
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf")


def _load_folder(folder: Path, base_model=None) -> Adapter:
    config = _read_json(folder / CONFIG_FILE)
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"{folder / CONFIG_FILE}: peft_type {config.get('peft_type')!r} is not LORA")
    state, file = _read_weights(folder)
    pairs: dict[str, dict[str, Tensor]] = {}
    other: dict[str, Tensor] = {}
    for key, value in state.items():
        short = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        m = _KEY.match(short)
        if m is None:
            other[short] = value
            continue
        kind = "embedding" if m["eab"] else "matrix"
        pairs.setdefault(m["mod"], {})[(m["ab"] or m["eab"])] = value
        pairs[m["mod"]]["_kind"] = kind  # type: ignore[assignment]
    if not pairs:
        raise AdapterFormatError(f"{file}: no LoRA factors (keys like '...lora_A.weight'); found {len(state)} other keys")
    alpha, r_default = config.get("lora_alpha", 8), config.get("r", 8)
    factors = {}
    for mod, p in pairs.items():
        if "A" not in p or "B" not in p:
            raise AdapterFormatError(f"{file}: module {mod!r} has lora_{'A' if 'A' in p else 'B'} but no "
                                     f"lora_{'B' if 'A' in p else 'A'}")
        A, B = p["A"], p["B"]
        r = A.shape[0]
        if B.shape[1] != r:
            raise AdapterFormatError(f"{file}: module {mod!r}: lora_A {tuple(A.shape)} and lora_B "
                                     f"{tuple(B.shape)} disagree on the rank")
        a = _pattern_value(config.get("alpha_pattern"), mod, alpha)
        scale = a / math.sqrt(r) if config.get("use_rslora", False) else a / r
        if p["_kind"] == "embedding":  # PEFT: (B A)ᵀ, shape (num_embeddings, dim)
            factors[mod] = LoraFactors(A.T, B, scale, (A.shape[1], B.shape[0]), "embedding")
        elif A.dim() > 2:  # conv: A (r, in, *k), B (out, r, 1..)
            shape = (B.shape[0], *A.shape[1:])
            factors[mod] = LoraFactors(B.flatten(1), A.flatten(1).T, scale, shape, "conv")
        else:
            fifo = _is_conv1d_gpt2(base_model, mod)
            fifo = bool(config.get("fan_in_fan_out", False)) if fifo is None else fifo
            if fifo:
                factors[mod] = LoraFactors(A.T, B, scale, (A.shape[1], B.shape[0]), "linear", True)
            else:
                factors[mod] = LoraFactors(B, A.T, scale, (B.shape[0], A.shape[1]), "linear")
    if other:
        kinds = sorted({_other_kind(k) for k in other})
        warnings.warn(f"{file}: {len(other)} keys are not LoRA factors ({', '.join(kinds)}); they are kept in "
                      f"Adapter.other and ignored by delta() and the models", stacklevel=3)
    return Adapter(factors, config, folder, other)


def _other_kind(key: str) -> str:
    if "lora_magnitude_vector" in key:
        return "DoRA magnitudes"
    if ".lora_B." in key and key.endswith("bias"):
        return "LoRA biases"
    return "other weights (e.g. modules_to_save)"


def list_adapters(path: str | os.PathLike) -> list[str]:
    """Names of the adapters in a PEFT folder: ``"default"`` (the folder itself) and named sub-folders."""
    path = Path(path)
    names = ["default"] if (path / CONFIG_FILE).exists() else []
    subs = sorted((d.name for d in path.iterdir() if d.is_dir() and (d / CONFIG_FILE).exists()), key=natural_key) \
        if path.is_dir() else []
    return names + [s for s in subs if s not in DIFFUSERS_COMPONENTS or names]


def load_adapter(path: str | os.PathLike, adapter_name: str | None = None, *, base_model=None,
                 dtype: torch.dtype | None = None) -> Adapter:
    """Read a PEFT LoRA adapter folder.

    ``path`` is a folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (or
    ``adapter_model.bin``, read with ``torch.load(weights_only=True)``). A named (non-default)
    adapter saved by PEFT lives in the sub-folder ``<adapter_name>/``. A diffusers-style folder
    without its own config but with ``unet/``, ``text_encoder/``, ... sub-folders is read as one
    adapter whose module names are prefixed ``"unet."``, ``"text_encoder."``.

    Args:
        path: the adapter folder.
        adapter_name: which named adapter to read; ``None`` reads the folder's own adapter (or its
            only named adapter).
        base_model: optional base model; when given, ``fan_in_fan_out`` is decided per module
            (``Conv1D`` modules only) instead of from the config's global flag, and every adapted
            module must exist in it.
        dtype: cast ``U`` and ``V`` to this dtype.

    Returns:
        an :class:`Adapter`; keys that are not LoRA factors are in ``Adapter.other`` (with a warning).

    Raises:
        AdapterFormatError: a missing, unreadable or corrupt file (named in the message), an
            unpaired ``lora_A`` / ``lora_B``, or an ambiguous folder.
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterFormatError(f"{path}: not an adapter folder (does not exist or is not a directory)")
    if adapter_name not in (None, "default"):
        sub = path / adapter_name
        if not (sub / CONFIG_FILE).exists():
            raise AdapterFormatError(f"{path}: no adapter named {adapter_name!r}; found {list_adapters(path)}")
        ad = _load_folder(sub, base_model)
    elif (path / CONFIG_FILE).exists():
        ad = _load_folder(path, base_model)
    else:
        subs = [d for d in sorted(path.iterdir()) if d.is_dir() and (d / CONFIG_FILE).exists()]
        comps = [d for d in subs if d.name in DIFFUSERS_COMPONENTS]
        if comps and len(comps) == len(subs):
            parts = {d.name: _load_folder(d, None) for d in comps}
            factors = {f"{c}.{k}": f for c, a in parts.items() for k, f in a.factors.items()}
            other = {f"{c}.{k}": t for c, a in parts.items() for k, t in a.other.items()}
            ad = Adapter(factors, {c: a.config for c, a in parts.items()}, path, other)
        elif len(subs) == 1:
            ad = _load_folder(subs[0], base_model)
        elif subs:
            raise AdapterFormatError(f"{path}: holds several adapters {[d.name for d in subs]}; pass adapter_name")
        else:
            raise AdapterFormatError(f"{path}: no {CONFIG_FILE} here or in a sub-folder")
    return ad.to(dtype) if dtype is not None else ad
