"""``GradMetaNet``: an equivariant network on a set of factored per-example gradients.

``GradMetaNet(..., variant=...)`` builds :class:`PooledGradMetaNet` (``"base"``) or
:class:`GradMetaNetPlusPlus` (``"plusplus"``); they differ only in the trunk between the neuron
encoder and the readout.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._inputs import NeuronLayout
from ._layers import (NEURON_ATTENTIONS, AttentionBlock, DataPool, Linear, NeuronDeepSets, ProductReadout,
                      SetNeuronLayer, linear)
from ._spec import SymmetrySpec, symmetry_spec

_READOUTS = ("invariant", "neuron", "weight")


class NeuronEncoder(nn.Module):
    """Raw space channels -> one bag ``(G, B, T, N, c)``: per-group embedding + positional codes.

    Hidden (permuted) spaces get a learned map of the sinusoidal (position, group) code of their
    space; fixed spaces additionally a learned vector per neuron (the neuron id).
    """

    def __init__(self, layout: NeuronLayout, c: int):
        super().__init__()
        self.layout = layout
        self.embed = nn.ModuleDict({g.replace(".", "_"): Linear(k, c) for g, k in layout.channels.items()})
        self.pos_map = Linear(c, c, bias=False)
        self.register_buffer("pos_code", torch.stack(
            [v for v in layout.positional(c).values()]).float(), persistent=False)
        self.ids = nn.ParameterDict({
            s.name.replace(".", "_"): nn.Parameter(torch.randn(s.size, c) * 0.1)
            for s in layout.spec.spaces if not s.permutable})

    def forward(self, feats: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        pos = self.pos_map(self.pos_code.to(self.pos_map.weight.dtype))
        spaces = self.layout.spec.spaces
        embeds = [self.embed[self.layout.group_of[s.name].replace(".", "_")] for s in spaces]
        # every additive term (embedding bias, positional code, neuron id) is summed on the small
        # (n, c) side first, then added to the full-size (G, B, T, n, c) product once
        shifts = []
        for k, (s, emb) in enumerate(zip(spaces, embeds)):
            shift = emb.bias + pos[k]
            if not s.permutable:
                shift = shift + self.ids[s.name.replace(".", "_")]
            shifts.append(shift.expand(s.size, -1))

        def raw(name: str) -> torch.Tensor:  # (G, B, T, n, ch)
            x = feats[0][name].unsqueeze(0) if len(feats) == 1 else torch.stack([f[name] for f in feats])
            return x.to(pos.dtype)

        if len({id(e) for e in embeds}) == 1:  # one embedding for every space: one product on the whole bag
            x = torch.cat([raw(s.name) for s in spaces], -2)
            return linear(x, embeds[0].weight) + torch.cat(shifts, 0)
        return torch.cat([linear(raw(s.name), emb.weight) + shift for s, emb, shift in zip(spaces, embeds, shifts)],
                         -2)


class GradMetaNet(nn.Module):
    """Equivariant network over a set of factored per-example gradients.

    Exactly equivariant to the neuron permutations of ``spec`` and invariant to the order of the
    data (and of the tokens inside a datum); every set axis is mean-pooled, so any batch size and
    token count work. Build with ``GradMetaNet.for_model``; ``GradMetaNet(..., variant=v)``
    returns the subclass for ``v``: :class:`PooledGradMetaNet` (``"base"``) or
    :class:`GradMetaNetPlusPlus` (``"plusplus"``).

    Args:
        spec: the model's ``SymmetrySpec``.
        readout: ``"invariant"`` -> ``(out_dim,)``; ``"neuron"`` -> ``{space_name: (n, out_dim)}``;
            ``"weight"`` -> ``{param_name: tensor shaped like the parameter}`` (``(*shape, out_dim)``
            when ``out_dim > 1``).
        out_dim: output channels.
        variant: ``"base"`` (set×neuron layers, pool over data, neuron DeepSets, product readout)
            or ``"plusplus"`` (attention across data and across neurons, per-datum product readout
            averaged over the data).
        weight_aware: feed biases as neuron channels and ``W[i, j]`` into the product readout;
            then ``forward`` needs ``params``.
        channels, set_layers, neuron_layers, heads: sizes.
        extra_channels: extra per-neuron input channels passed as ``forward(extra=...)``.
        edge_channels: extra per-entry readout channels passed as ``forward(edges=...)``.
        neuron_attention: GradMetaNet++ only: its attention across neurons, ``"softmax"`` (the
            paper's, ``O(S·N²)`` per block) or ``"linear"`` (``O(S·N)``, see
            :func:`gradmeta.nn.linear_attention`), one of ``NEURON_ATTENTIONS``.
        product: the per-weight readout (``readout="weight"`` only), one of ``PRODUCTS``. ``"gelu"``
            (default, :class:`GeluReadout`): ``w₂·gelu(U h[X_i] + V h[Y_j] + ...)``, on the
            data-pooled features for ``"base"``, per datum then averaged for ``"plusplus"``.
            ``"bilinear"`` (:class:`BilinearReadout`): ``MLP(mean_s (U h_s[X_i]) ⊙ (V h_s[Y_j]))``,
            so means of per-datum products such as ``mean_b δ_b[i] a_b[j]`` are read exactly; for
            ``"base"`` it reads the per-datum features *before* data pooling: ``h_s = g⁰_s + g_s +
            h_pool`` (the embedding, the last set×neuron layer and the pooled neuron-DeepSets
            features, broadcast over the data).
    """

    variant: str = ""

    def __new__(cls, *args, **kwargs):
        if cls is GradMetaNet:
            variant = kwargs.get("variant", args[3] if len(args) > 3 else None) or "base"
            if variant not in _VARIANTS:
                raise ValueError(f"variant must be one of {tuple(_VARIANTS)}, got {variant!r}")
            cls = _VARIANTS[variant]
        return super().__new__(cls)

    def __init__(self, spec: SymmetrySpec, readout: str = "invariant", out_dim: int = 1,
                 variant: str | None = None, weight_aware: bool = False, channels: int = 32,
                 set_layers: int = 4, neuron_layers: int = 2, heads: int = 4, extra_channels: int = 0,
                 edge_channels: int = 0, product: str = "gelu", neuron_attention: str = "softmax"):
        super().__init__()
        if variant is not None and variant != self.variant:
            raise ValueError(f"{type(self).__name__} is the {self.variant!r} variant, got variant={variant!r}")
        if readout not in _READOUTS:
            raise ValueError(f"readout must be one of {_READOUTS}, got {readout!r}")
        if product != "gelu" and readout != "weight":
            raise ValueError(f"product={product!r} is a per-weight readout; it needs readout='weight'")
        if neuron_attention not in NEURON_ATTENTIONS:
            raise ValueError(f"neuron_attention must be one of {NEURON_ATTENTIONS}, got {neuron_attention!r}")
        if neuron_attention != "softmax" and self.variant != "plusplus":
            raise ValueError(f"neuron_attention={neuron_attention!r} chooses the attention across neurons of "
                             f"GradMetaNet++ (variant='plusplus'); the {self.variant!r} variant has none")
        self.neuron_attention = neuron_attention
        self.spec, self.readout, self.out_dim = spec, readout, out_dim
        self.weight_aware, self.product = weight_aware, product
        self.layout = NeuronLayout(spec, weight_aware, extra_channels)
        c = channels
        self.encoder = NeuronEncoder(self.layout, c)
        self._init_trunk(c, set_layers, neuron_layers, heads)
        if readout == "weight":
            self.head = ProductReadout(spec, self.layout.offsets, c, c, out_dim,
                                       edge_channels + int(weight_aware), param_ids=spec.arch != "mlp",
                                       product=product)
        else:
            self.head = Linear(c, out_dim)

    def _init_trunk(self, c: int, set_layers: int, neuron_layers: int, heads: int) -> None:
        raise NotImplementedError

    def _trunk(self, g0: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Encoded bag ``g0 = g`` ``(G, B, T, N, c)`` -> neuron features ``(G, N, c)`` or ``(G, S, N, c)``."""
        raise NotImplementedError

    @classmethod
    def for_model(cls, model: nn.Module, readout: str = "invariant", out_dim: int = 1,
                  variant: str | None = None, weight_aware: bool = False, spec: SymmetrySpec | None = None,
                  **kwargs) -> "GradMetaNet":
        """Size a network for ``model``'s architecture (spec derived by ``symmetry_spec`` unless given).

        ``variant`` defaults to ``"base"`` (or to the subclass's own variant)."""
        spec = spec if spec is not None else symmetry_spec(model)
        spec.check(model)
        return cls(spec, readout, out_dim, variant, weight_aware, **kwargs)

    # ------------------------------------------------------------------------------ forward
    def forward(self, gs, params: dict[str, torch.Tensor] | Sequence[dict] | None = None,
                extra=None, edges=None):
        """Apply to one ``GradientSet`` or a list of them (same architecture).

        Args:
            gs: a ``GradientSet`` or a list of them; a list gives outputs with a leading axis.
            params: ``{param_name: tensor}`` (or one per gradient set) for the weight-aware variant.
            extra: ``{space_name: (B, T, n, k)}`` (or one per set) extra neuron channels.
            edges: ``{param_name: (*param.shape, e)}`` (or one per set) extra per-entry readout features.
        """
        single = not isinstance(gs, (list, tuple))
        sets = [gs] if single else list(gs)
        per = lambda x: [x] * len(sets) if x is None or isinstance(x, dict) else list(x)  # noqa: E731
        params_l, extra_l, edges_l = per(params), per(extra), per(edges)
        shapes = {(s.batch_size, s[self.spec.layers[0].module].backprops.shape[1]) for s in sets}
        if len(shapes) > 1:  # different B or T: run one by one
            outs = [self._forward([s], [p], [x], [e]) for s, p, x, e in zip(sets, params_l, extra_l, edges_l)]
            out = _cat(outs)
        else:
            out = self._forward(sets, params_l, extra_l, edges_l)
        return _index0(out) if single else out

    def _forward(self, sets, params_l, extra_l, edges_l):
        feats = [self.layout.features(s, p, x) for s, p, x in zip(sets, params_l, extra_l)]
        g0 = g = self.encoder(feats)  # (G, B, T, N, c)
        h = self._trunk(g0, g)
        if self.readout == "invariant":
            return self.head(h.mean(-2) if h.dim() == 3 else h.mean((1, 2)))
        if self.readout == "neuron":
            y = self.head(h if h.dim() == 3 else h.mean(1))
            return {s.name: y[:, slice(*self.layout.offsets[s.name])] for s in self.spec.spaces}
        return self.head(h, self._edges(params_l, edges_l, h))

    def _edges(self, params_l, edges_l, h):
        parts = []
        if self.weight_aware:
            parts.append({n: torch.stack([p[n] for p in params_l]).to(h).unsqueeze(-1)
                          for n, _ in self.spec.params})
        if edges_l[0] is not None:
            parts.append({n: torch.stack([e[n] for e in edges_l]).to(h) for n, _ in self.spec.params})
        if not parts:
            return None
        return {n: torch.cat([p[n] for p in parts], -1) for n, _ in self.spec.params}


class PooledGradMetaNet(GradMetaNet):
    """GradMetaNet, ``variant="base"``: set×neuron layers, pooling over the data, neuron DeepSets.

    Neuron features ``(G, N, c)``; with the bilinear readout, per-datum features ``(G, B·T, N, c)``
    read before the data pooling (see :class:`GradMetaNet`)."""

    variant = "base"

    def _init_trunk(self, c: int, set_layers: int, neuron_layers: int, heads: int) -> None:
        self.set_layers = nn.ModuleList(SetNeuronLayer(c, c) for _ in range(set_layers))
        self.pool = DataPool(c, c)
        self.neuron_layers = nn.ModuleList(NeuronDeepSets(c, c) for _ in range(neuron_layers))

    def _trunk(self, g0: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        # channels first through the set×neuron layers: (G, c, B, T, N), contiguous (the encoder's
        # few-channel product already lays g out so)
        x = g.movedim(-1, 1)
        for k, layer in enumerate(self.set_layers):
            x = layer.forward_channels_first(x if k == 0 else F.gelu(x))
        h = self.pool.forward_channels_first(F.gelu(x))
        for layer in self.neuron_layers:
            h = layer(F.gelu(h))
        if self.readout == "weight" and self.product == "bilinear":  # per datum, before pooling
            g = x.movedim(1, -1)
            G, B, T, N, c = g.shape
            h = (g0 + g).reshape(G, B * T, N, c) + h.unsqueeze(1)
        return h


class GradMetaNetPlusPlus(GradMetaNet):
    """GradMetaNet++, ``variant="plusplus"``: attention across the data and across the neurons;
    per-datum neuron features ``(G, B·T, N, c)``, read per datum and averaged over the data."""

    variant = "plusplus"

    def _init_trunk(self, c: int, set_layers: int, neuron_layers: int, heads: int) -> None:
        # no final LayerNorm: it would divide out the magnitude of every (datum, neuron)
        # feature, and the per-datum readout needs magnitudes to form products like δ_i a_j
        self.blocks = nn.ModuleList(AttentionBlock(c, heads, self.neuron_attention) for _ in range(set_layers))

    def _trunk(self, g0: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        G, B, T, N, c = g.shape
        h = g.reshape(G, B * T, N, c).contiguous()  # channels last: the layer norms and attention read rows
        for block in self.blocks:
            h = block(h)
        return h


_VARIANTS = {"base": PooledGradMetaNet, "plusplus": GradMetaNetPlusPlus}


def _cat(outs):
    if isinstance(outs[0], dict):
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    return torch.cat(outs)


def _index0(out):
    if isinstance(out, dict):
        return {k: v[0] for k, v in out.items()}
    return out[0]
