"""``gradmeta run`` for lopt from the command line: every outer method × backend, a user task
through ``[inner] factory``, the validation objective, and numeric ranges (exit status 2)."""
import json

import pytest
import torch

from gradmeta.cli import main

SPEC = """task = "lopt_meta_train"
checkpoint_every = 1
[inner]
hidden = [4]
batch_size = 8
valid_fraction = 0.2
[optimizer]
hidden = 4
[outer]
iterations = 2
particles = 2
truncation = 2
horizon = 4
[eval]
every = 2
steps = 4
eval_every = 2
seeds = [1000]
"""


def _run(tmp_path, name, *sets, spec=SPEC):
    path = tmp_path / f"{name}.toml"
    path.write_text(spec)
    args = ["run", str(path), "--out", str(tmp_path / name), "--no-progress"]
    for s in sets:
        args += ["--set", s]
    return main(args)


@pytest.mark.parametrize("method", ["pes", "es", "tbptt"])
@pytest.mark.parametrize("backend", ["func", "higher"])
def test_every_outer_method_and_backend_from_the_cli(tmp_path, method, backend):
    name = f"{method}_{backend}"
    assert _run(tmp_path, name, f'outer.method="{method}"', f'outer.backend="{backend}"',
                'outer.objective="valid"') == 0
    m = json.loads((tmp_path / name / "metrics.json").read_text())
    assert m["status"] == "complete" and len(m["history"]["meta"]["meta_loss"]) == 2
    assert all(v == v for v in m["history"]["meta"]["meta_loss"])  # finite, not NaN
    assert (tmp_path / name / "learned_optimizer.pt").is_file()


def test_user_task_factory_through_meta_training_and_evaluation(tmp_path, capsys):
    spec = SPEC.replace("[inner]\n", '[inner]\nfactory = "tests.lopt.user_tasks:make_wine_task"\n')
    assert _run(tmp_path, "wine", 'outer.objective="valid"', spec=spec) == 0
    m = json.loads((tmp_path / "wine" / "metrics.json").read_text())
    assert m["status"] == "complete" and len(m["history"]["eval"]["final_test_loss"]) == 2
    ckpt = tmp_path / "wine" / "learned_optimizer.pt"
    assert torch.load(ckpt, weights_only=True)["info"]["task"] == "wine_mlp"
    ev = ('task = "lopt_eval"\nseeds = [1, 2]\nsteps = 6\neval_every = 3\nadam_lrs = [0.01]\nsgdm_lrs = [0.1]\n'
          '[inner]\nfactory = "tests.lopt.user_tasks:make_wine_task"\n[timing]\nrepeats = 3\n')
    assert _run(tmp_path, "wine_eval", f'checkpoint="{ckpt}"', spec=ev) == 0
    s = json.loads((tmp_path / "wine_eval" / "metrics.json").read_text())["summary"]
    for name in ("learned", "adam", "sgdm"):  # best AND final test loss, so late divergence is visible
        assert s[f"{name}_final_test_loss_mean"] >= s[f"{name}_best_test_loss_mean"] > 0
    assert s["timing_batch_size"] == 32 and s["step_time_ratio_vs_adam"] > 0
    bad = spec.replace("make_wine_task", "not_a_task")
    assert _run(tmp_path, "bad_factory", spec=bad) == 2
    assert "inner.factory" in capsys.readouterr().err


@pytest.mark.parametrize("override,culprit", [
    ("outer.sigma=0", "outer.sigma"), ("inner.batch_size=0", "inner.batch_size"),
    ("optimizer.lr=-0.1", "optimizer.lr"), ("eval.seeds=[]", "eval.seeds"), ("outer.particles=0", "outer.particles"),
    ("inner.valid_fraction=1.0", "inner.valid_fraction"),
    ('optimizer.gmn_neuron_attention="linear"', "optimizer.gmn_neuron_attention"),  # the spec's kind has none
])
def test_out_of_range_values_exit_2_naming_the_key(tmp_path, capsys, override, culprit):
    assert _run(tmp_path, "bad", override) == 2
    assert culprit in capsys.readouterr().err


def test_validation_objective_without_a_validation_split_exits_2(tmp_path, capsys):
    assert _run(tmp_path, "noval", "inner.valid_fraction=0.0", 'outer.objective="valid"') == 2
    assert "outer.objective" in capsys.readouterr().err
