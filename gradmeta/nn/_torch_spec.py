"""Symmetry specs of torch's own ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder``.

Symmetries kept (exact: permuting a real module's units this way leaves its function unchanged):

* the FFN hidden units of each layer (``linear1`` rows and bias, ``linear2`` columns);
* inside each attention head, the query/key dims jointly (rows of the q and k blocks of
  ``in_proj_weight`` / ``in_proj_bias``) and the value/output dims jointly (rows of the v block,
  columns of ``out_proj.weight``).

Not kept: the residual stream, because it is the module's own input and output (permuting it
would change what the caller feeds in and reads out; inside a larger model it is shared with the
layers around), permutations of whole heads, and positions. Both ``norm_first`` settings and
batch- or sequence-first layouts have the same spec. Only self-attention with the packed
``in_proj_weight`` and no ``add_bias_kv`` is described (what the factored attention rule keeps as
one Linear-like pair).
"""
from __future__ import annotations

from torch import nn

from ._spec import LayerMap, Space, SymmetrySpec, SymmetrySpecError, register_spec


def _layer_parts(prefix: str, layer: nn.TransformerEncoderLayer, i: int, R: tuple[str, ...]):
    attn = layer.self_attn
    if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
        raise SymmetrySpecError(f"{prefix}self_attn: only packed in_proj_weight without add_bias_kv / "
                                "add_zero_attn is described; write a SymmetrySpec by hand")
    E, H = attn.embed_dim, attn.num_heads
    dh = E // H
    p = prefix
    spaces = [Space(f"{p}qk.h{j}", dh, True, i + 1, "qk", j) for j in range(H)]
    spaces += [Space(f"{p}vo.h{j}", dh, True, i + 1, "vo", j) for j in range(H)]
    spaces.append(Space(f"{p}ffn", layer.linear1.out_features, True, i + 1, "ffn"))
    qk = tuple(f"{p}qk.h{j}" for j in range(H))
    vo = tuple(f"{p}vo.h{j}" for j in range(H))
    ffn = (f"{p}ffn",)
    params, layers = [], {}

    def add(module, out, inp, weight, bias):
        params.append((weight, (out, inp) if inp is not None else (out,)))
        if bias is not None:
            params.append((bias, (out,)))
        layers[module] = LayerMap(module, out, inp if inp is not None else out, weight, bias)

    def bias_of(local):
        return f"{p}{local}.bias" if getattr(layer.get_submodule(local), "bias", None) is not None else None

    add(f"{p}self_attn", qk + qk + vo, R, f"{p}self_attn.in_proj_weight",
        f"{p}self_attn.in_proj_bias" if attn.in_proj_bias is not None else None)
    add(f"{p}self_attn.out_proj", R, vo, f"{p}self_attn.out_proj.weight", bias_of("self_attn.out_proj"))
    add(f"{p}linear1", ffn, R, f"{p}linear1.weight", bias_of("linear1"))
    add(f"{p}linear2", R, ffn, f"{p}linear2.weight", bias_of("linear2"))
    for norm in ("norm1", "norm2"):
        if getattr(layer, norm).weight is not None:
            add(f"{p}{norm}", R, None, f"{p}{norm}.weight", bias_of(norm))
    sa = [f"{p}self_attn", f"{p}self_attn.out_proj"]
    ff = [f"{p}linear1", f"{p}linear2"]
    n1, n2 = [x for x in (f"{p}norm1",) if x in layers], [x for x in (f"{p}norm2",) if x in layers]
    order = n1 + sa + n2 + ff if layer.norm_first else sa + n1 + ff + n2
    return spaces, params, [layers[m] for m in order]


def torch_transformer_spec(model: nn.Module) -> SymmetrySpec:
    """Spec of an ``nn.TransformerEncoderLayer`` or ``nn.TransformerEncoder`` (see the module docstring)."""
    blocks = [("", model)] if isinstance(model, nn.TransformerEncoderLayer) else \
        [(f"layers.{i}.", layer) for i, layer in enumerate(model.layers)]
    d = blocks[0][1].self_attn.embed_dim
    spaces, params, layers = [Space("resid", d, False, 0, "resid")], [], []
    R = ("resid",)
    for i, (prefix, layer) in enumerate(blocks):
        s, p, lm = _layer_parts(prefix, layer, i, R)
        spaces += s
        params += p
        layers += lm
    final = getattr(model, "norm", None) if isinstance(model, nn.TransformerEncoder) else None
    if final is not None:
        if not isinstance(final, nn.LayerNorm):
            raise SymmetrySpecError(f"TransformerEncoder.norm is {type(final).__name__}; only LayerNorm is described")
        if final.weight is not None:
            params.append(("norm.weight", (R,)))
            if final.bias is not None:
                params.append(("norm.bias", (R,)))
            layers.append(LayerMap("norm", R, R, "norm.weight", "norm.bias" if final.bias is not None else None))
    spec = SymmetrySpec(tuple(spaces), tuple(params), tuple(layers), "transformer")
    spec.check(model)
    return spec


register_spec(nn.TransformerEncoderLayer, torch_transformer_spec)
register_spec(nn.TransformerEncoder, torch_transformer_spec)
