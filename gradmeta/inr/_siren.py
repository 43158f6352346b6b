"""SIREN: the INR architecture (Sitzmann et al., 2020), as an ``nn.Module`` and as a pure function.

``f(x) = W₃ sin(ω₀(W₂ sin(ω₀(W₁ x + b₁)) + b₂)) + b₃`` with ``x ∈ [-1, 1]²`` a pixel coordinate.
Parameters are ``dict[str, Tensor]`` keyed ``layers.{0,1,2}.{weight,bias}`` (the module's
``named_parameters()`` names); every function here also accepts a *stack* of INRs, i.e. tensors
with one leading axis ``G`` (``layers.0.weight: (G, 32, 2)``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..nn import SymmetrySpec

__all__ = ["Siren", "siren_apply", "siren_init", "siren_spec", "pixel_grid", "param_names",
           "stack_params", "unstack_params", "DEFAULT_OMEGA0"]

DEFAULT_OMEGA0 = 30.0


def param_names(num_layers: int = 3) -> list[str]:
    """``["layers.0.weight", "layers.0.bias", ...]`` in ``named_parameters()`` order."""
    return [f"layers.{i}.{k}" for i in range(num_layers) for k in ("weight", "bias")]


def siren_apply(params: dict[str, Tensor], coords: Tensor, omega0: float = DEFAULT_OMEGA0) -> Tensor:
    """Evaluate one SIREN or a stack of them.

    Args:
        params: ``{name: tensor}``; one INR (``layers.0.weight: (h, 2)``) or a stack ``(G, h, 2)``.
        coords: ``(P, 2)`` coordinates shared by all INRs, or ``(G, P, 2)`` per INR.
        omega0: the frequency ``ω₀`` applied before every sine.

    Returns:
        ``(P, C)`` for one INR, ``(G, P, C)`` for a stack.
    """
    n = len(params) // 2
    x = coords
    for i in range(n):
        w, b = params[f"layers.{i}.weight"], params[f"layers.{i}.bias"]
        x = torch.matmul(x, w.transpose(-1, -2)) + b.unsqueeze(-2)
        if i < n - 1:
            x = torch.sin(omega0 * x)
    return x


def siren_init(num: int | None, out_channels: int = 1, hidden: int = 32, num_layers: int = 3,
               in_features: int = 2, omega0: float = DEFAULT_OMEGA0, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """The standard SIREN initialisation, for one INR (``num=None``) or a stack of ``num``.

    First layer ``W ~ U(-1/d_in, 1/d_in)``; later layers ``W ~ U(-√(6/d_in)/ω₀, √(6/d_in)/ω₀)``;
    biases ``U(-1/√d_in, 1/√d_in)`` (``nn.Linear``'s default, as in the reference code).
    """
    widths = [in_features] + [hidden] * (num_layers - 1) + [out_channels]
    lead = () if num is None else (num,)
    out = {}
    for i in range(num_layers):
        d_in, d_out = widths[i], widths[i + 1]
        bound = 1.0 / d_in if i == 0 else math.sqrt(6.0 / d_in) / omega0
        out[f"layers.{i}.weight"] = (torch.rand(*lead, d_out, d_in, generator=generator, dtype=dtype) * 2 - 1) * bound
        bb = 1.0 / math.sqrt(d_in)
        out[f"layers.{i}.bias"] = (torch.rand(*lead, d_out, generator=generator, dtype=dtype) * 2 - 1) * bb
    return out


def siren_spec(out_channels: int = 1, hidden: int = 32, num_layers: int = 3, in_features: int = 2) -> SymmetrySpec:
    """Neuron-permutation symmetry of a SIREN: an MLP chain whose hidden levels are permutable.

    Sine is elementwise, so permuting the hidden neurons (rows of ``W_l``, ``b_l`` and columns of
    ``W_{l+1}``) leaves the function unchanged. Written by hand because the ``ω₀·x`` scaling is not
    one of the elementwise operations ``gm.nn.symmetry_spec`` traces.
    """
    widths = [in_features] + [hidden] * (num_layers - 1) + [out_channels]
    return SymmetrySpec.chain({f"layers.{i}": (widths[i], widths[i + 1]) for i in range(num_layers)})


class Siren(nn.Module):
    """A SIREN ``in_features → hidden → … → out_channels`` (``num_layers`` linear layers).

    ``forward(coords (..., 2)) -> (..., out_channels)``; the same computation as
    :func:`siren_apply` on ``dict(self.named_parameters())``.
    """

    def __init__(self, out_channels: int = 1, hidden: int = 32, num_layers: int = 3, in_features: int = 2,
                 omega0: float = DEFAULT_OMEGA0, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        widths = [in_features] + [hidden] * (num_layers - 1) + [out_channels]
        self.omega0 = omega0
        #: ``(H, W)`` of the image this INR was fitted to (set by ``inr.fit``; ``None`` if unknown)
        self.image_size: tuple[int, int] | None = None
        self.layers = nn.ModuleList(nn.Linear(widths[i], widths[i + 1], dtype=dtype) for i in range(num_layers))
        self.load_params(siren_init(None, out_channels, hidden, num_layers, in_features, omega0, generator, dtype))

    @classmethod
    def from_params(cls, params: dict[str, Tensor], omega0: float = DEFAULT_OMEGA0) -> "Siren":
        """A module holding a copy of one INR's parameters (sizes read from the tensors)."""
        n = len(params) // 2
        w0, wl = params["layers.0.weight"], params[f"layers.{n - 1}.weight"]
        if w0.dim() != 2:
            raise ValueError(f"Siren.from_params expects one INR (2-D weights), got layers.0.weight {tuple(w0.shape)}")
        m = cls(wl.shape[0], w0.shape[0], n, w0.shape[1], omega0, dtype=w0.dtype)
        m.load_params(params)
        return m

    def load_params(self, params: dict[str, Tensor]) -> None:
        """Copy ``params`` (``{name: tensor}`` of one INR) into the module."""
        own = dict(self.named_parameters())
        if set(own) != set(params):
            raise KeyError(f"expected parameters {sorted(own)}, got {sorted(params)}")
        with torch.no_grad():
            for k, p in own.items():
                if p.shape != params[k].shape:
                    raise ValueError(f"{k}: shape {tuple(params[k].shape)} does not match the module's {tuple(p.shape)}")
                p.copy_(params[k])

    def params(self) -> dict[str, Tensor]:
        """Detached copy of the parameters, ``{name: tensor}``."""
        return {k: p.detach().clone() for k, p in self.named_parameters()}

    def forward(self, coords: Tensor) -> Tensor:
        x = coords
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.sin(self.omega0 * x)
        return x

    def render(self, H: int | tuple[int, int] | None = None, W: int | None = None) -> Tensor:
        """The image ``(C, H, W)`` on the ``H × W`` pixel-centre grid (no gradient).

        ``render(H, W)``, ``render((H, W))``, ``render(n)`` (``n × n``), or ``render()`` at :attr:`image_size`.
        """
        if H is None:
            if self.image_size is None:
                raise ValueError("Siren.render(): pass H, W (this INR does not know the size it was fitted to)")
            H, W = self.image_size
        elif W is None:
            H, W = H if isinstance(H, tuple) else (H, H)
        with torch.no_grad():
            out = self(pixel_grid(H, W, dtype=self.layers[0].weight.dtype).to(self.layers[0].weight.device))
        return out.T.reshape(-1, H, W)


def pixel_grid(H: int, W: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(H·W, 2)`` pixel-centre coordinates ``(x, y)`` in ``[-1, 1]``, row-major (y outer)."""
    ys = (torch.arange(H, dtype=dtype) + 0.5) / H * 2 - 1
    xs = (torch.arange(W, dtype=dtype) + 0.5) / W * 2 - 1
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], -1)


def stack_params(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """List of single-INR dicts -> one stacked dict ``{name: (G, ...)}``."""
    return {k: torch.stack([p[k] for p in items]) for k in items[0]}


def unstack_params(params: dict[str, Tensor]) -> list[dict[str, Tensor]]:
    """Stacked dict ``{name: (G, ...)}`` -> list of ``G`` single-INR dicts."""
    G = next(iter(params.values())).shape[0]
    return [{k: v[g] for k, v in params.items()} for g in range(G)]
