"""``fit_editor`` runs the shared minibatch loop: bit for bit the loop it replaced (kept here as the reference)."""
import pytest
import torch

from gradmeta import inr
from gradmeta.inr._fit import render
from gradmeta.inr._train import fit_editor


def _reference_fit(editor, params, targets, *, steps, batch_size, lr, seed):
    editor.calibrate(params)
    with torch.no_grad():
        sets = editor.aux_sets(params)
    size = tuple(targets.shape[-2:])
    opt = torch.optim.Adam(editor.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    N, losses = targets.shape[0], []
    for _ in range(steps):
        idx = torch.randint(N, (min(batch_size, N),), generator=g)
        p = {k: v[idx] for k, v in params.items()}
        batch_sets = None if sets is None else [sets[i] for i in idx.tolist()]
        loss = (render(editor.edit(p, batch_sets), size, editor.omega0) - targets[idx]).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("features", ["weights", "gradients"])
def test_fit_editor_equals_the_old_loop_bitwise(features):
    torch.manual_seed(0)
    images = torch.rand(6, 1, 8, 8)
    params = inr.fit_inrs(images, steps=5).params
    targets = inr.apply_edit("dilation", images)
    runs = []
    for fit in (_reference_fit, lambda *a, **k: fit_editor(*a, **k)["loss"]):
        torch.manual_seed(0)
        editor = inr.INREditor(features=features)
        losses = fit(editor, params, targets, steps=4, batch_size=3, lr=1e-3, seed=1)
        runs.append((losses, [p.detach().clone() for p in editor.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_high_pass_equals_a_naive_loop_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 5, 6, generator=g, dtype=torch.float64)
    k = [[1, 2, 1], [2, 4, 2], [1, 2, 1]]
    ref = torch.empty_like(x)
    N, C, H, W = x.shape
    for n in range(N):
        for c in range(C):
            for i in range(H):
                for j in range(W):
                    s = sum(k[a + 1][b + 1] * x[n, c, min(max(i + a, 0), H - 1), min(max(j + b, 0), W - 1)]
                            for a in (-1, 0, 1) for b in (-1, 0, 1))
                    ref[n, c, i, j] = x[n, c, i, j] - s / 16
    torch.testing.assert_close(_hp(x), ref, rtol=0, atol=1e-12)
    assert _hp(torch.full((1, 1, 4, 4), 0.7, dtype=torch.float64)).abs().max() < 1e-15
    with pytest.raises(ValueError, match="high_pass"):
        _hp(torch.rand(3, 4, 4))


def _hp(x):
    from gradmeta.inr._train import high_pass
    return high_pass(x)


def test_smoothness_zero_is_the_old_loss_and_positive_changes_training():
    torch.manual_seed(0)
    images = torch.rand(6, 1, 8, 8)
    params = inr.fit_inrs(images, steps=5).params
    targets = inr.apply_edit("dilation", images)
    runs = {}
    for lam in (None, 0.0, 5.0):
        torch.manual_seed(0)
        editor = inr.INREditor(features="weights")
        kw = {} if lam is None else {"smoothness": lam}
        losses = fit_editor(editor, params, targets, steps=4, batch_size=3, lr=1e-2, seed=1, **kw)["loss"]
        runs[lam] = (losses, [p.detach().clone() for p in editor.parameters()])
    assert runs[None][0] == runs[0.0][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[None][1], runs[0.0][1]))
    assert not all(torch.equal(a, b) for a, b in zip(runs[None][1], runs[5.0][1]))
    assert runs[5.0][0][0] > runs[None][0][0]  # same first batch and editor: the penalty adds to the loss
    with pytest.raises(ValueError, match="smoothness"):
        fit_editor(inr.INREditor(features="weights"), params, targets, steps=1, smoothness=-1.0)
