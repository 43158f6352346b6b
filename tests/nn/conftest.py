"""Shared references for gradmeta.nn tests: real networks, permuted copies, recomputed gradient sets."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import gradmeta as gm
import gradmeta.nn  # noqa: F401  (registers gm.nn)
from gradmeta.models import classification_loss, mlp


def permuted_model(model, spec, perms):
    """A deep copy of ``model`` with every parameter permuted by ``perms`` (brute force via the spec)."""
    new = copy.deepcopy(model)
    state = spec.permute({k: v.detach() for k, v in model.named_parameters()}, perms)
    with torch.no_grad():
        for k, p in new.named_parameters():
            p.copy_(state[k])
    return new


def nontrivial_perms(spec, rng):
    """Random permutations of every permutable space, none of them the identity (size > 1)."""
    out = {}
    for k, p in spec.random_permutations(rng).items():
        out[k] = p.flip(0) if (p == torch.arange(len(p))).all() else p
    return out


def assert_gmn_equivariant(model, spec, perms, gs, gp, tol=1e-10) -> dict:
    """GradMetaNet (both readouts, small, float64) on the gradient sets ``gs`` of ``model`` and ``gp``
    of the network permuted by ``perms``: the invariant readout is unchanged and the weight readout
    is permuted like the parameters. Returns the weight readout's expected ``{name: tensor}``."""
    from gradmeta.nn import GradMetaNet

    want = {}
    for readout in ("invariant", "weight"):
        torch.manual_seed(1)
        net = GradMetaNet.for_model(model, readout=readout, channels=8, set_layers=1, neuron_layers=1,
                                    heads=2).double()
        out, out_p = net(gs), net(gp)
        if readout == "invariant":
            torch.testing.assert_close(out_p, out, atol=tol, rtol=0)
        else:
            want = spec.permute(out, perms)
            for k in want:
                torch.testing.assert_close(out_p[k], want[k], atol=tol, rtol=0)
    return want


def mlp_case(widths, batch, seed=0, activation="tanh"):
    """(model, inputs, targets) in float64 for a classification MLP."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = mlp(widths, activation=activation).double()
    x = torch.randn(batch, widths[0], generator=g, dtype=torch.float64)
    y = torch.randint(0, widths[-1], (batch,), generator=g)
    return model, x, y


def collect(model, x, y, loss=classification_loss):
    return gm.collect_gradients(model, loss, x, y)


def replace_factors(gs, name, activations=None, backprops=None):
    """A GradientSet equal to ``gs`` except for the factors of layer ``name`` (to break couplings)."""
    layers = {n: gs[n] for n in gs.layer_names}
    f = layers[name]
    changes = {}
    if activations is not None:
        changes["_inputs"] = activations
    if backprops is not None:
        changes["backprops"] = backprops
    layers[name] = dataclasses.replace(f, **changes)
    return type(gs)(layers, gs.losses)


def permute_output(spec, out, perms):
    """Permute a readout the way the spec permutes parameters / spaces (dicts keyed by param or space)."""
    if set(out) <= {p for p, _ in spec.params}:
        return spec.permute(out, perms)
    return {s: (v.index_select(0, perms[s]) if s in perms else v) for s, v in out.items()}


def assert_close_dict(a, b, tol=1e-10):
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=tol, rtol=0), (k, (a[k] - b[k]).abs().max())


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def refs():
    """The reference helpers above, as one namespace (test files are not a package)."""
    import types
    return types.SimpleNamespace(permuted_model=permuted_model, nontrivial_perms=nontrivial_perms, mlp_case=mlp_case, collect=collect,
                                 replace_factors=replace_factors, permute_output=permute_output,
                                 assert_close_dict=assert_close_dict)
