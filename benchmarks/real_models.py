"""Per-example gradients on real models, side by side in one process: a plain forward+backward of
the mean loss, gradmeta's factor capture (``collect_gradients``), per-example gradient norms from
the factors, materialised per-example gradients from the factors, and ``torch.func``
``vmap(grad)``, Opacus (``GradSampleModule`` hooks, and per-sample norms from
``GradSampleModuleFastGradientClipping`` with ghost clipping) — on Hugging Face GPT-2 (6 layers, d=256, T=128, B=8), Hugging Face Llama
(4 layers, d=256, T=128, B=8), a ResNet-like CNN (B=64) and torch's ``nn.TransformerEncoder`` (4 layers,
d=256, T=128, B=8; its ``nn.MultiheadAttention`` factored). Random init, vocabulary 2048.

Time: median over ``--repeats`` calls after one warm-up, contestants interleaved round-robin;
ratio = time / plain forward+backward. Memory: bytes of the factors kept (``A`` and ``Δ`` of every
layer, fallback gradients) against materialised per-example gradients (``B × P`` numbers).

Usage::

    python benchmarks/real_models.py                  # -> benchmarks/results/real_models.{json,md}
    python benchmarks/real_models.py --quick --out DIR  # tiny sizes (smoke test)
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from _common import environment, error_text, sync
import gradmeta as gm
from gradmeta.grads import causal_lm_losses

HERE = Path(__file__).resolve().parent


class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(8, c)
        self.c2, self.n2 = nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(8, c)

    def forward(self, x):
        return torch.relu(x + self.n2(self.c2(torch.relu(self.n1(self.c1(x))))))


def resnet_like(c=32, classes=10):
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), ResBlock(c), nn.Conv2d(c, 2 * c, 3, stride=2, padding=1),
                         nn.ReLU(), ResBlock(2 * c), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, classes))


def cases(quick: bool):
    import transformers
    d, T, B, V = (32, 16, 4, 128) if quick else (256, 128, 8, 2048)
    gpt = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2 if quick else 6, n_embd=d, n_head=4, vocab_size=V, n_positions=T, bos_token_id=0, eos_token_id=0))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2 if quick else 4, hidden_size=d, intermediate_size=4 * d, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=V, max_position_embeddings=T, bos_token_id=0, eos_token_id=0))
    ids = torch.randint(0, V, (B, T))
    Bc, S = (8, 16) if quick else (64, 32)
    img = torch.randn(Bc, 3, S, S)
    ce = lambda o, y: nn.functional.cross_entropy(o, y, reduction="none")  # noqa: E731
    mse = lambda o, y: (o - y).pow(2).mean((1, 2))  # noqa: E731
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True),
                                    2 if quick else 4, enable_nested_tensor=False)
    return {
        "hf_gpt2": (gpt.eval(), causal_lm_losses, {"input_ids": ids}, ids),
        "hf_llama": (llama.eval(), causal_lm_losses, {"input_ids": ids}, ids),
        "resnet_cnn": (resnet_like().eval(), ce, img, torch.randint(0, 10, (Bc,))),
        "torch_encoder": (encoder.eval(), mse, torch.randn(B, T, d), torch.randn(B, T, d)),
    }


def _call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def contestants(model, loss_fn, inputs, targets):
    params = {n: p.detach() for n, p in model.named_parameters()}

    def plain():
        model.zero_grad(set_to_none=True)
        loss_fn(_call(model, inputs), targets).mean().backward()

    def func_vmap():
        def one(p, x, y):
            x1 = {k: v[None] for k, v in x.items()} if isinstance(x, dict) else x[None]
            return loss_fn(functional_call(model, p, args=() if isinstance(x1, dict) else (x1,),
                                           kwargs=x1 if isinstance(x1, dict) else None), y[None])[0]
        return vmap(grad(one), in_dims=(None, 0, 0))(params, inputs, targets)

    def train_copy():
        """Opacus captures activations only in train mode: a copy in train mode without dropout."""
        m = copy.deepcopy(model).train()
        for mod in m.modules():
            if isinstance(mod, nn.Dropout):
                mod.p = 0.0
        return m

    def opacus_hooks():
        from opacus import GradSampleModule
        gsm = state.setdefault("gsm", GradSampleModule(train_copy(), batch_first=True, loss_reduction="sum"))
        gsm.zero_grad(set_to_none=True)
        loss_fn(_call(gsm, inputs), targets).sum().backward()
        return [p.grad_sample for p in gsm.parameters() if p.requires_grad]

    def opacus_ghost_norms():
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        gsm = state.setdefault("ghost", GradSampleModuleFastGradientClipping(
            train_copy(), batch_first=True, loss_reduction="sum", max_grad_norm=1e9, use_ghost_clipping=True))
        gsm.zero_grad(set_to_none=True)
        loss_fn(_call(gsm, inputs), targets).sum().backward()
        return gsm.get_norm_sample()

    state: dict = {}
    return {
        "plain_fwd_bwd": plain,
        "opacus grad_sample": opacus_hooks,
        "opacus ghost norms": opacus_ghost_norms,
        "factors": lambda: gm.collect_gradients(model, loss_fn, inputs, targets),
        "factors+norms": lambda: gm.collect_gradients(model, loss_fn, inputs, targets).grad_norms(),
        "factors+per_example_grads": lambda: gm.collect_gradients(model, loss_fn, inputs, targets).per_example_grads(),
        "torch.func vmap(grad)": func_vmap,
    }


def factor_bytes(gs) -> int:
    total = 0
    for n in gs.layer_names:
        f = gs[n]
        total += f.backprops.numel() * f.backprops.element_size()
        if f._inputs is not None:
            total += f._inputs.numel() * f._inputs.element_size()
    return total


def run(quick: bool, repeats: int) -> dict:
    torch.manual_seed(0)
    rows = []
    for name, (model, loss_fn, x, y) in cases(quick).items():
        fns = contestants(model, loss_fn, x, y)
        times = {k: [] for k in fns}
        errors = {}
        for rep in range(repeats + 1):
            for k, fn in fns.items():
                if k in errors:
                    continue
                try:
                    t = time.perf_counter()
                    fn()
                    sync("cpu")
                    if rep:
                        times[k].append(time.perf_counter() - t)
                except Exception as e:  # noqa: BLE001 - recorded in the table
                    errors[k] = error_text(e)
        gs = gm.collect_gradients(model, loss_fn, x, y)
        B = gs.batch_size
        P = sum(p.numel() for p in model.parameters() if p.requires_grad)
        base = statistics.median(times["plain_fwd_bwd"])
        row = {"model": name, "batch": B, "params": P, "fallback_params": gs.fallback_params,
               "factor_mb": factor_bytes(gs) / 2 ** 20, "per_example_grads_mb": B * P * 4 / 2 ** 20,
               "ms": {}, "ratio": {}, "errors": errors}
        for k, ts in times.items():
            if ts:
                row["ms"][k] = 1e3 * statistics.median(ts)
                row["ratio"][k] = statistics.median(ts) / base
        rows.append(row)
        print(json.dumps(row))
    return {"rows": rows, "environment": environment("cpu", ("transformers",)), "quick": quick, "repeats": repeats}


def markdown(data: dict) -> str:
    env = data["environment"]
    names = ["plain_fwd_bwd", "factors", "factors+norms", "factors+per_example_grads", "torch.func vmap(grad)",
             "opacus grad_sample", "opacus ghost norms"]
    lines = [f"Device: {env.get('device')} ({env.get('cpu')}, {env.get('torch_threads')} torch thread(s), {env.get('cpu_count')} cores shared), torch {env.get('torch')}, "
             f"transformers {env.get('transformers')}; median of {data['repeats']} calls.", "",
             "| model | B | params | " + " | ".join(names) + " | factors MB | per-example grads MB |",
             "|---|---|---|" + "---|" * len(names) + "---|---|"]
    for r in data["rows"]:
        cells = [f"{r['ms'][k]:.0f} ms ({r['ratio'][k]:.2f}x)" if k in r["ms"] else "error¹" for k in names]
        lines.append(f"| {r['model']} | {r['batch']} | {r['params']:,} | " + " | ".join(cells)
                     + f" | {r['factor_mb']:.1f} | {r['per_example_grads_mb']:.1f} |")
    errs = sorted({f"{r['model']} / {k}: {e}" for r in data["rows"] for k, e in r["errors"].items()})
    lines += ["", "¹ " + "; ".join(errs)] if errs else []
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    a = ap.parse_args()
    torch.set_num_threads(1)
    data = run(a.quick, 2 if a.quick else a.repeats)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "real_models.json").write_text(json.dumps(data, indent=1) + "\n")
    (a.out / "real_models.md").write_text(markdown(data))
    print(markdown(data))
