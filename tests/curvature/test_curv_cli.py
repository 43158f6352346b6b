"""`gradmeta curvature` end to end on a tiny model (digits and a .pt file), plus its input errors."""
import json
import sys
import textwrap

import pytest
import torch

from gradmeta import curvature as gc
from gradmeta.cli import main
from gradmeta.curvature._report import cross_entropy_per_example


@pytest.fixture
def factory(tmp_path, monkeypatch):
    (tmp_path / "tiny_curv_model.py").write_text(textwrap.dedent("""
        import torch
        from gradmeta.models import mlp

        def make():
            torch.manual_seed(0)
            return torch.nn.Sequential(mlp([64, 8, 10]), torch.nn.Dropout(0.1))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "tiny_curv_model:make"
    sys.modules.pop("tiny_curv_model", None)


def test_cli_digits(factory, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["curvature", "--model", factory, "--data", "digits", "--num-examples", "96",
                 "--batch-size", "40", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "top eig" in text and "(all)" in text and "0.0" in text
    rep = json.loads((out / "curvature.json").read_text())
    assert (out / "spectral_density.png").stat().st_size > 1000
    assert [r["layer"] for r in rep["layers"]] == ["0.0", "0.2"] and rep["num_data"] == 96
    # the table's numbers are the library's numbers
    from gradmeta.data import load_digits
    d = load_digits(split="train", seed=0)
    import tiny_curv_model
    model = tiny_curv_model.make().eval()
    data = (d.images.flatten(1)[:96], d.labels[:96])
    H = gc.HessianOperator(model, cross_entropy_per_example, data, param_names=["0.2.weight", "0.2.bias"])
    exact = H.to_dense().trace().item()
    assert rep["layers"][1]["trace_method"] == "exact"
    assert abs(rep["layers"][1]["trace"] - exact) < 1e-4 * abs(exact)
    fisher = gc.fisher_diagonal(model, cross_entropy_per_example, data)
    assert abs(rep["layers"][0]["fisher_trace"] - (fisher["0.0.weight"].sum() + fisher["0.0.bias"].sum()).item()) < 1e-5


def test_cli_file_data_checkpoint_and_errors(factory, tmp_path, capsys):
    import tiny_curv_model
    model = tiny_curv_model.make()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2)
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    torch.save({"X": torch.randn(30, 64), "y": torch.randint(0, 10, (30,))}, tmp_path / "data.pt")
    out = tmp_path / "o2"
    assert main(["curvature", "--model", factory, "--data", str(tmp_path / "data.pt"),
                 "--checkpoint", str(tmp_path / "ckpt.pt"), "--out", str(out), "--samples", "10"]) == 0
    assert json.loads((out / "curvature.json").read_text())["num_data"] == 30
    assert main(["curvature", "--model", "no_such_module_xyz:make", "--data", "digits", "--out", str(out)]) == 2
    assert main(["curvature", "--model", factory, "--data", str(tmp_path / "missing.pt"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cannot import module 'no_such_module_xyz'" in err and "missing.pt" in err
