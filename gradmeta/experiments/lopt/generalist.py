"""Meta-training the generalist learned optimizer on a distribution of inner tasks, and its
held-out evaluation against lr-tuned Adam.

* :data:`TRAIN_TASKS` -- the meta-training distribution: MLPs of several widths / depths /
  activations on digits and 8×8 Fashion-MNIST, a small CNN on digits, tabular classification and
  regression (synthetic, generated here);
* :data:`HELDOUT_TASKS` -- eight tasks never seen in meta-training: a char LSTM, a char transformer
  on another corpus, a CNN on 28×28 Fashion-MNIST, regression with unscaled targets (diabetes),
  two unseen tabular sets (breast cancer, wine), a wide deep GELU MLP on 16×16 Fashion-MNIST, a
  digits autoencoder (MSE);
* :data:`VALIDATION_TASKS` -- six more tasks in neither set (a sigmoid MLP, a CNN on 8×8
  Fashion-MNIST, two synthetic tabular sets, iris, a char transformer on a third corpus), for
  choosing between candidates without looking at the held-out suite;
* :func:`meta_train` -- antithetic ES over full unrolls; each meta-iteration draws one task and
  one horizon, runs the rule with ``total_steps`` = that horizon; resumable slices;
* :func:`evaluate_suite` -- best and final test loss, step reduction, vs Adam tuned over a grid.

Run: ``python benchmarks/lopt_generalist.py train --out runs/lopt_generalist --max-steps 50``
(repeat: it resumes), then ``... eval``.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from gradmeta._io import atomic_write, safe_torch_load
from gradmeta.lopt import GeneralistRule, SupervisedTask, adam, es_grad, evaluate, save_checkpoint, train_curves
from gradmeta.lopt._tasks import LanguageModelTask, digits_mlp
from gradmeta.models import classification_loss, lm_loss, mlp

FASHION = "/usr/share/datasets/fashion-mnist"
Params = dict[str, Tensor]


# ---------------------------------------------------------------- inner tasks

def mse(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-example squared error ``(B, ...) -> (B,)`` (mean over the trailing axes)."""
    d = (outputs.reshape(len(outputs), -1) - targets.reshape(len(targets), -1))
    return d.square().mean(1)


def _standardise(X: Tensor, X_test: Tensor) -> tuple[Tensor, Tensor]:
    mu, sd = X.mean(0), X.std(0).clamp_min(1e-6)
    return (X - mu) / sd, (X_test - mu) / sd


def _split(X: Tensor, y: Tensor, test_fraction: float = 0.25, seed: int = 0):
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    n = int(len(X) * (1 - test_fraction))
    return X[perm[:n]], y[perm[:n]], X[perm[n:]], y[perm[n:]]


class SmallCNN(nn.Module):
    """``conv(c_in→c, 3, stride 2) → ReLU → conv(c→2c, 3, stride 2) → ReLU → flatten → linear``."""

    def __init__(self, size: int, channels: int = 8, classes: int = 10):
        super().__init__()
        self.c1 = nn.Conv2d(1, channels, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1)
        out = math.ceil(math.ceil(size / 2) / 2)
        self.head = nn.Linear(2 * channels * out * out, classes)

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, 1, size, size)`` -> logits ``(B, classes)``."""
        return self.head(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))


class CharLSTM(nn.Module):
    """One-layer LSTM language model written out (vmappable): ``(B, T)`` ids -> ``(B, T, V)`` logits."""

    def __init__(self, vocab: int, embed: int = 16, hidden: int = 32):
        super().__init__()
        self.embed, self.gates, self.head, self.hidden = nn.Embedding(vocab, embed), nn.Linear(embed + hidden, 4 * hidden), nn.Linear(hidden, vocab), hidden

    def forward(self, x: Tensor) -> Tensor:
        e = self.embed(x)
        h = e.new_zeros(x.shape[0], self.hidden)
        c, outs = h, []
        for t in range(x.shape[1]):
            i, f, g, o = self.gates(torch.cat([e[:, t], h], -1)).chunk(4, -1)
            c = torch.sigmoid(f + 1.0) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h)
        return self.head(torch.stack(outs, 1))


class LSTMLanguageTask(LanguageModelTask):
    """:class:`~gradmeta.lopt.LanguageModelTask` (same batches and test windows) with a :class:`CharLSTM`."""

    def __init__(self, corpus, batch_size: int = 16, seq_len: int = 16, name: str = "char_lstm"):
        super().__init__(corpus, batch_size=batch_size, seq_len=seq_len, test_windows=256, name=name)
        self.model = CharLSTM(corpus.vocab_size)
        for p in self.model.parameters():
            p.requires_grad_(False)


def _fashion(size: int, n_train: int, n_test: int, flat: bool):
    from gradmeta.data import load_fashion_mnist

    tr, te = (load_fashion_mnist(FASHION, s) for s in ("train", "test"))
    if size != 28:
        tr, te = tr.resize(size), te.resize(size)
    get = (lambda d, n: d.flat()[:n]) if flat else (lambda d, n: d.images[:n].float())
    return get(tr, n_train), tr.labels[:n_train], get(te, n_test), te.labels[:n_test]


def _digits(flat: bool = True):
    from gradmeta.data import load_digits

    tr, te = load_digits("train", seed=0), load_digits("test", seed=0)
    return (tr.flat(), tr.labels, te.flat(), te.labels) if flat else (tr.images.float(), tr.labels, te.images.float(), te.labels)


def _sk(name: str):
    import sklearn.datasets as d

    X, y = getattr(d, f"load_{name}")(return_X_y=True)
    return torch.tensor(X, dtype=torch.float32), torch.tensor(y)


def classify(model: nn.Module, data, name: str, batch_size: int = 128) -> SupervisedTask:
    X, y, Xt, yt = data
    return SupervisedTask(model, classification_loss, X, y, Xt, yt, batch_size, name=name)


def synthetic_tabular(seed: int, regression: bool, n: int = 1200, separation: float = 1.5) -> SupervisedTask:
    """Gaussian-cluster classification (4 classes, 20 features, centres ``separation·N(0, I)``, noise
    1.5) or a random-teacher regression, ``n`` rows (a quarter held out as the test split)."""
    g = torch.Generator().manual_seed(seed)
    d = 20
    if regression:
        X = torch.randn(n, d, generator=g)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            teacher = mlp([d, 16, 1], activation="tanh")
        with torch.no_grad():
            y = teacher(X).squeeze(-1) * 3 + 0.1 * torch.randn(n, generator=g)
        Xtr, ytr, Xte, yte = _split(X, y, seed=seed)
        return SupervisedTask(mlp([d, 32, 1], activation="relu"), mse, Xtr, ytr.unsqueeze(-1), Xte,
                              yte.unsqueeze(-1), 64, name=f"synthetic_regression_{seed}")
    centres = separation * torch.randn(4, d, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    X = centres[y] + torch.randn(n, d, generator=g) * 1.5
    return classify(mlp([d, 32, 4]), _split(X, y, seed=seed), f"synthetic_classification_{seed}", 64)


def with_valid(task: SupervisedTask, n: int = 512) -> SupervisedTask:
    """``task`` with the first ``n`` test examples as its validation split (for the meta-objective
    ``valid``: the meta-training tasks' own test data; the held-out suite is never touched)."""
    task.X_valid, task.y_valid = task.X_test[:n], task.y_test[:n]
    return task


def _train_builders() -> dict:
    fm8 = lambda: _fashion(8, 20000, 2000, True)  # noqa: E731
    return {
        "digits_mlp32_relu": lambda: digits_mlp([32]),
        "digits_mlp64_tanh": lambda: classify(mlp([64, 64, 10], activation="tanh"), _digits(), "digits_mlp64_tanh"),
        "digits_mlp32x32_gelu": lambda: classify(mlp([64, 32, 32, 10], activation="gelu"), _digits(), "digits_mlp32x32_gelu"),
        "fmnist8_mlp32_relu": lambda: classify(mlp([64, 32, 10]), fm8(), "fmnist8_mlp32_relu"),
        "fmnist8_mlp64x32_tanh": lambda: classify(mlp([64, 64, 32, 10], activation="tanh"), fm8(), "fmnist8_mlp64x32_tanh"),
        "digits_cnn": lambda: classify(SmallCNN(8, 4), _digits(flat=False), "digits_cnn", 64),
        "tabular_classification": lambda: synthetic_tabular(1, regression=False),
        "tabular_regression": lambda: synthetic_tabular(2, regression=True),
        "tabular_small_classification": lambda: synthetic_tabular(3, regression=False, n=240, separation=1.0),
    }


def _heldout_builders() -> dict:
    from gradmeta.data import stdlib_docstring_corpus

    def diabetes():
        X, y = _sk("diabetes")
        Xtr, ytr, Xte, yte = _split(X, y.float())
        Xtr, Xte = _standardise(Xtr, Xte)  # inputs scaled, targets NOT (≈ 25..346)
        return SupervisedTask(mlp([10, 32, 1]), mse, Xtr, ytr.unsqueeze(-1), Xte, yte.unsqueeze(-1), 32,
                              name="diabetes_unscaled_regression")

    def tabular(name, hidden, activation):
        X, y = _sk(name)
        Xtr, ytr, Xte, yte = _split(X, y)
        Xtr, Xte = _standardise(Xtr, Xte)
        return classify(mlp([X.shape[1], *hidden, int(y.max()) + 1], activation=activation), (Xtr, ytr, Xte, yte),
                        f"{name}_mlp", 32)

    def autoencoder():
        X, _, Xt, _ = _digits()
        return SupervisedTask(mlp([64, 16, 64], activation="sigmoid"), mse, X, X, Xt, Xt, 64, name="digits_autoencoder")

    return {
        "char_lstm": lambda: LSTMLanguageTask(stdlib_docstring_corpus()),
        "char_gpt_other_corpus": lambda: LanguageModelTask(stdlib_docstring_corpus(
            ("textwrap", "tokenize", "traceback", "unittest", "zipfile", "tarfile")), batch_size=16,
            seq_len=16, name="char_gpt_other_corpus"),
        "fmnist28_cnn": lambda: classify(SmallCNN(28, 8), _fashion(28, 10000, 2000, False), "fmnist28_cnn", 64),
        "diabetes_unscaled": diabetes,
        "breast_cancer_mlp": lambda: tabular("breast_cancer", [16], "tanh"),
        "wine_mlp": lambda: tabular("wine", [32], "relu"),
        "fmnist16_wide_deep_gelu": lambda: classify(mlp([256, 128, 128, 128, 10], activation="gelu"),
                                                    _fashion(16, 20000, 2000, True), "fmnist16_wide_deep_gelu"),
        "digits_autoencoder": autoencoder,
    }


def _validation_builders() -> dict:
    """Tasks for choosing between candidate optimizers (checkpoints, settings) without touching the
    held-out suite: neither trained on nor reported as held-out."""
    from gradmeta.data import stdlib_docstring_corpus

    def iris():
        X, y = _sk("iris")
        Xtr, ytr, Xte, yte = _split(X, y, seed=1)
        Xtr, Xte = _standardise(Xtr, Xte)
        return classify(mlp([4, 16, 3], activation="tanh"), (Xtr, ytr, Xte, yte), "iris_mlp", 16)

    return {
        "digits_mlp128_sigmoid": lambda: classify(mlp([64, 128, 10], activation="sigmoid"), _digits(),
                                                  "digits_mlp128_sigmoid"),
        "fmnist8_cnn": lambda: classify(SmallCNN(8, 4), _fashion(8, 10000, 2000, False), "fmnist8_cnn", 64),
        "tabular_classification_s4": lambda: synthetic_tabular(4, regression=False, n=600, separation=1.2),
        "tabular_regression_s5": lambda: synthetic_tabular(5, regression=True),
        "iris_mlp": iris,
        "char_gpt_third_corpus": lambda: LanguageModelTask(stdlib_docstring_corpus(
            ("ast", "dis", "pickle", "socket", "optparse", "configparser")), batch_size=16, seq_len=16,
            name="char_gpt_third_corpus"),
    }


#: The first meta-training distribution (the ``[50, 100, 150]``-horizon checkpoint's); the adaptive
#: rule adds a small, overfitting tabular task.
TRAIN_TASKS_V1 = tuple(_train_builders())[:8]
TRAIN_TASKS = tuple(_train_builders())
HELDOUT_TASKS = tuple(_heldout_builders())
#: For choosing between candidates: in neither the meta-training distribution nor the held-out suite.
VALIDATION_TASKS = tuple(_validation_builders())


# ---------------------------------------------------------------- meta-training

def meta_train(out: str, *, iterations: int = 400, max_steps: int | None = None, horizons=(50, 100, 150),
               particles: int = 16, sigma: float = 0.01, meta_lr: float = 1e-2, hidden: int = 16, seed: int = 0,
               tasks=TRAIN_TASKS_V1, adaptive: bool = False, lr: float = 3e-3, objective: str = "train",
               init: dict | None = None, lr_free: bool = False) -> dict:
    """Meta-train (resuming from ``out/meta_checkpoint.pt``) up to ``iterations``, at most ``max_steps`` now.

    ``adaptive``, ``lr``, ``lr_free``: the :class:`~gradmeta.lopt.GeneralistRule`'s; ``objective``: mean log of
    the inner train losses (``"train"``) or of the validation loss after each step (``"valid"``,
    :func:`with_valid`); ``init``: starting values of some meta-parameters (``{name: list}``,
    e.g. ``{"w_adapt": [10, 0]}``) instead of :meth:`~gradmeta.lopt.GeneralistRule.init_meta`'s.
    The settings are written to ``out/settings.json`` on the first slice; resuming with other
    settings is refused with a ``ValueError`` naming them (the run would silently change).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"horizons": list(horizons), "particles": particles, "sigma": sigma, "meta_lr": meta_lr,
                "hidden": hidden, "seed": seed, "tasks": list(tasks), "adaptive": adaptive, "lr": lr,
                "objective": objective, "lr_free": lr_free}
    _check_settings(out, settings)
    rule = GeneralistRule(hidden=hidden, lr=lr, adaptive=adaptive, lr_free=lr_free)
    meta = rule.init_meta(seed)
    for k, v in (init or {}).items():
        if k not in meta or torch.as_tensor(v).shape != meta[k].shape:
            raise ValueError(f"meta_train: init {k}={v!r} does not fit the rule's meta-parameters "
                             f"{ {n: tuple(t.shape) for n, t in meta.items()} }")
        meta[k] = torch.as_tensor(v, dtype=meta[k].dtype).clone()
    meta = {k: v.requires_grad_() for k, v in meta.items()}
    opt = torch.optim.Adam(meta.values(), lr=meta_lr)
    gen = torch.Generator().manual_seed(seed)
    picker = random.Random(seed)
    history, it = [], 0
    ckpt = out / "meta_checkpoint.pt"
    if ckpt.is_file():
        saved = safe_torch_load(ckpt, "generalist meta-training checkpoint")
        with torch.no_grad():
            for k, v in saved["meta"].items():
                meta[k].copy_(v)
        opt.load_state_dict(saved["opt"])
        gen.set_state(saved["generator"])
        picker.setstate(_tuple_state(json.loads((out / "picker.json").read_text())))
        history, it = json.loads((out / "history.json").read_text()), int(saved["iteration"])
    builders, cache = _train_builders(), {}
    stop = iterations if max_steps is None else min(iterations, it + max_steps)
    t0 = time.time()
    while it < stop:
        name, horizon = picker.choice(list(tasks)), picker.choice(list(horizons))
        if name not in cache:
            cache[name] = with_valid(builders[name]()) if objective != "train" else builders[name]()
        rule.total_steps = horizon
        g, info = es_grad(cache[name], rule, {k: v.detach() for k, v in meta.items()}, gen, particles=particles,
                          horizon=horizon, sigma=sigma, log_loss=True, objective=objective)
        norm = math.sqrt(sum(float(v.square().sum()) for v in g.values()))
        scale = min(1.0, 1.0 / norm) if norm > 0 and math.isfinite(norm) else 0.0
        for k, v in meta.items():
            v.grad = g[k] * scale
        opt.step()
        it += 1
        history.append({"iteration": it, "task": name, "horizon": horizon, "meta_loss": info["meta_loss"],
                        "grad_norm": norm, "skipped": info["skipped"], "seconds": time.time() - t0})
        print(f"{it}/{iterations} {name} H={horizon} meta-loss {info['meta_loss']:.4f} |g| {norm:.3g} "
              f"{time.time() - t0:.0f}s", file=sys.stderr, flush=True)
        if it % 10 == 0 or it == stop:
            _save(out, meta, opt, gen, picker, history, it, rule)
    return {k: v.detach() for k, v in meta.items()}


def _check_settings(out: Path, settings: dict) -> None:
    """Write ``out/settings.json`` (first slice) or refuse settings that differ from the saved ones."""
    path = out / "settings.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        diff = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
        if diff:
            raise ValueError(f"meta_train: {out} was started with other settings; resuming would change the run: "
                             + ", ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in diff.items())
                             + " (pass the saved values, or use a new --out folder)")
    elif not (out / "meta_checkpoint.pt").is_file():
        atomic_write(path, lambda f: f.write(json.dumps(settings, indent=1).encode()))


def _tuple_state(s):
    """``random.Random.getstate()`` back from its JSON form."""
    return (s[0], tuple(s[1]), s[2])


def _save(out: Path, meta, opt, gen, picker, history, it, rule) -> None:
    sd = {"meta": {k: v.detach().clone() for k, v in meta.items()}, "opt": opt.state_dict(),
          "generator": gen.get_state(), "iteration": it}
    atomic_write(out / "meta_checkpoint.pt", lambda f: torch.save(sd, f))
    atomic_write(out / "picker.json", lambda f: f.write(json.dumps(picker.getstate()).encode()))
    atomic_write(out / "history.json", lambda f: f.write(json.dumps(history).encode()))
    save_checkpoint(out / "lopt_generalist.pt", rule, sd["meta"], iterations=it,
                    trained_on=",".join(sorted({h["task"] for h in history})))


# ---------------------------------------------------------------- held-out evaluation

ADAM_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
#: The untuned baseline: ``torch.optim.Adam``'s default learning rate.
DEFAULT_ADAM_LR = 1e-3


def evaluate_suite(checkpoint: str, out: str, *, steps: int = 300, seeds=(1, 2, 3), tasks=HELDOUT_TASKS,
                   eval_every: int = 10) -> dict:
    """Every task of ``tasks`` (held-out by default; meta-training and :data:`VALIDATION_TASKS` may
    be named too, to compare rules without touching the held-out suite): the rule
    (``total_steps = steps``) vs Adam tuned over :data:`ADAM_GRID`."""
    from gradmeta.lopt import load_checkpoint

    rule, meta = load_checkpoint(checkpoint)
    rule.total_steps = steps
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "heldout.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    builders = {**_train_builders(), **_validation_builders(), **_heldout_builders()}
    for name in tasks:
        if name in results:
            continue
        t0 = time.time()
        task = builders[name]()
        r = evaluate(task, rule, meta, seeds=list(seeds), steps=steps, eval_every=eval_every, adam_lrs=list(ADAM_GRID))
        mine_best, adam_best = r["best_test_loss"], r["adam_best_test_loss"]
        d = train_curves(task, adam, torch.tensor([DEFAULT_ADAM_LR]), list(seeds), steps, eval_every)["test_loss"][0]
        results[name] = {
            "adam_lr": r["adam_lr"], "best": mine_best.tolist(), "final": r["final_test_loss"].tolist(),
            "adam_best": adam_best.tolist(), "adam_final": r["adam_final_test_loss"].tolist(),
            "step_reduction": r["step_reduction"].tolist(), "skipped": r["skipped"].tolist(),
            "adam_default_best": torch.nan_to_num(d, nan=float("inf")).min(-1).values.tolist(),
            "curve": r["test_loss"].mean(0).tolist(), "adam_curve": r["adam_test_loss"].mean(0).tolist(),
            "eval_steps": r["eval_steps"].tolist(), "seconds": time.time() - t0,
            "load_average_1min": os.getloadavg()[0]}
        print(f"{name}: best {mine_best.mean():.4g} vs Adam {adam_best.mean():.4g} (lr {r['adam_lr']}), "
              f"final {r['final_test_loss'].mean():.4g}, SR {r['step_reduction'].median():.2f}, "
              f"{time.time() - t0:.0f}s", file=sys.stderr, flush=True)
        atomic_write(path, lambda f: f.write(json.dumps(results, indent=1).encode()))
    return results


def summarise(results: dict) -> tuple[str, dict]:
    """Markdown table and the three targets from :func:`evaluate_suite`'s results."""
    import statistics as st

    rows = ["| held-out task | learned best | learned final | tuned Adam best (lr) | tuned Adam final | Adam lr 1e-3 best "
            "| step reduction (median) | best ≤ tuned Adam |", "|---|---|---|---|---|---|---|---|"]
    wins, default_wins, worst_ratio, adam_ratio, srs, ratios = 0, 0, 0.0, 0.0, [], {}
    for name, r in results.items():
        b, f, ab, af = (st.mean(r[k]) for k in ("best", "final", "adam_best", "adam_final"))
        win = b <= ab
        wins += win
        worst_ratio = max(worst_ratio, max(fi / bi for fi, bi in zip(r["final"], r["best"])))
        adam_ratio = max(adam_ratio, max(fi / bi for fi, bi in zip(r["adam_final"], r["adam_best"])))
        ratios[name] = round(max(fi / bi for fi, bi in zip(r["final"], r["best"])), 3)
        sr = st.median(r["step_reduction"])
        srs.append(sr)
        db = st.mean(r["adam_default_best"])
        default_wins += b <= db
        rows.append(f"| {name} | {b:.4g} | {f:.4g} | {ab:.4g} ({r['adam_lr']:g}) | {af:.4g} | {db:.4g} | {sr:.2f} "
                    f"| {'yes' if win else 'no'} |")
    targets = {"wins": wins, "wins_vs_adam_1e-3": default_wins, "tasks": len(results), "max_final_over_best": worst_ratio,
               "final_over_best_per_task": ratios, "tuned_adam_max_final_over_best": adam_ratio,
               "median_step_reduction": st.median(srs) if srs else float("nan")}
    return "\n".join(rows), targets
