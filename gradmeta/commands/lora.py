"""``gradmeta lora``: ``predict --model CKPT ADAPTER_DIR...`` and ``info ADAPTER_DIR...``."""
from __future__ import annotations

import json
import warnings

__all__ = ["add_parser", "predict"]


def predict(model_path: str, adapter_dirs: list[str]) -> list[dict]:
    """Predictions of a saved model (``save_model`` checkpoint, e.g. ``glnet.pt``) for adapter folders.

    Returns one dict per adapter: ``{"adapter": path, <target>: value, ...}``; regression targets in
    their own units (clipped to the range of the model's training targets when the checkpoint
    records it), membership targets as probabilities.
    """
    import torch

    from gradmeta.lora import load_adapter, load_model

    net, extra = load_model(model_path)
    targets = list(extra.get("targets", [f"out_{i}" for i in range(net.out_dim)]))
    rows = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for d in adapter_dirs:
            out = net(load_adapter(d))[0]
            if extra.get("regression", True):
                mu = torch.as_tensor(extra.get("target_mean", 0.0))
                sd = torch.as_tensor(extra.get("target_std", 1.0))
                out = out * sd + mu
                if "target_min" in extra:
                    out = out.clamp(extra["target_min"], extra["target_max"])
            else:
                out = torch.sigmoid(out)
            rows.append({"adapter": str(d), **{t: float(v) for t, v in zip(targets, out)}})
    return rows


def _cmd_predict(args) -> int:
    rows = predict(args.model, args.adapters)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    cols = [c for c in rows[0] if c != "adapter"]
    width = max(len("adapter"), *(len(r["adapter"]) for r in rows))
    print("  ".join(["adapter".ljust(width), *(c.rjust(10) for c in cols)]))
    for r in rows:
        print("  ".join([r["adapter"].ljust(width), *(f"{r[c]:10.4g}" for c in cols)]))
    return 0


def _cmd_info(args) -> int:
    from gradmeta.lora import load_adapter

    for d in args.adapters:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ad = load_adapter(d)
        print(f"{d}: {len(ad)} modules")
        for name, f in ad.items():
            print(f"  {name:40s} {f.kind:9s} weight {str(f.weight_shape):18s} r={f.rank:<3d} scale={f.scale:.4g}")
        for w in caught:
            print(f"  note: {w.message}")
    return 0


def add_parser(subparsers) -> None:
    """Register ``gradmeta lora {predict, info}`` on the ``gradmeta`` command's subparsers."""
    p = subparsers.add_parser("lora", help="LoRA adapters: predict properties with a trained model, inspect folders")
    sub = p.add_subparsers(dest="lora_command", metavar="LORA_COMMAND", required=True)
    q = sub.add_parser("predict", help="predict with a saved model (e.g. glnet.pt of a lora_predict run)")
    q.add_argument("--model", required=True, help="model checkpoint written by gradmeta.lora.save_model")
    q.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR", help="PEFT adapter folders")
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q.set_defaults(func=_cmd_predict)
    q = sub.add_parser("info", help="list the adapted modules, kinds, shapes, ranks and scales")
    q.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR")
    q.set_defaults(func=_cmd_info)
