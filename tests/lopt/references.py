"""Slow, obvious references for the learned-optimization tests."""
import torch


class LearnedSGD:
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
