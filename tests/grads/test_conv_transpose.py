"""Transposed convolutions: per-example gradients, norms, Gram, Fisher and mean equal a naive
per-example loop (float64, 1e-10) for strides, padding, dilation and output_padding."""
import pytest
import torch
from torch import nn

import gradmeta as gm
from tests.conftest import assert_dicts_close, assert_reductions_match, naive_per_example_grads


def mse(out, y):
    return (out - y).pow(2).flatten(1).sum(1)


CONFIGS = {
    "2d_plain": (2, dict(kernel_size=3)),
    "2d_stride_pad_outpad": (2, dict(kernel_size=3, stride=2, padding=1, output_padding=1)),
    "2d_dilation_rect": (2, dict(kernel_size=(2, 3), stride=(1, 2), dilation=(2, 1), padding=(1, 0))),
    "2d_no_bias": (2, dict(kernel_size=3, stride=2, bias=False)),
    "1d_stride_outpad": (1, dict(kernel_size=4, stride=3, padding=2, output_padding=2)),
    "1d_dilation": (1, dict(kernel_size=3, dilation=2, padding=1)),
}


def _case(name, frozen=None):
    dims, kw = CONFIGS[name]
    torch.manual_seed(0)
    conv = (nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose1d)(3, 4, **kw)
    model = nn.Sequential(conv, nn.Tanh()).double()
    if frozen:
        model.get_parameter(frozen).requires_grad_(False)
    x = torch.randn((5, 3) + (4, 5)[:dims], dtype=torch.float64)
    y = torch.randn(model(x).shape, dtype=torch.float64)
    return model, x, y


CASES = [(n, fz) for n in sorted(CONFIGS) for fz in ([None, "0.weight", "0.bias"]
                                                     if CONFIGS[n][1].get("bias", True) else [None])]


@pytest.mark.parametrize(("name", "frozen"), CASES)
def test_conv_transpose_equals_naive_loop(name, frozen):
    model, x, y = _case(name, frozen)
    want = naive_per_example_grads(model, mse, x, y)
    gs = gm.collect_gradients(model, mse, x, y)
    assert not gs.fallback_params and gs["0"].module_type.startswith("ConvTranspose")
    assert_reductions_match(gs, want)


def test_grouped_conv_transpose_takes_the_exact_fallback():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2), nn.Tanh()).double()
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    y = torch.randn(model(x).shape, dtype=torch.float64)
    gs = gm.collect_gradients(model, mse, x, y)
    assert sorted(gs.fallback_params) == ["0.bias", "0.weight"]
    assert_dicts_close(gs.per_example_grads(), naive_per_example_grads(model, mse, x, y))
