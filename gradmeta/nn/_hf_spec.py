"""Symmetry specs of Hugging Face GPT-2 and Llama causal LMs (registered with ``register_spec``
when ``transformers`` is installed).

Symmetries kept (exact: permuting a real model's units this way leaves its function unchanged):

* the residual stream: one permutation shared by the embeddings, every block, every norm
  (LayerNorm / RMSNorm commute with feature permutations) and the head;
* the MLP hidden units of each block (Llama's gated MLP: ``gate_proj`` and ``up_proj`` rows and
  ``down_proj`` columns jointly);
* GPT-2 attention: inside each head, the query/key dims jointly and the value/output dims jointly;
* Llama attention: inside each key/value head, the value dims (``v_proj`` rows, and the
  ``o_proj`` columns of every query head that reads that kv head, for grouped-query attention).

Not kept: Llama's query/key dims (rotary embeddings rotate fixed dim pairs ``(i, i + d_h/2)`` by
fixed frequencies, so permuting them changes the function), permutations of whole heads, the
vocabulary and the positions.
"""
from __future__ import annotations

from ._spec import LayerMap, Space, SymmetrySpec, register_spec


class _Builder:
    def __init__(self):
        self.spaces: list[Space] = []
        self.params: list = []
        self.layers: list[LayerMap] = []

    def space(self, *a, **k):
        self.spaces.append(Space(*a, **k))

    def linear(self, module, out, inp, bias: bool, transposed: bool = False):
        """A Linear (``weight (out, in)``) or transformers ``Conv1D`` (``weight (in, out)``)."""
        self.params.append((f"{module}.weight", (inp, out) if transposed else (out, inp)))
        if bias:
            self.params.append((f"{module}.bias", (out,)))
        self.layers.append(LayerMap(module, out, inp, f"{module}.weight", f"{module}.bias" if bias else None))

    def norm(self, module, R, bias: bool):
        self.params.append((f"{module}.weight", (R,)))
        if bias:
            self.params.append((f"{module}.bias", (R,)))
        self.layers.append(LayerMap(module, R, R, f"{module}.weight", f"{module}.bias" if bias else None))

    def head(self, model, prefix_emb: str, vocab_in: str, R):
        """``lm_head``: tied to the input embedding (one vocabulary space) or its own parameter."""
        tied = model.lm_head.weight is model.get_input_embeddings().weight
        if tied:
            self.layers.append(LayerMap("lm_head", (vocab_in,), R, f"{prefix_emb}.weight", None))
        else:
            self.space("vocab_out", model.lm_head.out_features, False, 99, "vocab_out")
            self.linear("lm_head", ("vocab_out",), R, model.lm_head.bias is not None)

    def build(self, model, arch="transformer") -> SymmetrySpec:
        spec = SymmetrySpec(tuple(self.spaces), tuple(self.params), tuple(self.layers), arch)
        spec.check(model)
        return spec


def gpt2_spec(model) -> SymmetrySpec:
    """Spec of a ``GPT2LMHeadModel`` (see the module docstring for the symmetries kept)."""
    cfg, t = model.config, "transformer"
    d, H = cfg.n_embd, cfg.n_head
    dh = d // H
    b = _Builder()
    b.space("vocab", cfg.vocab_size, False, 0, "vocab")
    b.space("positions", cfg.n_positions, False, 0, "positions")
    b.space("resid", d, True, 0, "resid")
    R = ("resid",)
    b.params += [(f"{t}.wte.weight", (("vocab",), R)), (f"{t}.wpe.weight", (("positions",), R))]
    b.layers += [LayerMap(f"{t}.wte", R, ("vocab",), f"{t}.wte.weight"),
                 LayerMap(f"{t}.wpe", R, ("positions",), f"{t}.wpe.weight")]
    for i, block in enumerate(model.transformer.h):
        p = f"{t}.h.{i}"
        qk = tuple(f"{p}.qk.h{j}" for j in range(H))
        vo = tuple(f"{p}.vo.h{j}" for j in range(H))
        for j in range(H):
            b.space(qk[j], dh, True, i + 1, "qk", j)
            b.space(vo[j], dh, True, i + 1, "vo", j)
        b.space(f"{p}.ffn", block.mlp.c_fc.nf, True, i + 1, "ffn")
        b.norm(f"{p}.ln_1", R, True)
        b.linear(f"{p}.attn.c_attn", qk + qk + vo, R, True, transposed=True)
        b.linear(f"{p}.attn.c_proj", R, vo, True, transposed=True)
        b.norm(f"{p}.ln_2", R, True)
        b.linear(f"{p}.mlp.c_fc", (f"{p}.ffn",), R, True, transposed=True)
        b.linear(f"{p}.mlp.c_proj", R, (f"{p}.ffn",), True, transposed=True)
    b.norm(f"{t}.ln_f", R, True)
    b.head(model, f"{t}.wte", "vocab", R)
    return b.build(model)


def llama_spec(model) -> SymmetrySpec:
    """Spec of a ``LlamaForCausalLM`` (grouped-query attention allowed; see the module docstring)."""
    cfg = model.config
    d, H = cfg.hidden_size, cfg.num_attention_heads
    KV = getattr(cfg, "num_key_value_heads", None) or H
    dh = getattr(cfg, "head_dim", None) or d // H
    rep = H // KV
    b = _Builder()
    b.space("vocab", cfg.vocab_size, False, 0, "vocab")
    b.space("resid", d, True, 0, "resid")
    R = ("resid",)
    b.params.append(("model.embed_tokens.weight", (("vocab",), R)))
    b.layers.append(LayerMap("model.embed_tokens", R, ("vocab",), "model.embed_tokens.weight"))
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        att, mlp = layer.self_attn, layer.mlp
        b.space(f"{p}.q", H * dh, False, i + 1, "q")
        b.space(f"{p}.k", KV * dh, False, i + 1, "k")
        vo = tuple(f"{p}.vo.g{g}" for g in range(KV))
        for g in range(KV):
            b.space(vo[g], dh, True, i + 1, "vo", g)
        ffn = (f"{p}.ffn",)
        b.space(ffn[0], mlp.gate_proj.out_features, True, i + 1, "ffn")
        b.norm(f"{p}.input_layernorm", R, False)
        b.linear(f"{p}.self_attn.q_proj", (f"{p}.q",), R, att.q_proj.bias is not None)
        b.linear(f"{p}.self_attn.k_proj", (f"{p}.k",), R, att.k_proj.bias is not None)
        b.linear(f"{p}.self_attn.v_proj", vo, R, att.v_proj.bias is not None)
        b.linear(f"{p}.self_attn.o_proj", R, tuple(vo[j // rep] for j in range(H)), att.o_proj.bias is not None)
        b.norm(f"{p}.post_attention_layernorm", R, False)
        b.linear(f"{p}.mlp.gate_proj", ffn, R, mlp.gate_proj.bias is not None)
        b.linear(f"{p}.mlp.up_proj", ffn, R, mlp.up_proj.bias is not None)
        b.linear(f"{p}.mlp.down_proj", R, ffn, mlp.down_proj.bias is not None)
    b.norm("model.norm", R, False)
    b.head(model, "model.embed_tokens", "vocab", R)
    return b.build(model)


_HF_CLASSES = (("transformers.models.gpt2.modeling_gpt2", "GPT2LMHeadModel", gpt2_spec),
               ("transformers.models.llama.modeling_llama", "LlamaForCausalLM", llama_spec))


def register_loaded_hf_specs() -> None:
    """Register the builders of the transformers classes whose modules are already imported (an
    instance of them exists only then), without importing transformers."""
    import sys
    for module, name, builder in _HF_CLASSES:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None:
            register_spec(cls, builder)
