"""Edits against naive loops; the gradient set of an INR against naive per-coordinate gradients."""
import pytest
import torch

import gradmeta.inr as inr
from tests.conftest import assert_dicts_close, naive_per_example_grads


def _naive_filter(img, reduce):
    C, H, W = img.shape
    out = torch.empty_like(img)
    for c in range(C):
        for i in range(H):
            for j in range(W):
                vals = [img[c, min(max(i + di, 0), H - 1), min(max(j + dj, 0), W - 1)]
                        for di in (-1, 0, 1) for dj in (-1, 0, 1)]
                out[c, i, j] = reduce(torch.stack(vals))
    return out


def test_dilation_erosion_contrast():
    x = torch.rand(2, 2, 6, 7, generator=torch.Generator().manual_seed(0))
    d, e = inr.apply_edit("dilation", x), inr.apply_edit("erosion", x)
    for n in range(2):
        torch.testing.assert_close(d[n], _naive_filter(x[n], torch.max))
        torch.testing.assert_close(e[n], _naive_filter(x[n], torch.min))
    torch.testing.assert_close(inr.apply_edit("contrast", x), (0.5 + 1.5 * (x - 0.5)).clamp(0, 1))


def test_register_edit_and_errors():
    @inr.register_edit("invert_test")
    def invert(images):
        return 1 - images

    x = torch.rand(1, 1, 3, 3)
    torch.testing.assert_close(inr.apply_edit("invert_test", x), 1 - x)
    with pytest.raises(KeyError, match="unknown edit 'nope'"):
        inr.get_edit("nope")
    with pytest.raises(ValueError, match="already registered"):
        inr.register_edit("invert_test")(lambda im: im)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        inr.apply_edit("dilation", x[0])
    del inr.EDITS["invert_test"]


@pytest.mark.parametrize("channels", [1, 3])
def test_gradient_set_equals_naive_per_coordinate_gradients(channels):
    m = inr.Siren(out_channels=channels, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    coords = inr.probe_coordinates(64, seed=0, dtype=torch.float64)
    assert coords.shape == (64, 2) and coords.abs().max() <= 1
    targets = torch.rand(64, channels, dtype=torch.float64)
    loss = lambda out, t: (out - t).square().sum(-1)  # noqa: E731
    for t in (None, targets):
        gs = inr.inr_gradient_set(m, coords, t)
        assert gs.layer_names == ["layers.0", "layers.1", "layers.2"] and gs.batch_size == 64
        want = naive_per_example_grads(m, loss, coords, torch.zeros(64, channels, dtype=torch.float64) if t is None else t)
        assert_dicts_close(gs.per_example_grads(), want, atol=1e-9)
    # the batched helper gives the same factors as one INR at a time
    stack = inr.stack_params([m.params(), m.params()])
    sets = inr.gradient_factor_sets(stack, coords)
    gs = inr.inr_gradient_set(m, coords)
    for k in gs.layer_names:
        torch.testing.assert_close(sets[1][k].backprops, gs[k].backprops)
        torch.testing.assert_close(sets[1][k].activations, gs[k].activations)
    # a constant target t: the factors give the naive gradients of ‖f(x) − t‖²
    sets = inr.gradient_factor_sets(stack, coords, target=-1.0)
    want = naive_per_example_grads(m, loss, coords, torch.full((64, channels), -1.0, dtype=torch.float64))
    assert_dicts_close(sets[0].per_example_grads(), want, atol=1e-9)
    # per-layer rescaling (through GradientSet.map_factors) divides each layer's weight gradients by s_a s_d
    scales = {k: (2.0 + i, 0.5 + i) for i, k in enumerate(gs.layer_names)}
    scaled = inr.rescale_sets(sets, scales)[0]
    assert isinstance(scaled, type(gs))
    for i, k in enumerate(gs.layer_names):
        torch.testing.assert_close(scaled.per_example_grads()[f"{k}.weight"],
                                   want[f"{k}.weight"] / (scales[k][0] * scales[k][1]), atol=1e-9, rtol=1e-9)


def test_probe_sets_hold_layer_inputs_and_preactivations():
    torch.manual_seed(0)
    m = inr.Siren(1, hidden=8, dtype=torch.float64)
    stack = inr.stack_params([m.params(), m.params()])
    sets = inr.probe_factor_sets(stack, grid=3, omega0=m.omega0)
    x = inr.pixel_grid(3, 3, torch.float64)
    p = sets[1]
    assert p.layer_names == ["layers.0", "layers.1", "layers.2"] and p.batch_size == 9 and "layers.1" in p
    torch.testing.assert_close(p["layers.0"].activations[:, 0], x)
    torch.testing.assert_close(p["layers.0"].backprops[:, 0], m.omega0 * m.layers[0](x))
    torch.testing.assert_close(p["layers.2"].backprops[:, 0], m(x))  # the last slot is the output itself
    assert not hasattr(p, "per_example_grads")  # pre-activations are not gradients
    half = inr.rescale_sets(sets, {k: (2.0, 4.0) for k in p.layer_names})[1]
    torch.testing.assert_close(half["layers.1"].backprops, p["layers.1"].backprops / 4)
