"""Curvature on degenerate data: empty batches and non-finite values are clear errors."""
import pytest
import torch
from torch import nn

from gradmeta import curvature as gc
from gradmeta.models import classification_loss


def _model():
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def test_empty_batch_is_an_error_not_a_zero_trace():
    data = (torch.zeros(0, 3, dtype=torch.float64), torch.zeros(0).long())
    with pytest.raises(gc.CurvatureError, match="batch 0 of data is empty"):
        gc.hessian_trace(_model(), classification_loss, data, num_samples=4)


@pytest.mark.parametrize("fn", [lambda m, d: gc.hessian_eigenvalues(m, classification_loss, d, k=1),
                                lambda m, d: gc.spectral_density(m, classification_loss, d, num_probes=1,
                                                                 num_steps=4)])
def test_nan_inputs_are_named(fn):
    x = torch.randn(4, 3, dtype=torch.float64)
    x[1, 2] = float("nan")
    with pytest.raises(gc.CurvatureError, match=r"inputs of shape \(4, 3\) contain NaN"):
        fn(_model(), (x, torch.zeros(4).long()))
