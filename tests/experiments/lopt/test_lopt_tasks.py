"""``gradmeta run`` tasks: meta-training resumed after SIGKILL equals an uninterrupted run; evaluation."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import gradmeta.run as gr
from gradmeta.specs import SpecError

ROOT = Path(__file__).resolve().parents[3]
SPEC = """task = "lopt_meta_train"
seed = 3
threads = 1
checkpoint_every = 1
[inner]
hidden = [8]
batch_size = 16
[optimizer]
hidden = 8
[outer]
iterations = {iterations}
particles = 4
truncation = 3
horizon = 9
log_loss = true
[eval]
every = 4
steps = 10
eval_every = 5
seeds = [1000]
"""
CLI = "import sys; from gradmeta.cli import main; sys.exit(main(sys.argv[1:]))"


def _ckpt_step(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["step"])
    except Exception:  # not there yet
        return -1


@pytest.mark.slow  # a killed subprocess and three runs
def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    spec = tmp_path / "lopt.toml"
    spec.write_text(SPEC.format(iterations=14))
    full = gr.run_spec(spec, tmp_path / "full", progress=False)

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", CLI, "run", str(spec), "--out", str(out), "--no-progress"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while _ckpt_step(out / "checkpoint.pt") < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _ckpt_step(out / "checkpoint.pt")
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()[-2000:]
    assert 3 <= killed_at < 14, killed_at
    assert not (out / "learned_optimizer.pt").exists()

    gr.run_spec(spec, out, resume=True, progress=False)
    a = torch.load(full / "learned_optimizer.pt", weights_only=True)
    b = torch.load(out / "learned_optimizer.pt", weights_only=True)
    assert a["meta"].keys() == b["meta"].keys()
    for k in a["meta"]:
        assert torch.equal(a["meta"][k], b["meta"][k]), k
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (full, out))
    assert ma["history"] == mb["history"] and ma["status"] == mb["status"] == "complete"
    run = json.loads((out / "run.json").read_text())
    assert [i["start_step"] for i in run["invocations"]] == [killed_at]
    for plot in ma["plots"]:
        assert (out / plot).is_file()

    # evaluate the trained checkpoint against tuned Adam / SGDM on held-out seeds
    ev = tmp_path / "eval.toml"
    ev.write_text(f'task = "lopt_eval"\ncheckpoint = "{out / "learned_optimizer.pt"}"\nseeds = [1, 2]\nsteps = 20\n'
                  'eval_every = 5\nadam_lrs = [0.001, 0.01]\nsgdm_lrs = [0.1]\n[inner]\nhidden = [8]\nbatch_size = 16\n'
                  '[timing]\nbatch_size = 32\nrepeats = 5\n')
    m = json.loads((gr.run_spec(ev, tmp_path / "eval", progress=False) / "metrics.json").read_text())
    s = m["summary"]
    assert s["adam_lr"] in (0.001, 0.01) and s["sgdm_lr"] == 0.1 and s["seeds"] == 2
    assert s["adam_step_reduction_mean"] == pytest.approx(1.0)  # Adam against itself
    assert s["learned_step_reduction_mean"] >= 0 and s["step_time_ratio_vs_adam"] > 0
    assert len(m["history"]["per_seed"]["learned_step_reduction"]) == 2
    assert (tmp_path / "eval" / "evaluation.png").is_file()


def test_meta_train_the_gradmetanet_branch_on_validation_loss(tmp_path):
    spec = tmp_path / "gmn.toml"
    spec.write_text(SPEC.format(iterations=2).replace("[optimizer]\nhidden = 8", '[optimizer]\nhidden = 8\nkind = "gradmetanet++"'
                                                      '\ngmn_channels = 2\nexamples = 8\ngmn_layers = 1')
                    .replace("batch_size = 16", "batch_size = 16\nvalid_fraction = 0.2")
                    .replace("log_loss = true", 'log_loss = true\nobjective = "valid"'))
    out = gr.run_spec(spec, tmp_path / "gmn", progress=False)
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "complete" and len(m["history"]["meta"]["meta_loss"]) == 2
    meta = torch.load(out / "checkpoint.pt", weights_only=True)["state"]["meta"]
    assert any(k.startswith("gmn.") for k in meta)
    from gradmeta.lopt import GradMetaNetLO, load_checkpoint, make_task

    wider = make_task("digits", hidden=[12], batch_size=16)
    lo, saved = load_checkpoint(out / "learned_optimizer.pt", model=wider.model)  # another hidden width
    assert isinstance(lo, GradMetaNetLO) and lo.examples == 8 and lo.config()["variant"] == "plusplus"
    assert all(torch.equal(saved[k], meta[k]) for k in meta)
    ev = tmp_path / "eval.toml"
    ev.write_text(f'task = "lopt_eval"\ncheckpoint = "{out / "learned_optimizer.pt"}"\nseeds = [1]\nsteps = 4\n'
                  "eval_every = 2\nadam_lrs = [0.01]\nsgdm_lrs = [0.1]\n[inner]\nhidden = [12]\nbatch_size = 16\n")
    s = json.loads((gr.run_spec(ev, tmp_path / "eval", progress=False) / "metrics.json").read_text())["summary"]
    assert s["learned_best_test_loss_mean"] > 0 and "step_time_ratio_vs_adam" not in s


def test_meta_train_the_weight_space_lo_and_evaluate_its_run_folder(tmp_path):
    spec = tmp_path / "ws.toml"
    spec.write_text(SPEC.format(iterations=2).replace("[optimizer]\nhidden = 8",
                                                      '[optimizer]\nhidden = 8\nkind = "weightspace"\ngmn_channels = 2'))
    out = gr.run_spec(spec, tmp_path / "ws", progress=False)
    meta = torch.load(out / "checkpoint.pt", weights_only=True)["state"]["meta"]
    assert any(k.startswith("ws.") for k in meta)
    ev = tmp_path / "eval.toml"
    ev.write_text(f'task = "lopt_eval"\nrun = "{out}"\nseeds = [1, 2]\nsteps = 10\neval_every = 5\n'
                  "adam_lrs = [0.01]\nsgdm_lrs = [0.1]\n[inner]\nhidden = [8]\nbatch_size = 16\n")
    res = gr.run_spec(ev, tmp_path / "eval", progress=False)
    s = json.loads((res / "metrics.json").read_text())["summary"]
    assert s["seeds"] == 2 and s["learned_best_test_loss_mean"] > 0 and "step_time_ratio_vs_adam" not in s
    bad = tmp_path / "bad.toml"
    bad.write_text(ev.read_text().replace(str(out), str(tmp_path / "missing")))
    with pytest.raises(FileNotFoundError, match="not a lopt_meta_train run folder"):
        gr.run_spec(bad, tmp_path / "bad", progress=False)


def test_gated_branch_from_a_spec_meta_trains_and_its_run_folder_rebuilds_it(tmp_path):
    from gradmeta.experiments.lopt.tasks import _from_run, _make_lo
    from gradmeta.lopt import PerParamMLP, make_task
    from gradmeta.specs import load_spec, resolve_spec

    spec = tmp_path / "gate.toml"
    spec.write_text(SPEC.format(iterations=2).replace("[optimizer]\nhidden = 8", '[optimizer]\nhidden = 8\nkind = '
                                                      '"gradmetanet"\ngmn_channels = 2\nexamples = 4\ngmn_layers = 1'
                                                      '\nextra_gate = true'))
    out = gr.run_spec(spec, tmp_path / "gate", progress=False)
    meta = torch.load(out / "checkpoint.pt", weights_only=True)["state"]["meta"]
    assert meta["mlp.extra_gate"].shape == (4,) and meta["mlp.w0_extra"].shape == (4, 8)
    assert meta["mlp.w0"].shape == (PerParamMLP.n_base_features, 8)
    assert meta["mlp.extra_gate"].abs().max() > 0  # meta-trained off its zero start
    task = make_task("digits", hidden=[8], batch_size=16)
    lo, saved = _from_run(str(out), task)
    assert lo.base.extra_gate and set(saved) == set(meta) == set(lo.init_meta(0))
    old = {k: v for k, v in resolve_spec(load_spec(spec), spec)["optimizer"].items() if k != "extra_gate"}
    ungated = _make_lo(task, old)  # a run folder written before the key
    assert not ungated.base.extra_gate and "mlp.extra_gate" not in ungated.init_meta(0)


def test_branch_lr_scale_names_the_branch_and_gates_only():
    from gradmeta.experiments.lopt.tasks import _branch_lr_scales
    from gradmeta.lopt import GradMetaNetLO, PerParamMLP, WeightSpaceLO, make_task

    task = make_task("digits", hidden=[8], batch_size=16)
    assert _branch_lr_scales(PerParamMLP(), 0.3, 0) is None  # no branch: nothing to scale
    assert _branch_lr_scales(GradMetaNetLO(task, layers=1), 1.0, 0) is None
    assert _branch_lr_scales(GradMetaNetLO(task, layers=1), 0.3, 0) == {"gmn.": 0.3}
    assert _branch_lr_scales(WeightSpaceLO(task, extra_gate=True), 0.3, 0) == {
        "ws.": 0.3, "mlp.w0_extra": 0.3, "mlp.extra_gate": 0.3}


def test_a_branch_meta_trained_on_top_of_a_per_parameter_run(tmp_path):
    ds_spec = tmp_path / "ds.toml"
    ds_spec.write_text(SPEC.format(iterations=3).replace("seed = 3", "seed = 5"))
    ds = gr.run_spec(ds_spec, tmp_path / "ds_s5", progress=False)
    ds_meta = torch.load(ds / "checkpoint.pt", weights_only=True)["state"]["meta"]
    branch = SPEC.format(iterations=2).replace("seed = 3", "seed = 5").replace(
        "[optimizer]\nhidden = 8", '[optimizer]\nhidden = 8\nkind = "gradmetanet"\ngmn_channels = 2\nexamples = 4\n'
        f'gmn_layers = 1\nextra_gate = true\nstart_from = "{tmp_path}/ds_s{{seed}}"')
    spec = tmp_path / "on_ds.toml"
    spec.write_text(branch.replace("[outer]", '[outer]\ntrain = "branch"'))
    out = gr.run_spec(spec, tmp_path / "on_ds", progress=False)
    meta = torch.load(out / "checkpoint.pt", weights_only=True)["state"]["meta"]
    for k, v in ds_meta.items():  # the per-parameter part is the DS run's, held fixed
        assert torch.equal(meta[f"mlp.{k}"], v), k
    assert meta["mlp.extra_gate"].abs().max() > 0  # the gates and the branch were meta-trained
    m, m_ds = (json.loads((d / "metrics.json").read_text())["history"]["eval"] for d in (out, ds))
    # with its gates closed, the rule it starts from steps as the DS run's last rule
    assert m["final_test_loss"][0] == pytest.approx(m_ds["final_test_loss"][-1], rel=1e-5)

    # the branch stage by truncated backpropagation: exact meta-gradients through the gradient-set capture
    spec.write_text(branch.replace("[outer]", '[outer]\ntrain = "branch"\nmethod = "tbptt"'))
    out = gr.run_spec(spec, tmp_path / "on_ds_tbptt", progress=False)
    meta = torch.load(out / "checkpoint.pt", weights_only=True)["state"]["meta"]
    for k, v in ds_meta.items():
        assert torch.equal(meta[f"mlp.{k}"], v), k
    assert meta["mlp.extra_gate"].abs().max() > 0

    spec.write_text(branch)  # train = "all" (the default): the per-parameter part moves too
    out = gr.run_spec(spec, tmp_path / "all", progress=False)
    meta = torch.load(out / "checkpoint.pt", weights_only=True)["state"]["meta"]
    assert not torch.equal(meta["mlp.w1"], ds_meta["w1"])

    for text, match in ((branch.replace("hidden = 8\nkind", "hidden = 6\nkind"), "hidden 8 there, 6 here"),
                        (branch.replace("ds_s{seed}", "nowhere"), "not a lopt_meta_train run folder"),
                        (SPEC.format(iterations=2).replace("[outer]", '[outer]\ntrain = "branch"'),
                         "meta-trains a branch; kind 'per_param_mlp' has none"),
                        (SPEC.format(iterations=2).replace("[optimizer]\nhidden = 8",
                                                           f'[optimizer]\nhidden = 8\nkind = "weightspace"\n'
                                                           f'gmn_channels = 2\nstart_from = "{out}"'),
                         "have no counterpart of that shape in kind 'weightspace'")):
        spec.write_text(text)
        with pytest.raises(SpecError, match=match):
            gr.run_spec(spec, tmp_path / "bad", progress=False, overwrite=True)
