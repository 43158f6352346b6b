"""Thread safety of collect_gradients and clear errors on degenerate input."""
import threading

import pytest
import torch

import gradmeta as gm
from gradmeta.grads import GradientCollectionError
from gradmeta.models import GPT, classification_loss, lm_loss
from tests.conftest import assert_dicts_close, naive_per_example_grads


def test_two_collecting_threads_and_one_inference_thread_on_one_model():
    torch.manual_seed(0)
    model = GPT(13, 8, 2, 2, 8).double()
    xs = {B: torch.randint(0, 13, (B, 6)) for B in (3, 5)}
    want = {B: naive_per_example_grads(model, lm_loss, x, x.roll(-1, 1)) for B, x in xs.items()}
    plain = model(xs[3]).detach()
    errors, barrier = [], threading.Barrier(3)

    def collect(B, reps=6):
        try:
            barrier.wait()
            for _ in range(reps):
                gs = gm.collect_gradients(model, lm_loss, xs[B], xs[B].roll(-1, 1))
                assert_dicts_close(gs.per_example_grads(), want[B])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    def infer(reps=30):
        try:
            barrier.wait()
            for _ in range(reps):
                torch.testing.assert_close(model(xs[3]).detach(), plain, atol=0, rtol=0)
        except BaseException as e:  # noqa: BLE001
            errors.append(repr(e))

    for sizes in [(3, 3), (3, 5)]:
        barrier.reset()
        threads = [threading.Thread(target=collect, args=(B,)) for B in sizes] + [threading.Thread(target=infer)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
    assert all(not m._forward_hooks and not m._forward_hooks_with_kwargs for m in model.modules())


def test_empty_batch_is_a_clear_error():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(GradientCollectionError, match="batch is empty"):
        gm.collect_gradients(model, classification_loss, torch.zeros(0, 3), torch.zeros(0).long())
    with pytest.raises(GradientCollectionError, match="batch is empty"):
        gm.grads.functional_factors(model, classification_loss, dict(model.named_parameters()),
                                    torch.zeros(0, 3), torch.zeros(0).long())


@pytest.mark.parametrize("bad", [lambda out, y: classification_loss(out, y).detach(),
                                 lambda out, y: out.argmax(1)])
def test_loss_that_does_not_depend_on_parameters(bad):
    model = torch.nn.Linear(3, 2)
    with pytest.raises(GradientCollectionError, match="must be a floating-point function of the model's parameters"):
        gm.collect_gradients(model, bad, torch.randn(4, 3), torch.zeros(4).long())
