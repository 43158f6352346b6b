"""Symmetry spec of ``gradmeta.models.GPT`` (DESIGN §2.2).

Spaces: the residual stream (one permutation tied across embeddings, every block, every
LayerNorm and the head), the FFN hidden units of each block, and inside each head of each block
the joint q/k feature dims and the joint v/o dims. Heads keep their positions (per-head spaces
with a head id). Vocabulary and positions are fixed. The same spec holds for pre-LN and post-LN
blocks, because LayerNorm commutes with permutations of its features.
"""
from __future__ import annotations

from ._spec import LayerMap, Space, SymmetrySpec


def gpt_spec(model) -> SymmetrySpec:
    """Spec of a ``gradmeta.models.GPT`` instance."""
    d = model.tok.embedding_dim
    nb = len(model.blocks)
    spaces = [Space("vocab_in", model.tok.num_embeddings, False, 0, "vocab_in"),
              Space("positions", model.pos.num_embeddings, False, 0, "positions"),
              Space("resid", d, True, 0, "resid")]
    params: list = [("tok.weight", (("vocab_in",), ("resid",))),
                    ("pos.weight", (("positions",), ("resid",)))]
    layers = [LayerMap("tok", ("resid",), ("vocab_in",), "tok.weight"),
              LayerMap("pos", ("resid",), ("positions",), "pos.weight")]
    R = ("resid",)

    def linear(name, out, inp):
        params.append((f"{name}.weight", (out, inp)))
        params.append((f"{name}.bias", (out,)))
        layers.append(LayerMap(name, out, inp, f"{name}.weight", f"{name}.bias"))

    def norm(name):
        params.append((f"{name}.weight", (R,)))
        params.append((f"{name}.bias", (R,)))
        layers.append(LayerMap(name, R, R, f"{name}.weight", f"{name}.bias"))

    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}"
        h = block.attn.n_heads
        dh = d // h
        qk = tuple(f"{p}.attn.qk.h{j}" for j in range(h))
        vo = tuple(f"{p}.attn.vo.h{j}" for j in range(h))
        ffn = f"{p}.ffn"
        spaces += [Space(s, dh, True, i + 1, "qk", j) for j, s in enumerate(qk)]
        spaces += [Space(s, dh, True, i + 1, "vo", j) for j, s in enumerate(vo)]
        spaces.append(Space(ffn, block.fc1.out_features, True, i + 1, "ffn"))
        norm(f"{p}.ln1")
        linear(f"{p}.attn.q", qk, R)
        linear(f"{p}.attn.k", qk, R)
        linear(f"{p}.attn.v", vo, R)
        linear(f"{p}.attn.o", R, vo)
        norm(f"{p}.ln2")
        linear(f"{p}.fc1", (ffn,), R)
        linear(f"{p}.fc2", R, (ffn,))
    spaces.append(Space("vocab_out", model.head.out_features, False, nb + 1, "vocab_out"))
    norm("ln_f")
    linear("head", ("vocab_out",), R)
    spec = SymmetrySpec(tuple(spaces), tuple(params), tuple(layers), "transformer")
    spec.check(model)
    return spec
