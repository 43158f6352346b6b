"""A user's own inner task, as a package outside gradmeta would write it (the README's example)."""
import torch


def make_wine_task():
    """An MLP 13-16-3 on scikit-learn's wine data (shipped with scikit-learn): standardised with the
    training statistics, 25% test, 20% of the rest for validation, batch 32."""
    from sklearn.datasets import load_wine
    from sklearn.model_selection import train_test_split

    from gradmeta.lopt import SupervisedTask
    from gradmeta.models import classification_loss, mlp

    X, y = load_wine(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    X_train, X_valid, y_train, y_valid = train_test_split(X_train, y_train, test_size=0.2, random_state=0,
                                                          stratify=y_train)
    mean, std = X_train.mean(0), X_train.std(0)
    f = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    t = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return SupervisedTask(mlp([13, 16, 3]), classification_loss, f(X_train), t(y_train), f(X_test), t(y_test),
                          batch_size=32, valid=(f(X_valid), t(y_valid)), name="wine_mlp")


def not_a_task():
    return object()
