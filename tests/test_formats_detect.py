"""Base-family detection from key names and shapes (Flux and SD3 are never SDXL), refusals that name the family,
and ``convert inspect`` on files whose metadata is silent."""

from __future__ import annotations

import json

import pytest
import torch

import lora_diffusion as ld
from lora_diffusion.convert import main
from lora_diffusion.io.detect import family_from_keys
from lora_diffusion.io.files import read_safetensors, write_safetensors
from lora_diffusion.io.library import describe

from .test_formats_helpers import sd15_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(flat: str, out: int, inp: int, r: int = 4, sep: str = ".lora_down.weight", up: str = ".lora_up.weight"):
    g = torch.Generator().manual_seed(len(flat))
    return {flat + sep: torch.randn(r, inp, generator=g), flat + up: torch.randn(out, r, generator=g)}


FLUX_KOHYA = {**_pair("lora_unet_double_blocks_0_img_attn_qkv", 9216, 3072),
              **_pair("lora_unet_single_blocks_3_linear1", 21504, 3072),
              **_pair("lora_te2_encoder_block_0_layer_0_SelfAttention_q", 4096, 4096)}  # T5 behind lora_te2_
FLUX_DIFFUSERS = _pair("transformer.single_transformer_blocks.0.attn.to_q", 3072, 3072, sep=".lora_A.weight", up=".lora_B.weight")
SD3_KOHYA = _pair("lora_unet_joint_blocks_0_context_block_attn_qkv", 4608, 1536)
SD3_DIFFUSERS = _pair("transformer.transformer_blocks.0.attn.add_k_proj", 1536, 1536, sep=".lora_A.weight", up=".lora_B.weight")
T5_ONLY = _pair("lora_te2_encoder_block_0_layer_0_SelfAttention_q", 4096, 4096)
SDXL_TE2 = _pair("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, 1280)
SD2_TE = _pair("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 1024, 1024)
SD1_PROJ_IN = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 320, 1, 1),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(320, 4, 1, 1)}


@pytest.mark.parametrize("sd,family", [(FLUX_KOHYA, "flux"), (FLUX_DIFFUSERS, "flux"), (SD3_KOHYA, "sd3"),
                                       (SD3_DIFFUSERS, "sd3"), (T5_ONLY, None), (SDXL_TE2, "sdxl"), (SD2_TE, "sd2"),
                                       (SD1_PROJ_IN, "sd1")])
def test_family_from_names_and_shapes(sd, family):
    assert family_from_keys({k: tuple(v.shape) for k, v in sd.items()}) == family


@pytest.mark.parametrize("sd,name", [(FLUX_KOHYA, "Flux"), (FLUX_DIFFUSERS, "Flux"), (SD3_KOHYA, "SD3")])
def test_transformer_lora_on_sd_model_names_the_family(tmp_path, sd, name):
    path = tmp_path / "dit.safetensors"
    write_safetensors(path, sd, {})
    for pipe, model in ((sd15_pipeline(cross=768), "SD1.x"), (sd15_pipeline(), "a UNet")):
        with pytest.raises(ld.AdapterFileError, match=f"dit.safetensors: this LoRA is for {name}, a transformer model; "
                                                      f"the model is {model}"):
            ld.load_adapter(pipe, path)
        assert ld.list_adapters(pipe) == []


def test_inspect_without_metadata(tmp_path, capsys):
    sd = {**SD2_TE, "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(2.0)}
    write_safetensors(tmp_path / "sd2.safetensors", sd, {})
    info = describe(tmp_path / "sd2.safetensors")
    assert info["base_family"] == "sd2" and info["alpha"] == "2"
    meta = {"ss_training_comment": "Trigger words: ohwx man, suit", "ss_output_name": "suits",
            "ss_tag_frequency": json.dumps({"5_ohwx man": {"ohwx man": 9, "suit": 4}})}
    write_safetensors(tmp_path / "sd1.safetensors", SD1_PROJ_IN, meta)
    info = describe(tmp_path / "sd1.safetensors")
    assert info["base_family"] == "sd1" and info["alpha"] is None
    assert info["trigger_words"] == ["ohwx man", "suit", "suits"]
    write_safetensors(tmp_path / "other.safetensors", {"model.layers.0.weight": torch.zeros(2, 2)}, {})
    assert main(["inspect", str(tmp_path / "other.safetensors")]) != 0
    assert "unknown adapter format" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "sd1.safetensors")]) == 0


def test_inspect_and_convert_name_a_flux_file(tmp_path, capsys):
    write_safetensors(tmp_path / "flux.safetensors", FLUX_KOHYA, {})
    info = describe(tmp_path / "flux.safetensors")
    assert info["base_family"] == "flux" and info["base"] == "Flux"
    # converted through a meta-device Flux.1 pipeline (transformer, CLIP-L, T5-XXL): fused qkv / linear1 split
    assert main([str(tmp_path / "flux.safetensors"), str(tmp_path / "o.safetensors"), "--to", "diffusers"]) == 0
    out = read_safetensors(tmp_path / "o.safetensors")[0]
    assert {k.rsplit(".lora_", 1)[0] for k in out} == {
        *(f"transformer.transformer_blocks.0.attn.to_{c}" for c in "qkv"),
        *(f"transformer.single_transformer_blocks.3.attn.to_{c}" for c in "qkv"),
        "transformer.single_transformer_blocks.3.proj_mlp", "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q"}
