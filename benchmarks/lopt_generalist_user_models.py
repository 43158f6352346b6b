"""The shipped (default) learned optimizer on models it never saw, used as a user would.

``LearnedOptimizer(model.parameters(), total_steps=N)`` against ``torch.optim.Adam`` at lr 1e-3 and
1e-2 (same initialisation and batches), on a tiny random-init Hugging Face GPT-2 (causal LM on a
periodic token stream), an ``nn.TransformerEncoder`` regression and a CNN on scikit-learn's digits.
Reports the mean training loss of the last 10 steps and the learned optimizer's skipped steps.

    python benchmarks/lopt_generalist_user_models.py            # -> benchmarks/results/lopt_generalist_user_models.md
"""
import argparse
import platform
from pathlib import Path

import torch
from torch import nn

from gradmeta.lopt import LearnedOptimizer

OPTIMIZERS = ("learned (default)", "Adam lr 1e-3", "Adam lr 1e-2")


def run(make_model, batch_fn, loss_fn, steps, opt_name):
    """Train a fresh model ``steps`` steps; ``(mean loss of the last 10 steps, skipped steps)``."""
    torch.manual_seed(0)
    model = make_model()
    if opt_name.startswith("learned"):
        opt = LearnedOptimizer(model.parameters(), total_steps=steps)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=float(opt_name.split("lr ")[1]))
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x, y = batch_fn(g)
        opt.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    tail = losses[-10:]
    return sum(tail) / len(tail), getattr(opt, "skipped_steps", 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 steps per run (smoke test), nothing written")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from sklearn.datasets import load_digits
    from transformers import GPT2Config, GPT2LMHeadModel

    stream = torch.tensor([i % 17 for i in range(5000)])  # a periodic token stream

    def lm_batch(g):
        idx = torch.randint(0, len(stream) - 33, (8,), generator=g)
        x = torch.stack([stream[i:i + 32] for i in idx])
        return x, x

    cfg = GPT2Config(vocab_size=32, n_positions=64, n_embd=32, n_layer=2, n_head=2)

    def lm_loss(m, x, y):
        return m(input_ids=x, labels=y).loss

    def encoder():
        layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
        return nn.Sequential(nn.TransformerEncoder(layer, 2), nn.Flatten(), nn.Linear(16 * 8, 1))

    w = torch.randn(8 * 16, generator=torch.Generator().manual_seed(2))

    def enc_batch(g):
        x = torch.randn(32, 8, 16, generator=g)
        return x, (x.flatten(1) @ w).unsqueeze(1) / 10

    def mse(m, x, y):
        return nn.functional.mse_loss(m(x), y)

    X, Y = load_digits(return_X_y=True)
    X, Y = torch.tensor(X, dtype=torch.float32).view(-1, 1, 8, 8) / 16, torch.tensor(Y)

    def cnn():
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                             nn.Flatten(), nn.Linear(16 * 64, 10))

    def digits_batch(g):
        i = torch.randint(0, len(X), (64,), generator=g)
        return X[i], Y[i]

    def ce(m, x, y):
        return nn.functional.cross_entropy(m(x), y)

    cases = (("tiny random-init HF GPT-2 (2 layers, d 32), LM", lambda: GPT2LMHeadModel(cfg), lm_batch, lm_loss, 150),
             ("nn.TransformerEncoder (2 layers, d 16), regression", encoder, enc_batch, mse, 200),
             ("CNN (2 conv + linear) on digits", cnn, digits_batch, ce, 200))
    rows = ["| model | steps | " + " | ".join(OPTIMIZERS) + " | learned: skipped steps |", "|---|---|---|---|---|---|"]
    for name, mk, bf, lf, steps in cases:
        steps = 3 if args.quick else steps
        out = {o: run(mk, bf, lf, steps, o) for o in OPTIMIZERS}
        rows.append(f"| {name} | {steps} | " + " | ".join(f"{out[o][0]:.4g}" for o in OPTIMIZERS)
                    + f" | {out[OPTIMIZERS[0]][1]} |")
        print(rows[-1], flush=True)
    md = "Mean training loss of the last 10 steps.\n\n" + "\n".join(rows) + \
        f"\n\ntorch {torch.__version__}, Python {platform.python_version()}, CPU, 1 thread\n"
    if not args.quick:
        Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
        Path("benchmarks/results/lopt_generalist_user_models.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
