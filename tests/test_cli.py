"""The ``gradmeta`` command, run folders (spec, metrics, plots, checkpoints, resume) and the
``gradients_digits`` task, run on a tiny spec through ``gradmeta.cli.main``."""
from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import gradmeta as gm
from gradmeta import cli
from gradmeta.experiments.grads import gradient_statistics
from gradmeta.models import classification_loss, mlp
from gradmeta._io import atomic_write
from gradmeta.specs import dump_toml, load_spec, resolve_spec, tomllib
from tests.conftest import write_spec as _write_spec

TINY = """\
task = "gradients_digits"
seed = 3

[model]
widths = [64, 16, 10]

[train]
steps = 40
batch_size = 32
lr = 0.01
eval_every = 10
checkpoint_every = 10

[collect]
every = 10
batch_size = 32
"""


def write_spec(tmp_path: Path, text: str = TINY, name: str = "tiny.toml") -> Path:
    return _write_spec(tmp_path, text, name)


def gm_run(*args) -> int:
    return cli.main(["run", *map(str, args), "--no-progress"])


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """The tiny spec run to the end once (shared by the tests that only read it)."""
    tmp = tmp_path_factory.mktemp("full")
    out = tmp / "run"
    assert gm_run(write_spec(tmp), "--out", out) == 0
    return out


def test_run_writes_sane_metrics_plot_and_resolved_spec(full_run):
    m = metrics(full_run)
    assert (m["task"], m["status"], m["step"], m["total_steps"]) == ("gradients_digits", "complete", 40, 40)
    ev, gr, tr = m["history"]["eval"], m["history"]["gradients"], m["history"]["train"]
    assert ev["step"] == [0, 10, 20, 30, 40] and gr["step"] == [0, 10, 20, 30, 40]
    assert tr["step"] == list(range(1, 41))
    for group in m["history"].values():
        for name, values in group.items():
            if name != "noise_scale":  # None where the unbiased ‖G‖² estimate is not positive
                assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in values), name
    assert ev["train_loss"][-1] < 0.5 * ev["train_loss"][0]
    assert ev["test_loss"][-1] < ev["test_loss"][0]
    assert sum(tr["batch_loss"][-10:]) < sum(tr["batch_loss"][:10])
    assert ev["test_acc"][-1] > 0.5  # chance is 0.1
    assert {"grad_norm/0", "grad_norm/2", "mean_grad_norm/2", "noise_scale_biased", "fisher_q0.5"} <= set(gr)
    assert all(q <= r for q, r in zip(gr["fisher_q0.5"], gr["fisher_q0.9"]))
    assert m["plots"] == ["gradients.png"]
    assert (full_run / "gradients.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the resolved spec is a complete, valid spec: defaults filled in, user values kept
    resolved = load_spec(full_run / "spec.resolved.toml")
    assert resolved == resolve_spec(resolved)
    assert resolved["train"]["optimizer"] == "adam" and resolved["seed"] == 3
    assert resolved["train"]["lr"] == 0.01 and resolved["collect"]["quantiles"][-1] == 1.0
    record = json.loads((full_run / "run.json").read_text())
    assert record["environment"]["torch"] == torch.__version__
    assert [i["start_step"] for i in record["invocations"]] == [0]
    assert not list(full_run.glob(".*tmp*"))  # atomic writes leave no temporary files


def test_resume_continues_from_checkpoint(tmp_path, full_run):
    spec, out = write_spec(tmp_path), tmp_path / "run"
    assert gm_run(spec, "--out", out, "--max-steps", 20) == 0
    m = metrics(out)
    assert (m["status"], m["step"]) == ("stopped", 20)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 20
    assert gm_run(spec, "--out", out, "--resume") == 0
    m = metrics(out)
    assert (m["status"], m["step"]) == ("complete", 40)
    record = json.loads((out / "run.json").read_text())
    assert [(i["start_step"], i["end_step"]) for i in record["invocations"]] == [(0, 20), (20, 40)]
    assert m["history"]["train"]["step"] == list(range(1, 41))  # continued, not restarted
    # stopping and resuming changes nothing: same data order, optimizer state and results
    assert m["history"] == metrics(full_run)["history"]


def test_resume_after_keyboard_interrupt(tmp_path, full_run, monkeypatch, capsys):
    import gradmeta.experiments.grads.gradients as task

    calls = []

    def interrupted(*args, **kwargs):  # Ctrl-C during the 4th collection (step 30)
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return gm.collect_gradients(*args, **kwargs)

    spec, out = write_spec(tmp_path), tmp_path / "run"
    monkeypatch.setattr(task, "collect_gradients", interrupted)
    assert gm_run(spec, "--out", out) == 130
    assert "--resume" in capsys.readouterr().err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 20
    monkeypatch.undo()
    assert gm_run(spec, "--out", out, "--resume") == 0
    record = json.loads((out / "run.json").read_text())
    assert [i["start_step"] for i in record["invocations"]] == [20]
    assert metrics(out)["history"] == metrics(full_run)["history"]


def test_resume_refuses_changed_spec(tmp_path, capsys):
    spec, out = write_spec(tmp_path), tmp_path / "run"
    assert gm_run(spec, "--out", out, "--max-steps", 10) == 0
    write_spec(tmp_path, TINY.replace("lr = 0.01", "lr = 0.02"))
    assert gm_run(spec, "--out", out, "--resume") == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "train.lr: 0.01 -> 0.02" in err and str(spec) in err
    assert metrics(out)["step"] == 10  # untouched


def test_existing_run_needs_resume_or_overwrite(tmp_path, capsys):
    spec, out = write_spec(tmp_path, TINY.replace("steps = 40", "steps = 5")), tmp_path / "run"
    assert gm_run(spec, "--out", out) == 0
    assert gm_run(spec, "--out", out) == 2
    assert "--resume" in capsys.readouterr().err
    assert gm_run(spec, "--out", out, "--overwrite") == 0
    assert len(json.loads((out / "run.json").read_text())["invocations"]) == 1


def test_default_out_dir_is_runs_spec_stem(tmp_path, monkeypatch):
    spec = write_spec(tmp_path, TINY.replace("steps = 40", "steps = 3"), name="mini.toml")
    monkeypatch.chdir(tmp_path)
    assert gm_run(spec) == 0
    assert metrics(tmp_path / "runs" / "mini")["status"] == "complete"


@pytest.mark.parametrize("text, expected", [
    ('task = "gradients_digit"\n', ["unknown task 'gradients_digit'", "did you mean 'gradients_digits'"]),
    ("seed = 1\n", ["missing required key 'task'"]),
    (TINY.replace("steps = 40\n", ""), ["missing required key 'train.steps'"]),
    (TINY.replace("steps = 40", "stpes = 40"), ["unknown key 'train.stpes'", "did you mean 'train.steps'"]),
    (TINY.replace("steps = 40", 'steps = "many"'), ["train.steps = 'many' must be an integer"]),
    (TINY.replace("lr = 0.01", "lr = true"), ["train.lr = True must be a number"]),
    (TINY + '\n[data]\nsplit_seed = 1.5\n', ["data.split_seed = 1.5 must be an integer"]),
    (TINY.replace("widths = [64, 16, 10]", "widths = [64, 16, 3]"), ["model.widths", "end with 10"]),
    (TINY.replace("widths = [64, 16, 10]", "widths = [64, 16.5, 10]"), ["model.widths[1] = 16.5"]),
    (TINY.replace("[model]", '[model]\nactivation = "swish"'), ["model.activation = 'swish'", "'relu'"]),
    (TINY.replace("lr = 0.01", "lr = 0.01 0.02"), ["invalid TOML"]),
])
def test_spec_errors_name_file_and_key(tmp_path, capsys, text, expected):
    spec = write_spec(tmp_path, text)
    assert gm_run(spec, "--out", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert str(spec) in err
    for fragment in expected:
        assert fragment in err


def test_missing_spec_file(tmp_path, capsys):
    assert gm_run(tmp_path / "nope.toml") == 2
    assert "nope.toml does not exist" in capsys.readouterr().err


def test_report(full_run, tmp_path, capsys):
    assert cli.main(["report", str(full_run)]) == 0
    out = capsys.readouterr().out
    assert "gradients_digits, complete, step 40/40" in out
    for fragment in ("test_acc", "noise_scale", "history: gradients", "fisher_q0.99", str(full_run / "gradients.png")):
        assert fragment in out
    assert "(missing)" not in out
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "metrics.json does not exist" in capsys.readouterr().err


def test_tasks_lists_registered_tasks(capsys):
    assert cli.main(["tasks"]) == 0
    assert "gradients_digits" in capsys.readouterr().out


def test_demo_spec_resolves():
    spec = Path(__file__).parents[1] / "tasks" / "gradients_digits.toml"
    resolved = resolve_spec(load_spec(spec), spec)
    assert resolved["task"] == "gradients_digits" and resolved["train"]["steps"] > 0


def test_gradient_statistics_match_materialised_gradients():
    torch.manual_seed(0)
    model = mlp([6, 5, 4, 3]).double()
    X, y = torch.randn(9, 6, dtype=torch.float64), torch.randint(3, (9,))
    gs = gm.collect_gradients(model, classification_loss, X, y)
    q = [0.0, 0.3, 0.5, 1.0]
    stats = gradient_statistics(gs, q)
    # reference: per-example gradients from a naive loop over examples
    names = [n for n, _ in model.named_parameters()]
    rows = []
    for b in range(9):
        model.zero_grad()
        classification_loss(model(X[b:b + 1]), y[b:b + 1]).sum().backward()
        rows.append({n: p.grad.clone() for n, p in model.named_parameters()})
    flat = torch.stack([torch.cat([r[n].flatten() for n in names]) for r in rows])  # (B, P)
    for layer in ("0", "2", "4"):
        cols = torch.cat([rows[0][n].flatten() * 0 + (1 if n.startswith(layer + ".") else 0) for n in names]).bool()
        g = flat[:, cols]
        assert stats[f"grad_norm/{layer}"] == pytest.approx(g.norm(dim=1).mean().item(), rel=1e-10)
        assert stats[f"mean_grad_norm/{layer}"] == pytest.approx(g.mean(0).norm().item(), rel=1e-10)
    trace_cov = torch.cov(flat.T).trace().item()  # unbiased covariance
    mean_sq = flat.mean(0).square().sum().item()
    assert stats["trace_cov"] == pytest.approx(trace_cov, rel=1e-10)
    assert stats["noise_scale_biased"] == pytest.approx(trace_cov / mean_sq, rel=1e-10)
    assert stats["grad_sq_unbiased"] == pytest.approx(mean_sq - trace_cov / 9, rel=1e-10)
    fisher = flat.square().mean(0)
    assert stats["fisher_trace"] == pytest.approx(fisher.sum().item(), rel=1e-10)
    for level in q:
        assert stats[f"fisher_q{level:g}"] == pytest.approx(torch.quantile(fisher, level).item(), rel=1e-10, abs=1e-300)


def test_toml_roundtrip():
    spec = {"task": "x", "a": 1, "f": 1e-5, "big": float("inf"), "s": 'say "hi"\n\\', "b": False,
            "l": [1.5, 2.0], "t": {"k": [1, 2], "u": {"deep key": "v"}}}
    assert tomllib.loads(dump_toml(spec)) == spec


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write(path, lambda f: f.write("old"), mode="w")

    def boom(f):
        f.write("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_write(path, boom, mode="w")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_subcommand_plugins(tmp_path, monkeypatch, capsys):
    (tmp_path / "gm_test_plugin.py").write_text(textwrap.dedent("""
        def add_parser(subparsers):
            p = subparsers.add_parser("hello")
            p.add_argument("--name", default="world")
            p.set_defaults(func=lambda args: print("hello", args.name))
    """))
    (tmp_path / "gm_test_broken.py").write_text("import gm_no_such_dependency_xyz\n")
    # An installed distribution declaring the subcommand in the ``gradmeta.commands`` entry-point group.
    dist = tmp_path / "gm_test_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: gm-test-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[gradmeta.commands]\nhello = gm_test_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli.main(["hello", "--name", "gm"]) == 0
    assert capsys.readouterr().out == "hello gm\n"
    (dist / "entry_points.txt").write_text("[gradmeta.commands]\nbroken = gm_test_broken\n")
    with pytest.raises(ModuleNotFoundError, match="gm_no_such_dependency_xyz"):
        cli.main(["tasks"])
    monkeypatch.delitem(sys.modules, "gm_test_plugin", raising=False)
