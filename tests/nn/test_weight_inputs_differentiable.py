"""Weight-aware networks read the weights as a differentiable input: the derivative of their output
with respect to the weights they are given (the gradient set held fixed) equals central finite
differences. A learned optimizer's meta-gradient through an unroll (truncated backpropagation) runs
through this path: the weights after step t are inputs of step t + 1."""
import pytest
import torch

from gradmeta.nn import AveragedGradientNet, GradMetaNet, PerParamDeepSets


def _nets(model):
    torch.manual_seed(0)
    kw = dict(readout="weight", out_dim=1, weight_aware=True, channels=8, set_layers=2, neuron_layers=1)
    return {
        "gradmetanet": GradMetaNet.for_model(model, **kw),
        "gradmetanet++": GradMetaNet.for_model(model, variant="plusplus", heads=2, **kw),
        "averaged-gradient": AveragedGradientNet.for_model(model, weight_aware=True, channels=8),
        "per-parameter deepsets": PerParamDeepSets(hidden=8, weight_aware=True),
    }


@pytest.mark.parametrize("name", ["gradmetanet", "gradmetanet++", "averaged-gradient", "per-parameter deepsets"])
def test_output_is_differentiable_in_the_weights(refs, name):
    model, x, y = refs.mlp_case([4, 6, 5, 3], 7, 0)
    net = _nets(model)[name].double()
    gs = refs.collect(model, x, y)
    w0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    probe = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
             for i, (k, v) in enumerate(w0.items())}

    def f(w):
        out = net(gs, params=w)
        return sum((out[k] * probe[k]).sum() for k in probe)

    w = {k: v.clone().requires_grad_(True) for k, v in w0.items()}
    grads = dict(zip(w, torch.autograd.grad(f(w), list(w.values()))))
    assert all(float(g.abs().max()) > 0 for g in grads.values())  # every weight tensor reaches the output
    d = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(100 + i), dtype=torch.float64)
         for i, (k, v) in enumerate(w0.items())}
    eps = 1e-6
    with torch.no_grad():
        fd = (f({k: w0[k] + eps * d[k] for k in w0}) - f({k: w0[k] - eps * d[k] for k in w0})) / (2 * eps)
    ad = sum((grads[k] * d[k]).sum() for k in w0)
    assert float(ad) == pytest.approx(float(fd), rel=1e-6, abs=1e-9)
