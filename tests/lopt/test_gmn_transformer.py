"""The GradMetaNet and weight-space learned optimizers on a transformer inner model
(:class:`gradmeta.models.GPT`, the char-LM task's architecture), in float64: the vectorised capture
equals a naive per-example loop, and one step is exactly equivariant to the GPT's symmetries
(FFN units per block, q/k and v/o dims per head) on the real network."""
import pytest
import torch
from torch.func import vmap

from gradmeta.lopt import GradMetaNetLO, ModuleTask, WeightSpaceLO
from gradmeta.models import GPT, lm_loss
from gradmeta.nn import symmetry_spec
from tests.conftest import naive_per_example_grads
from tests.nn.conftest import nontrivial_perms

V, T = 11, 5


@pytest.fixture(scope="module")
def gpt_task():
    """A 2-block GPT (vocab 11, d 8, 2 heads, FFN 12) in float64 and a batch of 4 windows of 5 tokens."""
    torch.manual_seed(0)
    task = ModuleTask(GPT(V, 8, 2, 2, T, d_ff=12).double(), lm_loss, "tiny_gpt")
    idx = torch.randint(0, V, (4, T + 1), generator=torch.Generator().manual_seed(0))
    return task, (idx[:, :-1], idx[:, 1:])


def _trained_looking(lo):
    """Meta-parameters whose per-parameter MLP reads the branch's features (untrained ones ignore them)."""
    meta = {k: v.double() for k, v in lo.init_meta(0).items()}
    meta["mlp.w2"] = 0.3 * torch.randn(meta["mlp.w2"].shape, generator=torch.Generator().manual_seed(1),
                                       dtype=torch.float64)
    return meta


def _model_at(task, params):
    with torch.no_grad():
        for k, p in task.model.named_parameters():
            p.copy_(params[k])
    return task.model.requires_grad_(True)


@pytest.mark.parametrize("examples", [None, 3])
def test_gradient_set_of_the_transformer_equals_the_naive_loop_under_vmap(gpt_task, examples):
    task, (x, y) = gpt_task
    lo = GradMetaNetLO(task, gmn_channels=2, hidden=8, examples=examples)
    params = task.init_stacked([1, 2])
    grads, pe, loss = vmap(lambda p: (lambda g, gs, l: (g, gs.per_example_grads(), l))(
        *lo.gradients(lo.model, lm_loss, p, x, y)))(params)
    n = examples or len(x)
    for i in range(2):
        p_i = {k: v[i] for k, v in params.items()}
        want = naive_per_example_grads(_model_at(task, p_i), lm_loss, x, y)
        task.model.requires_grad_(False)
        for k in want:
            torch.testing.assert_close(pe[k][i], want[k][:n], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(grads[k][i], want[k].mean(0), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(loss[i], task.loss(p_i, (x, y)).mean(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("make", [
    lambda t: GradMetaNetLO(t, gmn_channels=2, hidden=8, examples=3),
    lambda t: GradMetaNetLO(t, gmn_channels=2, hidden=8, weight_aware=True, variant="plusplus", heads=2),
    lambda t: WeightSpaceLO(t, out_channels=2, hidden=8)], ids=["gmn", "gmn++_weight_aware", "weightspace"])
def test_a_step_on_the_transformer_is_equivariant_to_its_symmetries(gpt_task, make):
    task, batch = gpt_task
    lo = make(task)
    lo.net.double()
    meta = _trained_looking(lo)
    spec = symmetry_spec(task.model)
    perms = nontrivial_perms(spec, torch.Generator().manual_seed(0))
    params = task.init(3)
    permuted = spec.permute(params, perms)
    # the permuted network computes the same function (the symmetries are real)
    torch.testing.assert_close(task.loss(permuted, batch), task.loss(params, batch), rtol=1e-12, atol=1e-12)
    new, _, loss = lo.step(task, meta, params, lo.init(params), batch)
    new_p, _, loss_p = lo.step(task, meta, permuted, lo.init(permuted), batch)
    torch.testing.assert_close(loss_p, loss, rtol=1e-12, atol=1e-12)
    want = spec.permute(new, perms)
    for k in params:
        torch.testing.assert_close(new_p[k], want[k], rtol=1e-9, atol=1e-10)  # a broken symmetry: ~1e-2
    # the branch matters: the same step without it (untrained meta-parameters: SGD with momentum) differs
    plain, _, _ = lo.step(task, {k: v.double() for k, v in lo.init_meta(0).items()}, params, lo.init(params), batch)
    assert any(not torch.allclose(new[k], plain[k]) for k in params)
