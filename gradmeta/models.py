"""Small reference models used by tests, benchmarks, tasks and notebooks.

They are built only from modules that the factor rules support (``nn.Linear``,
``nn.Embedding``, ``nn.LayerNorm``), so every parameter has factored per-example gradients.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .nn import LayerMap, Space, SymmetrySpec, register_spec

__all__ = ["mlp", "GPT", "gpt_spec", "TransformerBlock", "CausalSelfAttention", "lm_loss", "classification_loss"]

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}


def mlp(widths: list[int], activation: str = "relu", bias: bool = True) -> nn.Sequential:
    """``nn.Sequential`` of Linear layers ``widths[0] -> ... -> widths[-1]`` with elementwise activations.

    Args:
        widths: level widths ``d_0..d_L``; the model has ``L`` linear layers.
        activation: one of ``relu``, ``tanh``, ``gelu``, ``sigmoid`` (none after the last layer).
        bias: whether the linear layers have biases.
    """
    if len(widths) < 2:
        raise ValueError(f"mlp needs at least two widths, got {widths}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {sorted(_ACTIVATIONS)}")
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(d_in, d_out, bias=bias))
        if i < len(widths) - 2:
            layers.append(_ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention from separate ``q``, ``k``, ``v``, ``o`` Linear maps.

    Input and output: ``(B, T, d_model)``. Heads are contiguous blocks of ``d_model // n_heads``
    rows of ``q``, ``k``, ``v`` (and columns of ``o``).
    """

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        h = self.n_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, h, D // h).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(D // h)
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        attn = scores.masked_fill(mask, float("-inf")).softmax(-1)
        return self.o((attn @ v).transpose(1, 2).reshape(B, T, D))


class TransformerBlock(nn.Module):
    """Transformer block: attention and a GELU FFN, each with a residual connection.

    ``pre_ln=True`` (GPT-2 style): ``x + f(LN(x))``; ``pre_ln=False`` (original): ``LN(x + f(x))``.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int | None = None, pre_ln: bool = True):
        super().__init__()
        self.pre_ln = pre_ln
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, d_ff or 4 * d_model)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_ff or 4 * d_model, d_model)

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_ln:
            x = x + self.attn(self.ln1(x))
            return x + self._ffn(self.ln2(x))
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self._ffn(x))


class GPT(nn.Module):
    """GPT-style causal language model: token + position embeddings, blocks, final LN, head.

    Input: token ids ``(B, T)`` with ``T <= max_len``; output: logits ``(B, T, vocab)``.
    """

    def __init__(self, vocab: int, d_model: int = 32, n_heads: int = 4, n_blocks: int = 2,
                 max_len: int = 64, d_ff: int | None = None, pre_ln: bool = True):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, n_heads, d_ff, pre_ln) for _ in range(n_blocks))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.pos.num_embeddings:
            raise ValueError(f"sequence length {T} exceeds max_len={self.pos.num_embeddings}")
        pos = torch.arange(T, device=idx.device).expand_as(idx)
        x = self.tok(idx) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def classification_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy: logits ``(B, C)``, integer targets ``(B,)`` -> ``(B,)``."""
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example next-token loss: mean cross-entropy over tokens, ``(B, T, V), (B, T) -> (B,)``."""
    B, T, V = logits.shape
    return nn.functional.cross_entropy(
        logits.reshape(B * T, V), targets.reshape(B * T), reduction="none").view(B, T).mean(1)


def gpt_spec(model: "GPT") -> SymmetrySpec:
    """Neuron-permutation spec of a :class:`GPT` (registered with ``gradmeta.nn.register_spec``).

    Spaces: the residual stream (one permutation tied across embeddings, every block, every
    LayerNorm and the head), the FFN hidden units of each block, and inside each head of each block
    the joint q/k feature dims and the joint v/o dims. Heads keep their positions (per-head spaces
    with a head id). Vocabulary and positions are fixed. The same spec holds for pre-LN and post-LN
    blocks, because LayerNorm commutes with permutations of its features.
    """
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


register_spec(GPT, gpt_spec)
