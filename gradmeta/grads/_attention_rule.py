"""``nn.MultiheadAttention``: its projection weights are used functionally
(``F.multi_head_attention_forward``), so during capture the call is recomputed in a decomposed form
(in-projection with ``F.linear``, scaled dot-product attention, out-projection with ``F.linear``) whose
projection outputs are recorded; the model continues with the recomputed output, which equals the
module's own.

Factors of the in-projection, per example: ``G_in = Σ_t δ_t a_tᵀ`` over the tokens of the q, k and v
projections, laid out block-wise so one bilinear pair holds all three:

- self-attention (``query is key is value``) with the packed ``in_proj_weight (3E, E)``: ``A = x (B, T, E)``,
  ``Δ = [δ_q | δ_k | δ_v] (B, T, 3E)``;
- otherwise the tokens of q, k and v are concatenated, ``A (B, L + 2S, d_in)``, each token's ``Δ`` row
  holding its own projection's gradient in its block of ``3E`` columns (zeros elsewhere); with
  separate ``q/k/v_proj_weight`` (``kdim``/``vdim`` ≠ ``E``) the inputs are zero-padded into blocks of
  ``E + kdim + vdim`` columns, so the off-diagonal blocks of ``G_in`` are exactly zero and its norm is
  the norm of the three weights' gradients.

``out_proj`` is recorded as the ``Linear`` it is (inputs: the attention output ``(B, L, E)``).
"""
from __future__ import annotations

import inspect
import math

import torch
from torch import nn
from torch.nn import functional as F

from ._errors import GradientCollectionError
from ._factors import bilinear_per_example, bilinear_sq_sum, split_bias
from ._rules import BilinearRule, register_rule

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _attention_mask(m: nn.MultiheadAttention, q: torch.Tensor, S: int, key_padding_mask, attn_mask,
                    need_weights: bool, is_causal: bool) -> torch.Tensor | None:
    """Additive float mask broadcastable to ``(B, H, L, S)``, following ``F.multi_head_attention_forward``."""
    B, L = q.shape[0], q.shape[1]
    kpm = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                            other_type=F._none_or_dtype(attn_mask), other_name="attn_mask", target_type=q.dtype)
    am = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                           target_type=q.dtype, check_other=False)
    if is_causal and kpm is None and not need_weights:
        # torch passes is_causal to scaled_dot_product_attention and drops attn_mask: a causal mask.
        return torch.zeros(L, S, dtype=q.dtype, device=q.device).masked_fill(
            torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    mask = None
    if am is not None:
        mask = am if am.dim() == 2 else am.view(B, m.num_heads, L, S)
    if kpm is not None:
        kpm = kpm.view(B, 1, 1, S)
        mask = kpm if mask is None else mask + kpm
    return mask


@register_rule(nn.MultiheadAttention)
class MultiheadAttentionRule(BilinearRule):
    summary = ("in-projection: inputs `(B, T, E)` and output gradients `(B, T, 3E)` of q, k, v for "
               "self-attention (otherwise the q, k, v tokens concatenated, `(B, L+2S, d_in)` and "
               "`(B, L+2S, 3E)` block-wise); `out_proj` as a Linear on the attention output `(B, L, E)`; "
               "recomputed in decomposed form during capture (add_bias_kv, add_zero_attn and "
               "training-mode dropout take the exact fallback)")
    has_kfac = False
    replaces_forward = True
    owned_children = ("out_proj",)

    def covers(self, m):
        if m.bias_k is not None or m.bias_v is not None:
            return "add_bias_kv=True (learned key/value rows appended to every sequence)"
        if m.add_zero_attn:
            return "add_zero_attn=True"
        if m.training and m.dropout > 0:
            return f"dropout={m.dropout} in training mode (random attention masks)"
        return None

    # ---- capture -------------------------------------------------------------------------------
    def forward_again(self, session, name, m, args, kwargs):
        bound = _SIGNATURE.bind(m, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        query, key, value = a["query"], a["key"], a["value"]
        if query.dim() != 3:
            raise GradientCollectionError(
                f"module '{name}' (MultiheadAttention) was called with unbatched inputs of shape "
                f"{tuple(query.shape)}; per-example gradients need a batch axis")
        self_attention = query is key and key is value
        to_bf = (lambda t: t) if m.batch_first else (lambda t: t.transpose(0, 1))
        xq, xk, xv = to_bf(query), to_bf(key), to_bf(value)
        E, H = m.embed_dim, m.num_heads
        bias = m.in_proj_bias
        b_q, b_k, b_v = bias.chunk(3) if bias is not None else (None, None, None)

        def rec(x_stored, out, place):
            new = session.record(name, x_stored, out, 0, x_stored.shape, place=place)
            return out if new is None else new

        if m._qkv_same_embed_dim and self_attention:
            qkv = rec(session.keep(xq), F.linear(xq, m.in_proj_weight, bias), None)
            q, k, v = qkv.chunk(3, dim=-1)
        elif m._qkv_same_embed_dim:
            w_q, w_k, w_v = m.in_proj_weight.chunk(3)
            q = rec(session.keep(xq), F.linear(xq, w_q, b_q), (0, 3 * E))
            k = rec(session.keep(xk), F.linear(xk, w_k, b_k), (E, 3 * E))
            v = rec(session.keep(xv), F.linear(xv, w_v, b_v), (2 * E, 3 * E))
        else:
            kd, vd = m.kdim, m.vdim
            q = rec(F.pad(session.keep(xq), (0, kd + vd)), F.linear(xq, m.q_proj_weight, b_q), (0, 3 * E))
            k = rec(F.pad(session.keep(xk), (E, vd)), F.linear(xk, m.k_proj_weight, b_k), (E, 3 * E))
            v = rec(F.pad(session.keep(xv), (E + kd, 0)), F.linear(xv, m.v_proj_weight, b_v), (2 * E, 3 * E))
        B, L, S = xq.shape[0], xq.shape[1], xk.shape[1]
        heads = lambda t, n: t.reshape(B, n, H, E // H).transpose(1, 2)   # noqa: E731  (B, H, n, hd)
        q, k, v = heads(q, L), heads(k, S), heads(v, S)
        mask = _attention_mask(m, xq, S, a["key_padding_mask"], a["attn_mask"], a["need_weights"], a["is_causal"])
        scores = (q * math.sqrt(1.0 / (E // H))) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        weights = scores.softmax(dim=-1)                                  # (B, H, L, S)
        attended = (weights @ v).transpose(1, 2).reshape(B, L, E)
        out_name = f"{name}.out_proj" if name else "out_proj"
        out = F.linear(attended, m.out_proj.weight, m.out_proj.bias)
        if out_name in session.plan.hooked:
            new = session.record(out_name, session.keep(attended), out, 0, attended.shape)
            out = out if new is None else new
        out = to_bf(out)
        if not a["need_weights"]:
            return out, None
        return out, (weights.mean(dim=1) if a["average_attn_weights"] else weights)

    # ---- factors -> parameters -------------------------------------------------------------------
    @staticmethod
    def _has_bias(f):
        return "in_proj_bias" in f.param_shapes

    def _pair(self, f):
        a = f._inputs
        if self._has_bias(f):
            a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
        return a, f.backprops

    def _blocks(self, f) -> dict[str, tuple[slice, slice]]:
        """``{local weight name: (rows, columns)}`` of its block in ``G_in``."""
        if "in_proj_weight" in f.param_shapes:
            E = f.param_shapes["in_proj_weight"][1]
            return {"in_proj_weight": (slice(None), slice(0, E))}
        E, kd = f.param_shapes["q_proj_weight"][1], f.param_shapes["k_proj_weight"][1]
        vd = f.param_shapes["v_proj_weight"][1]
        return {"q_proj_weight": (slice(0, E), slice(0, E)),
                "k_proj_weight": (slice(E, 2 * E), slice(E, E + kd)),
                "v_proj_weight": (slice(2 * E, 3 * E), slice(E + kd, E + kd + vd))}

    def _to_params(self, f, g, lead):
        w, b = split_bias(g, self._has_bias(f))
        out = {k: w[(...,) + rc] for k, rc in self._blocks(f).items()}
        if b is not None:
            out["in_proj_bias"] = b
        return {k: v.reshape(lead + f.param_shapes[k]) for k, v in out.items() if k in f.param_names}

    def per_example(self, f):
        return self._to_params(f, bilinear_per_example(*self._pair(f)), (f.batch_size,))

    def sq_sum(self, f):
        return self._to_params(f, bilinear_sq_sum(*self._pair(f)), ())

    def _masked_pair(self, f):
        # Off-diagonal blocks of G_in are zero, so dropping a frozen weight's input columns (or the
        # bias column) removes exactly its part of the norms.
        a, d = self._pair(f)
        keep = torch.ones(a.shape[-1], dtype=torch.bool, device=a.device)
        for local, (_, cols) in self._blocks(f).items():
            if local not in f.param_names:
                keep[cols] = False
        if self._has_bias(f) and "in_proj_bias" not in f.param_names:
            keep[-1] = False
        return (a, d) if bool(keep.all()) else (a[..., keep], d)
