"""Factor rules: how each supported module class yields and uses its factors.

A rule captures the layer input in a forward hook and the output gradient in the backward pass,
and turns the pair into per-example gradients, mean gradients, Gram matrices, squared sums and
K-FAC factors. Rules are registered per module class (``register_rule``); the README's support
table is generated from this registry (``supported_layers``).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ._errors import GradientCollectionError
from ._factors import (LayerFactors, append_one, bilinear_gram, bilinear_per_example,
                       bilinear_sq_norms, bilinear_sq_sum, split_bias)

_REGISTRY: dict[type[nn.Module], "FactorRule"] = {}


def register_rule(module_cls: type[nn.Module]):
    """Class decorator: register a rule for ``module_cls`` (and subclasses that keep its forward)."""
    def wrap(rule_cls):
        _REGISTRY[module_cls] = rule_cls()
        return rule_cls
    return wrap


def rule_for(module: nn.Module) -> "FactorRule | None":
    """The rule for ``module``: its class or the nearest registered base whose ``forward`` it keeps."""
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls] if type(module).forward is cls.forward else None
    return None


def supported_layers() -> dict[str, str]:
    """``{module class name: what the factors are}`` for every registered rule."""
    return {cls.__name__: rule.summary for cls, rule in _REGISTRY.items()}


def support_table() -> str:
    """Markdown table of the supported layers (the README's table is this text)."""
    rows = [f"| `nn.{name}` | {summary} |" for name, summary in supported_layers().items()]
    return "\n".join(["| layer | factors kept per example |", "|---|---|", *rows])


class FactorRule:
    """Base rule: everything derived from materialised per-example gradients of the layer.

    Subclasses implement ``capture``, ``backprop``, ``activations`` and ``per_example``; layers whose
    per-example gradients are as small as their factors (norm layers) need nothing more.
    """

    summary = ""
    has_kfac = False
    #: ``activations`` are the stored inputs themselves (so ``GradientSet.map_factors`` may replace them).
    dense_inputs = True

    def check(self, module: nn.Module, name: str) -> None:
        """Raise ``GradientCollectionError`` if this module's configuration is not supported."""

    def capture(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Layer input ``x`` (batch-first) -> what is stored, batch-first."""
        raise NotImplementedError

    def backprop(self, module: nn.Module, grad_output: torch.Tensor) -> torch.Tensor:
        """Gradient at the layer output -> ``Δ`` of shape ``(B, T, d_out)``."""
        return grad_output.reshape(grad_output.shape[0], -1, grad_output.shape[-1])

    def finish(self, module: nn.Module, stored: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Last adjustment of ``Δ`` given the stored input (e.g. no gradient at padding tokens)."""
        return d

    def activations(self, f: LayerFactors) -> torch.Tensor:
        return f._inputs

    def per_example(self, f: LayerFactors) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _flat(self, f: LayerFactors) -> torch.Tensor:
        return torch.cat([g.flatten(1) for g in self.per_example(f).values()], dim=1)

    def mean(self, f: LayerFactors) -> dict[str, torch.Tensor]:
        return {k: g.mean(0) for k, g in self.per_example(f).items()}

    def gram(self, f: LayerFactors) -> torch.Tensor:
        g = self._flat(f)
        return g @ g.T

    def sq_norms(self, f: LayerFactors) -> torch.Tensor:
        return (self._flat(f) ** 2).sum(1)

    def sq_sum(self, f: LayerFactors) -> dict[str, torch.Tensor]:
        return {k: (g ** 2).sum(0) for k, g in self.per_example(f).items()}

    def kfac(self, f: LayerFactors) -> tuple[torch.Tensor, torch.Tensor]:
        raise GradientCollectionError(f"K-FAC factors are not defined for {f.module_type} layers")


class BilinearRule(FactorRule):
    """Layers whose weight gradient is ``Σ_t δ_t a_tᵀ`` (Linear, convolutions): factored formulas."""

    has_kfac = True

    def _pair(self, f: LayerFactors) -> tuple[torch.Tensor, torch.Tensor]:
        a = f._inputs
        return (append_one(a) if "bias" in f.param_shapes else a), f.backprops

    def _to_params(self, f: LayerFactors, g: torch.Tensor, lead: tuple[int, ...]) -> dict[str, torch.Tensor]:
        w, b = split_bias(g, "bias" in f.param_shapes)
        out = {"weight": w.reshape(lead + f.param_shapes["weight"])}
        if b is not None:
            out["bias"] = b
        return {k: v for k, v in out.items() if k in f.param_names}

    def per_example(self, f):
        return self._to_params(f, bilinear_per_example(*self._pair(f)), (f.batch_size,))

    def mean(self, f):
        a, d = self._pair(f)
        return self._to_params(f, torch.einsum("bto,bti->oi", d, a) / f.batch_size, ())

    def gram(self, f):
        return bilinear_gram(*self._masked_pair(f))

    def sq_norms(self, f):
        return bilinear_sq_norms(*self._masked_pair(f))

    def sq_sum(self, f):
        return self._to_params(f, bilinear_sq_sum(*self._pair(f)), ())

    def _masked_pair(self, f):
        # A frozen weight (or bias) must not count in norms: drop its part of the factors.
        a, d = self._pair(f)
        if "weight" not in f.param_names:
            a = a[..., -1:]
        elif "bias" in f.param_shapes and "bias" not in f.param_names:
            a = a[..., :-1]
        return a, d

    def kfac(self, f):
        a, d = self._pair(f)
        B, T = d.shape[:2]
        a_cov = torch.einsum("bti,btj->ij", a, a) / (B * T)
        g_cov = torch.einsum("bto,btp->op", d, d) / B
        return a_cov, g_cov


@register_rule(nn.Linear)
class LinearRule(BilinearRule):
    summary = "inputs `(B, T, d_in)` for any leading dims, output gradients `(B, T, d_out)`"

    def capture(self, module, x):
        return x.reshape(x.shape[0], -1, x.shape[-1])


class _ConvRule(BilinearRule):
    dims = 2

    def check(self, module, name):
        if module.groups != 1:
            raise GradientCollectionError(
                f"module '{name}' ({type(module).__name__}) has groups={module.groups}; factors are "
                "implemented for groups=1 only. Use gm.per_example_grads (torch.func path).")
        if module.padding_mode != "zeros":
            raise GradientCollectionError(
                f"module '{name}' ({type(module).__name__}) uses padding_mode={module.padding_mode!r}; "
                "only 'zeros' is supported. Use gm.per_example_grads (torch.func path).")

    def _padding(self, module):
        if module.padding == "valid":
            return (0,) * self.dims
        if module.padding == "same":
            total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
            if any(t % 2 for t in total):
                raise GradientCollectionError(
                    f"{type(module).__name__} with padding='same' and an even effective kernel pads "
                    "asymmetrically, which unfold cannot express. Use gm.per_example_grads.")
            return tuple(t // 2 for t in total)
        return module.padding

    def capture(self, module, x):
        if self.dims == 1:
            x = x.unsqueeze(-2)
            kernel, pad = (1,) + module.kernel_size, (0,) + self._padding(module)
            dil, stride = (1,) + module.dilation, (1,) + module.stride
        else:
            kernel, pad, dil, stride = module.kernel_size, self._padding(module), module.dilation, module.stride
        cols = F.unfold(x, kernel, dilation=dil, padding=pad, stride=stride)   # (B, C·k, L)
        return cols.transpose(1, 2)

    def backprop(self, module, grad_output):
        return grad_output.flatten(2).transpose(1, 2)   # (B, C_out, *spatial) -> (B, L, C_out)


@register_rule(nn.Conv2d)
class Conv2dRule(_ConvRule):
    summary = "unfolded patches `(B, H'·W', C_in·kh·kw)`, output gradients `(B, H'·W', C_out)`; groups=1"
    dims = 2


@register_rule(nn.Conv1d)
class Conv1dRule(_ConvRule):
    summary = "unfolded patches `(B, L', C_in·k)`, output gradients `(B, L', C_out)`; groups=1"
    dims = 1


@register_rule(nn.Embedding)
class EmbeddingRule(FactorRule):
    """``weight (V, D)``: example gradient row ``v`` is ``Σ_{t: x_t = v} δ_t``. Stored as indices."""

    summary = "token indices `(B, T)` (one-hot rows on request), output gradients `(B, T, D)`"
    has_kfac = True
    dense_inputs = False

    def check(self, module, name):
        if module.max_norm is not None:
            raise GradientCollectionError(
                f"module '{name}' (Embedding) has max_norm set, which renormalises its weight in place "
                "during the forward pass; use gm.per_example_grads (torch.func path).")

    def capture(self, module, x):
        return x.reshape(x.shape[0], -1)

    def finish(self, module, stored, d):
        if module.padding_idx is None:
            return d
        return d * (stored != module.padding_idx).unsqueeze(-1).to(d.dtype)  # no gradient at padding

    def _idx_d(self, f):
        return f._inputs, f.backprops

    def activations(self, f):
        return F.one_hot(f._inputs, f.param_shapes["weight"][0]).to(f.backprops.dtype)

    def per_example(self, f):
        idx, d = self._idx_d(f)
        V = f.param_shapes["weight"][0]
        out = d.new_zeros((d.shape[0], V, d.shape[-1]))
        out.scatter_add_(1, idx.unsqueeze(-1).expand_as(d), d)
        return {"weight": out}

    def mean(self, f):
        idx, d = self._idx_d(f)
        out = d.new_zeros(f.param_shapes["weight"])
        out.index_add_(0, idx.reshape(-1), d.reshape(-1, d.shape[-1]))
        return {"weight": out / f.batch_size}

    def gram(self, f):
        idx, d = self._idx_d(f)
        same = (idx[:, :, None, None] == idx[None, None]).to(d.dtype)          # (B, T, B, T)
        return (torch.einsum("bto,cso->btcs", d, d) * same).sum((1, 3))

    def sq_norms(self, f):
        idx, d = self._idx_d(f)
        same = (idx[:, :, None] == idx[:, None, :]).to(d.dtype)                 # (B, T, T)
        return (torch.einsum("bto,bso->bts", d, d) * same).sum((1, 2))

    def kfac(self, f):
        idx, d = self._idx_d(f)
        B, T = idx.shape
        counts = torch.bincount(idx.reshape(-1), minlength=f.param_shapes["weight"][0]).to(d.dtype)
        return torch.diag(counts / (B * T)), torch.einsum("bto,btp->op", d, d) / B


@register_rule(nn.LayerNorm)
class LayerNormRule(FactorRule):
    """Elementwise affine ``γ ∘ x̂ + β``: example gradients ``Σ_t δ_t ∘ x̂_t`` and ``Σ_t δ_t``."""

    summary = "normalised inputs `(B, T, d)`, output gradients `(B, T, d)` (elementwise affine)"

    def check(self, module, name):
        if len(module.normalized_shape) != 1:
            raise GradientCollectionError(
                f"module '{name}' (LayerNorm) normalises over {len(module.normalized_shape)} dims; "
                "only the last dim is supported. Use gm.per_example_grads (torch.func path).")

    def capture(self, module, x):
        xhat = F.layer_norm(x, module.normalized_shape, eps=module.eps)
        return xhat.reshape(x.shape[0], -1, x.shape[-1])

    def per_example(self, f):
        d = f.backprops
        out = {"weight": (d * f._inputs).sum(1), "bias": d.sum(1)}
        return {k: v for k, v in out.items() if k in f.param_names}
