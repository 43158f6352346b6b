"""Slow, obvious references for the learned-optimization tests."""
import torch

from gradmeta.lopt import LearnedRule


class LearnedSGD(LearnedRule):
    """Reference learned optimizer with one meta-parameter: ``θ ← θ − exp(log_lr)·∇``."""

    def init_meta(self, seed=0):
        return {"log_lr": torch.tensor(-1.0)}

    def init(self, params):
        return {"count": torch.zeros(())}

    def update(self, meta, grads, state, params):
        return {k: params[k] - meta["log_lr"].exp() * grads[k] for k in params}, {"count": state["count"] + 1}


def torch_trajectory(model, opt, batches, loss_fn, steps):
    """Parameters after each of ``steps`` torch.optim steps on ``batches[t]`` (the slow obvious reference)."""
    out = []
    for t in range(steps):
        x, y = batches[0][t], batches[1][t]
        opt.zero_grad()
        loss_fn(model(x), y).mean().backward()
        opt.step()
        out.append({k: v.detach().clone() for k, v in model.named_parameters()})
    return out


def task_trajectory(task, params, make_opt, batches, steps):
    """:func:`torch_trajectory` of a copy of ``task.model`` started at ``params``; ``make_opt(parameters)``."""
    import copy

    model = copy.deepcopy(task.model)
    model.load_state_dict(params)
    for p in model.parameters():
        p.requires_grad_(True)
    return torch_trajectory(model, make_opt(model.parameters()), batches, task.loss_fn, steps)


def per_param_mlp_update(lo, meta, grads, state, params, extra=None):
    """``PerParamMLP.update`` written tensor by tensor, features as an explicit ``(n, F)`` matrix."""
    from gradmeta.lopt._learned import _SGD_INDEX, DECAYS, TIMESCALES

    t = state.step + 1
    time = torch.tanh(t / torch.tensor(TIMESCALES, dtype=t.dtype))
    momenta = {k: torch.stack([b * state.momenta[k][i] + (1 - b) * grads[k] for i, b in enumerate(DECAYS)])
               for k in params}
    second = {k: 0.999 * state.second[k] + 0.001 * grads[k] ** 2 for k in params}
    new = {}
    for k, p in params.items():
        n = p.numel()
        m = momenta[k].reshape(len(DECAYS), n).T
        rs = 1 / torch.sqrt(second[k].reshape(n, 1) / (1 - 0.999 ** t) + 1e-8)
        cols = [p.reshape(n, 1), grads[k].reshape(n, 1), m, m * rs]
        if extra is not None:
            cols.append(extra[k].reshape(n, -1))
        f = torch.cat(cols, 1)
        f = f / torch.sqrt((f ** 2).mean(0, keepdim=True) + 1e-12)
        x = torch.cat([f, time.expand(n, len(TIMESCALES))], 1)
        x = torch.relu(x @ meta["w0"] + meta["b0"])
        x = torch.relu(x @ meta["w1"] + meta["b1"])
        out = x @ meta["w2"] + meta["b2"]
        d, s = out[:, 0].clamp(-10, 10), (0.1 * out[:, 1]).clamp(-3, 3)
        m_sgd = momenta[k][_SGD_INDEX].reshape(n) / (1 - DECAYS[_SGD_INDEX])
        step = meta["log_lr"].exp() * (s.exp() * m_sgd + lo.step_mult * d)
        new[k] = p - step.clamp(-lo.max_update, lo.max_update).view_as(p)
    return new, momenta, second


def gmn_step_with_hooks(lo, task, meta, params, state, batch, examples=None):
    """``GradMetaNetLO.step`` the old way: the gradient set collected with hooks on a live copy of the model
    (``collect_gradients``), one inner run at a time; the set of the first ``examples`` examples."""
    import copy

    import gradmeta as gm

    model = copy.deepcopy(task.model)
    model.load_state_dict(params)
    model.requires_grad_(True)
    x, y = task.split(batch)
    gs = gm.collect_gradients(model, task.loss_fn, x, y)
    sub = gs if examples is None else gm.collect_gradients(model, task.loss_fn, x[:examples], y[:examples])
    new, state = lo.update(meta, gs.mean_grad(), state, params, gradient_set=sub)
    return new, state, gs.losses.mean()


def looped(fn, n, *args):
    """``fn`` on the ``i``-th slice of every stacked argument (``None``: shared), for ``i < n``, stacked."""
    from torch.utils import _pytree as pytree

    take = lambda a, i: a if a is None else pytree.tree_map(lambda x: x[i], a)  # noqa: E731
    outs = [fn(*(take(a, i) for a in args)) for i in range(n)]
    return pytree.tree_map(lambda *xs: torch.stack(xs), *outs)
