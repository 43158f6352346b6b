"""The Fashion-MNIST learned-optimizer table: driver + specs end to end on generated IDX files."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gradmeta.experiments.lopt.table import _markdown, _targets, ratio_interval
from gradmeta.lopt import step_reduction
from tests.data.conftest import write_idx

ROOT = Path(__file__).resolve().parents[3]
LABELS = ["DS", "DS + GradMetaNet", "UNF", "UNF + GradMetaNet"]
TINY = ["inner.batch_size=8", "outer.iterations=2", "outer.particles=2", "outer.truncation=2", "outer.horizon=4",
        "eval.steps=4", "eval.every=2", "eval.eval_every=2", "optimizer.hidden=8", "optimizer.examples=4",
        "checkpoint_every=1"]


def _fake_fashion(root: Path) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 48), ("t10k", 24)):
        write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), gz=True)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n).astype(np.uint8), gz=True)


@pytest.mark.slow  # eight meta-training subprocesses
def test_driver_meta_trains_every_row_and_writes_the_table(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import lopt_fmnist_table as driver

    data, runs, res = tmp_path / "fmnist", tmp_path / "runs", tmp_path / "results"
    _fake_fashion(data)
    table_set = [f'inner.data_root="{data}"', "inner.batch_size=8", "steps=10", "eval_every=5", "seeds=[1,2]",
                 "adam_lrs=[0.01,0.05]", "sgdm_lrs=[0.05,0.2]", "sgdm_momenta=[0.5,0.9]"]
    args = ["--meta-seeds", "0", "1", "--runs-root", str(runs), "--results", str(res), "--name", "t",
            *[a for o in [f'inner.data_root="{data}"', *TINY] for a in ("--set", o)],
            *[a for o in table_set for a in ("--table-set", o)]]
    assert driver.main(args) == 0
    m = json.loads((res / "t.json").read_text())
    s = m["summary"]
    assert s["task"] == "fashion_mnist8_mlp" and s["missing"] == [] and s["steps"] == 10
    assert set(s["rows"]) == {"Adam (tuned)", "SGDM (tuned)", *LABELS}
    for label in LABELS:
        assert s["rows"][label]["meta_seeds"] == [0, 1]
        assert s["rows"][label]["step_reduction"]["mean"] >= 0
    assert s["rows"]["Adam (tuned)"]["step_reduction"]["mean"] == 1.0  # the reference against itself
    assert s["rows"]["Adam (tuned)"]["best_test_loss"]["std_over"] == "evaluation seeds"
    assert s["rows"]["DS"]["best_test_loss"]["std_over"] == "meta-training seeds"
    assert set(s["targets"]["gmn_vs_base"]) == {"DS + GradMetaNet", "UNF + GradMetaNet"}
    assert len(m["meta_training_wall_s"]) == 8 and all(w > 0 for w in m["meta_training_wall_s"].values())
    # the step reductions are those of the recorded curves
    rows = {r["label"]: r for r in m["history"]["rows"]}
    steps = torch.tensor(m["history"]["curves"]["step"])
    assert steps.tolist() == [0, 5, 10]
    md = (res / "t.md").read_text()
    assert all(f"| {label} |" in md for label in LABELS) and (res / "t.png").stat().st_size > 0
    assert len(rows["DS"]["per_seed_step_reduction"]) == 2 and len(rows["DS"]["per_seed_step_reduction"][0]) == 2
    # a missing meta-training seed is listed and leaves the row to the others (evaluation only)
    assert driver.main([*args, "--skip-train", "--meta-seeds", "0", "1", "2", "--table-set", 'compare=["UNF"]',
                        "--table-set", 'compare_with=["DS"]']) == 0
    s2 = json.loads((res / "t.json").read_text())["summary"]
    (c,) = s2["targets"]["compared"]  # a ratio asked for by the spec, besides the "<X> + ..." ones
    assert (c["label"], c["base"], c["paired"]) == ("UNF", "DS", True)
    d, u = (s2["rows"][k]["step_reduction"]["mean"] for k in ("DS", "UNF"))
    assert c["ratio"] == pytest.approx(u / d if d > 0 else (float("inf") if u > 0 else float("nan")), nan_ok=True)
    assert len(s2["missing"]) == 4 and s2["rows"]["DS"]["meta_seeds"] == [0, 1]
    assert s2["rows"]["DS"]["step_reduction"] == s["rows"]["DS"]["step_reduction"]  # deterministic
    # the gated rows with their gates closed: "open" re-evaluates exactly the table's rules
    import lopt_gate_ablation

    assert lopt_gate_ablation.main(["--runs-root", str(runs), "--meta-seeds", "0", "1", "--results", str(res),
                                    "--name", "abl", *[a for o in table_set for a in ("--table-set", o)]]) == 0
    abl = json.loads((res / "abl.json").read_text())["rows"]
    assert set(abl) == set(LABELS) - {"DS"}  # every row with a branch is gated in the shipped specs
    for label in abl:
        per_seed = s["rows"][label]["step_reduction"]["per_meta_seed"]
        assert [abl[label][str(m)]["open"]["step_reduction"] for m in (0, 1)] == pytest.approx(per_seed, abs=1e-9)
        assert all(abl[label][str(m)]["closed"]["best_test_loss"] > 0 for m in (0, 1))


def test_targets_pair_each_gradmetanet_row_with_its_base():
    row = lambda label, v: {"label": label, "meta_seeds": [0], "step_reduction": {"mean": v}}  # noqa: E731
    t = _targets([row("Adam (tuned)", 1.0), row("DS", 1.0), row("DS + GradMetaNet", 1.3), row("UNF", 1.5),
                  row("UNF + GradMetaNet", 1.6)], gmn_ratio=1.2, best=1.6)
    assert t["gmn_vs_base"]["DS + GradMetaNet"]["met"] and t["gmn_vs_base"]["DS + GradMetaNet"]["ratio"] == pytest.approx(1.3)
    assert not t["gmn_vs_base"]["UNF + GradMetaNet"]["met"]
    assert t["best_row"] == {"label": "UNF + GradMetaNet", "step_reduction": 1.6, "target": 1.6, "met": True}


def test_a_gradmetanet_row_is_not_credited_when_both_rows_never_reach_adam():
    row = lambda label, v: {"label": label, "meta_seeds": [0], "step_reduction": {"mean": v}}  # noqa: E731
    t = _targets([row("DS", 0.0), row("DS + GradMetaNet", 0.0), row("UNF", 0.0), row("UNF + GradMetaNet", 0.5)],
                 gmn_ratio=1.2, best=1.6)
    g = t["gmn_vs_base"]["DS + GradMetaNet"]
    assert g["met"] is False and g["ratio"] != g["ratio"]  # NaN: no ratio of two zeros
    assert t["gmn_vs_base"]["UNF + GradMetaNet"] == {"ratio": float("inf"), "target": 1.2, "met": True}
    md = _markdown([{**row("DS", 0.0), **{k: {"mean": 0.1, "std": 0.0} for k in ("best_test_loss", "final_test_loss")},
                     "step_reduction": {"mean": 0.0, "std": 0.0}}], {"targets": t})
    assert "DS + GradMetaNet vs without GradMetaNet: undefined (both step reductions 0) (target ≥ 1.2×: not met)" in md


def _exact_bootstrap_quantiles(base, other, level):
    """The exact paired-bootstrap distribution of mean(other)/mean(base): every one of the n^n resamples."""
    import itertools

    n = len(base)
    ratios = sorted(sum(other[i] for i in idx) / sum(base[i] for i in idx)
                    for idx in itertools.product(range(n), repeat=n))
    lo_rank = int(np.floor((1 - level) / 2 * (len(ratios) - 1)))
    hi_rank = int(np.ceil((1 + level) / 2 * (len(ratios) - 1)))
    return ratios[lo_rank], ratios[hi_rank], ratios


def test_ratio_interval_matches_the_exact_bootstrap_of_three_seeds():
    base, other = [2.55, 2.08, 2.17], [2.27, 2.91, 1.65]
    # 27 equally likely resamples; 50 % interval: its ends are atoms of probability >= 1/27 each, so
    # 10,000 draws land on the exact quantiles (a miss would need a count off by > 10 std)
    lo, hi, atoms = _exact_bootstrap_quantiles(base, other, 0.5)
    assert ratio_interval(base, other, paired=True, level=0.5) == pytest.approx((lo, hi), abs=1e-12)
    # 95 %: the extreme atoms (each resample has probability 1/27 > 2.5 %)
    assert ratio_interval(base, other, paired=True) == pytest.approx((atoms[0], atoms[-1]), abs=1e-12)
    # unpaired with a base of no spread: the resamples of ``other`` alone, over the same constant
    lo_u, hi_u = ratio_interval([2.0, 2.0, 2.0], other, paired=False)
    assert (lo_u, hi_u) == pytest.approx((min(other) / 2.0, max(other) / 2.0), abs=1e-12)


def test_ratio_interval_collapses_without_spread_and_is_reproducible():
    assert ratio_interval([1.0, 2.0, 3.0], [1.5, 3.0, 4.5], paired=True) == pytest.approx((1.5, 1.5), abs=1e-12)
    a = ratio_interval([1.0, 2.0, 1.5, 0.7], [1.1, 1.9, 2.2, 0.4], paired=False)
    assert a == ratio_interval([1.0, 2.0, 1.5, 0.7], [1.1, 1.9, 2.2, 0.4], paired=False)
    assert a[0] < 1.4 / 1.3 < a[1]
    # a base of 0 on every seed: inf when the other row gains, no credit when neither does
    assert ratio_interval([0.0, 0.0], [0.0, 1.0], paired=True) == (0.0, float("inf"))
    assert ratio_interval([0.0, 0.0], [0.0, 0.0], paired=True) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same seeds"):
        ratio_interval([1.0, 2.0], [1.0], paired=True)
    with pytest.raises(ValueError, match="one figure per meta-training seed"):
        ratio_interval([], [1.0], paired=False)


def test_targets_give_a_paired_interval_when_both_rows_share_their_seeds():
    def row(label, per_seed, seeds=(0, 1, 2)):
        return {"label": label, "meta_seeds": list(seeds),
                "step_reduction": {"mean": float(np.mean(per_seed)), "per_meta_seed": per_seed}}
    t = _targets([row("DS", [2.55, 2.08, 2.17]), row("DS + GradMetaNet", [2.27, 2.91, 1.65]),
                  row("UNF", [1.0, 2.0, 3.0], seeds=(0, 1, 2)), row("UNF + GradMetaNet", [2.0, 2.0], seeds=(0, 1))],
                 gmn_ratio=1.2, best=1.6)
    ds, unf = t["gmn_vs_base"]["DS + GradMetaNet"], t["gmn_vs_base"]["UNF + GradMetaNet"]
    assert ds["paired"] is True and ds["interval_95"] == ratio_interval([2.55, 2.08, 2.17], [2.27, 2.91, 1.65], True)
    assert ds["interval_95"][0] < ds["ratio"] < ds["interval_95"][1]
    assert unf["paired"] is False  # different seeds: each row resampled on its own
    md = _markdown([], {"targets": t})
    assert "DS + GradMetaNet vs without GradMetaNet: 1.00×, 95 % bootstrap interval over meta-training seeds (paired)" in md
    # a "<X> + ..." row that is not a GradMetaNet row: its ratio and interval, no target
    t2 = _targets([row("DS", [2.55, 2.08, 2.17]), row("DS + gradient statistics", [2.27, 2.91, 1.65])],
                  gmn_ratio=1.2, best=1.6)
    assert t2["gmn_vs_base"] == {} and t2["vs_base"]["DS + gradient statistics"]["interval_95"] == ds["interval_95"]
    md2 = _markdown([], {"targets": t2})
    line = next(ln for ln in md2.splitlines() if ln.startswith("- DS + gradient statistics vs DS: 1.00×, 95 % bootstrap"))
    assert "target" not in line
    # one seed per row: no interval, as before
    one = _targets([row("DS", [1.0], (0,)), row("DS + GradMetaNet", [1.3], (0,))], gmn_ratio=1.2, best=1.6)
    assert "interval_95" not in one["gmn_vs_base"]["DS + GradMetaNet"]


def test_compare_reports_named_pairs_of_rows_without_a_target(tmp_path):
    def row(label, per_seed):
        return {"label": label, "meta_seeds": [0, 1, 2],
                "step_reduction": {"mean": float(np.mean(per_seed)), "per_meta_seed": per_seed}}
    rows = [row("DS, first stage", [2.0, 2.5, 1.5]), row("DS", [1.0, 2.0, 1.5]), row("DS + GradMetaNet", [2.2, 2.4, 1.4])]
    t = _targets(rows, gmn_ratio=1.2, best=1.6, compare=[("DS + GradMetaNet", "DS, first stage"), ("DS", "missing")])
    (c,) = t["compared"]  # a pair naming a row that is not in the table is left out
    assert c == {"label": "DS + GradMetaNet", "base": "DS, first stage", "ratio": pytest.approx(6.0 / 6.0),
                 "paired": True, "interval_95": ratio_interval([2.0, 2.5, 1.5], [2.2, 2.4, 1.4], True)}
    assert t["gmn_vs_base"]["DS + GradMetaNet"]["ratio"] == pytest.approx(6.0 / 4.5)  # still against "DS"
    md = _markdown([], {"targets": t})
    line = next(ln for ln in md.splitlines() if ln.startswith("- DS + GradMetaNet vs DS, first stage: 1.00×, 95 %"))
    assert "target" not in line
    import gradmeta.run as gr
    from gradmeta.specs import SpecError

    spec = tmp_path / "t.toml"
    for extra, match in (('compare = ["DS"]\ncompare_with = ["UNF", "DS"]', "one base label per compared row"),
                         ('compare = ["DS"]\ncompare_with = ["UNF"]', "names no row label: 'UNF'")):
        spec.write_text(f'task = "lopt_table"\nrows = ["a", "b"]\nlabels = ["DS", "DS + GradMetaNet"]\n{extra}\n')
        with pytest.raises(SpecError, match=match):
            gr.run_spec(spec, tmp_path / "out", progress=False, overwrite=True)


def test_step_reduction_of_the_reference_is_one_and_of_a_slower_curve_below():
    steps = torch.tensor([0, 5, 10, 15])
    ref = torch.tensor([[2.0, 1.0, 0.5, 0.6]])
    assert step_reduction(ref, ref, steps).item() == 1.0
    assert step_reduction(ref, torch.tensor([[2.0, 1.5, 0.9, 0.5]]), steps).item() == pytest.approx(10 / 15)


@pytest.mark.parametrize("table, stem, rows", [
    ("lopt_fmnist_table", "lopt_fmnist_table", ["lopt_fmnist", "lopt_fmnist_gmn", "lopt_fmnist_weightspace",
                                                 "lopt_fmnist_weightspace_gmn"]),
    ("lopt_digits_table", "lopt_digits_table", [f"lopt_digits_table_{r}" for r in ("ds", "gmn", "weightspace",
                                                                                    "weightspace_gmn")]),
    ("lopt_char_lm_table", "lopt_char_lm_table", [f"lopt_char_lm_table_{r}" for r in ("ds", "gmn", "weightspace",
                                                                                      "weightspace_gmn")])])
def test_driver_takes_rows_runs_root_and_name_from_the_table_spec(table, stem, rows):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from lopt_table import table_defaults

    d = table_defaults(ROOT / "tasks" / f"{table}.toml", [])
    assert d["rows"] == [ROOT / "tasks" / f"{r}.toml" for r in rows]
    assert d["runs_root"] == ROOT / "runs" / stem and d["name"] == stem
    assert table_defaults(ROOT / "tasks" / f"{table}.toml", ['runs_root="elsewhere"'])["runs_root"] == ROOT / "elsewhere"


def test_driver_refuses_a_table_without_row_specs_or_of_another_task(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from lopt_table import table_defaults

    spec = tmp_path / "t.toml"
    spec.write_text('task = "lopt_table"\nrows = ["nowhere"]\nlabels = ["X"]\n')
    with pytest.raises(ValueError, match=r"t\.toml: no meta-training spec for rows .*nowhere\.toml"):
        table_defaults(spec, [])
    with pytest.raises(ValueError, match="rows is empty"):
        table_defaults(spec, ['rows=[""]'])
    with pytest.raises(ValueError, match="not 'lopt_table'"):
        table_defaults(ROOT / "tasks" / "lopt_fmnist.toml", [])


def test_closing_the_gates_of_a_branch_rule_gives_the_per_parameter_rule_of_its_mlp_part():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from lopt_gate_ablation import closed_rule

    from gradmeta.lopt import GradMetaNetLO, PerParamMLP, make_task

    task = make_task("digits", hidden=[8], batch_size=16)
    lo = GradMetaNetLO(task, gmn_channels=2, hidden=8, lr=0.05, examples=4, layers=1, extra_gate=True)
    gen = torch.Generator().manual_seed(0)
    meta = {k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in lo.init_meta(1).items()}
    plain, plain_meta = closed_rule(lo, meta)
    assert isinstance(plain, PerParamMLP) and plain.lr == 0.05 and set(plain_meta) == set(plain.init_meta(0))
    params = task.init(0)
    batch = tuple(b[0] for b in task.batches(torch.Generator().manual_seed(0), 1))
    shut = {**meta, "mlp.extra_gate": torch.zeros(2 * 2)}
    want, opened = (lo.step(task, m, params, lo.init(params), batch)[0] for m in (shut, meta))
    got = plain.step(task, plain_meta, params, plain.init(params), batch)[0]
    for k in params:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(got[k], opened[k]) for k in params)


@pytest.mark.parametrize("table", ["lopt_fmnist_table", "lopt_digits_table", "lopt_char_lm_table"])
def test_every_row_of_a_table_shares_its_inner_task_and_meta_training_budget(table):
    """The rows differ only in [optimizer]; the table evaluates on the rows' inner task."""
    from gradmeta.specs import load_spec, resolve_spec

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from lopt_table import table_defaults

    t = ROOT / "tasks" / f"{table}.toml"
    specs = [resolve_spec(load_spec(r), r) for r in table_defaults(t, [])["rows"]]
    tab = resolve_spec(load_spec(t), t)
    for s in specs:
        assert s["task"] == "lopt_meta_train" and s["inner"] == specs[0]["inner"] == tab["inner"]
        assert s["outer"] == specs[0]["outer"] and s["eval"] == specs[0]["eval"]
    assert [s["optimizer"]["kind"] for s in specs] == ["per_param_mlp", "gradmetanet", "weightspace", "gradmetanet"]
    assert [s["optimizer"]["weight_aware"] for s in specs] == [False, False, False, True]
    fmnist = ROOT / "tasks" / "lopt_fmnist.toml"
    if table == "lopt_digits_table":  # the Fashion-MNIST budget, on another inner task
        assert specs[0]["outer"] == resolve_spec(load_spec(fmnist), fmnist)["outer"]


@pytest.mark.parametrize("table,branches", [("lopt_fmnist_table_two_stage", 5), ("lopt_fmnist_table_two_stage_tbptt", 4),
                                            ("lopt_fmnist_table_two_stage_tbptt_unf", 4), ("lopt_fmnist_table_two_stage_tbptt_unf8", 2)])
def test_the_two_stage_table_gives_every_row_the_same_total_budget(table, branches):
    """Each branch row starts from the first-stage DS run of its seed in the table's runs_root, trains
    only its branch, and first stage + branch stage = the iterations of the DS row it is held against;
    the rows differ from the first stage in nothing else of [outer] than their method."""
    from gradmeta.specs import load_spec, resolve_spec

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from lopt_table import table_defaults

    t = ROOT / "tasks" / f"{table}.toml"
    d = table_defaults(t, [])
    tab = resolve_spec(load_spec(t), t)
    specs = {r.stem: resolve_spec(load_spec(r), r) for r in d["rows"]}
    first, twice = specs.pop("lopt_fmnist_stage1"), specs.pop("lopt_fmnist_twice")
    same = lambda a, b: {k: v for k, v in a.items() if k not in ("iterations", "train", "method")} == \
        {k: v for k, v in b.items() if k not in ("iterations", "train", "method")}  # noqa: E731
    assert same(first["outer"], twice["outer"]) and first["optimizer"] == twice["optimizer"]
    assert len(specs) == branches
    for stem, s in specs.items():
        assert s["inner"] == first["inner"] == tab["inner"] and s["eval"] == first["eval"], stem
        assert s["optimizer"]["start_from"] == f"{tab['runs_root']}/lopt_fmnist_stage1_s{{seed}}", stem
        assert s["outer"]["train"] == "branch" and same(s["outer"], first["outer"]), stem
        assert s["outer"]["method"] == ("tbptt" if stem.endswith("_tbptt") else "pes"), stem
        assert first["outer"]["iterations"] + s["outer"]["iterations"] == twice["outer"]["iterations"], stem
        assert all(s["optimizer"][k] == first["optimizer"][k] for k in ("hidden", "lr", "step_mult", "max_update"))
