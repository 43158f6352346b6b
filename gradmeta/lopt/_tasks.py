"""Inner tasks: what a learned optimizer is trained and evaluated on.

A task is functional so that many inner runs can be vectorised with ``torch.func.vmap``:
parameters are ``dict[str, Tensor]`` keyed by the model's ``named_parameters()`` names, and

* ``init(seed) -> params`` draws a fresh initialisation (deterministic in ``seed``);
* ``batches(generator, n) -> batch`` draws ``n`` independent training batches, every tensor
  with a leading axis ``n`` (one batch per particle / inner run);
* ``loss(params, batch) -> (B,)`` per-example training losses for one batch (no leading ``n``);
* ``test_loss(params) -> ()`` the mean loss on held-out data (test split or validation stream);
* optionally ``valid_loss(params) -> ()``, the loss on a validation split (for ``objective="valid"``).

Module-backed tasks also expose ``model`` (a parameter skeleton), ``loss_fn(outputs, targets)`` and
``split(batch) -> (inputs, targets)`` so that other backends (``higher``) and rules built on the
model's structure (:class:`~gradmeta.lopt.GradMetaNetLO`) can run them.

Your own task: subclass :class:`Task` or use :class:`SupervisedTask` (any model, any per-example
loss, tensors of inputs and targets), and name its factory in a spec as
``[inner] factory = "mypkg.tasks:make_task"`` (:func:`load_task`).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor, nn
from torch.func import functional_call

from gradmeta.models import GPT, classification_loss, lm_loss, mlp

__all__ = ["Task", "ModuleTask", "SupervisedTask", "ClassificationTask", "LanguageModelTask", "QuadraticTask",
           "digits_mlp", "image_mlp", "char_lm", "make_task", "load_task", "check_task", "TASK_NAMES"]


class Task:
    """Base class of inner tasks (see the module docstring for the protocol)."""

    name = "task"

    def init(self, seed: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def batches(self, generator: torch.Generator, n: int) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def loss(self, params: dict[str, Tensor], batch: tuple[Tensor, ...]) -> Tensor:
        raise NotImplementedError

    def test_loss(self, params: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def init_stacked(self, seeds: list[int]) -> dict[str, Tensor]:
        """``init`` for several seeds, stacked along a new leading axis ``(len(seeds), *shape)``."""
        inits = [self.init(int(s)) for s in seeds]
        return {k: torch.stack([p[k] for p in inits]) for k in inits[0]}


class ModuleTask(Task):
    """A task whose loss is ``loss_fn(model(inputs), targets)`` with the model's parameters replaced."""

    def __init__(self, model: nn.Module, loss_fn, name: str):
        self.model, self.loss_fn, self.name = model, loss_fn, name
        for p in self.model.parameters():
            p.requires_grad_(False)

    def init(self, seed: int) -> dict[str, Tensor]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for m in self.model.modules():
                if m is not self.model and hasattr(m, "reset_parameters"):
                    m.reset_parameters()
            return {k: v.detach().clone() for k, v in self.model.named_parameters()}

    @staticmethod
    def split(batch: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        """``(inputs, targets)`` of a batch."""
        return batch[0], batch[1]

    def loss(self, params: dict[str, Tensor], batch: tuple[Tensor, ...]) -> Tensor:
        """Per-example losses ``(B,)`` of ``batch`` at ``params``."""
        x, y = self.split(batch)
        return self.loss_fn(functional_call(self.model, params, (x,)), y)


class SupervisedTask(ModuleTask):
    """Any model on tensors of examples: ``loss_fn(model(X[idx]), y[idx]) -> (B,)``.

    Batches of ``batch_size`` examples are drawn with replacement from ``X (N, ...)``, ``y (N, ...)``;
    the test loss is the mean loss over the whole test split, the validation loss the mean over
    ``valid`` (``(X_valid, y_valid)``) when given.

    Args:
        model: the network; its parameters are only a skeleton (inner runs use functional copies).
        loss_fn: ``loss_fn(outputs, targets) -> (B,)`` per-example losses.
        X, y: training inputs and targets; X_test, y_test: the test split.
        batch_size: examples per inner step.
        valid: optional ``(X_valid, y_valid)``.
        name: shown in logs and plots.
    """

    def __init__(self, model: nn.Module, loss_fn, X: Tensor, y: Tensor, X_test: Tensor, y_test: Tensor,
                 batch_size: int = 128, valid: tuple[Tensor, Tensor] | None = None, name: str = "supervised"):
        if len(X) != len(y) or len(X_test) != len(y_test):
            raise ValueError(f"{name}: inputs and targets differ in length: train {len(X)} vs {len(y)}, "
                             f"test {len(X_test)} vs {len(y_test)}")
        if batch_size < 1:
            raise ValueError(f"{name}: batch_size must be >= 1, got {batch_size}")
        super().__init__(model, loss_fn, name)
        self.X, self.y, self.X_test, self.y_test, self.batch_size = X, y, X_test, y_test, batch_size
        self.X_valid, self.y_valid = valid if valid is not None else (None, None)

    def batches(self, generator: torch.Generator, n: int) -> tuple[Tensor, Tensor]:
        """``n`` batches: inputs ``(n, B, ...)``, targets ``(n, B, ...)``."""
        idx = torch.randint(len(self.y), (n, self.batch_size), generator=generator)
        return self.X[idx], self.y[idx]

    def test_loss(self, params: dict[str, Tensor]) -> Tensor:
        """Mean loss on the test split, ``()``."""
        return self.loss(params, (self.X_test, self.y_test)).mean()

    def valid_loss(self, params: dict[str, Tensor]) -> Tensor:
        """Mean loss on the validation examples, ``()``."""
        if self.X_valid is None:
            raise ValueError(f"{self.name}: no validation split; build the task with a validation split "
                             "(valid_fraction > 0 for the built-in tasks)")
        return self.loss(params, (self.X_valid, self.y_valid)).mean()


class ClassificationTask(SupervisedTask):
    """An MLP classifier on flat inputs: train ``X (N, D)`` float, ``y (N,)`` int64; test likewise.

    Batches of ``batch_size`` examples are drawn with replacement; the test loss is the mean
    cross-entropy over the whole test split. ``valid_fraction > 0`` holds that share of the
    training split out (stratified, deterministic) as a validation split.
    """

    def __init__(self, X: Tensor, y: Tensor, X_test: Tensor, y_test: Tensor, hidden: list[int],
                 batch_size: int = 128, activation: str = "relu", name: str = "mlp", valid_fraction: float = 0.0):
        if X.dim() != 2 or y.shape != X.shape[:1]:
            raise ValueError(f"ClassificationTask: expected X (N, D) and y (N,), got {tuple(X.shape)} and {tuple(y.shape)}")
        if not 0 <= valid_fraction < 1:
            raise ValueError(f"ClassificationTask: valid_fraction must lie in [0, 1), got {valid_fraction}")
        n_classes = int(max(y.max(), y_test.max())) + 1
        self.widths = [X.shape[1], *hidden, n_classes]
        valid = None
        if valid_fraction > 0:  # hold out part of the training split for meta-training on validation loss
            from gradmeta.data import stratified_split

            tr, va = stratified_split(y, valid_fraction, seed=1)
            X, y, valid = X[tr], y[tr], (X[va], y[va])
        super().__init__(mlp(self.widths, activation=activation), classification_loss, X, y, X_test, y_test,
                         batch_size, valid, name)


class LanguageModelTask(ModuleTask):
    """Next-character prediction with :class:`gradmeta.models.GPT` on a :class:`~gradmeta.data.TextCorpus`.

    Batches are random windows ``(B, T)`` of the train stream; the test loss is the mean
    per-token loss over the first ``test_windows`` windows of the validation stream.
    ``valid_fraction > 0`` holds the last share of the train stream out: the validation loss is the
    mean over its first ``test_windows`` windows.
    """

    def __init__(self, corpus, d_model: int = 32, n_heads: int = 4, n_blocks: int = 2,
                 batch_size: int = 8, seq_len: int = 8, test_windows: int = 256, name: str = "char_lm",
                 valid_fraction: float = 0.0):
        if not 0 <= valid_fraction < 1:
            raise ValueError(f"LanguageModelTask: valid_fraction must lie in [0, 1), got {valid_fraction}")
        super().__init__(GPT(corpus.vocab_size, d_model, n_heads, n_blocks, max_len=seq_len), lm_loss, name)
        self.corpus, self.batch_size, self.seq_len = corpus, batch_size, seq_len
        train = corpus.train
        self.X_valid = self.y_valid = None
        if valid_fraction > 0:
            cut = int(round(len(train) * (1 - valid_fraction)))
            held = train[cut:].unfold(0, seq_len + 1, seq_len)[:test_windows]  # non-overlapping windows
            if len(held) == 0:
                raise ValueError(f"{name}: valid_fraction={valid_fraction} leaves no validation window of "
                                 f"{seq_len + 1} tokens")
            train, self.X_valid, self.y_valid = train[:cut], held[:, :-1], held[:, 1:]
        self._windows = train.unfold(0, seq_len + 1, 1)  # (N - T, T + 1), a view
        self.X_test, self.y_test = corpus.windows("val", seq_len, test_windows)

    def batches(self, generator: torch.Generator, n: int) -> tuple[Tensor, Tensor]:
        """``n`` batches: inputs and shifted targets, both int64 ``(n, B, T)``."""
        w = self._windows[torch.randint(len(self._windows), (n, self.batch_size), generator=generator)]
        return w[..., :-1], w[..., 1:]

    def test_loss(self, params: dict[str, Tensor]) -> Tensor:
        """Mean per-token cross-entropy on the validation windows, ``()``."""
        return self.loss(params, (self.X_test, self.y_test)).mean()

    valid_loss = SupervisedTask.valid_loss


class QuadraticTask(Task):
    """``loss = ½ Σ_i h_i (θ_i − x_i)²`` with curvatures ``h = logspace(-1, 0)`` and targets ``x ~ N(0, noise²)``.

    A cheap task with a known structure, used to check outer-gradient estimators. ``B`` noisy
    targets per batch give ``B`` per-example losses. Initialisation ``θ₀ ~ N(init_mean, init_scale²)``
    (with ``noise = init_scale = 0`` every inner run is the same deterministic problem).
    """

    name = "quadratic"

    def __init__(self, dim: int = 4, batch_size: int = 4, noise: float = 0.1, init_scale: float = 1.0,
                 init_mean: float = 0.0):
        self.h = torch.logspace(-1, 0, dim)
        self.dim, self.batch_size, self.noise, self.init_scale = dim, batch_size, noise, init_scale
        self.init_mean = init_mean

    def init(self, seed: int) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {"theta": self.init_mean + self.init_scale * torch.randn(self.dim, generator=g)}

    def batches(self, generator: torch.Generator, n: int) -> tuple[Tensor]:
        return (self.noise * torch.randn(n, self.batch_size, self.dim, generator=generator),)

    def loss(self, params: dict[str, Tensor], batch: tuple[Tensor]) -> Tensor:
        return 0.5 * (self.h * (params["theta"] - batch[0]).square()).sum(-1)

    def test_loss(self, params: dict[str, Tensor]) -> Tensor:
        """The population loss (expectation over targets, up to a constant), ``()``."""
        return 0.5 * (self.h * params["theta"].square()).sum()

    valid_loss = test_loss  # a synthetic task: the population loss is the validation loss too


def digits_mlp(hidden: list[int] | None = None, batch_size: int = 128, split_seed: int = 0,
               valid_fraction: float = 0.0) -> ClassificationTask:
    """MLP ``64 -> hidden -> 10`` on the scikit-learn digits (embedded; default hidden ``[32]``).

    ``valid_fraction > 0`` holds that share of the training split out as a validation set.
    """
    from gradmeta.data import load_digits

    tr, te = load_digits("train", seed=split_seed), load_digits("test", seed=split_seed)
    return ClassificationTask(tr.flat(), tr.labels, te.flat(), te.labels, hidden or [32], batch_size,
                              name="digits_mlp", valid_fraction=valid_fraction)


def image_mlp(dataset: str, root: str | os.PathLike | None = None, hidden: list[int] | None = None,
              batch_size: int = 128, size: int = 8, valid_fraction: float = 0.0) -> ClassificationTask:
    """MLP on a file-based image set downsampled to ``size × size`` and flattened.

    ``dataset`` is ``fashion_mnist``, ``mnist``, ``cifar10`` or ``cifar100`` (read from ``root`` or
    ``$GRADMETA_DATA``, never downloaded); hidden defaults to ``[128]`` for CIFAR-100 and ``[32]``
    otherwise. Inputs are ``C·size²`` (64 for the grey sets, 192 for CIFAR). ``valid_fraction > 0``
    holds that share of the training split out as a validation set.
    """
    from gradmeta.data import load_dataset

    hidden = hidden or ([128] if dataset == "cifar100" else [32])
    tr, te = (load_dataset(dataset, split, root).resize(size) for split in ("train", "test"))
    return ClassificationTask(tr.flat(), tr.labels, te.flat(), te.labels, hidden, batch_size,
                              name=f"{dataset}{size}_mlp", valid_fraction=valid_fraction)


def char_lm(corpus=None, batch_size: int = 8, seq_len: int = 8, d_model: int = 32, n_heads: int = 4,
            n_blocks: int = 2, valid_fraction: float = 0.0) -> LanguageModelTask:
    """2-block transformer LM (d=32, 4 heads, batch 8, sequence 8) on the stdlib-docstring corpus."""
    if corpus is None:
        from gradmeta.data import stdlib_docstring_corpus

        corpus = stdlib_docstring_corpus()
    return LanguageModelTask(corpus, d_model, n_heads, n_blocks, batch_size, seq_len, valid_fraction=valid_fraction)


TASK_NAMES = ("digits", "fashion_mnist", "mnist", "cifar10", "cifar100", "char_lm", "quadratic")


def make_task(name: str, *, hidden: list[int] | None = None, batch_size: int | None = None,
              data_root: str | None = None, valid_fraction: float = 0.0) -> Task:
    """Build a task by name (one of :data:`TASK_NAMES`), as task specs do.

    ``valid_fraction`` (every task but ``quadratic``, whose validation loss is its population
    loss) holds that share of the training data out as a validation split.
    """
    if name == "digits":
        return digits_mlp(hidden, batch_size or 128, valid_fraction=valid_fraction)
    if name in ("fashion_mnist", "mnist", "cifar10", "cifar100"):
        return image_mlp(name, data_root or None, hidden, batch_size or 128, valid_fraction=valid_fraction)
    if name == "char_lm":
        return char_lm(batch_size=batch_size or 8, valid_fraction=valid_fraction)
    if name == "quadratic":
        return QuadraticTask(batch_size=batch_size or 4)
    raise ValueError(f"gradmeta.lopt.make_task: unknown task {name!r}; choose from {TASK_NAMES}")


_PROTOCOL = ("init", "batches", "loss", "test_loss")


def check_task(task, origin: str = "task") -> Task:
    """Return ``task`` if it has the methods of the task protocol, else raise ``TypeError`` naming
    ``origin`` and what is missing. Tasks without ``init_stacked`` get :meth:`Task.init_stacked`."""
    missing = [m for m in _PROTOCOL if not callable(getattr(task, m, None))]
    if missing:
        raise TypeError(f"{origin} returned a {type(task).__name__} without {', '.join(missing)}: a task needs "
                        "init(seed), batches(generator, n), loss(params, batch) -> (B,) and test_loss(params) "
                        "(subclass gradmeta.lopt.Task or use gradmeta.lopt.SupervisedTask)")
    if not callable(getattr(task, "init_stacked", None)):
        task.init_stacked = Task.init_stacked.__get__(task)
    if not hasattr(task, "name"):
        task.name = type(task).__name__
    return task


def load_task(factory: str) -> Task:
    """The task returned by ``factory``, ``"package.module:function"`` (a function of no arguments)."""
    import importlib

    module, _, attr = factory.partition(":")
    if not module or not attr:
        raise ValueError(f"inner.factory = {factory!r}: expected 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"inner.factory = {factory!r}: cannot import it ({type(e).__name__}: {e})") from e
    return check_task(fn(), f"inner.factory {factory!r}")
