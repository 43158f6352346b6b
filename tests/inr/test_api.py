"""The user path: inr.fit, train_editor, editor(siren), save / load_editor, refusals."""
import pytest
import torch

import gradmeta.inr as inr


def _images(n, C=1, H=8, W=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, C, H, W, generator=g)
    return torch.nn.functional.avg_pool2d(x, 3, 1, 1)  # smoother, still in [0, 1]


def test_fit_one_image_any_size():
    img = _images(1, C=3, H=7, W=10)[0]
    siren = inr.fit(img, steps=60)
    assert isinstance(siren, inr.Siren) and siren.image_size == (7, 10)
    out = siren.render(7, 10)
    assert out.shape == (3, 7, 10) and not out.requires_grad
    torch.testing.assert_close(siren.render(), out)
    torch.testing.assert_close(siren.render((7, 10)), out)
    assert inr.psnr(out[None], img[None]).item() > 20
    # the same computation as fit_inrs on a batch of one with the same seed
    ref = inr.fit_inrs(img[None], steps=60, lr=inr.FIT_LR, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, inr.render(ref.params, (7, 10))[0])


@pytest.mark.parametrize("bad, msg", [(torch.rand(2, 1, 4, 4), "batch"), (torch.rand(4, 4), r"\(C, H, W\)"),
                                      (torch.rand(1, 4, 4) + 1, r"\[0, 1\]"),
                                      (torch.zeros(1, 4, 4, dtype=torch.long), "float")])
def test_fit_refuses_bad_images(bad, msg):
    with pytest.raises(ValueError, match=msg):
        inr.fit(bad)


@pytest.fixture(scope="module")
def trained():
    return inr.train_editor(_images(6), "dilation", features="gradients:bilinear", steps=3, batch_size=4,
                            fit_steps=10, channels=8, aux_channels=2)


def test_train_editor_records_what_it_was_trained_for(trained):
    t = trained.trained_for
    assert t["edit"] == "dilation" and t["image_size"] == [8, 8] and t["channels"] == 1
    assert t["fit"] == {"steps": 10, "lr": inr.FIT_LR} and t["train"]["steps"] == 3
    assert trained.features == "gradients" and trained.product == "bilinear"
    assert "dilation editor" in trained.describe() and "8x8" in trained.describe()
    assert any(v.abs().sum() > 0 for k, v in trained.head.w2.state_dict().items())  # it trained


def test_save_load_round_trip(trained, tmp_path):
    siren = inr.fit(_images(1, seed=5)[0], steps=30)
    trained.save(tmp_path / "ed.pt")
    loaded = inr.load_editor(tmp_path / "ed.pt")
    assert loaded.config == trained.config and loaded.trained_for == trained.trained_for
    sd, sl = trained.state_dict(), loaded.state_dict()
    assert sd.keys() == sl.keys() and all(torch.equal(sd[k], sl[k]) for k in sd)
    a, b = trained(siren), loaded(siren)
    assert isinstance(a, inr.Siren) and a.image_size == (8, 8)
    for k, v in a.params().items():
        assert torch.equal(v, b.params()[k])
    torch.testing.assert_close(inr.edit(siren, loaded).render(8, 8), b.render(8, 8), atol=0, rtol=0)
    # the editor really edits: the result differs from the input
    assert not torch.equal(a.params()["layers.2.weight"], siren.params()["layers.2.weight"])
    # the file loads with weights_only=True (no pickled code)
    torch.load(tmp_path / "ed.pt", weights_only=True)


def test_editor_refuses_other_inrs(trained):
    with pytest.raises(ValueError, match=r"fitted to a 12x12 image.*Resize the image to 8x8"):
        trained(inr.fit(_images(1, H=12, W=12)[0], steps=2))
    with pytest.raises(ValueError, match="parameters"):
        trained(inr.fit(_images(1, C=3)[0], steps=2))  # 3 channels, editor made for 1
    with pytest.raises(ValueError, match="parameters"):
        inr.edit(inr.fit(_images(1)[0], steps=2, hidden=16), trained)
    with pytest.raises(ValueError, match="omega0"):
        trained(inr.fit(_images(1)[0], steps=2, omega0=10.0))
    # an INR of unknown image size (built by hand) with the right shape is accepted
    assert isinstance(trained(inr.Siren(1)), inr.Siren)


def test_load_editor_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a file nor a shipped editor"):
        inr.load_editor("no-such-editor")
    torch.save({"a": torch.ones(1)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not an editor saved by INREditor.save"):
        inr.load_editor(tmp_path / "x.pt")


def test_train_editor_bad_input():
    with pytest.raises(KeyError, match="unknown edit"):
        inr.train_editor(_images(2), "blur")
    with pytest.raises(ValueError, match="features must be one of"):
        inr.train_editor(_images(2), "dilation", features="grads")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        inr.train_editor(_images(2)[0], "dilation")
