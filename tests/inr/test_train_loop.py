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
