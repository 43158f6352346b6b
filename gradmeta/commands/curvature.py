"""``gradmeta curvature``: a per-layer curvature table, a spectral-density plot and a JSON report.

    gradmeta curvature --model pkg.module:factory --data digits|PATH [--checkpoint FILE] [--out DIR]

``factory`` is called without arguments and returns the ``nn.Module`` (or is the module itself).
``--data digits`` uses the embedded digits training split (inputs flattened to 64 features unless
``--digits-shape image``); a PATH is a ``.pt`` file (``torch.load(weights_only=True)``) holding an
``(inputs, targets)`` pair or a dict with ``inputs``/``targets`` (or ``X``/``y``), or an ``.npz`` with
the same keys (plain arrays only: object arrays, which need pickle, are refused). Checkpoints are
state dicts loaded with ``weights_only=True`` (a ``state_dict`` or ``model`` entry inside a dict is
unwrapped); a file that references code, or a truncated one, is refused with one line naming it.
"""
from __future__ import annotations

import importlib
import json
import platform
import sys
from pathlib import Path

import torch
from torch import nn

from gradmeta._io import safe_torch_load
from gradmeta.cli import positive
from gradmeta.data import DataFormatError

__all__ = ["add_parser", "run"]


class CLIError(ValueError):
    """A user input of ``gradmeta curvature`` is wrong; the message says which."""


def load_factory(spec: str) -> nn.Module:
    """``"pkg.module:factory"`` -> the model (calling ``factory()`` if it is not a module already)."""
    if ":" not in spec:
        raise CLIError(f"--model must look like pkg.module:factory, got {spec!r}")
    mod_name, attr = spec.split(":", 1)
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # like `python -m`: modules in the working directory are found
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as e:
        raise CLIError(f"--model: cannot import module {mod_name!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"--model: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    model = obj if isinstance(obj, nn.Module) else obj()
    if not isinstance(model, nn.Module):
        raise CLIError(f"--model: {spec} returned {type(model).__name__}, expected a torch.nn.Module")
    return model


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load the state dict in ``path`` into ``model``; :class:`CLIError` if it does not fit."""
    sd = safe_torch_load(path, "checkpoint")
    if isinstance(sd, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in sd and isinstance(sd[key], dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
        raise CLIError(f"--checkpoint {path}: expected a state dict {{name: tensor}}, got {type(sd).__name__}")
    try:
        model.load_state_dict(sd)
    except (RuntimeError, TypeError) as e:
        raise CLIError(f"--checkpoint {path}: does not match the model: {' '.join(str(e).split())}") from None


def _pair(obj, where: str):
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        return obj[0], obj[1]
    if isinstance(obj, dict):
        for a, b in (("inputs", "targets"), ("X", "y"), ("x", "y")):
            if a in obj and b in obj:
                return obj[a], obj[b]
    raise CLIError(f"--data {where}: expected an (inputs, targets) pair or keys inputs/targets or X/y")


def load_data(spec: str, digits_shape: str = "flat"):
    """``(inputs, targets)`` tensors from ``digits`` or a ``.pt`` / ``.npz`` file."""
    if spec == "digits":
        from gradmeta.data import load_digits

        d = load_digits(split="train", seed=0)
        X = d.images.flatten(1) if digits_shape == "flat" else d.images
        return X, d.labels
    path = Path(spec)
    if not path.exists():
        raise CLIError(f"--data: {spec!r} is neither 'digits' nor an existing file")
    if path.suffix == ".npz":
        import zipfile

        import numpy as np

        try:
            with np.load(path, allow_pickle=False) as z:
                X, y = _pair(dict(z), spec)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # object arrays need pickle: refused
            raise DataFormatError(f"--data {path}: not a readable .npz of plain arrays ({e})") from None
        if X.dtype.kind not in "biuf" or y.dtype.kind not in "biuf":
            raise DataFormatError(f"--data {path}: inputs/targets must be numeric arrays, got {X.dtype} and {y.dtype}")
        return torch.from_numpy(X), torch.from_numpy(y)
    X, y = _pair(safe_torch_load(path, "data file"), spec)
    try:
        return torch.as_tensor(X), torch.as_tensor(y)
    except (TypeError, ValueError, RuntimeError) as e:
        raise DataFormatError(f"--data {path}: inputs/targets are not tensors or numeric arrays ({e})") from None


def _env() -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(), "device": "cpu",
            "threads": torch.get_num_threads(), "machine": platform.machine()}


def run(args) -> int:
    """Run the subcommand from parsed ``args``; prints the table, writes the PNG and JSON."""
    from gradmeta.curvature._report import LOSSES, curvature_report, format_table

    torch.manual_seed(args.seed)
    model = load_factory(args.model)
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)
    if not args.train_mode:
        model.eval()  # running BatchNorm statistics, no dropout: a fixed operator
    X, y = load_data(args.data, args.digits_shape)
    if X.dim() == 0 or y.dim() == 0 or X.shape[0] != y.shape[0] or X.shape[0] == 0:
        raise DataFormatError(f"--data {args.data}: need inputs (N, ...) and targets (N, ...) with the same N >= 1, "
                              f"got shapes {tuple(X.shape)} and {tuple(y.shape)}")
    p = next(model.parameters(), None)
    if p is None:
        raise CLIError(f"--model {args.model}: the model has no parameters")
    if X.is_floating_point():
        X = X.to(p.dtype)
    X, y = X[: args.num_examples], y[: args.num_examples]
    data = list(zip(X.split(args.batch_size), y.split(args.batch_size)))
    report = curvature_report(model, LOSSES[args.loss], data, num_samples=args.samples, generator=args.seed,
                              eval_batchnorm=args.eval_batchnorm)
    sd = report.pop("_spectral_density")
    print(f"Hessian of the mean {args.loss} loss over {report['num_data']} examples of {args.data} "
          f"({report['num_matvecs']} Hessian-vector products, {report['seconds']:.1f} s)")
    print(format_table(report))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sd.plot(path=out / "spectral_density.png", title=f"Hessian spectral density: {args.model}")
    report.update(model_spec=args.model, data=args.data, checkpoint=args.checkpoint, loss=args.loss,
                  seed=args.seed, env=_env())
    (out / "curvature.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'curvature.json'} and {out / 'spectral_density.png'}")
    return 0


def add_parser(subparsers) -> None:
    """Register the ``curvature`` subcommand on an ``argparse`` subparsers object."""
    p = subparsers.add_parser("curvature", help="per-layer Hessian/Fisher curvature of your model",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="pkg.module:factory returning the nn.Module")
    p.add_argument("--data", required=True, help="'digits' or a .pt/.npz file with (inputs, targets)")
    p.add_argument("--checkpoint", help="state dict file (loaded with torch.load(weights_only=True))")
    p.add_argument("--out", default="runs/curvature", help="output folder (default: runs/curvature)")
    p.add_argument("--loss", choices=["cross_entropy", "mse"], default="cross_entropy")
    p.add_argument("--num-examples", type=positive(int), default=512, help="use the first N examples (default 512)")
    p.add_argument("--batch-size", type=positive(int), default=256)
    p.add_argument("--samples", type=positive(int), default=100, help="Hutchinson probes per large block (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--digits-shape", choices=["flat", "image"], default="flat",
                   help="digits inputs as (N, 64) or (N, 1, 8, 8)")
    p.add_argument("--train-mode", action="store_true", help="keep the model in train mode (default: eval)")
    p.add_argument("--eval-batchnorm", action="store_true",
                   help="with --train-mode: run BatchNorm on running statistics instead of failing")
    p.set_defaults(func=run)  # errors: one line, exit 2 (gradmeta.cli.main)
