"""Shared fixtures and references for the learned-optimization tests."""
import pytest
import torch

from gradmeta.lopt import digits_mlp


@pytest.fixture(scope="session")
def small_digits():
    """Digits MLP 64-8-10 with batch 16: small enough for many unrolls in a test."""
    return digits_mlp(hidden=[8], batch_size=16)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny vmapped unrolls run fastest (and most predictably on a shared machine) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
