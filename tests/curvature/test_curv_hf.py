"""Curvature on tiny Hugging Face models (sdpa attention, output objects, dict inputs, tuple
targets) against double-backward references; K-FAC lists what it does not cover; MC Fisher scaling."""
import pytest
import torch
from torch import nn

from gradmeta import curvature as gc
from gradmeta.grads import causal_lm_losses

transformers = pytest.importorskip("transformers")


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20, n_positions=8,
                                  bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(0, 20, (3, 5))
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[2, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}, ids.masked_fill(mask == 0, -100)


def _mean_loss(model, inputs, labels):
    return causal_lm_losses(model(**inputs), labels).mean()


def test_hvp_trace_and_top_eigenvalue_on_sdpa_gpt2_equal_double_backward():
    model = _gpt2()
    inputs, labels = _batch()
    params = [p for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        g = torch.autograd.grad(_mean_loss(model, inputs, labels), params, create_graph=True)
        want = torch.autograd.grad(g, params, [v[n] for n in names])
    got = gc.hvp(model, causal_lm_losses, (inputs, labels), v)
    for n, w in zip(names, want):
        torch.testing.assert_close(got[n], w, atol=1e-10, rtol=0)
    H = gc.exact_hessian(model, causal_lm_losses, (inputs, labels))
    torch.testing.assert_close(gc.hessian_trace(model, causal_lm_losses, (inputs, labels), method="exact"),
                               torch.trace(H), atol=1e-8, rtol=0)
    top = gc.hessian_eigenvalues(model, causal_lm_losses, (inputs, labels), k=1, tol=1e-10)
    torch.testing.assert_close(top.reshape(-1)[0].to(H), torch.linalg.eigvalsh(H)[-1],
                               atol=1e-6, rtol=1e-6)


def test_tuple_targets_are_one_batch_and_ggn_takes_output_objects():
    model = _gpt2()
    inputs, labels = _batch()
    loss = lambda out, t: causal_lm_losses(out, t[0].masked_fill(t[1] == 0, -100))  # noqa: E731
    targets = (inputs["input_ids"], inputs["attention_mask"])
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    a = gc.hvp(model, loss, [(inputs, targets)], v)
    b = gc.hvp(model, causal_lm_losses, (inputs, labels), v)
    for n in v:
        torch.testing.assert_close(a[n], b[n], atol=1e-12, rtol=0)
    with pytest.raises(gc.CurvatureError, match="pass \\[\\(inputs, targets\\)\\]"):
        gc.hvp(model, loss, ((inputs["input_ids"], inputs["attention_mask"]), targets), v)
    ggn = gc.ggn_vp(model, causal_lm_losses, (inputs, labels), v)
    assert all(torch.isfinite(t).all() for t in ggn.values())


def test_empirical_fisher_on_hf_equals_per_example_loop():
    model = _gpt2()
    inputs, labels = _batch()
    fd = gc.fisher_diagonal(model, causal_lm_losses, (inputs, labels))
    rows = []
    for b in range(3):
        loss = causal_lm_losses(model(**{k: t[b:b + 1] for k, t in inputs.items()}), labels[b:b + 1])[0]
        rows.append(torch.autograd.grad(loss, list(model.parameters())))
    for i, (n, _) in enumerate(model.named_parameters()):
        torch.testing.assert_close(fd[n], torch.stack([r[i] for r in rows]).square().mean(0), atol=1e-10, rtol=0)


def test_kfac_lists_the_parameters_it_does_not_cover():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4, 3)).double()
    x, y = torch.randn(4, 1, 6, 3, dtype=torch.float64), torch.randint(0, 3, (4,))
    with pytest.warns(RuntimeWarning, match="not covered"):
        kf = gc.kfac(model, lambda o, t: nn.functional.cross_entropy(o, t, reduction="none"), (x, y))
    assert set(kf.missing) == {"0.weight", "0.bias"} and set(kf) == {"2"}


def test_mc_fisher_of_a_token_averaged_loss_estimates_ggn_over_T():
    torch.manual_seed(0)
    T = 3
    model = nn.Linear(3, 4).double()
    x, y = torch.randn(2, T, 3, dtype=torch.float64), torch.randint(0, 4, (2, T))
    loss = lambda out, t: nn.functional.cross_entropy(out.transpose(1, 2), t, reduction="none").mean(1)  # noqa: E731
    mc = gc.fisher_diagonal(model, loss, (x, y), kind="mc", likelihood="categorical", mc_samples=4000, generator=0)
    ggn = gc.GGNOperator(model, loss, (x, y)).to_dense().diagonal()
    mc_flat = torch.cat([mc[n].flatten() for n, _ in model.named_parameters()])
    ratio = (mc_flat.sum() * T / ggn.sum()).item()
    assert 0.95 < ratio < 1.05, ratio          # E[g gᵀ] = GGN / T, not the GGN
