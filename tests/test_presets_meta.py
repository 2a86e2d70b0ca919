"""Target presets on the real SD1.5 / SDXL UNets and CLIP text encoders, built on the meta device
from their configs (no weights, no memory, nothing downloaded)."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch
from torch import nn

import lora_diffusion as ld

from .conftest import load_config

ATTN_PROJ = ("to_q", "to_k", "to_v", "to_out.0")


def meta_unet(fixture: str):
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in load_config(fixture).items() if not k.startswith("_")}
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def meta_clip(fixture: str):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    raw = load_config(fixture)
    cls = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}[
        raw["architectures"][0]]
    config = CLIPTextConfig(**{k: v for k, v in raw.items() if not k.startswith("_")})
    with torch.device("meta"):
        return cls(config), config


@pytest.fixture(scope="module")
def sd15_unet():
    return meta_unet("sd15-unet.json")


@pytest.fixture(scope="module")
def sdxl_unet():
    return meta_unet("sdxl-base-unet.json")


def _role(name: str) -> tuple[str, str]:
    m = re.fullmatch(r".*\.(attn[12])\.(to_q|to_k|to_v|to_out\.0)", name)
    assert m, f"unexpected target {name}"
    return m.group(1), m.group(2)


@pytest.mark.parametrize("unet_fixture, expected", [("sd15_unet", 128), ("sdxl_unet", 560)], ids=["sd15", "sdxl"])
def test_unet_attn_preset_on_meta(request, unet_fixture, expected):
    unet = request.getfixturevalue(unet_fixture)
    assert next(unet.parameters()).is_meta
    found = ld.find_targets(unet, ld.AdapterSpec(targets="unet-attn"))
    assert len(found) == expected
    assert all(type(m) is nn.Linear for m in found.values())
    roles = Counter(_role(n) for n in found)
    assert set(roles) == {(a, p) for a in ("attn1", "attn2") for p in ATTN_PROJ}
    assert set(roles.values()) == {expected // 8}, roles
    # the default targets of a UNet are the same preset
    assert sorted(ld.find_targets(unet, ld.AdapterSpec())) == sorted(found)
    # every attention linear of every transformer block, and nothing else
    all_attn = {n for n, m in unet.named_modules()
                if isinstance(m, nn.Linear) and re.search(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$", n)}
    assert set(found) == all_attn


@pytest.mark.parametrize("fixture, cls_name", [("clip-vit-l14-text.json", "CLIPTextModel"),
                                               ("openclip-bigg-text.json", "CLIPTextModelWithProjection")],
                         ids=["clip-l", "openclip-bigg"])
def test_clip_text_preset_on_meta(fixture, cls_name):
    model, config = meta_clip(fixture)
    assert type(model).__name__ == cls_name
    found = ld.find_targets(model, ld.AdapterSpec(targets="clip-text"))
    assert len(found) == 4 * config.num_hidden_layers
    assert all(type(m) is nn.Linear for m in found.values())
    kinds = Counter(n.rsplit(".", 1)[1] for n in found)
    assert kinds == {p: config.num_hidden_layers for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
    # the default targets of a CLIP text encoder are the same preset
    assert sorted(ld.find_targets(model, ld.AdapterSpec())) == sorted(found)
    # text_projection (CLIPTextModelWithProjection) and the MLPs are not targeted
    assert not any("text_projection" in n or ".mlp." in n for n in found)
    mlp = ld.find_targets(model, ld.AdapterSpec(targets="clip-text-mlp"))
    assert len(mlp) == 6 * config.num_hidden_layers


def test_lora_on_meta_sd15_unet():
    """add_adapter on a meta-built UNet: adapters created on meta, parameter count per the formula."""
    unet = meta_unet("sd15-unet.json")
    spec = ld.AdapterSpec(variant="lora", rank=4, targets="unet-attn")
    names = ld.add_adapter(unet, spec)
    assert len(names) == 128
    params = list(ld.adapter_parameters(unet))
    assert params and all(p.is_meta for _, p in params)
    assert all(p.dtype == torch.float32 for _, p in params)
    expected = 0
    for n in names:
        base = unet.get_submodule(n).base_layer
        assert isinstance(base, nn.Linear) and base.weight.is_meta
        expected += spec.rank * (base.in_features + base.out_features)
    assert sum(p.numel() for _, p in params) == expected
    # only the adapters are trainable
    trainable = {id(p) for p in unet.parameters() if p.requires_grad}
    assert trainable == {id(p) for _, p in params}
    # and they are removed cleanly
    ld.remove_adapters(unet)
    assert not any(isinstance(m, ld.AdaptedLayer) for m in unet.modules())


@pytest.mark.parametrize("variant", ld.variant_names())
def test_every_variant_on_meta(variant):
    """Every variant can be injected into a meta-built model (here 4 linears of the CLIP-L encoder,
    so T-LoRA's SVD init stays cheap); its tensors end up on meta, like the base weights."""
    model, _ = meta_clip("clip-vit-l14-text.json")
    spec = ld.AdapterSpec(variant=variant, rank=4, targets=r"re:.*layers\.0\.self_attn\.(q|k|v|out)_proj")
    names = ld.add_adapter(model, spec)
    assert len(names) == 4
    params = list(ld.adapter_parameters(model))
    assert params and all(p.is_meta for _, p in params)
    assert all(b.is_meta for n, layer in model.named_modules() if isinstance(layer, ld.AdaptedLayer)
               for b in layer.adapters.buffers())
    assert all(t.is_meta for t in ld.shared_tensors(model).values())
    ld.remove_adapters(model)
    assert not any(isinstance(m, ld.AdaptedLayer) for m in model.modules())
