"""Functional SGDM / Adam against torch.optim trajectories; usable under vmap (lr sweeps)."""
import torch
from torch.func import grad, vmap

from gradmeta.lopt import ADAM_LRS, adam, sgdm

from tests.lopt.references import task_trajectory


def _functional_trajectory(task, opt, params, batches, steps):
    state, out = opt.init(params), []
    for t in range(steps):
        batch = (batches[0][t], batches[1][t])
        g = grad(lambda p: task.loss(p, batch).mean())(params)
        params, state = opt.update(g, state, params)
        out.append(params)
    return out


def _compare(small_digits, functional, reference):
    params = small_digits.init(3)
    batches = small_digits.batches(torch.Generator().manual_seed(0), 15)
    ref = task_trajectory(small_digits, params, reference, batches, 15)
    got = _functional_trajectory(small_digits, functional, params, batches, 15)
    for r, g in zip(ref, got):
        for k in r:
            torch.testing.assert_close(g[k], r[k], rtol=1e-5, atol=1e-6)


def test_sgdm_matches_torch_sgd(small_digits):
    _compare(small_digits, sgdm(0.3, 0.9), lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9))


def test_adam_matches_torch_adam(small_digits):
    _compare(small_digits, adam(0.01), lambda ps: torch.optim.Adam(ps, lr=0.01))


def test_adam_lr_sweep_under_vmap_equals_separate_runs(small_digits):
    assert ADAM_LRS[0] == 0.0005 and ADAM_LRS[-1] == 0.01 and len(ADAM_LRS) == 20
    lrs = torch.tensor([0.001, 0.005, 0.01])
    params = small_digits.init(0)
    batches = small_digits.batches(torch.Generator().manual_seed(1), 5)

    def run(lr):
        return _functional_trajectory(small_digits, adam(lr), params, batches, 5)[-1]

    swept = vmap(run)(lrs)
    for i, lr in enumerate(lrs.tolist()):
        single = run(lr)
        for k in single:
            torch.testing.assert_close(swept[k][i], single[k], rtol=1e-5, atol=1e-6)
