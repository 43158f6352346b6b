"""Learned Fisher-diagonal estimator: GradMetaNet corrects the standard estimate from a gradient set.

The task: a random SIREN ``1 → h → h → 1`` (``gradmeta.inr.Siren``, standard init, ``ω₀ = 30``)
and ``num_points`` inputs ``x ~ U(-1, 1)``. The network sees a *gradient set* of ``set_size``
per-example **output** gradients ``∇_θ f(x_b)`` (collected with ``gm.collect_gradients`` and the
"loss" ``f(x)`` itself) at the first ``set_size`` of the points; the target is the regression
Fisher diagonal over all points, ``F = (1/P) Σ_p (∇_θ f(x_p))²``. The baseline every model is
compared with is the *standard estimator* from the same gradients, ``F̂_std = (1/B) Σ_b g_b²``
(``GradientSet.fisher_diagonal()``).

Every learned model predicts a multiplicative correction in log space,
``F̂ = F̂_std · exp(γ · c)``, with ``c = {param_name: param.shape}`` the network's per-weight output
and ``γ`` a learned scalar initialised at 0, so every model starts *exactly* at the standard
estimator and training can only move away from it where that lowers the loss. The log form keeps
the prediction positive and makes the correction scale free (Fisher entries span orders of
magnitude across layers and SIRENs). Per-entry inputs (``edges``) are the standardised
``log F̂_std``.

Error of an estimate (:func:`relative_error`): for every parameter tensor ``p`` the normalised
squared error ``‖F̂_p − F_p‖² / ‖F_p‖²``, averaged over the tensors; the headline number is
``1 − mean_err(model) / mean_err(standard)`` on held-out SIRENs (the error reduction).

Much of the standard estimator's error here is Monte-Carlo noise of a 1-D integral: the inputs
are visible in the gradient set (the first layer's activations), and reweighting each datum by
its nearest-neighbour cell (:func:`quadrature_fisher`, not learned) removes most of it. The
``cells`` option / ``"gradmetanet+cells"`` kind hands that per-datum cell to GradMetaNet as an
extra channel (a hand-made feature, reported separately from the plain models).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradmeta._training import minibatch_train
from gradmeta.grads import GradientSet, collect_gradients
from gradmeta.inr import Siren, siren_spec
from gradmeta.nn import AveragedGradientNet, FlatFactorMLP, GradMetaNet, NeuronLayout

__all__ = ["FisherDataset", "make_fisher_dataset", "output_loss", "standard_fisher", "relative_error",
           "LearnedFisherEstimator", "LEARNED_MODELS",
           "quadrature_fisher", "train_fisher_estimator", "evaluate_fisher_estimator",
           "square_channels", "fit_minibatches"]

LEARNED_MODELS = ("gradmetanet", "gradmetanet++", "gradmetanet+cells", "flat_mlp", "averaged_grad")
_EPS = 1e-12


def output_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-example "loss" ``f(x)`` (``outputs (B, 1) -> (B,)``): its gradients are output gradients."""
    return outputs.sum(-1)


def standard_fisher(gs: GradientSet) -> dict[str, Tensor]:
    """The standard estimator ``(1/B) Σ_b g_b²`` from a gradient set, ``{param_name: param.shape}``."""
    return gs.fisher_diagonal()


def quadrature_fisher(gs: GradientSet, low: float = -1.0, high: float = 1.0,
                      layer: str = "layers.0") -> dict[str, Tensor]:
    """Reference (not learned): the standard estimator reweighted by each datum's nearest-neighbour
    cell on the 1-D input interval ``[low, high]``, ``Σ_b w_b g_b²`` with ``w_b = cell_b / (high − low)``.

    The inputs are read from the gradient set itself (the activations of ``layer``, ``(B, 1, 1)``),
    so this uses no information a GradMetaNet does not see; it shows how much of the standard
    estimator's error is Monte-Carlo noise that a better quadrature removes.
    """
    w = _cells(gs, low, high, layer)
    return {k: torch.einsum("b,b...->...", w, g.square()) for k, g in gs.per_example_grads().items()}


def _cells(gs: GradientSet, low: float = -1.0, high: float = 1.0, layer: str = "layers.0") -> Tensor:
    """``(B,)`` nearest-neighbour cell of every datum's 1-D input on ``[low, high]``, summing to 1."""
    x = gs[layer].activations.reshape(-1)
    if x.numel() != gs.batch_size:
        raise ValueError(f"quadrature weights need 1-D inputs; {layer!r} activations have shape "
                         f"{tuple(gs[layer].activations.shape)}")
    xs, order = x.sort()
    mid = (xs[1:] + xs[:-1]) / 2
    lo, hi = torch.cat([xs.new_tensor([low]), mid]), torch.cat([mid, xs.new_tensor([high])])
    w = torch.empty_like(x)
    w[order] = (hi - lo) / (high - low)
    return w


def square_channels(layout: NeuronLayout, gs: GradientSet) -> dict[str, Tensor]:
    """``{space_name: (B, T, n, 2)}``: ``(a², δ²)`` of every space of ``layout``, each divided by its
    mean over the set (data, tokens and neurons of that space), so per-datum contributions
    ``δ_i² a_j²`` to squared gradient entries are one product away. Scale free; equivariant to
    the spaces' neuron permutations and to the data order."""
    out = {}
    for name, f in layout.features(gs).items():  # (B, T, n, [a, δ, has_a, has_δ])
        sq = f[..., :2].square()
        out[name] = sq / sq.mean((0, 1, 2), keepdim=True).clamp_min(_EPS)
    return out


@dataclass
class FisherDataset:
    """``N`` SIRENs with their gradient sets, standard estimates and Fisher-diagonal targets.

    Attributes:
        sets: ``N`` gradient sets of ``B = set_size`` output gradients each.
        standard: ``{param_name: (N, *shape)}`` standard estimates from those sets.
        target: ``{param_name: (N, *shape)}`` Fisher diagonals over ``num_points`` inputs.
        params: ``{param_name: (N, *shape)}`` the SIRENs' parameters.
        inputs: ``(N, num_points, 1)`` the inputs (the set uses the first ``set_size``).
    """

    sets: list[GradientSet]
    standard: dict[str, Tensor]
    target: dict[str, Tensor]
    params: dict[str, Tensor]
    inputs: Tensor

    def __len__(self) -> int:
        return len(self.sets)

    def subset(self, idx) -> "FisherDataset":
        idx = torch.as_tensor(idx, dtype=torch.long)
        pick = lambda d: {k: v[idx] for k, v in d.items()}  # noqa: E731
        return FisherDataset([self.sets[i] for i in idx.tolist()], pick(self.standard), pick(self.target),
                             pick(self.params), self.inputs[idx])


def make_fisher_dataset(num: int, *, set_size: int = 128, num_points: int = 1024, hidden: int = 32,
                        seed: int = 0, dtype: torch.dtype = torch.float32) -> FisherDataset:
    """Draw ``num`` random SIRENs ``1 → hidden → hidden → 1`` and build their examples.

    Deterministic in ``seed``. Gradients are collected in float64 and stored in ``dtype``.
    """
    if not 0 < set_size <= num_points:
        raise ValueError(f"make_fisher_dataset: need 0 < set_size ({set_size}) <= num_points ({num_points})")
    gen = torch.Generator().manual_seed(seed)
    sets, std, tgt, prm, xs = [], [], [], [], []
    for _ in range(num):
        model = Siren(1, hidden, 3, in_features=1, generator=gen, dtype=torch.float64)
        x = torch.rand(num_points, 1, generator=gen, dtype=torch.float64) * 2 - 1
        zeros = x.new_zeros(num_points)
        full = collect_gradients(model, output_loss, x, zeros).fisher_diagonal()
        gs = collect_gradients(model.to(dtype), output_loss, x[:set_size].to(dtype), zeros[:set_size].to(dtype))
        sets.append(gs)
        std.append(standard_fisher(gs))
        tgt.append({k: v.to(dtype) for k, v in full.items()})
        prm.append({k: p.detach().clone() for k, p in model.named_parameters()})
        xs.append(x.to(dtype))
    stack = lambda ds: {k: torch.stack([d[k] for d in ds]) for k in ds[0]}  # noqa: E731
    return FisherDataset(sets, stack(std), stack(tgt), stack(prm), torch.stack(xs))


def relative_error(pred: dict[str, Tensor], target: dict[str, Tensor]) -> Tensor:
    """``(N,)`` mean over parameter tensors of ``‖pred_p − target_p‖² / ‖target_p‖²`` (leading axis N)."""
    errs = []
    for k, t in target.items():
        if k not in pred:
            raise KeyError(f"relative_error: prediction lacks parameter {k!r} (has {sorted(pred)})")
        p = pred[k].to(t)
        if p.shape != t.shape:
            raise ValueError(f"relative_error: {k!r} predicted {tuple(p.shape)}, target {tuple(t.shape)}")
        dims = tuple(range(1, t.dim()))
        errs.append((p - t).square().sum(dims) / t.square().sum(dims).clamp_min(_EPS))
    return torch.stack(errs).mean(0)


class LearnedFisherEstimator(nn.Module):
    """``F̂ = F̂_std · exp(γ · c(gradient set))`` with a per-weight backbone ``c``.

    Args:
        kind: ``"gradmetanet"``, ``"gradmetanet++"`` (``GradMetaNet`` per-weight readout, edge input
            = standardised ``log F̂_std``), ``"flat_mlp"`` (``FlatFactorMLP`` on the concatenated
            per-example factors, no symmetry), ``"gradmetanet+cells"`` (``"gradmetanet"`` with
            ``cells=True``), ``"averaged_grad"`` (``AveragedGradientNet``: a
            weight-space net fed one averaged statistic per weight, the standardised
            ``log F̂_std`` — exactly what the standard estimator sees, without the per-datum set).
        hidden: SIREN width; ``channels``, ``layers``: backbone sizes.
        log_mean, log_std: ``{param_name: float}`` standardisation of ``log F̂_std`` (from the
            training set, see :meth:`fit_normalisation`).
    """

    def __init__(self, kind: str, hidden: int = 32, channels: int = 32, layers: int = 3, squares: bool = True,
                 cells: bool = False):
        super().__init__()
        if kind not in LEARNED_MODELS:
            raise ValueError(f"LearnedFisherEstimator: kind must be one of {LEARNED_MODELS}, got {kind!r}")
        gmn = kind.startswith("gradmetanet")
        self.squares, self.cells = squares and gmn, (cells or kind.endswith("+cells")) and gmn
        self.kind = kind
        spec = siren_spec(1, hidden, 3, in_features=1)
        self.names = [p for p, _ in spec.params]
        if kind.startswith("gradmetanet"):
            variant = "plusplus" if kind.endswith("++") else "base"
            self.net = GradMetaNet(spec, "weight", 1, variant, channels=channels, set_layers=layers,
                                   neuron_layers=2, edge_channels=1,
                                   extra_channels=2 * int(self.squares) + int(self.cells))
        elif kind == "flat_mlp":
            self.net = FlatFactorMLP(spec, "weight", 1, hidden=4 * channels)
        else:
            self.net = AveragedGradientNet(spec, "weight", 1, channels=channels, layers=layers)
        self._raw_layout = NeuronLayout(spec)
        self.gamma = nn.Parameter(torch.zeros(()))
        self.register_buffer("log_mean", torch.zeros(len(self.names)))
        self.register_buffer("log_std", torch.ones(len(self.names)))

    @torch.no_grad()
    def fit_normalisation(self, standard: dict[str, Tensor]) -> None:
        """Set the per-tensor mean/std of ``log F̂_std`` from ``{param_name: (N, *shape)}``."""
        for i, k in enumerate(self.names):
            v = standard[k].clamp_min(_EPS).log()
            self.log_mean[i] = v.mean()
            self.log_std[i] = v.std().clamp_min(1e-3) if v.numel() > 1 else 1.0

    def _edges(self, standard: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: ((standard[k].clamp_min(_EPS).log() - self.log_mean[i]) / self.log_std[i]).unsqueeze(-1)
                for i, k in enumerate(self.names)}

    def _extra(self, gs: GradientSet) -> dict[str, Tensor]:
        """Extra neuron channels: :func:`square_channels` (``squares``) and, with ``cells``, every
        datum's nearest-neighbour cell ``B · w_b`` of :func:`quadrature_fisher` (a hand-made per-datum
        feature, the same for all neurons), so the readout can reweight data by it."""
        out = square_channels(self._raw_layout, gs) if self.squares else {}
        if self.cells:
            w = _cells(gs) * gs.batch_size
            feats = out or self._raw_layout.features(gs)
            cells = {name: w.to(f).view(-1, 1, 1, 1).expand(*f.shape[:3], 1) for name, f in feats.items()}
            out = {name: torch.cat([out[name], c], -1) if out else c for name, c in cells.items()}
        return out

    def forward(self, sets: list[GradientSet], standard: dict[str, Tensor]) -> dict[str, Tensor]:
        """``sets``: ``G`` gradient sets; ``standard``: ``{param_name: (G, *shape)}`` their standard
        estimates. Returns ``{param_name: (G, *shape)}`` the corrected Fisher diagonals."""
        dtype = self.gamma.dtype
        standard = {k: standard[k].to(dtype) for k in self.names}
        edges = self._edges(standard)
        if self.kind.startswith("gradmetanet"):
            extra = [self._extra(s) for s in sets] if (self.squares or self.cells) else None
            c = self.net(list(sets), edges=[{k: e[g] for k, e in edges.items()} for g in range(len(sets))],
                         extra=extra)
        elif self.kind == "flat_mlp":
            c = self.net(list(sets))
        else:
            c = self.net([{k: e[g, ..., 0] for k, e in edges.items()} for g in range(len(sets))])
        return {k: standard[k] * torch.exp(self.gamma * c[k].to(dtype)) for k in self.names}


def train_fisher_estimator(model: LearnedFisherEstimator, data: FisherDataset, *, steps: int = 300,
                           batch_size: int = 16, lr: float = 1e-3, seed: int = 0,
                           log_every: int = 0) -> dict[str, list]:
    """Adam on the mean :func:`relative_error` of minibatches of ``data``; cosine learning rate.

    Returns ``{"step": [...], "loss": [...]}`` (every ``log_every`` steps; 0: only the last).
    """
    model.fit_normalisation(data.standard)
    return fit_minibatches(model, data, lambda b: relative_error(model(b.sets, b.standard), b.target),
                           steps=steps, batch_size=batch_size, lr=lr, seed=seed, log_every=log_every)


def fit_minibatches(model: nn.Module, data, batch_loss, *, steps: int, batch_size: int, lr: float,
                    seed: int = 0, log_every: int = 0) -> dict[str, list]:
    """The training loop shared by the learned curvature estimators.

    ``steps`` Adam steps with a cosine learning rate and gradient clipping at norm 1; each step
    draws ``batch_size`` examples without replacement (``seed``) via ``data.subset(idx)`` and
    minimises ``batch_loss(batch) -> (G,)`` averaged. Returns ``{"step": [...], "loss": [...]}``
    (every ``log_every`` steps; 0: only the last).
    """
    return minibatch_train(model, lambda idx: batch_loss(data.subset(idx)), len(data), steps=steps,
                           batch_size=batch_size, lr=lr, seed=seed, sampling="permutation", schedule="cosine",
                           clip=1.0, log_every=log_every)


@torch.no_grad()
def evaluate_fisher_estimator(model: LearnedFisherEstimator | str | None, data: FisherDataset,
                              batch_size: int = 64) -> dict[str, float]:
    """Mean relative error of ``model`` (``None``: the standard estimator; ``"quadrature"``:
    :func:`quadrature_fisher`) and of the standard estimator on ``data``; ``reduction = 1 − model / standard``."""
    if model == "quadrature":
        preds = [quadrature_fisher(gs) for gs in data.sets]
        err = float(relative_error({k: torch.stack([p[k] for p in preds]) for k in preds[0]}, data.target).mean())
        std = float(relative_error(data.standard, data.target).mean())
        return {"error": err, "standard_error": std, "reduction": 1.0 - err / std}
    errs = []
    for s in range(0, len(data), batch_size):
        b = data.subset(range(s, min(s + batch_size, len(data))))
        pred = b.standard if model is None else model(b.sets, b.standard)
        errs.append(relative_error(pred, b.target))
    err = float(torch.cat(errs).mean())
    std = float(relative_error(data.standard, data.target).mean())
    return {"error": err, "standard_error": std, "reduction": 1.0 - err / std}
