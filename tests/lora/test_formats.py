"""diffusers and kohya / A1111 single-file adapters, written by diffusers itself, against the deltas
diffusers applies when it loads the same file into the model (``lora_state_dict`` + ``load_lora_adapter``)."""
from __future__ import annotations

import shutil
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="the test extra (diffusers) writes the reference files")
from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya  # noqa: E402
from peft import LoraConfig, inject_adapter_in_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from gradmeta import lora  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "proj_in"]


def tiny_unet():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4,
                                    out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                    norm_num_groups=2, attention_head_dim=2)


def tiny_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(1)
    cfg = CLIPTextConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=1,
                         vocab_size=50, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModel(cfg)


def deltas(model, adapter="default", prefix="", unscaled=False):
    """PEFT's ``get_delta_weight`` per module (divided by PEFT's scale with ``unscaled``: ``B A``)."""
    return {prefix + n: m.get_delta_weight(adapter).detach() / (m.scaling[adapter] if unscaled else 1)
            for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.scaling}


def diffusers_applies(file):
    """The deltas diffusers puts into a fresh UNet when it loads ``file`` (unet part only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state, alphas, meta = StableDiffusionPipeline.lora_state_dict(str(file), return_lora_metadata=True)
        unet = tiny_unet()
        unet.load_lora_adapter(state, network_alphas=alphas, metadata=meta, prefix="unet", adapter_name="x")
    return deltas(unet, "x", "unet.")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A UNet and a text encoder with LoRA (ranks 2 with a rank-3 exception, alpha 4, random B)."""
    unet = tiny_unet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ucfg = LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=TARGETS,
                          rank_pattern={"conv1": 3})
        unet.add_adapter(ucfg)
        tcfg = LoraConfig(r=3, lora_alpha=5, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
        te = inject_adapter_in_model(tcfg, tiny_text_encoder())
    return unet, ucfg, te, tcfg, tmp_path_factory.mktemp("diffusers")


def assert_same(ad, want, scale=1.0):
    assert sorted(ad.module_names) == sorted(want)
    for k, d in want.items():
        torch.testing.assert_close(ad[k].delta(), d * scale, rtol=1e-6, atol=1e-7, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("metadata", [True, False])
def test_save_lora_weights(trained, metadata):
    unet, ucfg, te, tcfg, tmp = trained
    folder = tmp / f"pipe_{metadata}"
    kw = dict(unet_lora_adapter_metadata=ucfg.to_dict(), text_encoder_lora_adapter_metadata=tcfg.to_dict()) \
        if metadata else {}
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=get_peft_model_state_dict(unet),
                                              text_encoder_lora_layers=get_peft_model_state_dict(te), **kw)
    ad = lora.load_adapter(folder)  # a folder without adapter_config.json
    assert {k.split(".")[0] for k in ad.module_names} == {"unet", "text_encoder"}
    applied = diffusers_applies(folder / "pytorch_lora_weights.safetensors")
    assert_same(lora.Adapter({k: f for k, f in ad.items() if k.startswith("unet.")}), applied)
    # with metadata: the PEFT scales (alpha / r); without: diffusers takes alpha = r (scale 1)
    want_te = deltas(te, prefix="text_encoder.")
    if not metadata:
        want_te = deltas(te, prefix="text_encoder.", unscaled=True)
    assert_same(lora.Adapter({k: f for k, f in ad.items() if k.startswith("text_encoder.")}), want_te)
    want_unet = deltas(unet, prefix="unet.")
    if metadata:
        assert_same(lora.Adapter({k: f for k, f in ad.items() if k.startswith("unet.")}), want_unet)
    assert ad["unet.down_blocks.0.resnets.0.conv1"].rank == 3 and ad["unet.down_blocks.0.resnets.0.conv1"].kind == "conv"


def test_save_lora_adapter(trained):
    unet, _, _, _, tmp = trained
    unet.save_lora_adapter(str(tmp / "sla"))
    ad = lora.load_adapter(tmp / "sla" / "pytorch_lora_weights.safetensors")  # the file itself
    assert_same(ad, deltas(unet))


def test_diffusers_lora_down_up_keys(trained):
    unet, _, te, _, tmp = trained
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    te_state = convert_state_dict_to_diffusers(get_peft_model_state_dict(te))
    assert any(".lora.down.weight" in k for k in state)
    assert any(".lora_linear_layer.down.weight" in k for k in te_state)
    file = tmp / "old.safetensors"
    save_file({**{"unet." + k: v.contiguous() for k, v in state.items()},
               **{"text_encoder." + k: v.contiguous() for k, v in te_state.items()}}, str(file))
    both = lora.load_adapter(file)
    assert_same(lora.Adapter({k: f for k, f in both.items() if k.startswith("text_encoder.")}),
                deltas(te, prefix="text_encoder.", unscaled=True))
    ad = lora.Adapter({k: f for k, f in both.items() if k.startswith("unet.")})
    applied = diffusers_applies(file)  # diffusers 0.42 applies only the conv modules of this legacy layout
    assert applied
    for k, d in applied.items():  # get_delta_weight's matmul may take another kernel path: not bitwise
        torch.testing.assert_close(ad[k].delta(), d, rtol=1e-6, atol=1e-7, msg=lambda m: f"{k}: {m}")
    assert_same(ad, deltas(unet, prefix="unet.", unscaled=True))  # no alphas: scale 1


def test_kohya(trained):
    unet, _, _, _, tmp = trained
    state = convert_state_dict_to_kohya(get_peft_model_state_dict(unet))
    state = {k: torch.tensor(3.0) if k.endswith(".alpha") else v.contiguous() for k, v in state.items()}
    file = tmp / "kohya.safetensors"
    save_file({"lora_unet_" + k: v for k, v in state.items()}, str(file))
    applied = diffusers_applies(file)
    ad = lora.load_adapter(file, base_model=tiny_unet())  # dotted names from the base model
    assert_same(ad, applied)
    plain = lora.load_adapter(file)  # underscored names, same factors
    assert plain.module_names[0].startswith("unet.") and "_" in plain.module_names[0]
    f = plain["unet.down_blocks_0_resnets_0_conv1"]
    assert f.scale == pytest.approx(3 / 3) and ad["unet.down_blocks.0.attentions.0.proj_in"].scale == pytest.approx(1.5)
    # kohya without alpha keys: scale 1
    save_file({"lora_unet_" + k: v for k, v in state.items() if not k.endswith(".alpha")}, str(tmp / "k2.safetensors"))
    assert lora.load_adapter(tmp / "k2.safetensors")[plain.module_names[0]].scale == 1.0


def test_wrong_base_model_and_unsupported_keys(trained, tmp_path):
    unet, _, _, _, tmp = trained
    unet.save_lora_adapter(str(tmp / "sla2"))
    other = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with pytest.raises(lora.AdapterFormatError, match="no module 'down_blocks.*another base model"):
        lora.load_adapter(tmp / "sla2", base_model=other)
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, str(tmp_path / "loha.safetensors"))
    with pytest.raises(lora.AdapterFormatError, match="LyCORIS"):
        lora.load_adapter(tmp_path / "loha.safetensors")
    shutil.copy(tmp / "sla2" / "pytorch_lora_weights.safetensors", tmp_path / "second.safetensors")
    shutil.copy(tmp / "sla2" / "pytorch_lora_weights.safetensors", tmp_path / "third.safetensors")
    with pytest.raises(lora.AdapterFormatError, match="several weight files"):
        lora.load_adapter(tmp_path)


def test_kohya_text_encoder(trained):
    _, _, te, _, tmp = trained
    state = convert_state_dict_to_kohya(get_peft_model_state_dict(te))  # alpha = r: scale 1
    file = tmp / "kohya_te.safetensors"
    save_file({("lora_te_" + k if not k.startswith("lora_") else k): v.contiguous() for k, v in state.items()},
              str(file))
    ad = lora.load_adapter(file, base_model=tiny_text_encoder())
    assert_same(ad, deltas(te, prefix="text_encoder.", unscaled=True))
    assert lora.load_adapter(file).module_names[0].startswith("text_encoder.encoder_layers_0_")
