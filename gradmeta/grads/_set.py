"""``GradientSet``: the factored per-example gradients of a batch, and what follows from them."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import torch

from ._factors import LayerFactors


class GradientSet:
    """Per-example gradients of a batch of ``B`` examples, kept as factors per layer.

    Returned by ``gm.collect_gradients``. Indexing by module name gives a ``LayerFactors`` with
    ``.activations (B, T, d_in)`` and ``.backprops (B, T, d_out)``; a parameter of the exact
    fallback is its own entry (keyed by the parameter name, ``module_type == "fallback"``) holding
    its per-example gradients ``(B, *shape)`` as ``backprops``. A parameter used by several modules
    (``shared_params``) gets the sum of its uses everywhere. Every method below works from
    the factors; only ``per_example_grads`` returns tensors of size ``B × parameters``. Parameter
    dicts are keyed by ``model.named_parameters()`` names. The examples are unordered: permuting
    them permutes every output along its batch axis.
    """

    def __init__(self, layers: dict[str, LayerFactors], losses: torch.Tensor):
        self._layers = dict(layers)
        self.losses = losses
        """``(B,)`` per-example losses of the batch (detached)."""
        uses: dict[str, int] = {}
        for f in self._layers.values():
            for n in f.param_names.values():
                uses[n] = uses.get(n, 0) + 1
        self._shared = {n for n, c in uses.items() if c > 1}

    @property
    def fallback_params(self) -> list[str]:
        """Parameters that came through the exact fallback (per-example gradients kept as they are)."""
        return [n for f in self._layers.values() if f.module_type == "fallback" for n in f.param_names.values()]

    @property
    def shared_params(self) -> list[str]:
        """Parameters used by several collected modules (weight tying); their contributions are summed."""
        return sorted(self._shared)

    def _unshared(self, f: LayerFactors) -> LayerFactors | None:
        """``f`` without its shared parameters (``None`` if nothing is left)."""
        if not self._shared.intersection(f.param_names.values()):
            return f
        keep = {k: v for k, v in f.param_names.items() if v not in self._shared}
        return dataclasses.replace(f, param_names=keep) if keep else None

    def _shared_grads(self, names=None) -> dict[str, torch.Tensor]:
        """Materialised per-example gradients ``(B, *shape)`` of the shared parameters (sums over uses)."""
        want = self._shared if names is None else self._shared.intersection(names)
        out: dict[str, torch.Tensor] = {}
        for f in self._layers.values():
            if want.intersection(f.param_names.values()):
                for local, g in f._rule.per_example(f).items():
                    n = f.param_names[local]
                    if n in want:
                        out[n] = out[n] + g if n in out else g
        return out

    def _sq_norms(self, f: LayerFactors) -> torch.Tensor | float:
        u = self._unshared(f)
        return 0.0 if u is None else u._rule.sq_norms(u)

    @property
    def layer_names(self) -> list[str]:
        """Names of the collected modules, in forward order."""
        return list(self._layers)

    @property
    def batch_size(self) -> int:
        """Number of examples ``B``."""
        return self.losses.shape[0]

    @property
    def param_names(self) -> list[str]:
        """Names of the collected parameters, in layer order (each once)."""
        return list(dict.fromkeys(n for f in self._layers.values() for n in f.param_names.values()))

    def __getitem__(self, name: str) -> LayerFactors:
        try:
            return self._layers[name]
        except KeyError:
            msg = f"no layer {name!r} in this GradientSet; layers: {self.layer_names}"
            exact = [n for n in self.fallback_params if n.startswith(name + ".")]
            if exact:  # the module ran, but its factors were not captured
                msg = (f"layer {name!r} was not factored in this GradientSet: its parameters {exact} came "
                       "through the exact per-example fallback (for nn.MultiheadAttention: dropout in "
                       "training mode, add_bias_kv or add_zero_attn). A network that reads the factors "
                       "needs them: collect with the model in eval mode (model.eval()) or without "
                       "attention dropout; gradmeta.grads.supported_layers() lists what each layer needs")
            raise KeyError(msg) from None

    def __contains__(self, name: str) -> bool:
        return name in self._layers

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        rows = ", ".join(f"{n}: {f.module_type}" + ("" if f.module_type == "fallback" else f" T={f.backprops.shape[1]}")
                         for n, f in self._layers.items())
        return f"GradientSet(B={self.batch_size}, layers=[{rows}])"

    def map_factors(self, fn: Callable[[str, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                    ) -> "GradientSet":
        """A new set whose layer ``name`` has factors ``fn(name, A, Δ) -> (A', Δ')``.

        ``A (B, T, d_in)`` and ``Δ (B, T, d_out)`` are :attr:`LayerFactors.activations` and
        ``.backprops``; the results must keep those shapes. Every method of the new set then works
        on the transformed factors (e.g. per-layer rescaling: ``fn = lambda n, a, d: (a / s_a, d / s_d)``,
        which scales each per-example weight gradient by ``1 / (s_a s_d)``). Only layers whose
        factors are dense inputs (Linear, convolutions, LayerNorm) can be mapped; an Embedding,
        whose ``A`` is one-hot rows stored as indices, raises ``ValueError`` naming the layer.
        """
        layers = {}
        for name, f in self._layers.items():
            if not getattr(f._rule, "dense_inputs", False):
                raise ValueError(f"map_factors: layer {name!r} ({f.module_type}) stores its activations as "
                                 "indices and cannot be mapped; restrict the set to the other layers")
            a, d = fn(name, f.activations, f.backprops)
            if a.shape != f.activations.shape or d.shape != f.backprops.shape:
                raise ValueError(f"map_factors: fn changed the shapes of layer {name!r}: A {tuple(f.activations.shape)}"
                                 f" -> {tuple(a.shape)}, Δ {tuple(f.backprops.shape)} -> {tuple(d.shape)}")
            layers[name] = dataclasses.replace(f, _inputs=a, backprops=d)
        return GradientSet(layers, self.losses)

    def _per_param(self, method: str) -> dict[str, torch.Tensor]:
        """Linear quantities summed over the uses of each parameter."""
        out = {}
        for f in self._layers.values():
            for local, g in getattr(f._rule, method)(f).items():
                n = f.param_names[local]
                out[n] = out[n] + g if n in out else g
        return out

    def per_example_grads(self) -> dict[str, torch.Tensor]:
        """``{param_name: (B, *param.shape)}``: materialised per-example gradients."""
        return self._per_param("per_example")

    def mean_grad(self) -> dict[str, torch.Tensor]:
        """``{param_name: param.shape}``: gradient of ``losses.mean()``."""
        return self._per_param("mean")

    def grad_norms(self) -> torch.Tensor:
        """``(B,)`` L2 norms of the per-example gradients over all collected parameters."""
        sq = sum(self._sq_norms(f) for f in self._layers.values())
        sq = sq + sum(g.flatten(1).square().sum(1) for g in self._shared_grads().values())
        return sq.sqrt()

    def layer_grad_norms(self) -> dict[str, torch.Tensor]:
        """``{layer_name: (B,)}`` per-example gradient norms of each layer's parameters (a shared
        parameter counts with its full gradient in every layer that uses it)."""
        out = {}
        shared = self._shared_grads()
        for n, f in self._layers.items():
            sq = self._sq_norms(f) + sum(shared[p].flatten(1).square().sum(1)
                                         for p in f.param_names.values() if p in shared)
            out[n] = torch.as_tensor(sq).sqrt()
        return out

    def gram(self) -> torch.Tensor:
        """``(B, B)`` Gram matrix ``⟨g_b, g_c⟩`` of per-example gradients, summed over layers."""
        total = 0.0
        for f in self._layers.values():
            u = self._unshared(f)
            if u is not None:
                total = total + u._rule.gram(u)
        for g in self._shared_grads().values():
            g = g.flatten(1)
            total = total + g @ g.T
        return total

    def fisher_diagonal(self) -> dict[str, torch.Tensor]:
        """``{param_name: param.shape}``: empirical Fisher diagonal ``(1/B) Σ_b g_b ∘ g_b``."""
        out = {}
        for f in self._layers.values():
            u = self._unshared(f)
            if u is not None:
                out.update({u.param_names[k]: v for k, v in u._rule.sq_sum(u).items()})
        out.update({n: g.square().sum(0) for n, g in self._shared_grads().items()})
        return {k: v / self.batch_size for k, v in out.items()}

    def kfac_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{layer_name: (A_cov, G_cov)}`` for Linear, convolution and Embedding layers.

        ``A_cov = (1/(B·T)) Σ_{b,t} a aᵀ`` (``a`` with a trailing 1 when the layer has a bias) and
        ``G_cov = (1/B) Σ_{b,t} δ δᵀ``; for ``T = 1``, ``A_cov ⊗ G_cov`` is the K-FAC approximation
        of the empirical Fisher ``(1/B) Σ_b vec(g_b) vec(g_b)ᵀ`` (weights in ``(d_out, d_in)`` layout).
        """
        return {n: f._rule.kfac(f) for n, f in self._layers.items() if f._rule.kfac_ok(f)
                and not self._shared.intersection(f.param_names.values())}

    def kfac_missing(self) -> dict[str, str]:
        """``{parameter name: why}`` for the collected parameters that ``kfac_factors`` does not cover."""
        out = {}
        for n, f in self._layers.items():
            if f.module_type == "fallback":
                why = "exact fallback (no factors)"
            elif not f._rule.kfac_ok(f):
                why = f"{f.module_type} layers (this configuration) have no K-FAC factors"
            else:
                continue
            out.update({p: why for p in f.param_names.values()})
        for p in self._shared:
            out[p] = "shared by several modules (weight tying)"
        return out
