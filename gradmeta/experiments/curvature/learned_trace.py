"""Learned Fisher-trace estimator on larger MLPs: GradMetaNet corrects the standard trace estimate.

The zoo: MLPs ``64 → h → h → 10`` (ReLU, ``gradmeta.models.mlp``) on the 1797 scikit-learn digits
(flattened 8×8, ``gradmeta.data.load_digits("all")``). Every MLP is drawn with its own seed, its
weight matrices scaled by ``s ~ logU(init_scale)`` and then trained for ``k ~ U{0..train_steps}``
full-batch Adam steps on its points with their true labels, so the zoo spans near-uniform random
predictors to fairly confident ones (Fisher traces over several orders of magnitude).

Target: the **true Fisher trace** of the mean cross-entropy over ``num_points`` digits (all of them
by default), exactly, with the labels summed out under the model's predictive distribution::

    T = (1/N) Σ_n Σ_y p(y | x_n) ‖∇_θ log p(y | x_n)‖²

(one factored gradient collection over every (point, label) pair; no Monte-Carlo in the target).
Input: a gradient set of ``set_size`` per-example cross-entropy gradients at ``set_size`` of those
points (without replacement), each with its label **sampled from the model** ``y_b ~ p(· | x_b)``.
The standard estimator is their mean squared norm ``T̂_std = (1/B) Σ_b ‖g_b‖²`` (unbiased for
``T``). Metric: the normalised absolute error ``|T̂ − T| / T`` averaged over held-out MLPs
(normalised MAE), reported next to the standard estimator's.

Every learned model predicts a log-space correction ``T̂ = T̂_std · exp(γ · c)`` with ``c`` a scalar
invariant readout and ``γ`` a learned scalar initialised at 0, so every model starts *exactly* at the
standard estimator (as :class:`LearnedFisherEstimator` does per weight).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradmeta.grads import GradientSet, collect_gradients
from gradmeta.curvature import fisher_trace, rao_blackwell_trace, standard_trace
from gradmeta.models import classification_loss, mlp
from gradmeta.nn import AveragedGradientNet, FlatFactorMLP, GradMetaNet, NeuronLayout, symmetry_spec
from .learned_fisher import _EPS, fit_minibatches, square_channels

__all__ = ["TraceDataset", "make_trace_dataset", "normalised_abs_error",
           "LearnedTraceEstimator", "TRACE_MODELS", "train_trace_estimator", "evaluate_trace_estimator"]

TRACE_MODELS = ("gradmetanet", "gradmetanet++", "gradmetanet-no-norms", "norms_deepsets", "flat_mlp", "averaged_grad")
NUM_CLASSES = 10
IN_FEATURES = 64


def _digits(dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    from gradmeta.data import load_digits
    return load_digits("all", dtype=dtype).tensors(flatten=True)


def normalised_abs_error(pred: Tensor, target: Tensor) -> Tensor:
    """``|pred − target| / target``, elementwise (``(N,)``); its mean is the normalised MAE."""
    if pred.shape != target.shape:
        raise ValueError(f"normalised_abs_error: pred {tuple(pred.shape)} vs target {tuple(target.shape)}")
    return (pred - target.to(pred)).abs() / target.to(pred).clamp_min(_EPS)


@dataclass
class TraceDataset:
    """``N`` MLPs ``64-h-h-10`` with their gradient sets, standard estimates and Fisher-trace targets.

    Attributes:
        sets: ``N`` gradient sets of ``B = set_size`` cross-entropy gradients (model-sampled labels).
        standard: ``(N,)`` standard estimates :func:`standard_trace` of those sets.
        target: ``(N,)`` exact Fisher traces :func:`fisher_trace` over each MLP's ``num_points`` digits.
        params: ``{param_name: (N, *shape)}`` the MLPs' parameters (``mlp`` names, e.g. ``"0.weight"``).
        points: ``(N, num_points)`` digit indices of each target; the set uses the first ``set_size``.
        labels: ``(N, set_size)`` the sampled labels of the set.
        init_scale: ``(N,)`` weight scale ``s``; ``train_steps``: ``(N,)`` Adam steps taken.
        hidden: the width ``h``.
    """

    sets: list[GradientSet]
    standard: Tensor
    target: Tensor
    params: dict[str, Tensor]
    points: Tensor
    labels: Tensor
    init_scale: Tensor
    train_steps: Tensor
    hidden: int

    def __len__(self) -> int:
        return len(self.sets)

    def subset(self, idx) -> "TraceDataset":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return TraceDataset([self.sets[i] for i in idx.tolist()], self.standard[idx], self.target[idx],
                            {k: v[idx] for k, v in self.params.items()}, self.points[idx], self.labels[idx],
                            self.init_scale[idx], self.train_steps[idx], self.hidden)


def make_trace_dataset(num: int, *, hidden: int = 32, set_size: int = 128, num_points: int | None = None,
                       init_scale: tuple[float, float] = (0.5, 2.0), train_steps: int = 50, lr: float = 1e-2,
                       seed: int = 0, dtype: torch.dtype = torch.float32) -> TraceDataset:
    """Draw ``num`` MLPs ``64 → hidden → hidden → 10`` (module docstring) and build their examples.

    ``num_points``: digits per MLP (a random subset; ``None``: all 1797) — the target averages over
    them, the set uses ``set_size`` of them. Deterministic in ``seed``; models live and targets are
    computed in float64, the sets are collected in ``dtype``.
    """
    x_all, y_all = _digits(torch.float64)
    num_points = len(x_all) if num_points is None else num_points
    if not 0 < set_size <= num_points <= len(x_all):
        raise ValueError(f"make_trace_dataset: need 0 < set_size ({set_size}) <= num_points ({num_points}) "
                         f"<= {len(x_all)} digits")
    lo, hi = init_scale
    if not 0 < lo <= hi:
        raise ValueError(f"make_trace_dataset: init_scale must be 0 < low <= high, got {init_scale}")
    gen = torch.Generator().manual_seed(seed)
    sets, std, tgt, scales, steps, prm, pts_l, labels = [], [], [], [], [], [], [], []
    for _ in range(num):
        pts = torch.randperm(len(x_all), generator=gen)[:num_points]
        x, y = x_all[pts], y_all[pts]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2 ** 62, (), generator=gen)))
            model = mlp([IN_FEATURES, hidden, hidden, NUM_CLASSES]).double()
        s = lo * (hi / lo) ** float(torch.rand((), generator=gen, dtype=torch.float64))
        k = int(torch.randint(train_steps + 1, (), generator=gen))
        _perturb_and_train(model, s, k, x, y, lr)
        xb = x[:set_size]
        with torch.no_grad():
            yb = torch.multinomial(model(xb).softmax(-1), 1, generator=gen)[:, 0]
        tgt.append(fisher_trace(model, x))
        prm.append({k: p.detach().to(dtype, copy=True) for k, p in model.named_parameters()})
        pts_l.append(pts)
        labels.append(yb)
        gs = collect_gradients(model.to(dtype), classification_loss, xb.to(dtype), yb)
        sets.append(gs)
        std.append(standard_trace(gs))
        scales.append(s)
        steps.append(k)
    return TraceDataset(sets, torch.stack(std), torch.stack(tgt).to(dtype),
                        {k: torch.stack([p[k] for p in prm]) for k in prm[0]}, torch.stack(pts_l),
                        torch.stack(labels), torch.tensor(scales, dtype=dtype), torch.tensor(steps), hidden)


def _perturb_and_train(model: nn.Module, scale: float, steps: int, x: Tensor, y: Tensor, lr: float) -> None:
    """Scale every weight matrix by ``scale``, then ``steps`` full-batch Adam steps on ``(x, y)``."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight"):
                p.mul_(scale)
    if steps:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        for _ in range(steps):
            loss = classification_loss(model(x), y).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()


class LearnedTraceEstimator(nn.Module):
    """``T̂ = T̂_std · exp(γ · c(gradient set))`` with ``c`` a scalar invariant readout.

    Args:
        kind: ``"gradmetanet"`` / ``"gradmetanet++"``: ``GradMetaNet`` (invariant readout, base or
            plusplus variant) on the factors ``(a, δ)`` of every datum plus 4 extra neuron
            channels: :func:`square_channels` ``(a², δ²)``; the datum's log relative squared norm
            ``log(‖g_b‖² / T̂_std)``; and the standardised ``log T̂_std`` (the same on every
            neuron and datum). ``"gradmetanet-no-norms"``: ``"gradmetanet"`` without the last two
            (an ablation: only ``(a, δ, a², δ²)`` per datum and neuron). ``"norms_deepsets"``: the
            other ablation, a DeepSets ``ρ(mean_b φ(log(‖g_b‖² / T̂_std), z))`` on those two channels
            alone (no factors, no neurons). ``"flat_mlp"``:
            ``FlatFactorMLP`` on each datum's concatenated
            factors, mean over data (no neuron symmetry). ``"averaged_grad"``: the weight-space
            ``AveragedGradientNet`` fed one averaged statistic per weight, the standardised
            ``log F̂_std`` (Fisher diagonal of the same set; its sum is ``T̂_std``), without the
            per-datum set.
        hidden: MLP width ``h``; ``channels``, ``layers``: backbone sizes.

    Symmetry: every kind but ``"flat_mlp"`` is exactly invariant to permutations of the hidden
    neurons of the MLP the set came from; all kinds are invariant to the order of the data.
    Input: a list of ``G`` gradient sets of MLPs ``64-h-h-10``; output ``(G,)``.
    """

    def __init__(self, kind: str, hidden: int = 32, channels: int = 16, layers: int = 2):
        super().__init__()
        if kind not in TRACE_MODELS:
            raise ValueError(f"LearnedTraceEstimator: kind must be one of {TRACE_MODELS}, got {kind!r}")
        self.kind, self.hidden = kind, hidden
        spec = symmetry_spec(mlp([IN_FEATURES, hidden, hidden, NUM_CLASSES]))
        self.names = [p for p, _ in spec.params]
        self.norms = kind in ("gradmetanet", "gradmetanet++")
        if kind.startswith("gradmetanet"):
            self.net = GradMetaNet(spec, "invariant", 1, "plusplus" if kind.endswith("++") else "base",
                                   channels=channels, set_layers=layers, neuron_layers=2,
                                   extra_channels=2 + 2 * self.norms)
            self._raw_layout = NeuronLayout(spec)
        elif kind == "flat_mlp":
            self.net = FlatFactorMLP(spec, "invariant", 1, hidden=4 * channels)
        elif kind == "norms_deepsets":
            w = 4 * channels
            self.net = nn.ModuleDict({"phi": nn.Sequential(nn.Linear(2, w), nn.GELU(), nn.Linear(w, w)),
                                      "rho": nn.Sequential(nn.GELU(), nn.Linear(w, w), nn.GELU(), nn.Linear(w, 1))})
        else:
            self.net = AveragedGradientNet(spec, "invariant", 1, channels=channels, layers=layers)
        self.gamma = nn.Parameter(torch.zeros(()))
        self.register_buffer("log_mean", torch.zeros(1 + len(self.names)))  # [trace, *per tensor]
        self.register_buffer("log_std", torch.ones(1 + len(self.names)))

    @torch.no_grad()
    def fit_normalisation(self, sets: list[GradientSet]) -> None:
        """Mean/std of ``log T̂_std`` and, per parameter tensor, of ``log F̂_std`` over ``sets``."""
        logs = [torch.stack([standard_trace(s) for s in sets]).clamp_min(_EPS).log()]
        diags = [s.fisher_diagonal() for s in sets]
        logs += [torch.stack([d[k] for d in diags]).clamp_min(_EPS).log() for k in self.names]
        for i, v in enumerate(logs):
            self.log_mean[i] = v.mean()
            self.log_std[i] = v.std().clamp_min(1e-3) if v.numel() > 1 else 1.0

    @staticmethod
    def _log_rel_norms(gs: GradientSet) -> Tensor:
        """``(B,)`` ``log(‖g_b‖² / T̂_std)`` (floored at ``1e-4`` before the log)."""
        sq = gs.grad_norms().square()
        return (sq / sq.mean().clamp_min(_EPS)).clamp_min(1e-4).log()

    def _extra(self, gs: GradientSet, z: Tensor) -> dict[str, Tensor]:
        if not self.norms:
            return square_channels(self._raw_layout, gs)
        rel = self._log_rel_norms(gs)
        out = {}
        for name, f in square_channels(self._raw_layout, gs).items():
            B, T, n, _ = f.shape
            per = torch.stack([rel.to(f).view(B, 1, 1).expand(B, T, n), z.to(f).expand(B, T, n)], -1)
            out[name] = torch.cat([f, per], -1)
        return out

    def forward(self, sets: list[GradientSet]) -> Tensor:
        """``G`` gradient sets -> ``(G,)`` Fisher-trace estimates."""
        dtype = self.gamma.dtype
        std = torch.stack([standard_trace(s) for s in sets]).to(dtype)
        z = (std.clamp_min(_EPS).log() - self.log_mean[0]) / self.log_std[0]
        if self.kind.startswith("gradmetanet"):
            c = self.net(list(sets), extra=[self._extra(s, z[g]) for g, s in enumerate(sets)])
        elif self.kind == "flat_mlp":
            c = self.net(list(sets))
        elif self.kind == "norms_deepsets":
            c = torch.stack([self.net["rho"](self.net["phi"](torch.stack(
                [self._log_rel_norms(s).to(dtype), z[g].expand(s.batch_size)], -1)).mean(0))
                for g, s in enumerate(sets)])
        else:
            diags = [s.fisher_diagonal() for s in sets]
            c = self.net([{k: (d[k].to(dtype).clamp_min(_EPS).log() - self.log_mean[i + 1]) / self.log_std[i + 1]
                           for i, k in enumerate(self.names)} for d in diags])
        return std * torch.exp(self.gamma * c.reshape(len(sets)).to(dtype))


def train_trace_estimator(model: LearnedTraceEstimator, data: TraceDataset, *, steps: int = 300,
                          batch_size: int = 8, lr: float = 3e-3, seed: int = 0,
                          log_every: int = 0) -> dict[str, list]:
    """Fit the normalisation on ``data``, then Adam (cosine learning rate) on the mean
    :func:`normalised_abs_error` of minibatches of ``batch_size`` MLPs (the reported metric).

    Returns ``{"step": [...], "loss": [...]}`` (every ``log_every`` steps; 0: only the last).
    """
    if model.hidden != data.hidden:
        raise ValueError(f"train_trace_estimator: estimator built for h={model.hidden}, data has h={data.hidden}")
    model.fit_normalisation(data.sets)
    return fit_minibatches(model, data, lambda b: normalised_abs_error(model(b.sets), b.target),
                           steps=steps, batch_size=batch_size, lr=lr, seed=seed, log_every=log_every)


@torch.no_grad()
def evaluate_trace_estimator(model: LearnedTraceEstimator | str | None, data: TraceDataset,
                             batch_size: int = 64) -> dict[str, float]:
    """Normalised MAE of ``model`` (``None``: the standard estimator; ``"rao_blackwell"``:
    :func:`rao_blackwell_trace`) and of the standard estimator on ``data``;
    ``ratio = nmae / standard_nmae`` (< 1: better than the standard)."""
    if model == "rao_blackwell":
        pred = torch.stack([rao_blackwell_trace(gs) for gs in data.sets]).to(data.target)
        err = float(normalised_abs_error(pred, data.target).mean())
    else:
        errs = []
        for s in range(0, len(data), batch_size):
            b = data.subset(range(s, min(s + batch_size, len(data))))
            errs.append(normalised_abs_error(b.standard if model is None else model(b.sets), b.target))
        err = float(torch.cat(errs).mean())
    std = float(normalised_abs_error(data.standard, data.target).mean())
    return {"nmae": err, "standard_nmae": std, "ratio": err / std}
