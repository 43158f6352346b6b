"""Small float64 models and data covering every factor rule, shared by the grads tests."""
from __future__ import annotations

import torch
from torch import nn

from gradmeta.models import GPT, classification_loss, lm_loss, mlp


class BagOfWords(nn.Module):
    """Embedding -> mean over tokens -> Linear classifier."""

    def __init__(self, vocab=11, dim=6, classes=3, padding_idx=None):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.out = nn.Linear(dim, classes)

    def forward(self, idx):
        return self.out(self.emb(idx).mean(1))


class SmallConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 4, (2, 3), stride=2, dilation=(1, 2), bias=False)
        self.c3 = nn.Conv1d(4, 2, 3, padding="same")
        self.fc = nn.Linear(2 * 4, 3)

    def forward(self, x):
        h = torch.tanh(self.c2(torch.relu(self.c1(x))))      # (B, 4, 2, 2)
        h = torch.tanh(self.c3(h.flatten(2)))                 # (B, 2, 4)
        return self.fc(h.flatten(1))


class SharedLayer(nn.Module):
    """One Linear applied twice (its gradient sums over both calls) on 3-D token inputs."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):                                    # (B, T1, T2, 4)
        return self.out(torch.tanh(self.lin(torch.tanh(self.lin(x)))).mean((1, 2)))


def _cls_data(shape, classes=3, B=5):
    return torch.randn(B, *shape, dtype=torch.float64), torch.randint(0, classes, (B,))


def cases():
    """``{name: (model, loss_fn, inputs, targets)}`` in float64."""
    torch.manual_seed(1)
    tok = torch.randint(0, 11, (5, 6))
    lm_tok = torch.randint(0, 13, (4, 7))
    return {
        "mlp_bias": (mlp([6, 8, 5, 3]).double(), classification_loss, *_cls_data((6,))),
        "mlp_nobias": (mlp([6, 8, 5, 3], bias=False).double(), classification_loss, *_cls_data((6,))),
        "gpt_preln": (GPT(13, 8, 2, 2, 8).double(), lm_loss, lm_tok, lm_tok.roll(-1, 1)),
        "gpt_postln": (GPT(13, 8, 2, 2, 8, pre_ln=False).double(), lm_loss, lm_tok, lm_tok.roll(-1, 1)),
        "bag_of_words": (BagOfWords().double(), classification_loss, tok, torch.randint(0, 3, (5,))),
        "bag_padding": (BagOfWords(padding_idx=0).double(), classification_loss, tok % 4,
                        torch.randint(0, 3, (5,))),
        "conv": (SmallConv().double(), classification_loss, *_cls_data((2, 5, 7))),
        "shared_layer_3d": (SharedLayer().double(), classification_loss, *_cls_data((2, 3, 4), classes=2)),
    }
