"""Every trainable parameter on models with torch's attention, RNNs, norms, grouped convs, raw
parameters and tied weights: equal to a naive per-example loop (float64, 1e-10)."""
import pytest
import torch
from torch import nn

import gradmeta as gm
from gradmeta.grads import GradientCollectionError, functional_factors
from tests.conftest import assert_dicts_close, assert_reductions_match, naive_per_example_grads


def ce(out, y):
    return nn.functional.cross_entropy(out, y, reduction="none")


class SeqModel(nn.Module):
    """Tokens -> body -> mean over time -> head; ``body`` takes and returns (B, T, d) or (T, B, d)."""

    def __init__(self, body, seq_first=False, d=6):
        super().__init__()
        self.emb = nn.Embedding(11, d)
        self.body, self.seq_first = body, seq_first
        self.head = nn.Linear(d, 3)

    def forward(self, idx):
        h = self.emb(idx)
        if self.seq_first:
            h = h.transpose(0, 1)
        h = self.body(h)
        h = h[0] if isinstance(h, tuple) else h
        return self.head(h.mean(0 if self.seq_first else 1))


class MHA(nn.Module):
    def __init__(self, batch_first=True):
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, batch_first=batch_first)

    def forward(self, h):
        return self.attn(h, h, h, need_weights=False)[0]


class PosAndCls(nn.Module):
    """ViT-style raw parameters added to activations, RMSNorm, GroupNorm, grouped + circular convs."""

    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, 4))
        self.pos = nn.Parameter(torch.randn(1, 6, 4))
        self.conv = nn.Conv1d(4, 4, 3, padding=1, groups=2)
        self.circ = nn.Conv1d(4, 4, 3, padding=1, padding_mode="circular")
        self.gn = nn.GroupNorm(2, 4)
        self.rms = nn.RMSNorm(4)
        self.ln2d = nn.LayerNorm((5, 4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):                                   # (B, 5, 4)
        h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos   # (B, 6, 4)
        c = self.circ(self.gn(self.conv(h.transpose(1, 2))))                            # (B, 4, 6)
        h = self.rms(c.transpose(1, 2))
        return self.head(self.ln2d(h[:, 1:]).mean(1))


def _tok(B=4, T=5):
    return torch.randint(0, 11, (B, T)), torch.randint(0, 3, (B,))


CASES = {
    "mha": lambda: (SeqModel(MHA()), *_tok()),
    "mha_seq_first_T_eq_B": lambda: (SeqModel(MHA(batch_first=False), seq_first=True), *_tok(4, 4)),
    "encoder_layer_seq_first_T_eq_B": lambda: (SeqModel(nn.TransformerEncoderLayer(6, 2, 8, dropout=0.0),
                                                        seq_first=True), *_tok(4, 4)),
    "encoder_layer": lambda: (SeqModel(nn.TransformerEncoderLayer(6, 2, 8, dropout=0.0, batch_first=True)), *_tok()),
    "gru": lambda: (SeqModel(nn.GRU(6, 6, batch_first=True)), *_tok()),
    "lstm_seq_first": lambda: (SeqModel(nn.LSTM(6, 6), seq_first=True), *_tok(3, 3)),
    "freq_embedding": lambda: (SeqModel(nn.Identity()), *_tok()),
    "pos_cls_norms_convs": lambda: (PosAndCls(), torch.randn(4, 5, 4), torch.randint(0, 3, (4,))),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_parameter_equals_naive_loop(name):
    torch.manual_seed(0)
    model, x, y = CASES[name]()
    if name == "freq_embedding":
        model.emb.scale_grad_by_freq = True
        x[:, 1] = x[:, 0]                                    # repeated tokens in every example
    model = model.double().eval()
    want = naive_per_example_grads(model, ce, x, y)
    gs = gm.collect_gradients(model, ce, x, y)
    assert set(gs.param_names) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert_reductions_match(gs, want)
    params = {n: p.detach() for n, p in model.named_parameters()}
    assert_dicts_close(functional_factors(model, ce, params, x, y).per_example_grads(), want)


def test_fallback_is_listed_and_rules_are_used():
    torch.manual_seed(0)
    model = PosAndCls().double()
    gs = gm.collect_gradients(model, ce, torch.randn(3, 5, 4, dtype=torch.float64), torch.zeros(3).long())
    assert sorted(gs.fallback_params) == ["circ.bias", "circ.weight", "cls_token", "pos"]
    assert {gs[n].module_type for n in ("conv", "gn", "rms", "ln2d")} == {"Conv1d", "GroupNorm", "RMSNorm", "LayerNorm"}
    assert "pos" in gs.kfac_missing() and "conv" not in gs.kfac_factors()


def test_weight_read_outside_its_module_is_summed():
    class FunctionalHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.lin = nn.Linear(4, 4)

        def forward(self, idx):
            h = torch.tanh(self.lin(self.emb(idx))).mean(1)
            return torch.cat([h @ self.emb.weight.T, h @ self.lin.weight], 1)   # both weights also used functionally

    model = FunctionalHead().double()
    idx, y = torch.randint(0, 7, (3, 5)), torch.randint(0, 4, (3,))
    loss = lambda out, t: ce(out[:, :4], t)  # noqa: E731
    for layers in (None, ["lin"], ["emb"]):
        gs = gm.collect_gradients(model, loss, idx, y, layers=layers)
        want = naive_per_example_grads(model, loss, idx, y)
        assert_dicts_close(gs.per_example_grads(), {k: want[k] for k in gs.param_names})
        assert "emb.weight" in gs.fallback_params or layers == ["lin"]


def test_requested_layer_never_called_is_named():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(GradientCollectionError, match=r"requested layer 'unused' \(Linear\) was never called"):
        gm.collect_gradients(Skip(), ce, torch.randn(2, 3), torch.zeros(2).long(), layers=["unused"])


def test_embedding_max_norm_is_refused():
    model = SeqModel(nn.Identity())
    model.emb.max_norm = 1.0
    with pytest.raises(GradientCollectionError, match=r"'emb' \(Embedding\) has max_norm"):
        gm.collect_gradients(model, ce, *_tok())


def test_sequence_first_submodules_with_T_equal_B_are_read_along_dim_1():
    """Selecting only the Linear/LayerNorm layers of a batch_first=False encoder layer (T = B)."""
    torch.manual_seed(0)
    model = SeqModel(nn.TransformerEncoderLayer(6, 2, 8, dropout=0.0), seq_first=True).double().eval()
    x, y = _tok(4, 4)
    layers = ["body.linear1", "body.linear2", "body.norm1"]
    gs = gm.collect_gradients(model, ce, x, y, layers=layers)
    want = naive_per_example_grads(model, ce, x, y)
    assert_dicts_close(gs.per_example_grads(), {k: want[k] for k in gs.param_names})
    assert not gs.fallback_params
