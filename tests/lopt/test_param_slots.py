"""The branch network is called with its meta-parameters by a lighter swap than
``torch.func.functional_call``: same outputs, the module's own parameters restored (also after an
error), and any other set of names handed to ``functional_call``."""
import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

from gradmeta.lopt import GradMetaNetLO
from gradmeta.lopt._gmn import _ParamSlots
from gradmeta.models import mlp


def _meta(net, k=3):
    return {n: torch.stack([p.detach() + 0.1 * torch.randn_like(p) for _ in range(k)])
            for n, p in net.named_parameters()}


def test_slots_equal_functional_call_under_vmap_and_restore_the_parameters():
    torch.manual_seed(0)
    model = mlp([5, 6, 3]).double()
    lo = GradMetaNetLO(model, channels=4, layers=2)
    lo.net.double()
    from gradmeta.grads import functional_factors
    from gradmeta.models import classification_loss

    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    params = {n: p.detach() for n, p in model.named_parameters()}
    gs = functional_factors(model, classification_loss, params, x, y)
    meta = _meta(lo.net)
    own = {n: p for n, p in lo.net.named_parameters()}
    slots = _ParamSlots(lo.net)
    got = vmap(lambda m: slots(m, (gs,)))(meta)
    want = vmap(lambda m: functional_call(lo.net, m, (gs,)))(meta)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert all(p is own[n] for n, p in lo.net.named_parameters())


def test_slots_restore_the_parameters_after_an_error_and_fall_back_on_other_names():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x, fail=False):
            if fail:
                raise RuntimeError("boom")
            return self.lin(x)

    m = Boom()
    own = dict(m.named_parameters())
    slots = _ParamSlots(m)
    new = {n: torch.zeros_like(p) for n, p in own.items()}
    with pytest.raises(RuntimeError, match="boom"):
        slots(new, (torch.ones(1, 2),), {"fail": True})
    assert all(p is own[n] for n, p in m.named_parameters())
    assert torch.equal(slots(new, (torch.ones(1, 2),)), torch.zeros(1, 2))
    # a partial dict (only the bias) goes through functional_call: the weight stays the module's own
    part = {"lin.bias": torch.ones(2)}
    torch.testing.assert_close(slots(part, (torch.ones(1, 2),)), functional_call(m, part, (torch.ones(1, 2),)))


def test_slots_follow_a_replaced_submodule():
    m = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    slots = _ParamSlots(m)
    x = torch.randn(4, 2)
    new = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    torch.testing.assert_close(slots(new, (x,)), functional_call(m, new, (x,)), atol=0, rtol=0)
    m[2] = nn.Linear(3, 1)  # a new module in the same place: the old slot would write into the old one
    new = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    torch.testing.assert_close(slots(new, (x,)), functional_call(m, new, (x,)), atol=0, rtol=0)
