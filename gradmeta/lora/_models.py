"""Models on LoRA adapters: the common :class:`AdapterModel` base, :class:`GLNet`, checkpoints."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import torch
from torch import Tensor, nn

from gradmeta.nn import FactorPairNet, singular_value_features

from .._io import safe_torch_load
from ._adapter import Adapter
from ._dataset import stack_factors

__all__ = ["AdapterModel", "GLNet", "mlp_head", "Pairs", "MODELS", "save_model", "load_model"]

#: ``{module: (U (N, n, r), V (N, m, r))}`` with ``scale`` folded into ``U`` (see :func:`stack_factors`).
Pairs = dict[str, tuple[Tensor, Tensor]]
AdapterInput = Union[Adapter, Sequence[Adapter], Pairs]

#: Registered model classes by name (for :func:`load_model`).
MODELS: dict[str, type] = {}


class AdapterModel(nn.Module):
    """Base of every adapter model: input handling, per-module input scale, construction kwargs.

    ``net(x)`` accepts one :class:`Adapter`, a list of adapters (any ranks; zero-padded) or
    already stacked :data:`Pairs`, and returns ``(N, out_dim)``. Before the model sees them, the
    ``U`` of module ``k`` is divided by ``input_scale[k]`` (a scalar, so every symmetry of the
    model is kept); :meth:`fit_input_scale` sets it to the RMS Frobenius norm of ``ΔW_k``.

    Args:
        shapes: ``{module: (n, m)}`` as in ``Adapter.shapes`` (module order is kept).
        out_dim: output size.
    """

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        MODELS[cls.__name__] = cls

    def __init__(self, shapes: dict[str, tuple[int, int]], out_dim: int = 1):
        super().__init__()
        self.names = list(shapes)
        self.shapes = {k: (int(v[0]), int(v[1])) for k, v in shapes.items()}
        self.out_dim = out_dim
        self.register_buffer("input_scale", torch.ones(len(self.names)))
        self.kwargs: dict = {"shapes": self.shapes, "out_dim": out_dim}

    @classmethod
    def for_adapter(cls, ad: Adapter, out_dim: int = 1, **kwargs) -> "AdapterModel":
        """A model sized from an example adapter's module names and shapes (its rank does not matter)."""
        return cls(ad.shapes, out_dim=out_dim, **kwargs)

    def _dtype(self) -> torch.dtype:
        return self.input_scale.dtype

    def pairs(self, x: AdapterInput) -> Pairs:
        """Stacked, input-scaled factor pairs in the model's dtype; checks module names and shapes."""
        if isinstance(x, Adapter):
            x = [x]
        if not isinstance(x, dict):
            x = stack_factors(list(x), dtype=self._dtype())
        out = {}
        for i, k in enumerate(self.names):
            if k not in x:
                raise KeyError(f"{type(self).__name__}: input has no module {k!r}; it has {list(x)[:8]}")
            U, V = x[k]
            if (U.shape[-2], V.shape[-2]) != self.shapes[k]:
                raise ValueError(f"{type(self).__name__}: module {k!r} is {(U.shape[-2], V.shape[-2])}, "
                                 f"the model was built for {self.shapes[k]}")
            out[k] = (U.to(self._dtype()) / self.input_scale[i], V.to(self._dtype()))
        return out

    @torch.no_grad()
    def fit_input_scale(self, x: AdapterInput) -> "AdapterModel":
        """Set ``input_scale[k] = sqrt(mean ‖U_k V_kᵀ‖_F²)`` over the given adapters (``O((n+m) r²)``)."""
        pairs = x if isinstance(x, dict) else stack_factors([x] if isinstance(x, Adapter) else list(x),
                                                             dtype=self._dtype())
        for i, k in enumerate(self.names):
            U, V = pairs[k]
            sq = ((U.transpose(-1, -2) @ U) * (V.transpose(-1, -2) @ V)).sum((-1, -2))  # ‖U Vᵀ‖_F²
            self.input_scale[i] = sq.mean().clamp_min(1e-30).sqrt()
        return self

    def forward(self, x: AdapterInput) -> Tensor:
        return self.forward_pairs(self.pairs(x))

    def forward_pairs(self, pairs: Pairs) -> Tensor:
        """``pairs`` (already scaled) -> ``(N, out_dim)``."""
        raise NotImplementedError


def mlp_head(d_in: int, hidden: int, out: int, depth: int = 2) -> nn.Sequential:
    """``depth`` times (Linear, GELU), then a Linear to ``out``: the head of :class:`SVDMLP` and of
    GLNet's spectral path (built the same way, so one seed gives both the same initial weights)."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(d_in if i == 0 else hidden, hidden), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(hidden, out))


class GLNet(AdapterModel):
    """``GL(r)^L``-invariant model on adapters: an exact spectral path plus an equivariant residual.

    * **Spectral path** (the main one): an MLP on the exact top-``sv_k`` singular values of every
      module's ``U Vᵀ`` (QR of ``U`` and ``V``, then an SVD of the small ``r × r`` product:
      ``O((n + m) r²)``) -- the input and head of :class:`SVDMLP`, built first, so that under one
      seed its initial weights equal SVDMLP's.
    * **Equivariant residual** (``residual=True``): :class:`gradmeta.nn.FactorPairNet` -- per
      module, row-side equivariant maps on ``(U, V)`` with the sign-gated GL nonlinearity, an
      invariant ``U Vᵀ`` head on the learned ``h × h`` sketch ``W_U ΔW W_Vᵀ`` and its own top-
      ``svd_k`` singular values -- added through a scalar gate that starts at zero, so the model
      starts as the spectral MLP and learns what the spectrum misses (singular vectors).

    ``residual=False`` is the spectral path alone: same function and, with the same seed and
    training loop, the same trained model as :class:`SVDMLP` (tested). Whether a dataset needs
    the residual (:data:`VARIANTS`) is a model-selection question, answered on a validation split
    by :func:`gradmeta.lora.train` (and by the ``lora_predict`` task), never on the test set, with
    :func:`gradmeta.lora.select_variant`: the lower validation error, the spectral path alone on
    ties (or, with ``rule="one_se"``, unless the residual is better by more than one standard error).

    ``sv_k=0`` is the equivariant network alone. It is not among the variants selection chooses
    from: without the exact singular values nothing keeps it level with :class:`SVDMLP` when the
    test adapters differ from the validation ones (on a rank shift, trained on ranks 2 and 4 and
    tested on rank 8, it fell below SVDMLP while validating best); pass ``sv_k=0`` to use it.

    Input ``{module: (U (N, n, r), V (N, m, r))}`` (or adapters) -> ``(N, out_dim)``. Invariant to
    ``(U, V) -> (U R, V R⁻ᵀ)`` for any ``R ∈ GL(r)`` per module; rank-agnostic (any ``r``;
    zero-padded rank columns do not change the output).

    Args:
        shapes, out_dim: see :class:`AdapterModel`.
        hidden, channels, depth, svd_k, mlp_hidden: those of :class:`gradmeta.nn.FactorPairNet`.
        sv_k: singular values per module of the spectral path (0: no spectral path, the model of
            checkpoints saved before it existed); sv_hidden: its MLP width.
        residual: include the equivariant residual.
    """

    #: The variants model selection chooses from (kwargs on top of the user's), in preference order.
    VARIANTS = {"spectral": {"residual": False}, "spectral+equivariant": {"residual": True}}

    #: kwargs of checkpoints saved before they existed (see :func:`load_model`).
    LEGACY_KWARGS = {"sv_k": 0, "residual": True}

    def __init__(self, shapes: dict[str, tuple[int, int]], out_dim: int = 1, *, hidden: int = 8,
                 channels: int = 4, depth: int = 2, svd_k: int = 4, mlp_hidden: int = 64, sv_k: int = 16,
                 sv_hidden: int = 128, residual: bool = True):
        super().__init__(shapes, out_dim)
        if not sv_k and not residual:
            raise ValueError("GLNet: sv_k = 0 and residual = False leave nothing to compute")
        self.kwargs.update(hidden=hidden, channels=channels, depth=depth, svd_k=svd_k, mlp_hidden=mlp_hidden,
                           sv_k=sv_k, sv_hidden=sv_hidden, residual=bool(residual))
        self.sv_k, self.residual = sv_k, bool(residual)
        if sv_k:  # first: its initial weights are SVDMLP's under the same seed
            self.sv_mlp = mlp_head(sv_k * len(self.names), sv_hidden, out_dim)
        if residual:
            self.body = FactorPairNet(self.shapes, out_dim, hidden=hidden, channels=channels, depth=depth,
                                      svd_k=svd_k, mlp_hidden=mlp_hidden)
            if sv_k:
                self.gate = nn.Parameter(torch.zeros(()))

    def forward_pairs(self, pairs: Pairs) -> Tensor:
        if not self.sv_k:
            return self.body(pairs)
        out = self.sv_mlp(torch.cat([singular_value_features(*pairs[k], self.sv_k) for k in self.names], -1))
        return out + self.gate * self.body(pairs) if self.residual else out


def save_model(net: AdapterModel, path: str | os.PathLike, **extra) -> Path:
    """Save ``{"model": class name, "kwargs", "state_dict", **extra}`` (readable with weights_only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": type(net).__name__, "kwargs": net.kwargs, "state_dict": net.state_dict(), **extra}, path)
    return path


def load_model(path: str | os.PathLike) -> tuple[AdapterModel, dict]:
    """Inverse of :func:`save_model`: ``(model in eval mode, the extra entries)``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a model checkpoint (corrupt, code, or wrong content); the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model checkpoint")
    ckpt = safe_torch_load(path, "LoRA model checkpoint")
    if not isinstance(ckpt, dict) or not {"model", "kwargs", "state_dict"} <= set(ckpt):
        raise ValueError(f"{path} is not a gradmeta LoRA model checkpoint (needs 'model', 'kwargs' and 'state_dict'; "
                         "write it with gradmeta.lora.save_model or `gradmeta lora train`)")
    name = ckpt.get("model")
    if name not in MODELS:
        raise ValueError(f"{path}: unknown model class {name!r}; known: {sorted(MODELS)}")
    try:
        kwargs = {**getattr(MODELS[name], "LEGACY_KWARGS", {}), **dict(ckpt["kwargs"])}
        shapes, out_dim = kwargs.pop("shapes"), kwargs.pop("out_dim")
        net = MODELS[name](shapes, out_dim, **kwargs)
        net.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: the {name} checkpoint does not match its model "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    net.to(ckpt["state_dict"]["input_scale"].dtype).eval()
    return net, {k: v for k, v in ckpt.items() if k not in ("model", "kwargs", "state_dict")}
