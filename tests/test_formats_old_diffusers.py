"""diffusers LoRA files from before the PEFT backend, generated to their documented layouts on SD1.5-shaped models.

0.15–0.20 (``unet.<module>.lora.down.weight``, ``text_encoder.<module>.lora_linear_layer.down.weight``): the UNet
equals what diffusers 0.42 loads (fp32/fp16/bf16 files); the text encoder (kohya-era ``text_model.`` paths, which
diffusers 0.42 on transformers 5 no longer maps) equals the format's arithmetic W + up·down.
<= 0.14 (``…attn1.processor.to_q_lora.down.weight``): diffusers 0.42 loads nothing from it; here W + up·down
on to_q / to_k / to_v / to_out.0 (and q/k/v/out_proj for the text encoder).
"""

from __future__ import annotations

import copy

import pytest
import torch

import lora_diffusion as ld
from lora_diffusion.io.files import write_safetensors

from .test_formats_helpers import (
    TE_TARGETS,
    UNET_TARGETS,
    adaptable_weights,
    max_rel_diff,
    peft_state_dict,
    sd15_pipeline,
    sd15_unet_config,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one intra-op thread (conftest)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _rule(pipe, deltas: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """W + up·down (scale 1) per (component, module)."""
    out = {c: adaptable_weights(pipe.components[c]) for c in ("unet", "text_encoder")}
    for (comp, mod), (down, up) in deltas.items():
        w = out[comp][mod]
        out[comp][mod] = w + (up.float().flatten(1) @ down.float().flatten(1)).view_as(w)
    return out


def _merged_ours(pipe, path):
    ours = copy.deepcopy(pipe)
    ld.load_adapter(ours, path, name="old")
    n = sum(len(ld.adapter_state_dict(ours.components[c], "old")) for c in ("unet", "text_encoder"))
    ld.merge_adapters(ours)
    return ours, n


def era_020_file(tmp_path, pipe, dtype: torch.dtype, seed: int = 0):
    unet = peft_state_dict(pipe.unet, UNET_TARGETS, seed + 1)
    te = peft_state_dict(pipe.text_encoder, TE_TARGETS, seed + 2)
    sd, deltas = {}, {}
    for comp, psd, sub, prefix in (("unet", unet, "lora", ""), ("text_encoder", te, "lora_linear_layer", "text_model.")):
        for k in [k for k in psd if k.endswith(".lora_A.weight")]:
            mod = k.removesuffix(".lora_A.weight")
            down, up = psd[k].to(dtype), psd[f"{mod}.lora_B.weight"].to(dtype)
            sd[f"{comp}.{prefix}{mod}.{sub}.down.weight"] = down
            sd[f"{comp}.{prefix}{mod}.{sub}.up.weight"] = up
            deltas[(comp, mod)] = (down, up)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    write_safetensors(path, sd, {})
    return path, sd, deltas


def _pipe(family: str):
    """SD1.x-shaped (conv proj_in), or SD2.x-shaped (Linear proj_in, per-block head dims) at toy width."""
    pipe = sd15_pipeline()
    if family == "sd2":
        from diffusers import UNet2DConditionModel

        torch.manual_seed(1)
        cfg = {**sd15_unet_config(), "use_linear_projection": True, "attention_head_dim": [4, 8]}
        pipe.register_modules(unet=UNet2DConditionModel(**cfg).eval())
    return pipe


@pytest.mark.parametrize("family,dtype", [("sd1", "fp32"), ("sd1", "fp16"), ("sd1", "bf16"), ("sd2", "fp16")])
def test_diffusers_020_file_matches_diffusers_and_rule(tmp_path, family, dtype):
    pipe = _pipe(family)
    path, sd, deltas = era_020_file(tmp_path, pipe, DTYPES[dtype])
    assert any(".conv1.lora.down.weight" in k for k in sd) and any(".to_out.0.lora.up.weight" in k for k in sd)
    assert any(k.endswith("proj_in.lora.down.weight") and v.dim() == (2 if family == "sd2" else 4) for k, v in sd.items())
    ours, n = _merged_ours(pipe, path)
    assert n == len(sd)  # every key consumed
    want = _rule(pipe, deltas)
    assert max_rel_diff(adaptable_weights(ours.text_encoder), want["text_encoder"]) < 1e-5
    ref = copy.deepcopy(pipe)
    ref.load_lora_weights(str(path), adapter_name="x")
    ref.fuse_lora(components=["unet"])
    assert max_rel_diff(adaptable_weights(ours.unet), adaptable_weights(ref.unet)) < 1e-5
    assert max_rel_diff(adaptable_weights(ours.unet), want["unet"]) < 1e-5


ATTN = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
TE_ATTN = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


@pytest.mark.parametrize("unet_prefix", ["unet.", ""])
def test_diffusers_014_attention_processor_file(tmp_path, unet_prefix):
    pipe = sd15_pipeline()
    g = torch.Generator().manual_seed(0)
    weights = {c: adaptable_weights(pipe.components[c]) for c in ("unet", "text_encoder")}
    sd, deltas = {}, {}
    blocks = sorted({m.rsplit(".", 1)[0] for m in weights["unet"] if m.endswith(".attn1.to_q") or m.endswith(".attn2.to_q")})
    for block in blocks:
        for old, new in ATTN.items():
            o, i = weights["unet"][f"{block}.{new}"].shape
            down, up = torch.randn(4, i, generator=g) * 0.1, torch.randn(o, 4, generator=g) * 0.1
            sd[f"{unet_prefix}{block}.processor.{old}_lora.down.weight"] = down
            sd[f"{unet_prefix}{block}.processor.{old}_lora.up.weight"] = up
            deltas[("unet", f"{block}.{new}")] = (down, up)
    for layer in ("encoder.layers.0.self_attn", "encoder.layers.1.self_attn"):
        for old, new in TE_ATTN.items():
            o, i = weights["text_encoder"][f"{layer}.{new}"].shape
            down, up = torch.randn(2, i, generator=g) * 0.1, torch.randn(o, 2, generator=g) * 0.1
            sd[f"text_encoder.text_model.{layer}.{old}_lora.down.weight"] = down
            sd[f"text_encoder.text_model.{layer}.{old}_lora.up.weight"] = up
            deltas[("text_encoder", f"{layer}.{new}")] = (down, up)
    path = tmp_path / "attn_procs.safetensors"
    write_safetensors(path, sd, {})
    ours, n = _merged_ours(pipe, path)
    assert n == len(sd)
    want = _rule(pipe, deltas)
    for c in want:
        assert max_rel_diff(adaptable_weights(ours.components[c]), want[c]) < 1e-5, c


def test_old_diffusers_bad_key_names_file_key_and_format(tmp_path):
    pipe = sd15_pipeline()
    path, sd, _ = era_020_file(tmp_path, pipe, torch.float32)
    bad = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn9.to_q.lora.down.weight"
    write_safetensors(tmp_path / "bad.safetensors", {**sd, bad: torch.zeros(4, 32)}, {})
    with pytest.raises(ld.AdapterFileError, match=rf"bad.safetensors: key '{bad}'.*not in the model.*diffusers 0.15-0.20"):
        ld.load_adapter(pipe, tmp_path / "bad.safetensors")
    write_safetensors(tmp_path / "bad2.safetensors", {**sd, "unet.conv_in.lora.mid.weight": torch.zeros(1)}, {})
    with pytest.raises(ld.AdapterFileError, match=r"bad2.safetensors: key 'unet.conv_in.lora.mid.weight': not a key of "
                                                  r"the old diffusers LoRA format"):
        ld.load_adapter(pipe, tmp_path / "bad2.safetensors")
    assert ld.list_adapters(pipe) == []
