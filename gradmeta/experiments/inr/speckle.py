"""Where the held-out error of an editor sits: speckle (background, high frequency) vs shape.

``python -m gradmeta.experiments.inr.speckle ZOO_DIR EDIT EDITOR [EDITOR ...]`` renders the
edited test-split INRs of a zoo on their pixel grid and prints, per editor, the pixel MSE to the
target edit: raw, clipped to [0, 1], after a 3×3 binomial blur of the rendering (if smoothing
the output helps, part of the error is high-frequency speckle), and the share of the squared
error on background pixels (target exactly 0) with the mean |rendering| there.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import gradmeta.inr as inr

__all__ = ["speckle_report"]


@torch.no_grad()
def speckle_report(zoo_dir: str, edit: str, editors: list[str]) -> dict[str, dict[str, float]]:
    zoo = inr.load_zoo(zoo_dir).split("test")
    y = inr.apply_edit(edit, zoo.images)
    k = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16
    bg = y == 0
    out = {}
    for name in editors:
        ed = inr.load_editor(name)
        r = inr.render(ed.edit(zoo.params), tuple(y.shape[-2:]), ed.omega0)
        C = r.shape[1]
        blur = F.conv2d(F.pad(r, (1, 1, 1, 1), mode="replicate"), k.expand(C, 1, 3, 3), groups=C)
        se = (r - y).square()
        out[name] = {"mse": se.mean().item(), "mse_clipped": (r.clamp(0, 1) - y).square().mean().item(),
                     "mse_blur3x3": (blur - y).square().mean().item(),
                     "background_share_of_se": (se[bg].sum() / se.sum()).item(),
                     "background_mean_abs": r[bg].abs().mean().item()}
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    for name, row in speckle_report(sys.argv[1], sys.argv[2], sys.argv[3:]).items():
        print(name, " ".join(f"{k}={v:.4g}" for k, v in row.items()))
