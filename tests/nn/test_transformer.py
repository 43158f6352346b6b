"""GradMetaNet on the GPT test transformer: per-token factors as set elements; exact equivariance
under the full spec (FFN units per block, q/k and v/o dims per head, tied residual stream)."""
import pytest
import torch

from gradmeta.models import GPT, lm_loss
from gradmeta.nn import GradMetaNet, symmetry_spec


def case(pre_ln, batch=3, T=5, seed=0):
    torch.manual_seed(seed)
    model = GPT(11, 8, 2, 2, 6, d_ff=12, pre_ln=pre_ln).double()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 11, (batch, T + 1), generator=g)
    return model, idx[:, :-1], idx[:, 1:]


@pytest.mark.parametrize("pre_ln", [True, False])
@pytest.mark.parametrize("variant", ["base", "plusplus"])
@pytest.mark.parametrize("readout", ["invariant", "weight"])
def test_gpt_equivariance(refs, pre_ln, variant, readout, rng):
    model, x, y = case(pre_ln)
    spec = symmetry_spec(model)
    torch.manual_seed(1)
    net = GradMetaNet.for_model(model, readout=readout, variant=variant, channels=8, set_layers=1,
                                neuron_layers=1, heads=2, weight_aware=readout == "weight").double()
    kw = lambda m: {"params": dict(m.named_parameters())} if net.weight_aware else {}  # noqa: E731
    out = net(refs.collect(model, x, y, lm_loss), **kw(model))
    perms = refs.nontrivial_perms(spec, rng)
    pm = refs.permuted_model(model, spec, perms)
    out_p = net(refs.collect(pm, x, y, lm_loss), **kw(pm))
    if readout == "invariant":
        assert torch.allclose(out, out_p, atol=1e-10, rtol=0)
    else:
        refs.assert_close_dict(out_p, spec.permute(out, perms), 1e-10)
        assert not torch.allclose(out["blocks.0.attn.q.weight"], out["blocks.0.attn.k.weight"])
    # any number of tokens and examples with the same network
    x2, y2 = case(pre_ln, batch=2, T=3)[1:]
    out2 = net(refs.collect(model, x2, y2, lm_loss), **kw(model))
    assert (out2.shape == out.shape) if readout == "invariant" else out2.keys() == out.keys()
