"""Fitting many SIRENs at once: ``vmap`` over stacked functional parameters, one Adam state per INR."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap

from ._siren import DEFAULT_OMEGA0, pixel_grid, siren_apply, siren_init

__all__ = ["fit_inrs", "FitResult", "psnr", "render"]


@dataclass
class FitResult:
    """Output of :func:`fit_inrs`.

    Attributes:
        params: ``{name: (G, ...)}`` fitted parameters (detached).
        psnr: ``(G,)`` PSNR in dB of each INR's rendering vs its image (peak 1).
        mse: ``(G,)`` final pixel MSE.
        loss_history: ``(steps,)`` mean training MSE over the INRs at every step.
    """

    params: dict[str, Tensor]
    psnr: Tensor
    mse: Tensor
    loss_history: Tensor


def render(params: dict[str, Tensor], size: tuple[int, int], omega0: float = DEFAULT_OMEGA0) -> Tensor:
    """Images ``(G, C, H, W)`` of a stack of INRs (``(C, H, W)`` for one INR) on the pixel grid."""
    H, W = size
    dtype = params["layers.0.weight"].dtype
    out = siren_apply(params, pixel_grid(H, W, dtype).to(params["layers.0.weight"].device), omega0)
    return out.transpose(-1, -2).reshape(*out.shape[:-2], -1, H, W)


def psnr(pred: Tensor, target: Tensor, peak: float = 1.0) -> Tensor:
    """``10 log10(peak² / MSE)`` per leading index: ``(G, ...)`` images -> ``(G,)`` dB."""
    mse = (pred - target).square().flatten(1).mean(1)
    return 10 * torch.log10(peak ** 2 / mse.clamp_min(1e-20))


def fit_inrs(images: Tensor, *, steps: int = 500, lr: float = 1e-3, hidden: int = 32, num_layers: int = 3,
             omega0: float = DEFAULT_OMEGA0, init: dict[str, Tensor] | None = None,
             generator: torch.Generator | None = None, betas: tuple[float, float] = (0.9, 0.999),
             eps: float = 1e-8, progress: bool = False, desc: str = "fit INRs") -> FitResult:
    """Fit one SIREN per image, all at once.

    The loss of INR ``g`` is its own pixel MSE; ``vmap(grad)`` gives every INR the gradient of its
    own loss only, and Adam keeps per-INR moments (elementwise) and a per-INR step count, so the
    result for each INR equals fitting it alone (up to floating-point summation order).

    Args:
        images: ``(G, C, H, W)`` in ``[0, 1]``; float dtype of the INRs.
        steps, lr, betas, eps: Adam on the mean pixel MSE of each INR.
        hidden, num_layers, omega0: SIREN size (3 layers of 32 hidden by default).
        init: ``{name: (G, ...)}`` starting parameters; default :func:`siren_init` with ``generator``.
        progress: show a tqdm bar over steps.

    Returns:
        :class:`FitResult`.
    """
    if images.dim() != 4:
        raise ValueError(f"fit_inrs: images must be (G, C, H, W), got shape {tuple(images.shape)}")
    G, C, H, W = images.shape
    dtype = images.dtype
    coords = pixel_grid(H, W, dtype).to(images.device)
    targets = images.flatten(2).transpose(1, 2)  # (G, H·W, C)
    if init is None:
        init = siren_init(G, C, hidden, num_layers, omega0=omega0, generator=generator, dtype=dtype)
    params = {k: v.detach().clone().to(images.device) for k, v in init.items()}
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    v2 = {k: torch.zeros_like(v) for k, v in params.items()}
    t = torch.zeros(G, dtype=dtype, device=images.device)  # per-INR step counts

    def loss_one(p, y):
        return (siren_apply(p, coords, omega0) - y).square().mean()

    step_fn = vmap(grad_and_value(loss_one))
    b1, b2 = betas
    history = torch.empty(steps)
    from tqdm.auto import tqdm

    for s in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        grads, losses = step_fn(params, targets)
        history[s] = losses.mean().detach().cpu()
        t += 1
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        for k in params:
            g = grads[k]
            m[k].mul_(b1).add_(g, alpha=1 - b1)
            v2[k].mul_(b2).addcmul_(g, g, value=1 - b2)
            shape = (G,) + (1,) * (g.dim() - 1)
            denom = (v2[k] / c2.view(shape)).sqrt_().add_(eps)
            params[k] = params[k] - lr * (m[k] / c1.view(shape)) / denom
    with torch.no_grad():
        pred = render(params, (H, W), omega0)
        mse = (pred - images).square().flatten(1).mean(1)
    return FitResult({k: v.detach() for k, v in params.items()}, 10 * torch.log10(1 / mse.clamp_min(1e-20)),
                     mse, history)

