"""Equivariant layers over (data × tokens × neurons) and the readouts.

Shapes: a batch of ``G`` gradient sets, ``B`` data, ``T`` tokens, ``N`` neurons (one bag over
every space of the spec), ``c`` channels. Set-valued axes are always *mean*-pooled, so a trained
layer accepts any ``B``, ``T`` (and any width of a permuted space).

* ``SetNeuronLayer``: ``(G, B, T, N, c) -> (G, B, T, N, c')``, equivariant to ``S_B × S_N`` (and
  ``S_T`` inside each datum); ``forward_channels_first`` maps ``(G, c, B, T, N)`` (faster on a CPU).
* ``DataPool``: ``(G, B, T, N, c) -> (G, N, c')``, invariant to data/token order.
* ``NeuronDeepSets``: ``(G, N, c) -> (G, N, c')``.
* ``AttentionBlock`` (GradMetaNet++): attention across data per neuron and across neurons per datum.
* ``ProductReadout``: one output per parameter entry, ``Ŵ[i, j] = MLP(h_X[i], h_Y[j], edge[i, j])``;
  ``GeluReadout`` (additive, then gelu) and ``BilinearReadout`` (mean of per-datum products).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._spec import SymmetrySpec

#: Names of the per-weight product readouts (``product=`` of ``ProductReadout`` and ``GradMetaNet``):
#: ``"gelu"`` (:class:`GeluReadout`) and ``"bilinear"`` (:class:`BilinearReadout`).
PRODUCTS = ("gelu", "bilinear")


#: A :class:`Linear` with at most this many outputs multiplies as ``weight @ xᵀ`` on a CPU.
_ROWS_LAST_MAX_OUT = 8


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, ``x (..., c_in) -> (..., c_out)``.

    With at most 8 outputs on a CPU it is computed as ``weight @ xᵀ`` (the long row axis last; the
    result is a transposed view): BLAS runs that several times faster than ``x @ weightᵀ`` for so
    few channels (GradMetaNet's typical widths), under ``vmap`` too.
    """
    c_out, c_in = weight.shape
    if c_out > _ROWS_LAST_MAX_OUT or x.dim() < 2 or x.device.type != "cpu":
        return F.linear(x, weight, bias)
    # (c_in, rows): a view both for a channels-last x and for one laid out channels-first (as returned here)
    rows = x.movedim(-1, 0).reshape(c_in, -1) if x.stride(-1) != 1 else x.reshape(-1, c_in).T
    y = torch.mm(weight, rows) if bias is None else torch.addmm(bias.unsqueeze(1), weight, rows)
    return y.T.view(*x.shape[:-1], c_out)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and initialisation) whose product is :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def _mix(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Channel map of a channels-first tensor: ``x (G, c_in, *rest) -> (G, c_out, *rest)``, one
    ``(c_out, c_in) @ (c_in, Π rest)`` product per ``G``."""
    G, c_in, *rest = x.shape
    if G == 1:  # one plain product (under vmap: one batched product, no broadcasting matmul)
        return torch.mm(weight, x.reshape(c_in, -1)).view(1, weight.shape[0], *rest)
    return torch.matmul(weight, x.reshape(G, c_in, -1)).view(G, weight.shape[0], *rest)


class SetNeuronLayer(nn.Module):
    """Exchangeable layer: ``M₁g + M₂ mean_t g + M₃ mean_{b,t} g + M₄ mean_n g + M₅ mean_{b,t,n} g + bias``."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.self_ = Linear(c_in, c_out)
        self.pools = nn.ModuleList(Linear(c_in, c_out, bias=False) for _ in range(4))

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        """``(G, B, T, N, c) -> (G, B, T, N, c')`` (computed channels first: the result is a view of
        a ``(G, c', B, T, N)`` tensor)."""
        return self.forward_channels_first(g.movedim(-1, 1)).movedim(1, -1)

    def forward_channels_first(self, x: torch.Tensor) -> torch.Tensor:
        """The same map on channels-first features: ``(G, c, B, T, N) -> (G, c', B, T, N)``, contiguous.

        Every product is ``(c', c) @ (c, ·)`` over a long contiguous axis and every mean and
        addition runs along contiguous rows, which on a CPU is faster than the channels-last
        layout for few channels (and under ``vmap`` too); a trunk of these layers stays channels
        first from one layer to the next.
        """
        tok, data, neuron, everything = self.pools
        x = x.contiguous()
        T = x.shape[3]
        if T == 1:  # one token: mean_t g = g, fold M₂ into M₁ (one full-size product)
            out = _mix(self.self_.weight + tok.weight, x)
        else:
            out = _mix(self.self_.weight, x).add_(_mix(tok.weight, x.mean(3, keepdim=True)))
        pooled_n = x.mean(4, keepdim=True)                             # (G, c, B, T, 1)
        pooled_d = x.mean((2, 3), keepdim=True)                        # (G, c, 1, 1, N)
        # the bias joins the small (G, c', 1, 1, N) terms: two broadcast adds on the full-size tensor
        small = (_mix(data.weight, pooled_d) + _mix(everything.weight, pooled_d.mean(4, keepdim=True))
                 + self.self_.bias.view(-1, 1, 1, 1))
        return out.add_(small).add_(_mix(neuron.weight, pooled_n))


class NeuronDeepSets(nn.Module):
    """``h[n] = M₁ h[n] + M₂ mean_n h``; ``(G, N, c) -> (G, N, c')``."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.m1 = Linear(c_in, c_out)
        self.m2 = Linear(c_in, c_out, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.m1(h) + self.m2(h.mean(-2, keepdim=True))


class DataPool(NeuronDeepSets):
    """Pool over data and tokens: ``h[n] = M₁ mean_{b,t} g[·,·,n] + M₂ mean_{b,t,n} g``; ``(G,B,T,N,c) -> (G,N,c')``
    (a :class:`NeuronDeepSets` on the data-and-token mean)."""

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return super().forward(g.mean((1, 2)))

    def forward_channels_first(self, x: torch.Tensor) -> torch.Tensor:
        """The same pool of channels-first features ``(G, c, B, T, N) -> (G, N, c')``."""
        return super().forward(x.mean((2, 3)).transpose(1, 2))


#: Explicit attention materialises the ``(L, L)`` scores of at most about this many elements at a
#: time (per vmapped sample): memory stays bounded for long sequences, and the scores of a chunk
#: stay in cache between the product, the softmax and the second product.
_SCORES_ELEMENTS = 1 << 15


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``softmax(scale · q kᵀ) v`` along the sequence axis: ``q, k, v (..., L, d) -> (..., L, d)``;
    ``scale`` defaults to ``1/√d``.

    Equal to ``F.scaled_dot_product_attention`` (no mask). On a CPU, when no autograd graph is
    recorded (e.g. PES steps of a learned optimizer under ``vmap``), it is computed explicitly, by
    matrix products and a softmax over chunks of the leading (sequence) axes of about
    ``_SCORES_ELEMENTS`` scores: those ops have ``vmap`` batching rules, whereas the CPU attention
    kernel has none and would run once per vmapped sample. When a graph is recorded, and on other
    devices, the fused kernel is used: it saves no ``(L, L)`` score matrix for backward, whereas
    the explicit form (:func:`explicit_attention`) keeps all of them.
    """
    if q.device.type != "cpu" or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                                                or v.requires_grad)):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return explicit_attention(q, k, v, scale)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """:func:`attention` by matrix products and a softmax over chunks of about ``_SCORES_ELEMENTS``
    scores (``vmap``-able; under autograd it keeps every chunk's ``(L, L)`` probabilities)."""
    *lead, L, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    if scale != 1:
        q = q * scale
    n = math.prod(lead)
    rows = max(1, _SCORES_ELEMENTS // max(L * L, 1))
    if n <= rows:
        return _attend(q, k, v)
    q, k, v = q.reshape(n, L, d), k.reshape(n, L, d), v.reshape(n, L, d)
    return torch.cat([_attend(q[a:a + rows], k[a:a + rows], v[a:a + rows]) for a in range(0, n, rows)]
                     ).view(*lead, L, d)


def _attend(q, k, v):
    """``softmax(q kᵀ) v`` computed as ``(vᵀ aᵀ)ᵀ`` with the transposed weights ``aᵀ = softmax(k qᵀ)``
    normalised along their first axis: on a CPU the product is faster for few channels, and the
    softmax kernel is up to 4× faster along a non-last axis of short sequences (8 or 16 data)."""
    a_t = torch.softmax(torch.matmul(k, q.transpose(-1, -2)), -2)           # (..., L_k, L_q)
    return torch.matmul(v.transpose(-1, -2), a_t).transpose(-1, -2)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Linear attention along the sequence axis: ``q, k, v (..., L, d) -> (..., L, d)``,
    ``y_i = φ(q_i)ᵀ (mean_j φ(k_j) v_jᵀ) / (φ(q_i) · mean_j φ(k_j))`` with ``φ = elu + 1 > 0``
    (Katharopoulos et al., 2020).

    Like softmax attention, every output is a convex combination of the values, with weights
    ``φ(q_i)·φ(k_j) / Σ_j' φ(q_i)·φ(k_j')``, and permuting the sequence permutes the output; the
    cost is ``O(L·d²)`` instead of ``O(L²·d)``: no ``(L, L)`` matrix is formed. Means (not sums) over
    ``j`` keep the intermediate sizes independent of ``L``; the ratio is the same.
    """
    fq, fk = F.elu(q).add_(1), F.elu(k).add_(1)
    L, d = k.shape[-2], v.shape[-1]
    kv = torch.matmul(fk.transpose(-1, -2), v) / L                          # (..., d, d)
    z = fk.mean(-2).unsqueeze(-1)                                            # (..., d, 1)
    # numerators and denominators from one product: φ(q_i) @ [kv | z]
    nd = torch.matmul(fq, torch.cat([kv, z], -1))                            # (..., L, d + 1)
    return nd[..., :d] / nd[..., d:]


#: Kinds of attention across neurons in a GradMetaNet++ block (:class:`AttentionBlock`).
NEURON_ATTENTIONS = ("softmax", "linear")


def _normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.layer_norm(x, x.shape[-1:], eps=eps)`` (no affine map), its two row means taken as
    matrix products with a ``(c, 1)`` column of ``1/c``: with few channels (rows of 8 numbers)
    that takes about half the time of the layer-norm kernel on a CPU."""
    col = torch.full((x.shape[-1], 1), 1.0 / x.shape[-1], dtype=x.dtype, device=x.device)
    xc = x - torch.matmul(x, col)
    return xc * torch.rsqrt(torch.matmul(xc * xc, col) + eps)


def _normed_linear(x: torch.Tensor, norm: nn.LayerNorm, lin: nn.Linear) -> torch.Tensor:
    """``lin(norm(x))`` with the norm's affine map folded into the linear map (``W diag(γ)``,
    ``b + W β``): the full-size tensor is normalised once, never scaled and shifted."""
    xhat = _normalize(x, norm.eps)
    return linear(xhat, lin.weight * norm.weight, torch.addmv(lin.bias, lin.weight, norm.bias))


class _MHA(nn.Module):
    """Multi-head self-attention without positions (permutation equivariant along the sequence).

    ``forward(x, dim, norm)``: ``x (..., c)`` attended along its axis ``dim`` (the other axes index
    independent sequences), after the layer norm ``norm`` if given; same shape out. The queries,
    keys and values are the first, second and third ``c`` outputs of ``qkv``, each split into
    ``heads`` consecutive slices of ``c / heads``. ``kind``: ``"softmax"`` (scaled dot-product
    attention) or ``"linear"`` (:func:`linear_attention`, ``O(L)`` in the sequence length).
    """

    def __init__(self, c: int, heads: int, kind: str = "softmax"):
        super().__init__()
        if c % heads:
            raise ValueError(f"channels={c} not divisible by heads={heads}")
        if kind not in NEURON_ATTENTIONS:
            raise ValueError(f"attention kind must be one of {NEURON_ATTENTIONS}, got {kind!r}")
        self.heads, self.kind = heads, kind
        self.qkv = Linear(c, 3 * c)
        self.out = Linear(c, c)

    def forward(self, x: torch.Tensor, dim: int = -2, norm: nn.LayerNorm | None = None) -> torch.Tensor:
        c = x.shape[-1]
        h, d = self.heads, c // self.heads
        w, b = self.qkv.weight, self.qkv.bias
        if norm is not None:  # the norm's affine map folded into qkv: the full-size tensor is only normalised
            x = _normalize(x, norm.eps)
            w, b = w * norm.weight, torch.addmv(b, w, norm.bias)
        # Exact rewrites that spare full-size passes. Both kinds: the value bias comes out of the
        # attention unchanged (each row of weights sums to 1) and joins the output bias. Softmax:
        # the scale 1/√d goes into the query map; the key bias adds q·b_k to every score of a row,
        # which the softmax ignores. (Linear attention needs both biases: φ is not linear.)
        softmax = self.kind == "softmax"
        scale = d ** -0.5 if softmax else 1.0
        b_q, b_k, b_v = b.split(c)
        qkv = linear(x, torch.cat([w[:c] * scale, w[c:]])).movedim(dim, -2)        # (..., L, 3c)
        *lead, L, _ = qkv.shape
        qkv = qkv.view(*lead, L, 3, h, d).movedim(-3, 0).transpose(-3, -2)          # (3, ..., h, L, d)
        q = qkv[0] + (b_q * scale).view(h, 1, d)
        if softmax:
            y = attention(q, qkv[1], qkv[2], scale=1.0)                             # (..., h, L, d)
        else:
            y = linear_attention(q, qkv[1] + b_k.view(h, 1, d), qkv[2])
        y = y.transpose(-3, -2).reshape(*lead, L, c)
        return linear(y, self.out.weight, torch.addmv(self.out.bias, self.out.weight, b_v)).movedim(-2, dim)


class AttentionBlock(nn.Module):
    """GradMetaNet++ block on ``(G, S, N, c)`` (``S = B·T`` set elements).

    Pre-norm residual: attention across the data axis for every neuron, then across neurons for
    every datum, then a channel MLP. Equivariant to ``S_S × S_N``. ``neuron_attention``: the
    attention across neurons, ``"softmax"`` (``O(S·N²·c)``) or ``"linear"``
    (:func:`linear_attention`, ``O(S·N·c²/heads)``: cheaper when ``N`` exceeds the head dimension).
    """

    def __init__(self, c: int, heads: int = 4, neuron_attention: str = "softmax"):
        super().__init__()
        self.n1, self.n2, self.n3 = nn.LayerNorm(c), nn.LayerNorm(c), nn.LayerNorm(c)
        self.data_attn = _MHA(c, heads)
        self.neuron_attn = _MHA(c, heads, neuron_attention)
        self.mlp = nn.Sequential(Linear(c, 2 * c), nn.GELU(), Linear(2 * c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.data_attn(x, dim=-3, norm=self.n1)
        x = x + self.neuron_attn(x, norm=self.n2)
        hidden, act, out = self.mlp
        return x + out(act(_normed_linear(x, self.n3, hidden)))


class ProductReadout(nn.Module):
    """Per-parameter readout ``{param_name: (G, *param.shape[, out_dim])}`` from neuron features.

    ``ProductReadout(..., product=p)`` builds the subclass for ``p`` (one of :data:`PRODUCTS`):
    :class:`GeluReadout` (``"gelu"``, the default) or :class:`BilinearReadout` (``"bilinear"``).
    Both read a 2-axis parameter with axes ``(X, Y)`` from the neuron features ``h_X[i]``,
    ``h_Y[j]``, optional per-entry features ``e[i, j]`` (the weight itself in the weight-aware
    variant, the mean gradient in the averaged-gradient net) and an optional learned per-parameter
    vector ``p`` (needed when several parameters share the same spaces, as ``q`` and ``k`` do); a
    1-axis parameter from ``h_X[i]``, ``e[i]`` and ``p``. ``h`` may carry a data axis ``S``
    (``(G, S, N, c)``): the readout is then invariant to the order of ``s``. Equivariant to the
    neuron permutations of ``spec``.

    Args:
        spec: the architecture's ``SymmetrySpec`` (parameters with 1 or 2 axes).
        offsets: ``{space_name: (start, stop)}`` of every space in the neuron axis ``N``.
        c: input channels; hidden: width of the readout; out_dim: outputs per entry.
        edge_channels: channels ``e`` of the per-entry features (0: none).
        param_ids: learn the per-parameter vector ``p``.
        product: ``"gelu"`` or ``"bilinear"`` (see the subclasses).
    """

    product: str = ""

    def __new__(cls, *args, **kwargs):
        if cls is ProductReadout:
            product = kwargs.get("product", args[7] if len(args) > 7 else "gelu")
            if product not in PRODUCTS:
                raise ValueError(f"product must be one of {PRODUCTS}, got {product!r}")
            cls = _READOUT_CLASSES[product]
        return super().__new__(cls)

    def __init__(self, spec: SymmetrySpec, offsets: dict[str, tuple[int, int]], c: int, hidden: int,
                 out_dim: int = 1, edge_channels: int = 0, param_ids: bool = False, product: str | None = None):
        super().__init__()
        if product is not None and product != self.product:
            raise ValueError(f"{type(self).__name__} is the {self.product!r} readout, got product={product!r}")
        for p, axes in spec.params:
            if len(axes) > 2:
                raise ValueError(f"product readout handles parameters with 1 or 2 axes; {p!r} has {len(axes)}")
        self.spec, self.offsets, self.out_dim = spec, offsets, out_dim

    def _init_tail(self, hidden: int, edge_channels: int, param_ids: bool) -> None:
        """The layers both readouts share, created after the product layers (fixed init order)."""
        self.e2 = nn.Linear(edge_channels, hidden, bias=False) if edge_channels else None
        self.e1 = nn.Linear(edge_channels, hidden, bias=False) if edge_channels else None
        self.w2, self.w1 = Linear(hidden, self.out_dim), Linear(hidden, self.out_dim)
        self.pid = nn.Parameter(torch.randn(len(self.spec.params), hidden) * 0.1) if param_ids else None

    def _rows(self, h: torch.Tensor, axis: tuple[str, ...]) -> torch.Tensor:
        rows = [h[..., slice(*self.offsets[s]), :] for s in axis]
        return rows[0] if len(rows) == 1 else torch.cat(rows, -2)  # one space: a view, no copy

    def _squeeze(self, y: torch.Tensor) -> torch.Tensor:
        return y.squeeze(-1) if self.out_dim == 1 else y

    def forward(self, h: torch.Tensor, edges: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``h``: ``(G, N, c)`` or ``(G, S, N, c)``; ``edges``: ``{param_name: (G, *param.shape, e)}``."""
        raise NotImplementedError


class GeluReadout(ProductReadout):
    """``product="gelu"``: ``Ŵ[i, j] = w₂ · gelu(U h_X[i] + V h_Y[j] + E e[i, j] + p) + b₂`` computed by
    broadcasting (``O(P·hidden)``, never a concatenation); ``b̂[i] = w₂' · gelu(U' h_X[i] + E' e[i] + p)
    + b₂'``. With a data axis the gelu is applied per element ``s`` and averaged over ``S``
    (GradMetaNet++'s per-datum readout), in checkpointed chunks of the data."""

    product = "gelu"

    def __init__(self, spec: SymmetrySpec, offsets: dict[str, tuple[int, int]], c: int, hidden: int,
                 out_dim: int = 1, edge_channels: int = 0, param_ids: bool = False, product: str | None = None):
        super().__init__(spec, offsets, c, hidden, out_dim, edge_channels, param_ids, product)
        self.u2, self.v2, self.u1 = nn.Linear(c, hidden), nn.Linear(c, hidden, bias=False), nn.Linear(c, hidden)
        self._init_tail(hidden, edge_channels, param_ids)

    def forward(self, h: torch.Tensor, edges: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``h``: ``(G, N, c)`` or ``(G, S, N, c)``; ``edges``: ``{param_name: (G, *param.shape, e)}``."""
        per_datum = h.dim() == 4
        out = {}
        for k, (name, axes) in enumerate(self.spec.params):
            e = None if edges is None else edges[name]
            if len(axes) == 2:
                hx, hy = self.u2(self._rows(h, axes[0])), self.v2(self._rows(h, axes[1]))
                lin, el = self.w2, self.e2
            else:
                hx, hy, lin, el = self.u1(self._rows(h, axes[0])), None, self.w1, self.e1
            bias = 0 if e is None else el(e)
            if self.pid is not None:
                bias = bias + self.pid[k]
            if not per_datum:  # one element: S = 1
                hx, hy = hx.unsqueeze(1), None if hy is None else hy.unsqueeze(1)
            # channels first, (G, S, K, nx[, ny]): the broadcast sum, gelu and data mean run along
            # the long neuron axis (a channels-last layout has rows of K entries), and the last map
            # reads (K, entries) rows as they lie
            z = _chunked_mean(_channels_first(hx, 1), None if hy is None else _channels_first(hy, 1),
                              _channels_first(bias, len(axes))).movedim(-1 - len(axes), -1)
            out[name] = self._squeeze(lin(z))
        return out


class BilinearReadout(ProductReadout):
    """``product="bilinear"``: a multiplicative readout.

    For a weight, ``z[i, j] = mean_s (U h_s[X_i] + u) ⊙ (V h_s[Y_j] + v)`` (``K = hidden``
    channels; one batched matmul over the data axis, ``O(S·P·K)``, never an ``(S, P, K)`` tensor);
    for a bias, ``z[i] = mean_s (U' h_s[X_i] + u') ⊙ (V' h_s[X_i] + v')``. Then ``Ŵ[i, j] =
    MLP([z, slog z], e[i, j], p)`` pointwise, with ``slog z = sign(z)·log(1 + |z|)`` (elementwise, so
    every symmetry is kept; it gives the MLP ratios of products as differences). Since the biases
    ``u, v`` let a channel be constant, ``z`` holds ``mean_s f(h_s[X_i])·g(h_s[Y_j])`` and the plain
    means of each side for linear ``f, g``: with neuron channels ``δ``, ``a`` the mean gradient
    ``mean_b δ_b[i] a_b[j]`` is one channel (see :meth:`products`). ``h`` without a data axis is
    read as ``S = 1``.
    """

    product = "bilinear"

    def __init__(self, spec: SymmetrySpec, offsets: dict[str, tuple[int, int]], c: int, hidden: int,
                 out_dim: int = 1, edge_channels: int = 0, param_ids: bool = False, product: str | None = None):
        super().__init__(spec, offsets, c, hidden, out_dim, edge_channels, param_ids, product)
        self.u2, self.v2 = nn.Linear(c, hidden), nn.Linear(c, hidden)   # weights: U, V
        self.u1, self.v1 = nn.Linear(c, hidden), nn.Linear(c, hidden)   # biases: U', V'
        self.in2, self.in1 = nn.Linear(2 * hidden, hidden), nn.Linear(2 * hidden, hidden)  # [z, slog z]
        self._init_tail(hidden, edge_channels, param_ids)

    def products(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{param_name: z}``, ``z`` of shape ``(G, *param.shape, K)``.

        ``z[..., i, j, k] = mean_s (U h_s[X_i] + u)_k (V h_s[Y_j] + v)_k`` for a weight and
        ``mean_s (U' h_s[X_i] + u')_k (V' h_s[X_i] + v')_k`` for a bias; ``h``: ``(G, N, c)`` or
        ``(G, S, N, c)``. Equivariant to the neuron permutations, invariant to the order of ``s``.
        """
        h = h if h.dim() == 4 else h.unsqueeze(1)                          # (G, S, N, c)
        S, out = h.shape[1], {}
        for name, axes in self.spec.params:
            if len(axes) == 2:
                ux, vy = self.u2(self._rows(h, axes[0])), self.v2(self._rows(h, axes[1]))  # (G, S, n, K)
                z = ux.permute(0, 3, 2, 1) @ vy.permute(0, 3, 1, 2)        # (G, K, nx, ny): sum over s
                out[name] = z.permute(0, 2, 3, 1) / S
            else:
                hx = self._rows(h, axes[0])
                ux, vx = self.u1(hx), self.v1(hx)
                out[name] = (ux * vx).mean(1)                               # (G, n, K)
        return out

    def forward(self, h: torch.Tensor, edges: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``h``: ``(G, N, c)`` or ``(G, S, N, c)``; ``edges``: ``{param_name: (G, *param.shape, e)}``."""
        out = {}
        for k, (name, z) in enumerate(self.products(h).items()):
            lin_in, el, lin = (self.in2, self.e2, self.w2) if z.dim() == 4 else (self.in1, self.e1, self.w1)
            x = lin_in(torch.cat([z, z.sign() * z.abs().log1p()], -1))
            if edges is not None:
                x = x + el(edges[name])
            if self.pid is not None:
                x = x + self.pid[k]
            out[name] = self._squeeze(lin(F.gelu(x)))
        return out


_READOUT_CLASSES = {"gelu": GeluReadout, "bilinear": BilinearReadout}


# Per-datum product readouts are evaluated in chunks of data of at most this many elements, with
# activation checkpointing, so memory stays O(chunk·P·hidden) instead of O(S·P·hidden).
_CHUNK_ELEMENTS = 1 << 22
#: Without autograd, chunks of at most this many elements (per vmapped sample): the per-datum
#: sums stay in cache between the broadcast sum, the gelu and the data mean.
_CACHE_ELEMENTS = 1 << 14


def _channels_first(t, n_axes: int):
    """``(..., *sizes, K) -> (..., K, *sizes)`` for ``n_axes`` trailing axes, laid out contiguously
    (the neuron axes innermost, also under ``vmap``); a plain number or a ``(K,)`` vector
    broadcasts as ``(K, 1, ...)``."""
    if not torch.is_tensor(t):
        return t
    if t.dim() == 1:
        return t.view(-1, *[1] * n_axes)
    return t.movedim(-1, -1 - n_axes).contiguous()


def _outer(hx, hy):
    """``hx[..., :, None] + hy[..., None, :]`` (channels first: ``(..., K, nx)`` and ``(..., K, ny)``)."""
    return hx if hy is None else hx.unsqueeze(-1) + hy.unsqueeze(-2)


def _gelu_sum(hx, hy, bias):
    """``sum_s gelu(hx[:, s, :, :, None] + hy[:, s, :, None, :] + bias)`` (channels first, data axis 1)."""
    per_entry = 2 + (1 if hy is None else 2)  # (G, K, nx[, ny]): insert the data axis
    bias = bias.unsqueeze(1) if torch.is_tensor(bias) and bias.dim() == per_entry else bias
    z = _outer(hx, hy)
    if hy is not None and not torch.is_grad_enabled() and not _is_zero(bias):
        z = z.add_(bias)                    # z is a fresh tensor: no second full-size copy
    else:
        z = _plus(z, bias)
    z = F.gelu(z)
    return z[:, 0] if z.shape[1] == 1 else z.sum(1)


def _is_zero(bias) -> bool:
    return isinstance(bias, (int, float)) and bias == 0


def _plus(z, bias):
    """``z + bias``; a plain ``0`` (no edge features, no parameter ids) is skipped: no full-size copy."""
    return z if _is_zero(bias) else z + bias


def _chunked_mean(hx, hy, bias):
    """``mean_s gelu(hx[:, s, :, :, None] + hy[:, s, :, None, :] + bias)``; hx/hy ``(G, S, K, n)``
    (channels first), bias ``(G, K, nx[, ny])`` or broadcastable; ``(G, K, nx[, ny])``."""
    S = hx.shape[1]
    per = hx.shape[-1] * (1 if hy is None else hy.shape[-1]) * hx.shape[-2] * hx.shape[0]
    step = max(1, (_CHUNK_ELEMENTS if torch.is_grad_enabled() else _CACHE_ELEMENTS) // max(per, 1))
    if step >= S:
        total = _gelu_sum(hx, hy, bias)
        return total if S == 1 else total / S
    total = None
    for s in range(0, S, step):
        args = (hx[:, s:s + step], None if hy is None else hy[:, s:s + step], bias)
        if torch.is_grad_enabled():
            part = checkpoint(_gelu_sum, *args, use_reentrant=False)
            total = part if total is None else total + part
        else:  # accumulated in place (the first part is a fresh tensor)
            part = _gelu_sum(*args)
            total = part if total is None else total.add_(part)
    return total / S
