"""The editors shipped in gradmeta/inr/editors: what they were trained for, and that they edit."""
import pytest
import torch

import gradmeta.inr as inr

NAMES = ["dilation", "erosion", "contrast"]


def test_the_shipped_editors_are_listed():
    assert set(inr.shipped_editors()) >= {n + s for n in NAMES for s in ("", "-weights")}


@pytest.fixture(scope="module")
def drawn():
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 28), torch.linspace(-1, 1, 28), indexing="ij")
    img = (((xx ** 2 + yy ** 2).sqrt() - 0.5).abs() < 0.15).float()[None] * 0.9
    return img, inr.fit(img)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("suffix", ["", "-weights"])
def test_shipped_editor_edits_a_drawn_image(name, suffix, drawn):
    ed = inr.load_editor(name + suffix)
    t = ed.trained_for
    assert t["edit"] == name and t["image_size"] == [28, 28] and t["channels"] == 1
    assert t["train"]["source"] == "fashion_mnist"
    assert ed.features == ("weights" if suffix else "gradients")
    img, siren = drawn
    target = inr.apply_edit(name, img[None])[0]
    no_edit = (siren.render() - target).square().mean()
    edited = (ed(siren).render() - target).square().mean()
    assert edited < 0.7 * no_edit, (name + suffix, edited.item(), no_edit.item())
