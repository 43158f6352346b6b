"""Rules of the layers real models use: Linear (and transformers' ``Conv1D``), convolutions
(any ``groups``), Embedding, and the elementwise-affine norms (LayerNorm, RMSNorm and
Llama-style ``*RMSNorm`` classes, GroupNorm)."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ._errors import GradientCollectionError
from ._factors import LayerFactors
from ._rules import BilinearRule, FactorRule, register_rule


def _wrapped(t: torch.Tensor) -> bool:
    """True under a torch.func transform (values are not inspectable there)."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


@register_rule(nn.Linear)
class LinearRule(BilinearRule):
    summary = "inputs `(B, T, d_in)` for any leading dims, output gradients `(B, T, d_out)`"

    def capture(self, module, x):
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def mean(self, f):
        """The weight from the stored inputs and the bias as a sum of ``Δ``: no column of ones
        appended to the inputs (a copy of them) and no slicing of a joint ``(o, i + 1)`` product."""
        a, d = f._inputs, f.backprops
        out = {"weight": self._weight(f, torch.einsum("bto,bti->oi", d, a) / f.batch_size, ())}
        if "bias" in f.param_shapes:
            out["bias"] = d.sum((0, 1)) / f.batch_size
        return {k: v for k, v in out.items() if k in f.param_names}


@register_rule(r"transformers\.pytorch_utils\.Conv1D", label="transformers Conv1D")
class HFConv1DRule(LinearRule):
    """transformers' ``Conv1D`` (GPT-2): ``y = x W + b`` with ``W (d_in, d_out)``, a transposed Linear.
    K-FAC factors are those of the Linear ``Wᵀ``."""

    summary = "as Linear; weight gradients transposed to the `(d_in, d_out)` layout"

    def _weight(self, f, w, lead):
        return w.transpose(-1, -2).reshape(lead + f.param_shapes["weight"])


class _ConvRule(BilinearRule):
    """Unfolded patches ``A (B, L, C_in·k)`` and ``Δ (B, L, C_out)``. With ``groups = g > 1`` the
    weight gradient of group ``j`` is ``Σ_l δ_{l,j} a_{l,j}ᵀ`` over its channel block; norms, Gram
    and Fisher then come from materialised per-example gradients (the size of the weight per example)."""

    dims = 2

    def covers(self, module):
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (only 'zeros' is factored)"
        if module.padding == "same" and any(d * (k - 1) % 2 for d, k in zip(module.dilation, module.kernel_size)):
            return "padding='same' with an even effective kernel pads asymmetrically"
        return None

    def _padding(self, module):
        if module.padding == "valid":
            return (0,) * self.dims
        if module.padding == "same":
            return tuple(d * (k - 1) // 2 for d, k in zip(module.dilation, module.kernel_size))
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

    @staticmethod
    def _groups(f):
        return f._inputs.shape[-1] // math.prod(f.param_shapes["weight"][1:])

    def per_example(self, f):
        g = self._groups(f)
        if g == 1:
            return super().per_example(f)
        B, L, _ = f._inputs.shape
        a = f._inputs.reshape(B, L, g, -1)
        d = f.backprops.reshape(B, L, g, -1)
        out = {"weight": torch.einsum("blgo,blgi->bgoi", d, a).reshape((B,) + f.param_shapes["weight"]),
               "bias": f.backprops.sum(1)}
        return {k: v for k, v in out.items() if k in f.param_names}

    def _base(self, f):
        return BilinearRule if self._groups(f) == 1 else FactorRule

    def mean(self, f):
        return self._base(f).mean(self, f)

    def gram(self, f):
        return self._base(f).gram(self, f)

    def sq_norms(self, f):
        return self._base(f).sq_norms(self, f)

    def sq_sum(self, f):
        return self._base(f).sq_sum(self, f)

    def kfac_ok(self, f):
        return self._groups(f) == 1

    def kfac(self, f):
        if self._groups(f) != 1:
            raise GradientCollectionError(f"K-FAC factors are not defined for grouped {f.module_type} layers")
        return super().kfac(f)


@register_rule(nn.Conv2d)
class Conv2dRule(_ConvRule):
    summary = "unfolded patches `(B, H'·W', C_in·kh·kw)`, output gradients `(B, H'·W', C_out)`; any groups"
    dims = 2


@register_rule(nn.Conv1d)
class Conv1dRule(_ConvRule):
    summary = "unfolded patches `(B, L', C_in·k)`, output gradients `(B, L', C_out)`; any groups"
    dims = 1


@register_rule(nn.Embedding)
class EmbeddingRule(FactorRule):
    """``weight (V, D)``: example gradient row ``v`` is ``Σ_{t: x_t = v} δ_t`` (divided by the count
    of ``v`` in the example when ``scale_grad_by_freq``, as for the example alone). Stored as indices."""

    summary = ("token indices `(B, T)` (one-hot rows on request), output gradients `(B, T, D)`; "
               "padding_idx and scale_grad_by_freq per example")
    has_kfac = True
    dense_inputs = False

    def check(self, module, name):
        if module.max_norm is not None:
            raise GradientCollectionError(
                f"module '{name}' (Embedding) has max_norm set, which renormalises its weight in place "
                "during the forward pass, so each example sees a different weight; per-example "
                "gradients are not defined for a batch. Remove max_norm.")

    def capture(self, module, x):
        return x.reshape(x.shape[0], -1)

    def finish(self, module, stored, d):
        if module.scale_grad_by_freq:   # counts within each example, as for the example alone
            counts = (stored[:, :, None] == stored[:, None, :]).sum(-1)
            d = d / counts.unsqueeze(-1).to(d.dtype)
        if module.padding_idx is None:
            return d
        return d * (stored != module.padding_idx).unsqueeze(-1).to(d.dtype)  # no gradient at padding

    def activations(self, f):
        return F.one_hot(f._inputs, f.param_shapes["weight"][0]).to(f.backprops.dtype)

    def per_example(self, f):
        idx, d = f._inputs, f.backprops
        V = f.param_shapes["weight"][0]
        out = torch.zeros((d.shape[0], V, d.shape[-1]), dtype=d.dtype, device=d.device)
        return {"weight": out.scatter_add(1, idx.unsqueeze(-1).expand_as(d), d)}

    def mean(self, f):
        idx, d = f._inputs, f.backprops
        out = torch.zeros(f.param_shapes["weight"], dtype=d.dtype, device=d.device)
        return {"weight": out.index_add(0, idx.reshape(-1), d.reshape(-1, d.shape[-1])) / f.batch_size}

    def gram(self, f):
        idx, d = f._inputs, f.backprops
        same = (idx[:, :, None, None] == idx[None, None]).to(d.dtype)          # (B, T, B, T)
        return (torch.einsum("bto,cso->btcs", d, d) * same).sum((1, 3))

    def sq_norms(self, f):
        idx, d = f._inputs, f.backprops
        same = (idx[:, :, None] == idx[:, None, :]).to(d.dtype)                 # (B, T, T)
        return (torch.einsum("bto,bso->bts", d, d) * same).sum((1, 2))

    def kfac(self, f):
        idx, d = f._inputs, f.backprops
        B, T = idx.shape
        counts = torch.bincount(idx.reshape(-1), minlength=f.param_shapes["weight"][0]).to(d.dtype)
        return torch.diag(counts / (B * T)), torch.einsum("bto,btp->op", d, d) / B


class ElementwiseAffineRule(FactorRule):
    """``y = γ ∘ x̂ (+ β)`` over ``d`` features: per-example gradients ``Σ_t δ_t ∘ x̂_t`` and ``Σ_t δ_t``
    (as small as the factors, so norms and Fisher use them directly)."""

    def _features(self, module) -> int:
        return math.prod(module.weight.shape)

    def backprop(self, module, grad_output):
        return grad_output.reshape(grad_output.shape[0], -1, self._features(module))

    def per_example(self, f):
        d = f.backprops
        out = {"weight": (d * f._inputs).sum(1), "bias": d.sum(1)}
        return {k: v.reshape((d.shape[0],) + f.param_shapes[k]) for k, v in out.items() if k in f.param_names}


@register_rule(nn.LayerNorm)
class LayerNormRule(ElementwiseAffineRule):
    summary = "normalised inputs `(B, T, d)`, output gradients `(B, T, d)` (elementwise affine)"

    def capture(self, module, x):
        xhat = F.layer_norm(x, module.normalized_shape, eps=module.eps)
        return xhat.reshape(x.shape[0], -1, self._features(module))


@register_rule(nn.RMSNorm)
class RMSNormRule(ElementwiseAffineRule):
    summary = "normalised inputs `(B, T, d)`, output gradients `(B, T, d)` (elementwise weight)"

    def capture(self, module, x):
        xhat = F.rms_norm(x, module.normalized_shape, eps=module.eps)
        return xhat.reshape(x.shape[0], -1, self._features(module))


@register_rule(r"transformers\.models\..*\.(Llama|Mistral|Mixtral|Qwen2|Qwen3|Phi3|Olmo2|Granite)RMSNorm",
               label="transformers Llama-style *RMSNorm (Llama, Mistral, Mixtral, Qwen2/3, Phi-3, OLMo-2, Granite)")
class HFRMSNormRule(ElementwiseAffineRule):
    """``weight ∘ (x·rsqrt(mean(x²) + eps))`` computed in float32 and cast back, as these classes do;
    checked against the module's output at every capture (outside torch.func transforms)."""

    summary = "normalised inputs `(B, T, d)` (float32 statistics, like the module), output gradients `(B, T, d)`"

    @staticmethod
    def _eps(module):
        return getattr(module, "variance_epsilon", getattr(module, "eps", None))

    def covers(self, module):
        if self._eps(module) is None or set(dict(module.named_parameters(recurse=False))) != {"weight"} \
                or module.weight.dim() != 1:
            return "not an RMSNorm with one elementwise weight and an eps"
        return None

    def capture(self, module, x):
        xf = x.to(torch.float32)
        xhat = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self._eps(module))).to(x.dtype)
        return xhat.reshape(x.shape[0], -1, x.shape[-1])

    def verify(self, module, x, output, name):
        if _wrapped(output) or _wrapped(x):
            return
        want = module.weight.detach() * self.capture(module, x.detach()).reshape(x.shape)
        tol = 8 * torch.finfo(output.dtype).eps
        if want.shape != output.shape or not torch.allclose(want.to(output.dtype), output.detach(), rtol=tol,
                                                            atol=tol * float(output.detach().abs().max())):
            raise GradientCollectionError(
                f"module '{name}' ({type(module).__name__}) does not compute weight * x * rsqrt(mean(x²) + "
                "eps), which the RMSNorm rule assumes. Register a rule for it (gm.grads.register_rule).")


@register_rule(nn.GroupNorm)
class GroupNormRule(ElementwiseAffineRule):
    summary = "normalised inputs `(B, H·W, C)`, output gradients `(B, H·W, C)` (per-channel affine)"

    def capture(self, module, x):
        xhat = F.group_norm(x, module.num_groups, eps=module.eps)
        return xhat.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)

    def backprop(self, module, grad_output):
        return grad_output.reshape(grad_output.shape[0], grad_output.shape[1], -1).transpose(1, 2)


class _ConvTransposeRule(BilinearRule):
    """Transposed convolution ``weight (C_in, C_out, *k)``: example gradient
    ``Σ_l x_l u_lᵀ`` with ``x_l`` the input at position ``l`` and ``u_l`` the patch of the *output
    gradient* that position ``l`` wrote to (``F.unfold`` of ``Δ`` with the layer's stride, padding and
    dilation). The bias, ``Σ_positions δ``, is one extra token ``(0, 1)`` whose ``Δ`` row holds it in
    ``C_out`` extra columns: the stored pair is ``A (B, L_in [+1], C_in [+1])`` and
    ``Δ (B, L_in [+1], C_out·k [+ C_out])``, and the weight/bias blocks of ``Σ_t Δ_t A_tᵀ`` are the
    gradients (the other blocks are exactly zero)."""

    dims = 2
    has_kfac = False

    def covers(self, module):
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (only 'zeros' is factored)"
        if module.groups != 1:
            return "groups > 1 (not factored for transposed convolutions)"
        if any(op >= s for op, s in zip(module.output_padding, module.stride)):
            return "output_padding >= stride"
        return None

    def _spatial(self, module):
        if self.dims == 1:
            return ((1,) + module.kernel_size, (0,) + module.padding, (1,) + module.dilation, (1,) + module.stride)
        return module.kernel_size, module.padding, module.dilation, module.stride

    def capture(self, module, x):
        a = x.flatten(2).transpose(1, 2)                                   # (B, L_in, C_in)
        if module.bias is None:
            return a
        a = F.pad(a, (0, 1))
        extra = a.new_zeros(a.shape[0], 1, a.shape[2])
        extra[..., -1] = 1
        return torch.cat([a, extra], dim=1)

    def backprop(self, module, grad_output):
        g = grad_output.unsqueeze(-2) if self.dims == 1 else grad_output
        kernel, pad, dil, stride = self._spatial(module)
        u = F.unfold(g, kernel, dilation=dil, padding=pad, stride=stride).transpose(1, 2)   # (B, L_in, C_out·k)
        if module.bias is None:
            return u
        C_out = grad_output.shape[1]
        u = F.pad(u, (0, C_out))
        extra = F.pad(grad_output.flatten(2).sum(-1), (u.shape[-1] - C_out, 0)).unsqueeze(1)
        return torch.cat([u, extra], dim=1)

    def _pair(self, f):
        return f._inputs, f.backprops

    def _to_params(self, f, g, lead):
        C_in, C_out = f.param_shapes["weight"][:2]
        Ok = math.prod(f.param_shapes["weight"][1:])
        w = g[..., :Ok, :C_in].reshape(lead + f.param_shapes["weight"][1:] + (C_in,))
        out = {"weight": w.movedim(-1, len(lead))}
        if "bias" in f.param_shapes:
            out["bias"] = g[..., Ok:, C_in]
        return {k: v for k, v in out.items() if k in f.param_names}

    def _masked_pair(self, f):
        a, d = self._pair(f)
        C_in = f.param_shapes["weight"][0]
        if "weight" not in f.param_names:
            a = a[..., C_in:]
        elif "bias" in f.param_shapes and "bias" not in f.param_names:
            a = a[..., :C_in]
        return a, d


@register_rule(nn.ConvTranspose2d)
class ConvTranspose2dRule(_ConvTransposeRule):
    summary = ("inputs `(B, H·W [+1], C_in [+1])`, unfolded output-gradient patches `(B, H·W [+1], "
               "C_out·kh·kw [+ C_out])` (bias as one extra token); stride, padding, dilation, "
               "output_padding; groups = 1")
    dims = 2


@register_rule(nn.ConvTranspose1d)
class ConvTranspose1dRule(_ConvTransposeRule):
    summary = ("inputs `(B, L [+1], C_in [+1])`, unfolded output-gradient patches `(B, L [+1], "
               "C_out·k [+ C_out])` (bias as one extra token); stride, padding, dilation, output_padding; groups = 1")
    dims = 1
