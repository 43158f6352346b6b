"""Fisher diagonal (empirical / Monte-Carlo) and K-FAC, read from factored gradient sets.

Empirical Fisher: ``F = (1/N) Σ_n g_n g_nᵀ`` with ``g_n = ∇ℓ_n`` at the given targets; its diagonal
is one matmul per layer on the factors: ``(1/B)(Δ∘Δ)ᵀ(A∘A)``.
Monte-Carlo Fisher: the same with targets drawn from the model's predictive distribution, an
unbiased estimate of the GGN for cross-entropy ("categorical") and squared error ("gaussian").
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import nn

from ._data import CurvatureError, batch_size, batches, call_model, checked, output_tensor, trainable
from ._estimators import _gen
from ..params import ParamLayout
from ._linop import LinearOperator

_LIKELIHOODS = ("categorical", "gaussian")


def sample_targets(outputs: torch.Tensor, loss_fn, likelihood: str, generator: torch.Generator) -> torch.Tensor:
    """Targets drawn from the model's predictive distribution at ``outputs``.

    * ``"categorical"``: ``y ~ softmax(outputs)`` over the last axis (integer labels, leading shape kept).
    * ``"gaussian"``: ``y = f + ε/√(2c)``, ``ε ~ N(0, I)``, where ``c`` is read off ``loss_fn`` as
      ``ℓ(f, f + e_1)`` for a unit vector ``e_1``: for a loss ``c‖f − y‖²`` (e.g. MSE, ``c = 1/D``)
      ``E[g gᵀ]`` then equals the GGN ``2c JᵀJ``.
    """
    f = outputs.detach()
    gen_dev = generator.device
    if likelihood == "categorical":
        probs = f.reshape(-1, f.shape[-1]).softmax(-1).to(gen_dev, torch.float64)
        y = torch.multinomial(probs, 1, generator=generator).view(f.shape[:-1])
        return y.to(f.device)
    if likelihood == "gaussian":
        e = torch.zeros_like(f)
        e.view(f.shape[0], -1)[:, 0] = 1.0
        c = loss_fn(f, f + e).detach()  # (B,) per-example curvature constant of a quadratic loss
        if (c <= 0).any():
            raise CurvatureError("likelihood='gaussian' needs a squared-error loss_fn (ℓ(f, f+e) > 0)")
        eps = torch.randn(f.shape, generator=generator, device=gen_dev, dtype=torch.float64).to(f)
        scale = (2 * c).rsqrt().view((-1,) + (1,) * (f.ndim - 1))
        return f + eps * scale
    raise CurvatureError(f"likelihood must be one of {_LIKELIHOODS}, got {likelihood!r}")


def _fisher_batches(model, loss_fn, data, kind, likelihood, mc_samples, generator, eval_batchnorm):
    """Yield ``(weight, inputs, targets)``: the weights of the batches sum to 1."""
    if kind not in ("empirical", "mc"):
        raise CurvatureError(f"kind must be 'empirical' or 'mc', got {kind!r}")
    if kind == "mc" and likelihood is None:
        raise CurvatureError("kind='mc' needs likelihood='categorical' (cross-entropy) or 'gaussian' (squared error)")
    bs = batches(data)
    N = sum(batch_size(x) for x, _ in bs)
    gen = _gen(generator, None)
    for x, y in bs:
        x = x if isinstance(x, (torch.Tensor, Mapping)) else tuple(x)
        if kind == "empirical":
            yield batch_size(x) / N, x, y
            continue
        with torch.no_grad(), checked(model, eval_batchnorm):
            out = call_model(model, x)
        for _ in range(mc_samples):
            yield batch_size(x) / (N * mc_samples), x, sample_targets(output_tensor(out)[0], loss_fn, likelihood, gen)


def fisher_diagonal(model: nn.Module, loss_fn, data, kind: str = "empirical", *, likelihood: str | None = None,
                    mc_samples: int = 1, generator=None, route: str = "auto",
                    eval_batchnorm: bool = False) -> dict[str, torch.Tensor]:
    """Fisher diagonal ``(1/N) Σ_n g_n ∘ g_n`` of the per-example gradients over ``data``.

    Args:
        model, loss_fn, data: as for ``hvp``; ``loss_fn`` returns per-example losses ``(B,)``.
        kind: ``"empirical"`` (the given targets) or ``"mc"`` (targets sampled from the model,
            ``mc_samples`` draws per example; an estimate of the GGN diagonal). Scaling: for a
            per-example loss that *averages* ``T`` token losses (``ℓ = (1/T) Σ_t ℓ_t``, e.g. a
            language model), cross-token terms vanish in expectation and ``E[g gᵀ] = GGN / T``;
            multiply by ``T`` (or sum the token losses) to estimate the GGN of the mean loss. The
            sampled targets are aligned with the logits (one per position), so ``loss_fn`` must not
            shift them (``causal_lm_losses(..., shift=False)``).
        likelihood: for ``kind="mc"``: ``"categorical"`` (cross-entropy on logits) or ``"gaussian"``.
        generator: ``torch.Generator`` (CPU) or int seed for the MC draws.
        route: ``"factors"`` (``gm.collect_gradients(...).fisher_diagonal()``, one matmul per layer),
            ``"per_example"`` (torch.func per-example gradients, any module) or ``"auto"`` (factors
            when every trainable parameter is covered by a supported layer).

    Returns:
        ``{param_name: tensor shaped like the parameter}`` for every trainable parameter.
    """
    from gradmeta import grads as gg

    _, layout = trainable(model)
    out = {n: torch.zeros(s, dtype=p.dtype, device=p.device)
           for (n, s), p in zip(zip(layout.names, layout.shapes), trainable(model)[0])}
    if route not in ("auto", "factors", "per_example"):
        raise CurvatureError(f"route must be 'auto', 'factors' or 'per_example', got {route!r}")
    for w, x, y in _fisher_batches(model, loss_fn, data, kind, likelihood, mc_samples, generator, eval_batchnorm):
        fd = None
        with checked(model, eval_batchnorm):
            if route != "per_example":
                try:
                    fd = gg.collect_gradients(model, loss_fn, x, y).fisher_diagonal()
                    if set(fd) != set(layout.names):
                        raise gg.GradientCollectionError(
                            f"parameters {sorted(set(layout.names) - set(fd))} are not covered by factor rules")
                except gg.GradientCollectionError:
                    if route == "factors":
                        raise
                    fd = None
            if fd is None:
                pe = gg.per_example_grads(model, loss_fn, x, y)
                fd = {n: (g * g).mean(0) for n, g in pe.items()}
        for n in layout.names:
            out[n] += w * fd[n].detach()
    return out


class KFAC(Mapping):
    """K-FAC factors of the Linear layers: ``{layer_name: (A_cov, G_cov)}`` plus products.

    For a Linear layer with weight ``W (d_out, d_in)`` and optional bias, the block of the Fisher
    over ``M = [W | b]`` (``d_out × (d_in + 1)``) is approximated by ``G_cov ⊗ A_cov`` in row-major
    ``vec(M)`` order, i.e. ``F̂ vec(M) = vec(G_cov M A_cov)``. Other parameters (convolutions,
    norms, embeddings, weights tied to another module) are not covered: ``missing`` lists them.

    Attributes:
        param_names: ``{layer_name: {"weight": param_name, "bias": param_name}}``.
    """

    def __init__(self, factors: dict, param_names: dict, param_shapes: dict, missing: dict | None = None):
        self._factors = factors
        self.param_names = param_names
        self.missing: dict[str, str] = dict(missing or {})
        """``{param_name: why}`` for the trainable parameters these factors do not cover (they are
        absent from ``matvec`` / ``to_dense``)."""
        names = [p for layer in factors for p in param_names[layer].values()]
        self.layout = ParamLayout(tuple(names), tuple(param_shapes[n] for n in names))

    def __getitem__(self, layer):
        return self._factors[layer]

    def __iter__(self):
        return iter(self._factors)

    def __len__(self):
        return len(self._factors)

    def _layer_product(self, layer, v: dict, damping: float, inverse: bool):
        A, G = self._factors[layer]
        names = self.param_names[layer]
        M = v[names["weight"]]
        if "bias" in names:
            M = torch.cat([M, v[names["bias"]][:, None]], 1)
        if inverse:
            eye_a = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
            eye_g = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
            # damping λ split as √λ on each factor (Martens & Grosse 2015, §6.3, with π = 1)
            d = damping ** 0.5
            R = torch.linalg.solve(G + d * eye_g, torch.linalg.solve(A + d * eye_a, M.T).T)
        else:
            R = G @ M @ A
        res = {names["weight"]: R[:, : v[names["weight"]].shape[1]]}
        if "bias" in names:
            res[names["bias"]] = R[:, -1]
        return res

    def matvec(self, v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """K-FAC-vector product ``{param_name: tensor}`` -> same keys (the covered parameters)."""
        out = {}
        for layer in self._factors:
            out.update(self._layer_product(layer, v, 0.0, False))
        return out

    def inverse_matvec(self, v: dict[str, torch.Tensor], damping: float = 1e-3) -> dict[str, torch.Tensor]:
        """``((G + √λ I) ⊗ (A + √λ I))⁻¹ v`` per layer: a damped natural-gradient direction."""
        out = {}
        for layer in self._factors:
            out.update(self._layer_product(layer, v, damping, True))
        return out

    def operator(self) -> LinearOperator:
        """The K-FAC matrix as a ``LinearOperator`` on flat vectors in ``self.layout`` order."""
        kf = self
        ref = next(iter(self._factors.values()))[0]

        class _Op(LinearOperator):
            def _matvec(self, x):
                r = kf.matvec(kf.layout.unflatten(x))
                return kf.layout.flatten(r)

        return _Op(self.layout.size, ref.dtype, ref.device)

    def to_dense(self) -> torch.Tensor:
        """Dense block-diagonal ``(P, P)`` matrix over the covered parameters (for tests)."""
        return self.operator().to_dense()


def kfac(model: nn.Module, loss_fn, data, kind: str = "empirical", *, likelihood: str | None = None,
         mc_samples: int = 1, generator=None, eval_batchnorm: bool = False) -> KFAC:
    """K-FAC factors of every ``nn.Linear`` layer, averaged over ``data`` (weighted by batch size).

    Parameters of other layers are not covered: they are listed in ``KFAC.missing`` (with a warning).

    ``A_cov = E[a aᵀ]`` (``a`` with a trailing 1 for a bias; tokens averaged), ``G_cov = E_b[Σ_t δ δᵀ]``
    from ``gm.collect_gradients(...).kfac_factors()``; ``kind``/``likelihood`` as for ``fisher_diagonal``
    (``"mc"`` gives the usual K-FAC of the Fisher/GGN).

    Returns:
        ``KFAC`` mapping ``layer_name -> (A_cov (d_in[+1], d_in[+1]), G_cov (d_out, d_out))``.
    """
    from gradmeta import grads as gg

    _, layout = trainable(model)
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight.requires_grad]
    if not linear:
        raise CurvatureError(f"{type(model).__name__} has no trainable nn.Linear layers for K-FAC")
    acc: dict = {}
    pnames: dict = {}
    for w, x, y in _fisher_batches(model, loss_fn, data, kind, likelihood, mc_samples, generator, eval_batchnorm):
        with checked(model, eval_batchnorm):
            gs = gg.collect_gradients(model, loss_fn, x, y, layers=linear)
        for layer, (A, G) in gs.kfac_factors().items():
            if layer not in linear:
                continue
            pnames[layer] = dict(gs[layer].param_names)
            a0, g0 = acc.get(layer, (0, 0))
            acc[layer] = (a0 + w * A.detach(), g0 + w * G.detach())
    shapes = dict((n, p.shape) for n, p in model.named_parameters())
    covered = {p for names in pnames.values() for p in names.values()}
    missing = {n: "not an nn.Linear weight or bias (no K-FAC block here)" for n in layout.names if n not in covered}
    for n in missing:
        if any(n in f.param_names.values() for f in (gs[layer] for layer in gs.layer_names)):
            missing[n] = "nn.Linear parameter shared with another module (weight tying)"
    if missing:
        warnings.warn(f"kfac: {len(missing)} trainable parameters are not covered (see KFAC.missing): "
                      f"{sorted(missing)[:6]}{' ...' if len(missing) > 6 else ''}", RuntimeWarning, stacklevel=2)
    return KFAC(acc, pnames, shapes, missing)
