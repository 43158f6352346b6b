"""INR editors: neuron-permutation equivariant networks predicting ``Δθ`` (``θ' = θ + Δθ``).

All variants share a weight-space trunk built from ``gradmeta.nn`` blocks:

1. neuron features from the weights (bias, mean and RMS of incoming and outgoing weights,
   normalised per parameter), embedded with a learned code per level and a learned id per
   fixed neuron (input coordinates, output channels);
2. ``layers`` rounds of ``NeuronDeepSets`` plus weight-space message passing
   (``h_l[i] += mean_j W_l[i,j]·U h_{l−1}[j]`` and back), equivariant to hidden-neuron
   permutations;
3. ``ProductReadout``: ``Δθ[i,j] = MLP(h[i], h[j], W[i,j], e[i,j])`` for weights,
   ``Δb[i] = MLP(h[i], b[i], e[i])`` for biases, scaled by each parameter's zoo std.

``features`` picks the per-weight extras ``e``: none (``"weights"``), or the weight readout of a
``GradMetaNet`` applied to the INR's gradient set (``"gradients"``; ``"gradients++"`` uses the
GradMetaNet++ variant) or to its probing activations at grid points (``"probing"``). ``product``
picks that GradMetaNet's per-weight readout: ``"gelu"`` (default) or ``"bilinear"``
(``MLP(mean_b (U h_b[i]+u) ⊙ (V h_b[j]+v))``, which represents per-datum products such as the
mean gradient ``mean_b δ_b[i] a_b[j]`` exactly). A variant name ``"gradients:bilinear"`` /
``"gradients++:bilinear"`` (see :func:`parse_variant`) names both at once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import PRODUCTS, GradMetaNet, NeuronDeepSets, NeuronLayout, ProductReadout, SymmetrySpec
from ._features import FeatureSet, factor_rms, gradient_factor_sets, probe_coordinates, probe_factor_sets, rescale_sets
from ._siren import DEFAULT_OMEGA0, Siren, pixel_grid, siren_spec

__all__ = ["INREditor", "FEATURES", "PRODUCTS", "EDITOR_FORMAT", "edit", "parse_variant"]

FEATURES = ("weights", "probing", "gradients", "gradients++")


def parse_variant(name: str, product: str = "gelu") -> tuple[str, str]:
    """``"features[:product]"`` -> ``(features, product)``; ``product`` is the default when no suffix.

    Raises:
        ValueError: unknown features or product, or a product suffix on ``"weights"`` (no readout).
    """
    feat, _, suffix = name.partition(":")
    prod = suffix or product
    if feat not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {feat!r} (in {name!r})")
    if prod not in PRODUCTS:
        raise ValueError(f"product must be one of {PRODUCTS}, got {prod!r} (in {name!r})")
    if suffix and feat == "weights":
        raise ValueError(f"{name!r}: 'weights' has no GradMetaNet branch, so no product readout")
    return feat, prod


class _WeightMessage(nn.Module):
    """Messages along the INR's weights: ``h_l[i] += mean_j W[i,j] U h_{l−1}[j]``, ``h_{l−1}[j] += mean_i W[i,j] V h_l[i]``."""

    def __init__(self, spec: SymmetrySpec, offsets: dict[str, tuple[int, int]], c: int):
        super().__init__()
        self.spec, self.offsets = spec, offsets
        self.u, self.v = nn.Linear(c, c, bias=False), nn.Linear(c, c, bias=False)

    def forward(self, h: Tensor, w: dict[str, Tensor]) -> Tensor:
        parts = {s.name: [] for s in self.spec.spaces}
        hs = {s.name: h[:, slice(*self.offsets[s.name])] for s in self.spec.spaces}
        for lm in self.spec.layers:
            (o,), (i,) = lm.out_spaces, lm.in_spaces
            W = w[lm.weight]  # (G, n_o, n_i)
            parts[o].append(W @ self.u(hs[i]) / W.shape[-1])
            parts[i].append(W.transpose(-1, -2) @ self.v(hs[o]) / W.shape[-2])
        return torch.cat([sum(parts[s.name]) if parts[s.name] else torch.zeros_like(hs[s.name])
                          for s in self.spec.spaces], 1)


class INREditor(nn.Module):
    """Predicts ``Δθ`` for a stack of SIRENs; exactly equivariant to their hidden-neuron permutations.

    Args:
        out_channels, hidden, num_layers, omega0: the SIREN architecture edited.
        features: one of :data:`FEATURES`.
        channels: width of the trunk (and of the GradMetaNet branch).
        layers: rounds of neuron DeepSets + weight messages.
        aux_channels: per-weight features from the GradMetaNet branch.
        product: that branch's per-weight readout, one of :data:`PRODUCTS` (ignored for ``"weights"``).
        num_coords, coord_seed: the fixed random coordinates of the gradient set.
        grad_grid: if > 0, the gradient set uses the ``grad_grid × grad_grid`` pixel-centre grid
            instead of ``num_coords`` random coordinates.
        grad_target: the constant target ``t`` of the gradient set's ``‖f(x) − t‖²`` (default 0).
        probe_grid: the probing baseline uses a ``probe_grid × probe_grid`` pixel grid.
        zero_init: start as the identity edit (``Δθ = 0``).
        aux_zero_init: zero the readout's input weights from the GradMetaNet features, so that the
            editor starts as the same function as a weight-only one and the features enter only
            as far as training finds them useful (gradients still reach the GradMetaNet branch
            once those weights move).

    Call :meth:`calibrate` on training INRs before training (sets the per-parameter and
    per-layer feature scales, stored as buffers).
    """

    def __init__(self, out_channels: int = 1, hidden: int = 32, num_layers: int = 3, *, features: str = "weights",
                 channels: int = 16, layers: int = 2, aux_channels: int = 4, set_layers: int = 2,
                 num_coords: int = 64, coord_seed: int = 0, probe_grid: int = 8,
                 omega0: float = DEFAULT_OMEGA0, zero_init: bool = True, product: str = "gelu",
                 grad_grid: int = 0, grad_target: float = 0.0, aux_zero_init: bool = False):
        super().__init__()
        #: the constructor arguments (what :meth:`save` stores to rebuild the editor)
        self.config = dict(out_channels=out_channels, hidden=hidden, num_layers=num_layers, features=features,
                           channels=channels, layers=layers, aux_channels=aux_channels, set_layers=set_layers,
                           num_coords=num_coords, coord_seed=coord_seed, probe_grid=probe_grid, omega0=omega0,
                           zero_init=zero_init, product=product, grad_grid=grad_grid, grad_target=grad_target,
                           aux_zero_init=aux_zero_init)
        #: what the editor was trained for (``edit``, ``image_size``, ``fit``, ...), or ``None``
        self.trained_for: dict | None = None
        if features not in FEATURES:
            raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
        if product not in PRODUCTS:
            raise ValueError(f"product must be one of {PRODUCTS}, got {product!r}")
        if grad_grid < 0:
            raise ValueError(f"grad_grid must be >= 0, got {grad_grid}")
        self.product, self.grad_target = product, float(grad_target)
        self.spec = siren_spec(out_channels, hidden, num_layers)
        self.features, self.omega0, self.probe_grid = features, omega0, probe_grid
        self.names = [p for p, _ in self.spec.params]
        layout = NeuronLayout(self.spec)
        self.offsets = layout.offsets
        c = channels
        self.embed = nn.Linear(7, c)
        self.level = nn.Parameter(torch.randn(len(self.spec.spaces), c) * 0.1)
        self.ids = nn.ParameterDict({s.name: nn.Parameter(torch.randn(s.size, c) * 0.1)
                                     for s in self.spec.spaces if not s.permutable})
        self.deepsets = nn.ModuleList(NeuronDeepSets(c, c) for _ in range(layers))
        self.messages = nn.ModuleList(_WeightMessage(self.spec, self.offsets, c) for _ in range(layers))
        aux = 0 if features == "weights" else aux_channels
        if aux:
            self.aux = GradMetaNet(self.spec, readout="weight", out_dim=aux,
                                   variant="plusplus" if features == "gradients++" else "base",
                                   channels=c, set_layers=set_layers, neuron_layers=1, heads=2, product=product)
        self.head = ProductReadout(self.spec, self.offsets, c, c, 1, edge_channels=1 + aux)
        if zero_init:
            for lin in (self.head.w1, self.head.w2):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
        coords = pixel_grid(grad_grid, grad_grid) if grad_grid else probe_coordinates(num_coords, coord_seed)
        if aux and aux_zero_init:
            with torch.no_grad():
                for lin in (self.head.e2, self.head.e1):  # column 0 reads W[i,j] / b[i]; the rest, e
                    lin.weight[:, 1:].zero_()
        self.register_buffer("coords", coords)
        self.register_buffer("param_std", torch.ones(len(self.names)))
        self.register_buffer("feature_rms", torch.ones(num_layers, 2))

    # ------------------------------------------------------------------------------ scales
    @torch.no_grad()
    def calibrate(self, params: dict[str, Tensor]) -> "INREditor":
        """Set the per-parameter std and per-layer feature RMS from a stack of training INRs."""
        self.param_std.copy_(torch.stack([params[n].std().clamp_min(1e-8) for n in self.names]))
        if self.features != "weights":
            raw = self._raw_sets({k: v[:256] for k, v in params.items()})
            rms = factor_rms(raw)
            self.feature_rms.copy_(torch.tensor([rms[f"layers.{i}"] for i in range(len(rms))]))
        return self

    def _raw_sets(self, params: dict[str, Tensor]) -> list[FeatureSet]:
        if self.features == "probing":
            return probe_factor_sets(params, self.probe_grid, self.omega0)
        return gradient_factor_sets(params, self.coords.to(params["layers.0.weight"]), self.omega0, self.grad_target)

    def aux_sets(self, params: dict[str, Tensor]) -> list[FeatureSet] | None:
        """The (rescaled) gradient or probing sets the GradMetaNet branch reads, one per INR; ``None`` for ``"weights"``."""
        if self.features == "weights":
            return None
        scales = {f"layers.{i}": tuple(float(x) for x in r) for i, r in enumerate(self.feature_rms)}
        return rescale_sets(self._raw_sets(params), scales)

    # ------------------------------------------------------------------------------ forward
    def _neuron_features(self, w: dict[str, Tensor]) -> Tensor:
        G = next(iter(w.values())).shape[0]
        dt = next(iter(w.values())).dtype
        feats = []
        for k, s in enumerate(self.spec.spaces):
            n = s.size
            zero = torch.zeros(G, n, dtype=dt, device=self.level.device)
            one = torch.ones_like(zero)
            inc = [lm for lm in self.spec.layers if s.name in lm.out_spaces]
            out = [lm for lm in self.spec.layers if s.name in lm.in_spaces]
            ch = [w[inc[0].bias] if inc and inc[0].bias else zero]
            if inc:
                W = w[inc[0].weight]
                ch += [W.mean(-1), W.square().mean(-1).sqrt(), one]
            else:
                ch += [zero, zero, zero]
            if out:
                W = w[out[0].weight]
                ch += [W.mean(-2), W.square().mean(-2).sqrt(), one]
            else:
                ch += [zero, zero, zero]
            y = self.embed(torch.stack(ch, -1)) + self.level[k]
            if not s.permutable:
                y = y + self.ids[s.name]
            feats.append(y)
        return torch.cat(feats, 1)

    def forward(self, params: dict[str, Tensor] | Siren, sets: list[FeatureSet] | None = None):
        """``Δθ`` ``{name: (G, ...)}`` for a stack of INRs ``{name: (G, ...)}``.

        ``sets``: precomputed :meth:`aux_sets` of these INRs (else computed here).
        Called on one :class:`Siren` instead, returns the edited ``Siren`` (``edit(siren, self)``).
        """
        if isinstance(params, Siren):
            return edit(params, self)
        w = {n: params[n] / self.param_std[k] for k, n in enumerate(self.names)}
        h = self._neuron_features(w)
        for ds, msg in zip(self.deepsets, self.messages):
            x = F.gelu(h)
            h = h + ds(x) + msg(x, w)
        edges = {n: w[n].unsqueeze(-1) for n in self.names}
        if self.features != "weights":
            sets = self.aux_sets(params) if sets is None else sets
            e = self.aux(list(sets))
            edges = {n: torch.cat([edges[n], e[n]], -1) for n in self.names}
        out = self.head(h, edges)
        return {n: out[n] * self.param_std[k] for k, n in enumerate(self.names)}

    def edit(self, params: dict[str, Tensor], sets: list[FeatureSet] | None = None) -> dict[str, Tensor]:
        """Edited parameters ``θ + Δθ`` of a stack of INRs."""
        delta = self(params, sets)
        return {n: params[n] + delta[n] for n in self.names}


    # ------------------------------------------------------------------------------ users
    def describe(self) -> str:
        """One line: the SIREN architecture edited and, if known, what the editor was trained for."""
        c = self.config
        arch = (f"SIRENs with {c['out_channels']} channel(s), {c['num_layers']} layers of {c['hidden']} hidden, "
                f"omega0={c['omega0']:g}")
        t = self.trained_for or {}
        if "edit" in t:
            H, W = t.get("image_size", ("?", "?"))
            return f"{t['edit']} editor ({c['features']}) for {H}x{W} images: {arch}"
        return f"editor ({c['features']}) for {arch}"

    def check(self, inr: Siren | dict[str, Tensor]) -> None:
        """Raise ``ValueError`` naming the mismatch if ``inr`` is not a SIREN this editor was made for.

        Checked: parameter names and shapes (channels, hidden width, depth), ``ω₀``, and, when both
        are known, the image size the INR was fitted to (``Siren.image_size``, set by ``inr.fit``).
        """
        params = dict(inr.named_parameters()) if isinstance(inr, Siren) else inr
        want = {n: tuple(s) for n, s in _param_shapes(self.config).items()}
        got = {n: tuple(v.shape) for n, v in params.items()}
        if got != want:
            raise ValueError(f"this {self.describe()}; the INR has parameters {got} instead of {want}. "
                             "Fit the image with the same SIREN (inr.fit(image) uses the default one)")
        if isinstance(inr, Siren):
            if float(inr.omega0) != float(self.omega0):
                raise ValueError(f"this {self.describe()}; the INR has omega0={inr.omega0:g}")
            size = (self.trained_for or {}).get("image_size")
            if size is not None and inr.image_size is not None and tuple(inr.image_size) != tuple(size):
                raise ValueError(f"this {self.describe()}; the INR was fitted to a "
                                 f"{inr.image_size[0]}x{inr.image_size[1]} image. Resize the image to "
                                 f"{size[0]}x{size[1]} before inr.fit (an editor is tied to its pixel grid)")

    def save(self, path) -> None:
        """Write the editor (constructor config, ``trained_for`` and weights) to ``path``.

        Read back with ``gradmeta.inr.load_editor(path)`` (``torch.load(weights_only=True)``).
        """
        from .._io import atomic_write

        blob = {"format": EDITOR_FORMAT, "config": dict(self.config), "trained_for": self.trained_for,
                "state": {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}}
        atomic_write(path, lambda f: torch.save(blob, f))


EDITOR_FORMAT = "gradmeta.inr.editor/1"


def _param_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    widths = [2] + [config["hidden"]] * (config["num_layers"] - 1) + [config["out_channels"]]
    out = {}
    for i in range(config["num_layers"]):
        out[f"layers.{i}.weight"], out[f"layers.{i}.bias"] = (widths[i + 1], widths[i]), (widths[i + 1],)
    return out


def edit(inr: Siren | dict[str, Tensor], editor: INREditor) -> Siren | dict[str, Tensor]:
    """Edit one INR: a ``Siren`` gives a new ``Siren``; a ``{name: tensor}`` dict of one INR gives a dict.

    Raises ``ValueError`` (see :meth:`INREditor.check`) for an INR of another shape.
    """
    editor.check(inr)
    params = inr.params() if isinstance(inr, Siren) else inr
    p = {k: v.to(editor.param_std).unsqueeze(0) for k, v in params.items()}
    with torch.no_grad():
        new = {k: v[0] for k, v in editor.edit(p).items()}
    if not isinstance(inr, Siren):
        return new
    out = Siren.from_params(new, editor.omega0)
    out.image_size = inr.image_size
    return out
