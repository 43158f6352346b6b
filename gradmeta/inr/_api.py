"""The short path for users: fit one image, load a shipped editor, edit, render; train and save editors.

```python
siren = inr.fit(image)                       # (C, H, W) in [0, 1] -> Siren
editor = inr.load_editor("dilation")         # shipped with the package (or a path written by editor.save)
edited = editor(siren)                       # = inr.edit(siren, editor)
img = edited.render(28, 28)                  # (C, H, W)
```
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from ._edits import apply_edit, get_edit
from ._editors import EDITOR_FORMAT, INREditor, parse_variant
from ._fit import fit_inrs
from ._siren import DEFAULT_OMEGA0, Siren
from ._train import fit_editor
from ._zoo import INRZoo

__all__ = ["fit", "load_editor", "shipped_editors", "train_editor", "FIT_STEPS", "FIT_LR"]

#: the fitting budget of :func:`fit` and of the zoos the shipped editors were trained on
FIT_STEPS, FIT_LR = 150, 3e-3

_SHIPPED = Path(__file__).parent / "editors"


def fit(image: Tensor, *, steps: int = FIT_STEPS, lr: float = FIT_LR, hidden: int = 32, num_layers: int = 3,
        omega0: float = DEFAULT_OMEGA0, seed: int = 0, progress: bool | None = None) -> Siren:
    """Fit one SIREN to one image.

    Args:
        image: ``(C, H, W)`` float tensor in ``[0, 1]``, any size and channel count.
        steps, lr: Adam budget; the defaults are those the shipped editors were trained with
            (an editor sees the INR's weights, so INRs fitted differently are out of its distribution).
        hidden, num_layers, omega0: SIREN architecture (the shipped editors: 32, 3, 30).
        seed: the SIREN initialisation.
        progress: tqdm bar over steps; ``None`` shows it for fits of more than ~10⁷ pixel-steps.

    Returns:
        a :class:`Siren` with ``image_size = (H, W)``; ``siren.render()`` gives the fitted image.
    """
    if not isinstance(image, Tensor) or image.dim() != 3 or not image.is_floating_point():
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"inr.fit: image must be a float tensor (C, H, W), got {shape}"
                         + (" (a batch? use inr.fit_inrs for many images)" if isinstance(image, Tensor)
                            and image.dim() == 4 else ""))
    if not torch.isfinite(image).all() or image.min() < 0 or image.max() > 1:
        raise ValueError(f"inr.fit: image values must be finite and in [0, 1], got range "
                         f"[{image.min().item():.3g}, {image.max().item():.3g}]")
    C, H, W = image.shape
    if progress is None:
        progress = steps * H * W > 10_000_000
    res = fit_inrs(image.unsqueeze(0), steps=steps, lr=lr, hidden=hidden, num_layers=num_layers, omega0=omega0,
                   generator=torch.Generator().manual_seed(seed), progress=progress, desc="fit INR")
    siren = Siren.from_params({k: v[0] for k, v in res.params.items()}, omega0)
    siren.image_size = (H, W)
    return siren


def shipped_editors() -> list[str]:
    """Names of the editors shipped inside the package (``inr.load_editor(name)``)."""
    return sorted(p.stem for p in _SHIPPED.glob("*.pt"))


def load_editor(name_or_path: str | os.PathLike, map_location: str | torch.device = "cpu") -> INREditor:
    """A shipped editor by name (see :func:`shipped_editors`) or one written by ``INREditor.save``.

    Loaded with ``torch.load(weights_only=True)``; ``editor.trained_for`` says what it was trained for.

    Raises:
        FileNotFoundError: neither a shipped name nor an existing file (lists the shipped names).
        ValueError: the file is not an editor written by ``INREditor.save``.
    """
    path = Path(name_or_path)
    if not path.exists():
        path = _SHIPPED / f"{name_or_path}.pt"
        if not path.exists():
            raise FileNotFoundError(f"load_editor: {str(name_or_path)!r} is neither a file nor a shipped editor "
                                    f"(shipped: {', '.join(shipped_editors()) or 'none'})")
    blob = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != EDITOR_FORMAT:
        raise ValueError(f"load_editor: {path} is not an editor saved by INREditor.save "
                         f"(format {blob.get('format') if isinstance(blob, dict) else type(blob).__name__!r}, "
                         f"expected {EDITOR_FORMAT!r})")
    editor = INREditor(**blob["config"])
    editor.load_state_dict(blob["state"])
    editor.trained_for = blob["trained_for"]
    return editor.eval()


def train_editor(data: Tensor | INRZoo, edit: str, *, features: str = "gradients:bilinear", steps: int = 2000,
                 batch_size: int = 32, lr: float = 3e-3, seed: int = 0, fit_steps: int = FIT_STEPS,
                 fit_lr: float = FIT_LR, progress: bool = False, **editor_kwargs) -> INREditor:
    """Train an editor for ``edit`` on a set of images; the result can be saved and reloaded.

    Args:
        data: images ``(N, C, H, W)`` in ``[0, 1]`` (fitted here with ``fit_steps`` / ``fit_lr``, as
            :func:`fit` will fit the INRs you edit later) or an :class:`INRZoo` (its INRs are used).
        edit: a registered edit name (``inr.EDITS``).
        features: ``"weights"``, ``"probing"``, ``"gradients"``, ``"gradients++"`` with an optional
            ``":bilinear"`` / ``":gelu"`` readout (see :func:`parse_variant`).
        steps, batch_size, lr, seed: Adam on the rendered-image MSE (see :func:`fit_editor`).
        editor_kwargs: further :class:`INREditor` arguments (``channels``, ``layers``, ...).

    Returns:
        the trained :class:`INREditor`, ``trained_for`` filled in (edit, image size, channels, fit).
    """
    get_edit(edit)
    feats, product = parse_variant(features)
    if isinstance(data, INRZoo):
        params, images = data.params, data.images
        fit_cfg = {"steps": data.config.get("steps"), "lr": data.config.get("lr")}
    else:
        if not isinstance(data, Tensor) or data.dim() != 4:
            raise ValueError(f"train_editor: data must be images (N, C, H, W) or an INRZoo, got "
                             f"{tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__}")
        images = data
        params = fit_inrs(images, steps=fit_steps, lr=fit_lr, generator=torch.Generator().manual_seed(seed),
                          progress=progress).params
        fit_cfg = {"steps": fit_steps, "lr": fit_lr}
    N, C, H, W = images.shape
    hidden, num_layers = params["layers.0.weight"].shape[-2], len(params) // 2
    torch.manual_seed(seed)
    editor = INREditor(C, hidden, num_layers, features=feats, product=product, **editor_kwargs)
    fit_editor(editor, params, apply_edit(edit, images), steps=steps, batch_size=batch_size, lr=lr, seed=seed,
               progress=progress)
    editor.trained_for = {"edit": edit, "image_size": [H, W], "channels": C, "fit": fit_cfg,
                          "train": {"images": N, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed}}
    return editor.eval()
