"""``gradmeta lora``: ``train``, ``predict`` and ``info``.

Every user mistake (a missing folder or file, a zoo root without an adapter name, an adapter of
another base model, a corrupt or missing checkpoint, a bad label) ends in one line on stderr and
exit status 2; notes about adapters (DoRA magnitudes, non-zero-B initialisations, ...) are printed
as ``note:`` lines on stderr.
"""
from __future__ import annotations

import json
import sys
import warnings

__all__ = ["add_parser", "predict"]


def predict(model_path: str, adapter_dirs: list[str]) -> list[dict]:
    """Predictions of a saved model for adapter folders or files (see :func:`gradmeta.lora.predict`)."""
    from gradmeta.lora import predict as _predict
    return _predict(model_path, adapter_dirs)


def _user_errors():
    from gradmeta.lora import AdapterFormatError, AdapterMismatchError, LabelError
    return (AdapterFormatError, AdapterMismatchError, LabelError, FileNotFoundError, NotADirectoryError,
            IsADirectoryError, PermissionError, ValueError, KeyError)


def _one_line(e: BaseException) -> str:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    lines = [ln.strip() for ln in str(msg).splitlines() if ln.strip()]
    return lines[0] + (f" (and {len(lines) - 1} more: {'; '.join(lines[1:3])}{' ...' if len(lines) > 3 else ''})"
                       if len(lines) > 1 else "") if lines else type(e).__name__


def _notes(caught) -> None:
    seen = set()
    for w in caught:
        text = str(w.message)
        if text not in seen:
            seen.add(text)
            print(f"note: {text}", file=sys.stderr)


def _guarded(fn):
    def run(args) -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                status = fn(args)
            except _user_errors() as e:
                _notes(caught)
                print(f"gradmeta lora {args.lora_command}: error: {_one_line(e)}", file=sys.stderr)
                return 2
        _notes(caught)
        return status
    return run


def _cmd_predict(args) -> int:
    from gradmeta.lora import load_adapter, load_model
    from gradmeta.lora import predict as _predict

    net, extra = load_model(args.model)
    ads = [load_adapter(d, args.adapter_name) for d in args.adapters]
    rows = _predict(net, ads, extra)
    for r, d in zip(rows, args.adapters):
        r["adapter"] = d
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    cols = [c for c in rows[0] if c != "adapter"]
    width = max(len("adapter"), *(len(r["adapter"]) for r in rows))
    fmt = lambda v: f"{v:10.4g}" if isinstance(v, float) else f"{v!s:>10}"
    print("  ".join(["adapter".ljust(width), *(c.rjust(10) for c in cols)]))
    for r in rows:
        print("  ".join([r["adapter"].ljust(width), *(fmt(r[c]) for c in cols)]))
    return 0


def _cmd_info(args) -> int:
    from pathlib import Path

    from gradmeta.lora import CONFIG_FILE, list_adapters, load_adapter

    for d in args.adapters:
        peft_folder = (Path(d) / CONFIG_FILE).is_file()  # its own adapter plus named ones
        names = [args.adapter_name] if args.adapter_name else (list_adapters(d) if peft_folder else [None])
        for name in names:
            ad = load_adapter(d, name)
            label = d if name in (None, "default") else f"{d} [adapter {name}]"
            print(f"{label}: {len(ad)} modules")
            for mod, f in ad.items():
                print(f"  {mod:40s} {f.kind:9s} weight {str(f.weight_shape):18s} r={f.rank:<3d} scale={f.scale:.4g}")
    return 0


def _cmd_train(args) -> int:
    from gradmeta.lora import train

    models = args.model.split(",") if args.model != "auto" else "auto"
    res = train(args.adapters, args.labels, args.target.split(","), task=args.task, model=models,
                val_fraction=args.val_fraction, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                patience=args.patience, seed=args.seed, device=args.device, out=args.out, skip_bad=args.skip_bad,
                selection=args.selection)
    for name, sc in res.scores.items():
        shown = ", ".join(f"{k} {v:.4g}" for k, v in sc.items()
                          if k != "loss" and isinstance(v, (int, float)) and not isinstance(v, bool))
        if "variant" in sc:  # GLNet: which of its paths, chosen on validation
            shown += f", variant {sc['variant']}"
        print(f"{name:16s} validation: {shown}{'   <- selected' if name == res.name else ''}")
    print(f"saved {res.path} (use: gradmeta lora predict --model {res.path} ADAPTER...)")
    return 0


def add_parser(subparsers) -> None:
    """Register ``gradmeta lora {train, predict, info}`` on the ``gradmeta`` command's subparsers."""
    p = subparsers.add_parser("lora", help="LoRA adapters: train on your labels, predict, inspect")
    sub = p.add_subparsers(dest="lora_command", metavar="LORA_COMMAND", required=True)
    q = sub.add_parser("train", help="train a model on a folder of adapters and a labels CSV")
    q.add_argument("--adapters", required=True, metavar="ROOT", help="folder of adapters (searched recursively)")
    q.add_argument("--labels", required=True, metavar="CSV", help="CSV with a column 'adapter' (path under ROOT)")
    q.add_argument("--target", required=True, metavar="COLUMN", help="label column(s), comma-separated")
    q.add_argument("--task", choices=("regression", "classification"), default="regression")
    q.add_argument("--model", default="glnet", help="glnet, svd, factor, dense, procrustes, transformer; "
                   "comma-separated to select on the validation split; auto = glnet,svd (default glnet)")
    q.add_argument("--val-fraction", type=float, default=0.2)
    q.add_argument("--selection", choices=("min", "one_se"), default="min",
                   help="how GLNet's variant is chosen on validation: min = the better score (ties to the "
                        "spectral path); one_se = the spectral path unless the residual wins by more than one "
                        "standard error")
    q.add_argument("--epochs", type=int, default=100)
    q.add_argument("--batch-size", type=int, default=32)
    q.add_argument("--lr", type=float, default=1e-3)
    q.add_argument("--patience", type=int, default=20, help="early stop after this many epochs without progress")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    q.add_argument("--skip-bad", action="store_true", help="skip unreadable / mismatched / unlabelled adapters")
    q.add_argument("--out", required=True, metavar="DIR", help="writes DIR/model.pt and DIR/metrics.json")
    q.set_defaults(func=_guarded(_cmd_train))
    q = sub.add_parser("predict", help="predict with a saved model (model.pt of `lora train`, glnet.pt of lora_predict)")
    q.add_argument("--model", required=True, help="model checkpoint written by gradmeta.lora.save_model")
    q.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapter folders or files")
    q.add_argument("--adapter-name", default=None, help="named adapter inside each PEFT folder")
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q.set_defaults(func=_guarded(_cmd_predict))
    q = sub.add_parser("info", help="list the adapted modules, kinds, shapes, ranks and scales of every adapter")
    q.add_argument("adapters", nargs="+", metavar="ADAPTER")
    q.add_argument("--adapter-name", default=None, help="only this named adapter (default: all of them)")
    q.set_defaults(func=_guarded(_cmd_info))
