"""Tiny random-init Hugging Face models (float64): every trainable parameter, with attention masks,
-100 labels and tied embeddings, equals a naive per-example loop to 1e-10."""
import pytest
import torch

import gradmeta as gm
from gradmeta.grads import causal_lm_losses, functional_factors, sequence_classification_losses
from tests.conftest import assert_dicts_close, flatten_params

transformers = pytest.importorskip("transformers")
V, B, T = 50, 3, 6


def naive(model, loss_fn, inputs: dict, targets):
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows = []
    for b in range(targets.shape[0]):
        loss = loss_fn(model(**{k: v[b:b + 1] for k, v in inputs.items()}), targets[b:b + 1])
        rows.append(torch.autograd.grad(loss[0], list(params.values()), allow_unused=True, materialize_grads=True))
    return {n: torch.stack([r[i] for r in rows]) for i, n in enumerate(params)}


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=V,
                                                                n_positions=16, bos_token_id=0, eos_token_id=0))


def _llama(tied=True):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=16, intermediate_size=24, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=V, max_position_embeddings=16, tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0))


def _opt():
    return transformers.OPTForCausalLM(transformers.OPTConfig(
        num_hidden_layers=2, hidden_size=16, ffn_dim=24, num_attention_heads=2, vocab_size=V,
        max_position_embeddings=16, word_embed_proj_dim=16, bos_token_id=0, eos_token_id=0, pad_token_id=1))


def _bert():
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        num_hidden_layers=2, hidden_size=16, intermediate_size=24, num_attention_heads=2, vocab_size=V,
        max_position_embeddings=16, num_labels=3))


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(2, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}, ids.masked_fill(mask == 0, -100)


MODELS = {"gpt2": (_gpt2, "lm"), "llama": (_llama, "lm"), "opt": (_opt, "lm"), "bert": (_bert, "cls")}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_hf_model_every_parameter_equals_naive_loop(name):
    torch.manual_seed(0)
    build, kind = MODELS[name]
    model = build().double().eval()
    inputs, labels = _batch()
    loss_fn = causal_lm_losses
    if kind == "cls":
        loss_fn, labels = sequence_classification_losses, torch.tensor([0, 2, 1])
    want = naive(model, loss_fn, inputs, labels)
    gs = gm.collect_gradients(model, loss_fn, inputs, labels)
    assert set(gs.param_names) == set(want)
    assert_dicts_close(gs.per_example_grads(), want)
    flat = flatten_params(want)
    torch.testing.assert_close(gs.grad_norms(), flat.norm(dim=1), atol=1e-10, rtol=0)
    torch.testing.assert_close(gs.gram(), flat @ flat.T, atol=1e-10, rtol=0)
    assert_dicts_close(gs.fisher_diagonal(), {k: g.square().mean(0) for k, g in want.items()})
    if name in ("gpt2", "llama"):
        assert gs.shared_params and not gs.fallback_params     # tied head summed, everything factored
        params = {n: p.detach() for n, p in model.named_parameters()}
        assert_dicts_close(functional_factors(model, loss_fn, params, inputs, labels).per_example_grads(), want)


def test_gpt2_lm_head_alone_still_counts_the_embedding_use():
    model = _gpt2().double().eval()
    inputs, labels = _batch()
    gs = gm.collect_gradients(model, causal_lm_losses, inputs, labels, layers=["lm_head"])
    want = naive(model, causal_lm_losses, inputs, labels)
    assert gs.param_names == ["transformer.wte.weight"]
    assert_dicts_close(gs.per_example_grads(), {"transformer.wte.weight": want["transformer.wte.weight"]})


def test_causal_lm_losses_ignore_minus_100_and_average_per_example():
    logits = torch.randn(2, 4, 5, dtype=torch.float64)
    labels = torch.tensor([[1, 2, 3, 4], [0, 1, -100, -100]])
    got = causal_lm_losses(logits, labels)
    lp = logits.log_softmax(-1)
    want0 = -(lp[0, 0, 2] + lp[0, 1, 3] + lp[0, 2, 4]) / 3
    want1 = -lp[1, 0, 1]
    torch.testing.assert_close(got, torch.stack([want0, want1]))


def test_torch_func_path_with_attention_mask_eager_works_sdpa_says_what_to_do():
    inputs, labels = _batch()
    sdpa = _gpt2().double().eval()
    with pytest.raises(gm.GradientCollectionError, match="attn_implementation='eager'"):
        gm.per_example_grads(sdpa, causal_lm_losses, inputs, labels)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=V, n_positions=16, bos_token_id=0,
                                  eos_token_id=0, attn_implementation="eager")
    eager = transformers.GPT2LMHeadModel(cfg).double().eval()
    assert_dicts_close(gm.per_example_grads(eager, causal_lm_losses, inputs, labels),
                       naive(eager, causal_lm_losses, inputs, labels))
