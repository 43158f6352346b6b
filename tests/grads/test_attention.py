"""Factored rule of ``nn.MultiheadAttention`` (and torch's transformer layers built on it): every
parameter equals a naive per-example loop in float64 to 1e-10, with masks, cross-attention,
separate q/k/v weights, sequence-first layouts and returned attention weights."""
import pytest
import torch
from torch import nn

import gradmeta as gm
from gradmeta.grads import functional_factors
from tests.conftest import assert_dicts_close, flatten_params, naive_per_example_grads

E, H = 6, 2


def ce(out, y):
    return nn.functional.cross_entropy(out, y, reduction="none")


class Attn(nn.Module):
    """Embedding -> MultiheadAttention(query, key, value, masks...) -> mean -> head.

    Inputs ``(idx (B, L), ctx (B, S, kdim) or None, kpm (B, S), mask3 (B, H, L, S))``: per-example
    tensors, so the naive loop slices them with the batch. The attention weights feed the loss."""

    def __init__(self, mode="self", batch_first=True, kdim=None, vdim=None, bias=True, causal=False,
                 need_weights=True, average=True, mask="kpm"):
        super().__init__()
        self.emb = nn.Embedding(11, E)
        self.attn = nn.MultiheadAttention(E, H, batch_first=batch_first, kdim=kdim, vdim=vdim, bias=bias)
        self.head = nn.Linear(E, 3)
        self.mode, self.bf, self.causal, self.nw, self.avg, self.mask = mode, batch_first, causal, need_weights, average, mask
        self.vproj = nn.Linear(kdim or E, vdim or E) if mode == "cross_kv_differ" else None

    def forward(self, idx, ctx, kpm, mask3):
        h = self.emb(idx)                                                   # (B, L, E)
        B, L = idx.shape
        if self.mode == "self":
            q = k = v = h
        elif self.mode == "cross":
            q, k, v = h, ctx, ctx
        else:
            q, k, v = h, ctx, self.vproj(ctx)
        if not self.bf:
            if self.mode == "self":
                q = k = v = h.transpose(0, 1)
            else:
                q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        S = k.shape[0 if not self.bf else 1]
        kw = {}
        if "kpm" in self.mask:
            kw["key_padding_mask"] = kpm
        if "float2d" in self.mask:
            kw["attn_mask"] = torch.linspace(-1, 1, L * S, dtype=h.dtype).reshape(L, S)
        if "bool3d" in self.mask:
            kw["attn_mask"] = mask3.reshape(B * H, L, S)
        if self.causal:
            kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(L, dtype=h.dtype)
            kw["is_causal"] = True
        out, w = self.attn(q, k, v, need_weights=self.nw, average_attn_weights=self.avg, **kw)
        out = out if self.bf else out.transpose(0, 1)
        logits = self.head(out.mean(1))
        if w is not None:
            logits = logits + w.reshape(B, -1).sum(1, keepdim=True).sin()
        return logits


def _inputs(B=4, L=5, S=3, kdim=E, mask3_fill=True):
    idx = torch.randint(0, 11, (B, L))
    ctx = torch.randn(B, S, kdim, dtype=torch.float64)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0, -1] = kpm[2, 1] = True
    mask3 = torch.rand(B, H, L, S) < 0.3
    mask3[..., 0] = False                                                    # no fully masked row
    return (idx, ctx, kpm, mask3), torch.randint(0, 3, (B,))


CASES = {
    "self_kpm_weights": dict(S=5),
    "self_seq_first_T_eq_B_float_mask": dict(batch_first=False, mask="float2d", L=4, B=4, S=4),
    "self_causal_no_weights": dict(causal=True, need_weights=False, mask="", S=5),
    "self_causal_with_kpm": dict(causal=True, need_weights=False, mask="kpm", S=5),
    "self_bool3d_per_head_weights": dict(mask="bool3d", average=False, S=5),
    "self_no_bias": dict(bias=False, S=5),
    "cross_kpm": dict(mode="cross"),
    "cross_seq_first_bool3d": dict(mode="cross", batch_first=False, mask="bool3d+kpm", need_weights=False),
    "cross_separate_weights": dict(mode="cross_kv_differ", kdim=4, vdim=7, mask="kpm"),
    "cross_separate_weights_no_bias": dict(mode="cross_kv_differ", kdim=4, vdim=7, bias=False, mask="float2d"),
}


def _case(name):
    cfg = dict(CASES[name])
    B, L, S = cfg.pop("B", 4), cfg.pop("L", 5), cfg.pop("S", 3)
    torch.manual_seed(0)
    model = Attn(**cfg).double().eval()
    x, y = _inputs(B, L, S, kdim=cfg.get("kdim") or E)
    return model, x, y


def _check_all(model, x, y, loss=ce):
    want = naive_per_example_grads(model, loss, x, y)
    gs = gm.collect_gradients(model, loss, x, y)
    # the recomputed forward is the module's: same per-example losses
    torch.testing.assert_close(gs.losses, loss(model(*x), y).detach(), atol=1e-12, rtol=0)
    assert set(gs.param_names) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert_dicts_close(gs.per_example_grads(), want)
    flat = flatten_params({k: want[k] for k in gs.param_names})
    torch.testing.assert_close(gs.grad_norms(), flat.norm(dim=1), atol=1e-10, rtol=0)
    torch.testing.assert_close(gs.gram(), flat @ flat.T, atol=1e-10, rtol=0)
    assert_dicts_close(gs.fisher_diagonal(), {k: g.square().mean(0) for k, g in want.items()})
    assert_dicts_close(gs.mean_grad(), {k: g.mean(0) for k, g in want.items()})
    return gs, want


@pytest.mark.parametrize("name", sorted(CASES))
def test_multihead_attention_equals_naive_loop(name):
    model, x, y = _case(name)
    gs, want = _check_all(model, x, y)
    assert gs.fallback_params == []
    assert gs["attn"].module_type == "MultiheadAttention" and gs["attn.out_proj"].module_type.endswith("Linear")
    params = {n: p.detach() for n, p in model.named_parameters()}
    assert_dicts_close(functional_factors(model, ce, params, x, y).per_example_grads(), want)


def test_self_attention_factors_are_one_linear_over_tokens():
    model, x, y = _case("self_kpm_weights")
    gs = gm.collect_gradients(model, ce, x, y)
    assert gs["attn"].activations.shape == (4, 5, E) and gs["attn"].backprops.shape == (4, 5, 3 * E)
    model, x, y = _case("cross_kpm")
    gs = gm.collect_gradients(model, ce, x, y)
    assert gs["attn"].activations.shape == (4, 5 + 3 + 3, E) and gs["attn"].backprops.shape == (4, 11, 3 * E)


@pytest.mark.parametrize("frozen", ["attn.in_proj_bias", "attn.in_proj_weight", "attn.k_proj_weight",
                                    "attn.out_proj.weight"])
def test_frozen_attention_parameters_do_not_count(frozen):
    model, x, y = _case("cross_separate_weights" if "k_proj" in frozen else "cross_kpm")
    model.get_parameter(frozen).requires_grad_(False)
    gs, _ = _check_all(model, x, y)
    assert frozen not in gs.param_names and not gs.fallback_params


def test_only_out_proj_requested_is_still_factored():
    model, x, y = _case("self_kpm_weights")
    gs = gm.collect_gradients(model, ce, x, y, layers=["attn.out_proj"])
    want = naive_per_example_grads(model, ce, x, y)
    assert gs.param_names == ["attn.out_proj.weight", "attn.out_proj.bias"] and not gs.fallback_params
    assert_dicts_close(gs.per_example_grads(), {k: want[k] for k in gs.param_names})


@pytest.mark.parametrize("option", ["add_bias_kv", "add_zero_attn", "train_dropout"])
def test_exotic_options_take_the_exact_fallback(option):
    torch.manual_seed(0)
    model = Attn(mode="cross").double().eval()
    kw = {"add_bias_kv": dict(add_bias_kv=True), "add_zero_attn": dict(add_zero_attn=True),
          "train_dropout": dict(dropout=0.5)}[option]
    model.attn = nn.MultiheadAttention(E, H, batch_first=True, **kw).double()
    x, y = _inputs()
    if option == "train_dropout":
        model.attn.train()
        gs = gm.collect_gradients(model, ce, x, y)
        assert {"attn.in_proj_weight", "attn.out_proj.weight"} <= set(gs.fallback_params)
        return
    gs, _ = _check_all(model, x, y)
    assert {"attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight"} <= set(gs.fallback_params)


class TorchTransformer(nn.Module):
    def __init__(self, kind, batch_first, norm_first=False):
        super().__init__()
        self.emb = nn.Embedding(11, E)
        self.kind, self.bf = kind, batch_first
        kw = dict(d_model=E, nhead=H, dim_feedforward=8, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
        if kind == "encoder":
            self.body = nn.TransformerEncoder(nn.TransformerEncoderLayer(**kw), 2, enable_nested_tensor=False)
        elif kind == "encoder_layer":
            self.body = nn.TransformerEncoderLayer(**kw)
        else:
            self.body = nn.TransformerDecoderLayer(**kw)
        self.head = nn.Linear(E, 3)

    def forward(self, idx, ctx, kpm, mask3):
        h = self.emb(idx)
        L = idx.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=h.dtype)
        t = (lambda z: z) if self.bf else (lambda z: z.transpose(0, 1))   # noqa: E731
        if self.kind == "decoder_layer":
            out = self.body(t(h), t(ctx), tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=kpm)
        else:
            pad = torch.zeros(idx.shape, dtype=torch.bool)
            pad[:, -1] = idx[:, -1] > 5
            out = self.body(t(h), mask=causal, src_key_padding_mask=pad, is_causal=True) if self.kind == "encoder" \
                else self.body(t(h), src_mask=causal, src_key_padding_mask=pad)
        return self.head(t(out).mean(1))


@pytest.mark.parametrize("kind", ["encoder", "encoder_layer", "decoder_layer"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_torch_transformer_layers_equal_naive_loop(kind, batch_first):
    torch.manual_seed(0)
    model = TorchTransformer(kind, batch_first, norm_first=not batch_first).double().eval()
    x, y = _inputs(B=4, L=4, S=3)        # L = B: sequence-first read from the configuration
    gs, _ = _check_all(model, x, y)
    assert not gs.fallback_params
    assert {gs[n].module_type for n in gs.layer_names if n.endswith("attn")} == {"MultiheadAttention"}


def test_multihead_attention_is_in_the_support_table():
    assert "nn.MultiheadAttention" in gm.grads.supported_layers()


def test_functional_factors_under_vmap_over_parameter_sets_equal_a_loop():
    torch.manual_seed(0)
    enc = nn.TransformerEncoderLayer(E, H, 8, dropout=0.0, batch_first=True).double().eval()
    x, y = torch.randn(3, 4, E, dtype=torch.float64), torch.randn(3, 4, E, dtype=torch.float64)
    loss = lambda o, t: (o - t).pow(2).sum((1, 2))  # noqa: E731
    sets = [{n: p.detach() + 0.1 * k * torch.randn_like(p) for n, p in enc.named_parameters()} for k in range(3)]
    stacked = {n: torch.stack([s[n] for s in sets]) for n in sets[0]}
    got = torch.func.vmap(lambda p: functional_factors(enc, loss, p, x, y).grad_norms())(stacked)
    want = []
    for s in sets:
        with torch.no_grad():
            for n, p in enc.named_parameters():
                p.copy_(s[n])
        want.append(flatten_params(naive_per_example_grads(enc, loss, x, y)).norm(dim=1))
    torch.testing.assert_close(got, torch.stack(want), atol=1e-10, rtol=0)
