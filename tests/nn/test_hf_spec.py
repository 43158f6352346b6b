"""GradMetaNet on real Hugging Face GPT-2 and Llama: permuting the model's units by the derived
spec leaves its function unchanged, and the network's outputs are invariant / equivariant."""

import pytest
import torch
from torch import nn

import gradmeta as gm
from gradmeta.grads import causal_lm_losses
from gradmeta.nn import symmetry_spec
from tests.grads.test_hf_models import _batch, _gpt2, _llama
from tests.nn.conftest import assert_gmn_equivariant, nontrivial_perms
from tests.nn.conftest import permuted_model as _permuted

pytest.importorskip("transformers")


def _float64_norms(model):
    """Llama's RMSNorm computes its statistics in float32, so a permuted model agrees only to ~1e-7;
    nn.RMSNorm (same weight and eps) keeps float64 and makes the check exact."""
    for layer in model.model.layers:
        for name in ("input_layernorm", "post_attention_layernorm"):
            old = getattr(layer, name)
            new = nn.RMSNorm(old.weight.shape[0], eps=old.variance_epsilon).double()
            new.weight.data.copy_(old.weight.data)
            setattr(layer, name, new)
    old = model.model.norm
    model.model.norm = nn.RMSNorm(old.weight.shape[0], eps=old.variance_epsilon).double()
    model.model.norm.weight.data.copy_(old.weight.data)
    return model


BUILDS = {"gpt2": (_gpt2, 1e-10), "llama_tied": (lambda: _float64_norms(_llama(True).double()), 1e-10),
          "llama_untied": (lambda: _float64_norms(_llama(False).double()), 1e-10),
          "llama_float32_norms": (lambda: _llama(True), 1e-6)}


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_equivariance_on_real_hf_models(name):
    build, tol = BUILDS[name]
    torch.manual_seed(0)
    model = build().double().eval()
    spec = symmetry_spec(model)
    inputs, labels = _batch()
    perms = nontrivial_perms(spec, torch.Generator().manual_seed(3))
    pm = _permuted(model, spec, perms)
    torch.testing.assert_close(pm(**inputs).logits, model(**inputs).logits, atol=tol, rtol=0)
    gs = gm.collect_gradients(model, causal_lm_losses, inputs, labels)
    gp = gm.collect_gradients(pm, causal_lm_losses, inputs, labels)
    assert_gmn_equivariant(model, spec, perms, gs, gp, tol)


def test_llama_spec_keeps_rotary_dims_fixed_and_gates_joint():
    spec = symmetry_spec(_llama(True))
    assert not spec.space("model.layers.0.q").permutable and not spec.space("model.layers.0.k").permutable
    axes = spec.param_axes
    assert axes["model.layers.0.mlp.gate_proj.weight"][0] == axes["model.layers.0.mlp.up_proj.weight"][0]
    # grouped-query attention: 2 query heads read kv head 0
    assert axes["model.layers.0.self_attn.o_proj.weight"][1] == ("model.layers.0.vo.g0", "model.layers.0.vo.g0")
