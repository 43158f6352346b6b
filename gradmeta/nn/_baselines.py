"""Baselines that GradMetaNet is compared with: the same tasks without its inputs or symmetries.

* ``PerParamDeepSets``: each parameter entry sees only its own set ``{g_b[i, j]}_b`` of
  per-example gradient entries (materialised: ``B × P``), ``ρ(mean_b φ(g_b[i,j]))``; the function
  is shared by all entries (the per-parameter learned-optimizer baseline).
* ``FlatFactorMLP``: an MLP on every datum's flattened factors ``(A, Δ)`` of all layers, mean over
  data (so any batch size), no neuron symmetry; needs a fixed architecture and token count.
* ``AveragedGradientNet``: the same neuron blocks fed the mean gradient only (a weight-space net):
  row/column statistics of ``ḡ`` as neuron features, neuron DeepSets, product readout with ``ḡ[i,j]``
  (and optionally ``W[i,j]``) as per-entry input. Exactly equivariant to the spec's permutations.

All outputs follow ``GradMetaNet``: ``"invariant"`` -> ``(out_dim,)``, ``"weight"`` -> ``{param_name:
tensor shaped like the parameter}``; a list of gradient sets adds a leading axis.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._inputs import NeuronLayout
from ._layers import NeuronDeepSets, ProductReadout
from ._models import NeuronEncoder
from ._spec import SymmetrySpec, symmetry_spec


def _as_list(gs):
    return (False, list(gs)) if isinstance(gs, (list, tuple)) else (True, [gs])


def _stack_out(outs, single):
    if isinstance(outs[0], dict):
        out = {k: torch.stack([o[k] for o in outs]) for k in outs[0]}
        return {k: v[0] for k, v in out.items()} if single else out
    out = torch.stack(outs)
    return out[0] if single else out


class PerParamDeepSets(nn.Module):
    """Per-parameter DeepSets over the per-example gradient entries of every weight.

    Args:
        param_names: parameters to read out (default: all of the gradient set).
        hidden: width of φ and ρ.
        weight_aware: also feed the parameter value to every element.
    Input ``gs`` -> ``{param_name: param.shape}`` (``out_dim = 1``).
    """

    def __init__(self, hidden: int = 32, weight_aware: bool = False):
        super().__init__()
        self.weight_aware = weight_aware
        c = 1 + int(weight_aware)
        self.phi = nn.Sequential(nn.Linear(c, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.rho = nn.Sequential(nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))

    @classmethod
    def for_model(cls, model: nn.Module, **kwargs) -> "PerParamDeepSets":
        return cls(**kwargs)

    def forward(self, gs, params=None):
        single, sets = _as_list(gs)
        outs = []
        for s in sets:
            out = {}
            for name, g in s.per_example_grads().items():  # (B, *shape)
                x = g.unsqueeze(-1)
                if self.weight_aware:
                    if params is None:
                        raise ValueError("weight-aware: pass params=dict(model.named_parameters())")
                    x = torch.cat([x, params[name].to(g).expand_as(g).unsqueeze(-1)], -1)
                out[name] = self.rho(self.phi(x).mean(0)).squeeze(-1)
            outs.append(out)
        return _stack_out(outs, single)


class FlatFactorMLP(nn.Module):
    """MLP on each datum's flattened factors of every layer, mean over data, then a linear head.

    Args:
        spec: architecture (factor sizes); ``tokens``: ``T`` of the gradient sets it will see.
        readout: ``"invariant"`` (``out_dim``) or ``"weight"`` (one output per parameter entry).
    """

    def __init__(self, spec: SymmetrySpec, readout: str = "invariant", out_dim: int = 1,
                 hidden: int = 128, tokens: int = 1):
        super().__init__()
        self.spec, self.readout, self.tokens = spec, readout, tokens
        d = tokens * sum(spec.axis_size(lm.in_spaces) + spec.axis_size(lm.out_spaces) for lm in spec.layers)
        self.shapes = {p: tuple(spec.axis_size(a) for a in axes) for p, axes in spec.params}
        n_out = out_dim if readout == "invariant" else sum(int(torch.Size(s).numel()) for s in self.shapes.values())
        self.body = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())
        self.head = nn.Linear(hidden, n_out)

    @classmethod
    def for_model(cls, model: nn.Module, readout: str = "invariant", out_dim: int = 1, **kwargs):
        return cls(symmetry_spec(model), readout, out_dim, **kwargs)

    def forward(self, gs):
        single, sets = _as_list(gs)
        outs = []
        for s in sets:
            parts = []
            for lm in self.spec.layers:
                for t in (s[lm.module].activations, s[lm.module].backprops):
                    if t.shape[1] != self.tokens:
                        raise ValueError(f"FlatFactorMLP was built for T={self.tokens}; layer "
                                         f"{lm.module!r} has T={t.shape[1]}")
                    parts.append(t.reshape(t.shape[0], -1))
            y = self.head(self.body(torch.cat(parts, -1).to(self.head.weight.dtype)).mean(0))
            if self.readout == "weight":
                out, k = {}, 0
                for p, shp in self.shapes.items():
                    n = int(torch.Size(shp).numel())
                    out[p], k = y[k:k + n].reshape(shp), k + n
                y = out
            outs.append(y)
        return _stack_out(outs, single)


class _WeightLayout(NeuronLayout):
    """Neuron channels from per-parameter tensors: for each space, the mean and mean square of
    every 2-axis parameter along its other axis, and every 1-axis parameter's value."""

    def __init__(self, spec: SymmetrySpec):
        super().__init__(spec)
        self.channels, self.group_of = {}, {}
        for s in spec.spaces:
            c = sum(2 if len(axes) == 2 else 1 for _, axes in spec.params for ax in axes if s.name in ax)
            if self.channels.setdefault(s.kind, c) != c:
                raise ValueError(f"spaces of kind {s.kind!r} have different parameter incidences")
            self.group_of[s.name] = s.kind

    def features(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{space: (1, 1, n, c)}`` from ``{param_name: tensor}``."""
        out = {}
        for s in self.spec.spaces:
            chans = []
            for p, axes in self.spec.params:
                for k, ax in enumerate(axes):
                    if s.name not in ax:
                        continue
                    off = sum(self.spec.space(x).size for x in ax[:ax.index(s.name)])
                    t = tensors[p].narrow(k, off, s.size)
                    if len(axes) == 1:
                        chans.append(t)
                    else:
                        t = t if k == 0 else t.T
                        chans += [t.mean(1), (t ** 2).mean(1)]
            out[s.name] = torch.stack(chans, -1)[None, None]
        return out


class AveragedGradientNet(nn.Module):
    """Weight-space net on the mean gradient only (what a gradient-set model is compared to).

    Exactly equivariant to the spec's permutations. ``readout``: ``"invariant"`` or ``"weight"``.
    """

    def __init__(self, spec: SymmetrySpec, readout: str = "weight", out_dim: int = 1,
                 weight_aware: bool = False, channels: int = 32, layers: int = 3):
        super().__init__()
        self.spec, self.readout, self.weight_aware = spec, readout, weight_aware
        self.layout = _WeightLayout(spec)
        self.encoder = NeuronEncoder(self.layout, channels)
        self.layers = nn.ModuleList(NeuronDeepSets(channels, channels) for _ in range(layers))
        if readout == "weight":
            self.head = ProductReadout(spec, self.layout.offsets, channels, channels, out_dim,
                                       edge_channels=1 + int(weight_aware), param_ids=spec.arch != "mlp")
        else:
            self.head = nn.Linear(channels, out_dim)

    @classmethod
    def for_model(cls, model: nn.Module, readout: str = "weight", out_dim: int = 1, **kwargs):
        return cls(symmetry_spec(model), readout, out_dim, **kwargs)

    def forward(self, gs, params=None):
        """``gs``: a ``GradientSet`` (its mean gradient is used) or a ``{param_name: mean grad}`` dict."""
        single, sets = _as_list(gs)
        grads = [s if isinstance(s, dict) else s.mean_grad() for s in sets]
        dtype = self.encoder.pos_map.weight.dtype
        h = self.encoder([self.layout.features({k: v.to(dtype) for k, v in g.items()}) for g in grads])[:, 0, 0]
        for layer in self.layers:
            h = layer(F.gelu(h))
        if self.readout != "weight":
            out = self.head(h.mean(-2))
            return out[0] if single else out
        edges = {p: torch.stack([g[p] for g in grads]).to(dtype).unsqueeze(-1) for p, _ in self.spec.params}
        if self.weight_aware:
            if params is None:
                raise ValueError("weight-aware: pass params=dict(model.named_parameters())")
            plist = [params] * len(grads) if isinstance(params, dict) else list(params)
            edges = {p: torch.cat([e, torch.stack([q[p] for q in plist]).to(e).unsqueeze(-1)], -1)
                     for p, e in edges.items()}
        out = self.head(h, edges)
        return {k: v[0] for k, v in out.items()} if single else out
