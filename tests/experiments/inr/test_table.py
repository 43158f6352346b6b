"""The INR results table: exact pooling of seed summaries, run-folder reading, duplicate-seed refusal."""
import json
import statistics

import pytest
import torch

from gradmeta.experiments.inr.table import build_table, main, pool


def test_pool_equals_statistics_of_the_union():
    g = torch.Generator().manual_seed(0)
    vals = torch.rand(9, generator=g, dtype=torch.float64).tolist()
    parts = [vals[:2], vals[2:3], vals[3:7], vals[7:]]
    groups = [(statistics.fmean(p), statistics.stdev(p) if len(p) > 1 else 0.0, len(p)) for p in parts]
    mean, std, n = pool(groups)
    assert n == 9
    assert mean == pytest.approx(statistics.fmean(vals), rel=1e-12)
    assert std == pytest.approx(statistics.stdev(vals), rel=1e-12)
    assert pool([(0.5, 0.0, 1)]) == (0.5, 0.0, 1)
    with pytest.raises(ValueError):
        pool([])


def _fake_run(folder, edit, results, smoothness=None):
    folder.mkdir()
    lam = "" if smoothness is None else f"smoothness = {smoothness}\n"
    (folder / "spec.resolved.toml").write_text(
        f'[data]\nedit = "{edit}"\ntrain_limit = 64\n[train]\nsteps = 10\n{lam}')
    (folder / "metrics.json").write_text(json.dumps({"summary": {
        "identity_mse": 0.5, "zoo_size": 80, "zoo_psnr_mean": 40.0, "zoo_inrs_per_s": 3.0}}))
    torch.save({"step": len(results), "state": {"results": {
        k: {"mse": v, "train_seconds": 1.0} for k, v in results.items()}}}, folder / "checkpoint.pt")


def test_build_table_pools_runs_and_recorded_seeds_and_refuses_duplicates(tmp_path):
    _fake_run(tmp_path / "a", "erosion", {"weights/seed2": 0.3, "gradients:bilinear/seed2": 0.2})
    _fake_run(tmp_path / "b", "erosion", {"gradients:bilinear/seed3": 0.1})
    rec = [{"edit": "erosion", "steps": 10, "train_limit": 64, "variant": "weights", "seeds": [0, 1],
            "mean": 0.4, "std": 0.1, "source": "old"}]
    t = build_table([tmp_path / "a", tmp_path / "b"], rec)
    w = t["cells"]["erosion|10|64|0|weights"]
    assert w["seeds"] == [0, 1, 2] and w["n"] == 3
    assert w["mean"] == pytest.approx((0.4 * 2 + 0.3) / 3)
    # seeds 0, 1 = 0.4 -+ 0.1/sqrt(2): the union with 0.3 has this sample std
    d = 0.1 / 2 ** 0.5
    assert w["std"] == pytest.approx(statistics.stdev([0.4 - d, 0.4 + d, 0.3]))
    gr = t["cells"]["erosion|10|64|0|gradients:bilinear"]
    assert gr["per_seed"] == {"2": 0.2, "3": 0.1} and gr["mean"] == pytest.approx(0.15)
    _fake_run(tmp_path / "c", "erosion", {"weights/seed2": 0.25}, smoothness=0.5)  # another cell: no clash
    assert build_table([tmp_path / "a", tmp_path / "c"], [])["cells"]["erosion|10|64|0.5|weights"]["mean"] == 0.25
    with pytest.raises(ValueError, match="seed 2"):
        build_table([tmp_path / "a", tmp_path / "a"], [])
    with pytest.raises(ValueError, match=r"seeds \[2\]"):
        build_table([tmp_path / "a"], [{**rec[0], "seeds": [1, 2]}])
    out = tmp_path / "table"
    main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)])
    assert "| erosion | 5.000e-01 |" in out.with_suffix(".md").read_text()
    assert json.loads(out.with_suffix(".json").read_text())["cells"]["erosion|10|64|0|weights"]["n"] == 1
