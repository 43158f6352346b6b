"""lora.train / lora.predict and `gradmeta lora {train, predict, info}`: results, selection, user mistakes."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from gradmeta import cli, lora
from tests.lora.peft_refs import make_peft, save


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """40 PEFT adapters (ranks 2 / 4, varied scale); labels: log‖ΔW‖ of the first layer and a size class."""
    root = tmp_path_factory.mktemp("labelled")
    rows = ["adapter,lognorm,size"]
    for i in range(40):
        torch.manual_seed(100)
        base = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
        pm = make_peft(base, seed=i, r=2 + 2 * (i % 2), lora_alpha=1 + i % 7, target_modules=["0", "2"])
        save(pm, root / "adapters" / f"ad{i}")
        d = pm.base_model.model[0].get_delta_weight("default")
        v = float(torch.linalg.matrix_norm(d.detach()).log())
        rows.append(f"ad{i},{v},{'big' if v > 0 else 'small'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_train_selects_on_validation_and_predicts(labelled, tmp_path):
    res = lora.train(labelled / "adapters", labelled / "labels.csv", "lognorm", model=["glnet", "svd"], epochs=30,
                     lr=3e-3,
                     out=tmp_path / "m")
    assert set(res.scores) == {"GLNet", "SVDMLP"}
    assert res.name == max(res.scores, key=lambda k: res.scores[k]["r2"])
    assert res.scores["SVDMLP"]["r2"] > 0.5  # a norm is a function of the singular values
    g = res.scores["GLNet"]  # every GLNet variant trained; the better on validation kept
    assert set(g["variants"]) == set(lora.GLNet.VARIANTS) and g["variants"][g["variant"]] == g["r2"]
    best = max(g["variants"].values())
    excess = g["variants_excess"]  # mean per-adapter validation error is 1 - R²
    assert all(excess[v][0] == pytest.approx(best - r2, abs=1e-9) for v, r2 in g["variants"].items())
    assert g["r2"] == best and g["variant"] == next(v for v in lora.GLNet.VARIANTS if excess[v][0] <= 0)
    assert g["variants"]["spectral"] == res.scores["SVDMLP"]["r2"]  # the spectral path alone is SVDMLP
    saved = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert saved["selected"] == res.name and saved["n_train"] + saved["n_val"] == 40
    rows = lora.predict(res.path, [labelled / "adapters" / "ad0", labelled / "adapters" / "ad1"])
    with torch.no_grad():
        direct = res.model(lora.load_adapter(labelled / "adapters" / "ad0"))[0, 0]
    want = (direct * res.info["target_std"] + res.info["target_mean"]).clamp(res.info["target_min"],
                                                                              res.info["target_max"])
    assert rows[0]["lognorm"] == pytest.approx(float(want), rel=1e-6)


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_train_predict_classification(labelled, tmp_path, capsys):
    rc, out, err = run(capsys, "lora", "train", "--adapters", str(labelled / "adapters"), "--labels",
                       str(labelled / "labels.csv"), "--target", "size", "--task", "classification", "--model",
                       "svd", "--epochs", "5", "--out", str(tmp_path / "c"))
    assert rc == 0 and "SVDMLP" in out and "selected" in out, err
    rc, out, err = run(capsys, "lora", "predict", "--model", str(tmp_path / "c" / "model.pt"), "--json",
                       str(labelled / "adapters" / "ad3"))
    row = json.loads(out)[0]
    assert rc == 0 and row["size"] in ("big", "small") and row["p_big"] + row["p_small"] == pytest.approx(1)
    rc, out, err = run(capsys, "lora", "train", "--adapters", str(labelled / "adapters"), "--labels",
                       str(labelled / "labels.csv"), "--target", "lognorm", "--model", "glnet,svd", "--epochs", "3",
                       "--selection", "one_se", "--out", str(tmp_path / "g"))
    assert rc == 0 and "GLNet" in out and "variant " in out, err
    g = json.loads((tmp_path / "g" / "metrics.json").read_text())["validation"]["GLNet"]
    excess = g["variants_excess"]  # the one-SE rule: the first variant within one standard error of the best
    assert g["variant"] == next(v for v in lora.GLNet.VARIANTS if excess[v][0] <= excess[v][1])
    with pytest.raises(ValueError, match="selection must be one of"):
        lora.train(labelled / "adapters", labelled / "labels.csv", "lognorm", selection="best")


def _one_line_error(rc, err):
    assert rc == 2 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("gradmeta lora")]
    assert len(lines) == 1, err
    return lines[0]


def test_cli_user_mistakes_one_line_exit_2(labelled, tmp_path, capsys):
    ads = labelled / "adapters"
    res = lora.train(ads, labelled / "labels.csv", "lognorm", model="svd", epochs=2, out=tmp_path / "m")
    other = save(make_peft(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)), r=2,
                           target_modules=["0", "2"]), tmp_path / "other")
    (tmp_path / "corrupt.pt").write_bytes(b"\x00" * 50)
    bad_labels = tmp_path / "labels.csv"
    bad_labels.write_text((labelled / "labels.csv").read_text().replace("ad7,", "ad7,x", 1))
    cases = [
        (("lora", "info", str(tmp_path / "missing")), "no such adapter folder or file"),
        (("lora", "info", str(ads)), "holds several adapters"),  # a zoo root without an adapter name
        (("lora", "predict", "--model", str(res.path), str(other)), "does not fit the model"),
        (("lora", "predict", "--model", str(tmp_path / "nope.pt"), str(ads / "ad0")), "no such model checkpoint"),
        (("lora", "predict", "--model", str(tmp_path / "corrupt.pt"), str(ads / "ad0")), "or contains code"),
        (("lora", "train", "--adapters", str(tmp_path / "missing"), "--labels", str(bad_labels), "--target", "x",
          "--out", str(tmp_path / "o")), "no such adapter folder"),
        (("lora", "train", "--adapters", str(ads), "--labels", str(bad_labels), "--target", "lognorm",
          "--out", str(tmp_path / "o")), "line 9 (adapter 'ad7'), column 'lognorm'"),
    ]
    for argv, match in cases:
        line = _one_line_error(*run(capsys, *argv)[::2])
        assert match in line, (argv, line)


def test_cli_info_every_named_adapter_and_predict_dora_note(labelled, tmp_path, capsys):
    from peft import LoraConfig
    torch.manual_seed(100)
    pm = make_peft(nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)), r=2, target_modules=["0", "2"])
    pm.add_adapter("dora", LoraConfig(r=3, target_modules=["0", "2"], use_dora=True, init_lora_weights=False))
    folder = save(pm, tmp_path / "named")
    rc, out, err = run(capsys, "lora", "info", str(folder))
    assert rc == 0 and f"{folder}: 2 modules" in out and f"{folder} [adapter dora]: 2 modules" in out
    res = lora.train(labelled / "adapters", labelled / "labels.csv", "lognorm", model="svd", epochs=2,
                     out=tmp_path / "m")
    rc, out, err = run(capsys, "lora", "predict", "--model", str(res.path), "--adapter-name", "dora", str(folder))
    assert rc == 0 and "note:" in err and "DoRA magnitudes" in err
