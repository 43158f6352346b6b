"""symmetry_spec: derived specs are real symmetries of real models; clear errors otherwise."""
import dataclasses

import pytest
import torch
from torch import nn

import gradmeta as gm
from gradmeta.models import GPT, mlp
from gradmeta.nn import SymmetrySpec, SymmetrySpecError, symmetry_spec



def test_mlp_spec_levels_and_print():
    spec = symmetry_spec(mlp([3, 5, 4, 2]))
    assert spec.arch == "mlp" and spec.widths == [3, 5, 4, 2]
    assert [s.permutable for s in spec.spaces] == [False, True, True, False]
    assert spec.param_axes["2.weight"] == (("level2",), ("level1",))
    text = str(spec)
    assert "level1" in text and "permuted" in text and "2.weight" in text
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.arch = "x"


@pytest.mark.parametrize("make", [
    lambda: mlp([4, 6, 5, 3], activation="tanh"),
    lambda: GPT(11, 8, 2, 2, 6, d_ff=12, pre_ln=True),
    lambda: GPT(11, 8, 2, 2, 6, d_ff=12, pre_ln=False),
])
def test_spec_permutations_leave_function_unchanged(make, rng, refs):
    permuted_model = refs.permuted_model
    torch.manual_seed(0)
    model = make().double()
    spec = symmetry_spec(model)
    x = (torch.randint(0, 11, (3, 6), generator=rng) if isinstance(model, GPT)
         else torch.randn(7, 4, generator=rng, dtype=torch.float64))
    perms = refs.nontrivial_perms(spec, rng)
    out, out_p = model(x), permuted_model(model, spec, perms)(x)
    assert torch.allclose(out, out_p, atol=1e-12, rtol=0)
    # sanity: a permutation that breaks the tie (rows of one layer only) changes the function
    bad = spec.permute(dict(model.named_parameters()), perms)
    name = next(p for p, ax in spec.params if len(ax) == 2 and spec.space(ax[0][0]).permutable)
    broken = permuted_model(model, spec, {})
    with torch.no_grad():
        dict(broken.named_parameters())[name].copy_(bad[name])
    assert not torch.allclose(out, broken(x), atol=1e-6)


def test_gpt_spec_ties_residual_and_keeps_heads():
    spec = symmetry_spec(GPT(11, 8, 2, 2, 6, d_ff=12))
    axes = spec.param_axes
    assert axes["blocks.1.fc2.weight"] == (("resid",), ("blocks.1.ffn",))
    assert axes["tok.weight"][1] == ("resid",) and axes["ln_f.weight"] == (("resid",),)
    assert axes["blocks.0.attn.o.weight"][1] == ("blocks.0.attn.vo.h0", "blocks.0.attn.vo.h1")
    assert not spec.space("vocab_out").permutable


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.tanh(self.fc1(x)))))


class Residual(Custom):
    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc3(h + self.fc2(h))


def test_custom_mlp_traced_and_hand_written():
    spec = symmetry_spec(Custom())
    assert spec == SymmetrySpec.chain({"fc1": (4, 8), "fc2": (8, 8), "fc3": (8, 2)})
    spec.check(Custom())


def test_unsupported_structure_raises_clearly():
    with pytest.raises(SymmetrySpecError, match="single chain"):
        symmetry_spec(Residual())
    with pytest.raises(SymmetrySpecError, match="BatchNorm1d"):
        symmetry_spec(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)))
    with pytest.raises(SymmetrySpecError, match="previous level"):
        SymmetrySpec.chain({"a": (3, 4), "b": (5, 2)})
    with pytest.raises(SymmetrySpecError, match="shape"):
        SymmetrySpec.chain({"0": (3, 5), "2": (5, 2)}).check(mlp([3, 4, 2]))
