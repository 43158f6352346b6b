"""GradMetaNetLO under vmap (functional gradient sets) equals the old hooks-based particle loop;
exactly equivariant to the inner MLP's hidden-neuron permutations; subsampled gradient sets."""
import pytest
import torch
from torch.func import vmap
from torch.utils import _pytree as pytree

from gradmeta.lopt import PES, GradMetaNetLO, SupervisedTask, digits_mlp
from gradmeta.models import classification_loss, mlp

from .references import gmn_step_with_hooks


def _trained_looking(lo, dtype=torch.float32, seed=1):
    """Meta-parameters whose MLP reads the GradMetaNet features (untrained ones ignore them)."""
    gen = torch.Generator().manual_seed(seed)
    meta = {k: v.to(dtype) for k, v in lo.init_meta(0).items()}
    meta["mlp.w2"] = 0.3 * torch.randn(meta["mlp.w2"].shape, generator=gen, dtype=dtype)
    if "mlp.extra_gate" in meta:  # gates start at 0: open them so that the branch is read
        meta["mlp.extra_gate"] = torch.randn(meta["mlp.extra_gate"].shape, generator=gen, dtype=dtype)
    return meta


@pytest.fixture(scope="module")
def digits64():
    """Digits MLP 64-6-10 in float64, batch 12."""
    t = digits_mlp(hidden=[6], batch_size=12)
    return SupervisedTask(mlp([64, 6, 10]).double(), classification_loss, t.X.double(), t.y, t.X_test.double(),
                          t.y_test, batch_size=12, name="digits64")


@pytest.mark.parametrize("variant,weight_aware,examples,attn,product", [("base", False, None, "softmax", "gelu"),
                                                                        ("plusplus", False, 5, "softmax", "gelu"),
                                                                        ("plusplus", False, 5, "linear", "gelu"),
                                                                        ("base", True, 5, "softmax", "gelu"),
                                                                        ("base", False, 5, "softmax", "bilinear")])
def test_vmapped_steps_equal_the_hooks_loop_in_float64(digits64, variant, weight_aware, examples, attn, product):
    lo = GradMetaNetLO(digits64, gmn_channels=2, variant=variant, weight_aware=weight_aware, hidden=8,
                       examples=examples, neuron_attention=attn, product=product)
    meta = _trained_looking(lo, torch.float64)
    params = digits64.init_stacked([0, 1, 2])
    state = vmap(lo.init)(params)
    batches = digits64.batches(torch.Generator().manual_seed(0), 2 * 3)
    batches = tuple(b.view(2, 3, *b.shape[1:]) for b in batches)
    ref_p, ref_s = params, state
    for t in range(2):
        batch = tuple(b[t] for b in batches)
        params, state, loss = vmap(lambda p, s, b: lo.step(digits64, meta, p, s, b))(params, state, batch)
        outs = [gmn_step_with_hooks(lo, digits64, meta, *(pytree.tree_map(lambda x: x[i], a)
                                                          for a in (ref_p, ref_s, batch)), examples=examples)
                for i in range(3)]
        ref_p, ref_s, ref_loss = pytree.tree_map(lambda *xs: torch.stack(xs), *outs)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
        for a, b in zip(pytree.tree_leaves((params, state)), pytree.tree_leaves((ref_p, ref_s))):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert any(not torch.allclose(params[k][0], params[k][1]) for k in params)


def test_pes_estimate_equals_the_per_particle_loop(small_digits, monkeypatch):
    """One PES iteration, vectorised, equals the same iteration with particles stepped one by one with hooks."""
    lo = GradMetaNetLO(small_digits, gmn_channels=2, hidden=8, examples=8)
    meta = _trained_looking(lo)
    results = []
    for mode in ("vmap", "loop"):
        if mode == "loop":
            monkeypatch.setattr(lo, "step", lambda task, m, p, s, b: gmn_step_with_hooks(lo, task, m, p, s, b, 8))

            def loop_map(fn, in_dims):
                def run(*args):
                    n = next(pytree.tree_leaves(a)[0].shape[d] for a, d in zip(args, in_dims) if d is not None)
                    take = lambda a, d, i: a if d is None else pytree.tree_map(lambda x: x.select(d, i), a)  # noqa: E731
                    outs = [fn(*(take(a, d, i) for a, d in zip(args, in_dims))) for i in range(n)]
                    return pytree.tree_map(lambda *xs: torch.stack(xs), *outs)
                return run
            monkeypatch.setattr(lo, "map", loop_map)
        pes = PES(small_digits, lo, particles=4, truncation=2, horizon=4, sigma=0.05)
        gen = torch.Generator().manual_seed(0)
        state = pes.init(meta, gen)
        g, state, info = pes.grad(meta, state, gen)
        results.append((g, state, info))
    (g, s, info), (g_ref, s_ref, info_ref) = results
    assert info["meta_loss"] == pytest.approx(info_ref["meta_loss"], rel=1e-5)
    for k in g:
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-3, atol=1e-4)
    for a, b in zip(pytree.tree_leaves(s), pytree.tree_leaves(s_ref)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(float(v.abs().max()) > 0 for k, v in g.items() if k.startswith("gmn."))


@pytest.mark.parametrize("variant,gate,center,attn,product", [("base", False, False, "softmax", "gelu"),
                                                              ("plusplus", False, False, "softmax", "gelu"),
                                                              ("plusplus", False, False, "linear", "gelu"),
                                                              ("base", True, False, "softmax", "gelu"),
                                                              ("base", True, True, "softmax", "gelu"),
                                                              ("base", True, True, "softmax", "bilinear")])
def test_steps_are_equivariant_to_hidden_neuron_permutations(digits64, variant, gate, center, attn, product):
    lo = GradMetaNetLO(digits64, gmn_channels=2, variant=variant, weight_aware=True, hidden=8, examples=7,
                       extra_gate=gate, center_branch=center, neuron_attention=attn, product=product)
    meta = _trained_looking(lo, torch.float64)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(3))

    def permute(p):
        return {"0.weight": p["0.weight"][perm], "0.bias": p["0.bias"][perm], "2.weight": p["2.weight"][:, perm],
                "2.bias": p["2.bias"]}

    def permute_state(s):
        base = s.base._replace(momenta=permute_lead(s.base.momenta), second=permute(s.base.second))
        return s._replace(base=base, avg=permute(s.avg))

    def permute_lead(m):  # (6 decays, *shape)
        return {"0.weight": m["0.weight"][:, perm], "0.bias": m["0.bias"][:, perm],
                "2.weight": m["2.weight"][:, :, perm], "2.bias": m["2.bias"]}

    params = digits64.init(0)
    pp, state, state_p = permute(params), lo.init(params), lo.init(permute(params))
    batches = digits64.batches(torch.Generator().manual_seed(0), 3)
    for t in range(3):
        batch = tuple(b[t] for b in batches)
        params, state, loss = lo.step(digits64, meta, params, state, batch)
        pp, state_p, loss_p = lo.step(digits64, meta, pp, state_p, batch)
        torch.testing.assert_close(loss_p, loss, rtol=1e-12, atol=1e-12)
        for a, b in zip(pytree.tree_leaves((pp, state_p)), pytree.tree_leaves((permute(params), permute_state(state)))):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_examples_is_checked_and_changes_the_update(small_digits):
    with pytest.raises(ValueError, match="examples must be a positive integer"):
        GradMetaNetLO(small_digits, examples=0)
    params = small_digits.init(0)
    batch = tuple(b[0] for b in small_digits.batches(torch.Generator().manual_seed(0), 1))
    out = {}
    for examples in (None, 16, 4):
        lo = GradMetaNetLO(small_digits, gmn_channels=2, hidden=8, examples=examples)
        out[examples] = lo.step(small_digits, _trained_looking(lo), params, lo.init(params), batch)
    for k in params:  # 16 = the batch size: the whole batch
        assert torch.equal(out[None][0][k], out[16][0][k])
    assert out[4][2] == out[None][2]  # the loss is always the whole batch's
    assert any(not torch.allclose(out[4][0][k], out[None][0][k]) for k in params)


@pytest.mark.parametrize("which", ["mlp", "gpt"])
def test_subsample_set_sliced_from_the_batch_equals_the_set_collected_on_it(digits64, which):
    """``gradients`` runs one factored pass over the batch and slices its first ``examples`` examples:
    the same set as collected on those examples alone, and the batch's mean gradient and loss."""
    from torch.func import functional_call, grad_and_value

    from gradmeta.grads import functional_factors
    from gradmeta.lopt import char_lm

    task = digits64 if which == "mlp" else char_lm(batch_size=6, seq_len=5, d_model=8, n_heads=2)
    lo = GradMetaNetLO(task, gmn_channels=2, hidden=8, examples=3)
    params = {k: v.double() for k, v in task.init(0).items()}
    lo.model.double()
    x, y = task.split(tuple(b[0] for b in task.batches(torch.Generator().manual_seed(0), 1)))
    x = x.double() if x.is_floating_point() else x
    from gradmeta.lopt._gmn import _first_examples

    assert _first_examples(functional_factors(lo.model, task.loss_fn, params, x, y), 3) is not None  # sliced
    grads, sub, loss = lo.gradients(lo.model, task.loss_fn, params, x, y)
    ref = functional_factors(lo.model, task.loss_fn, params, x[:3], y[:3])
    assert sub.batch_size == 3 and sub.layer_names == ref.layer_names
    for name in ref:
        torch.testing.assert_close(sub[name].backprops, ref[name].backprops, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sub[name].activations, ref[name].activations, rtol=1e-12, atol=1e-12)
    g_ref, loss_ref = grad_and_value(lambda p: task.loss_fn(functional_call(lo.model, p, (x,)), y).mean())(params)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-12)
    for k in params:
        torch.testing.assert_close(grads[k], g_ref[k], rtol=1e-10, atol=1e-12)
