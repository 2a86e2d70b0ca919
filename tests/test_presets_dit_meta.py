"""DiT target presets on the real Flux.1-dev/schnell and SD3.5 medium/large transformers (and the T5-XXL encoder),
built on the meta device from their published configs: module counts per family and preset, and the modules the
kohya (original-layout) and diffusers/PEFT formats of each family address."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

import lora_diffusion as ld
from lora_diffusion.io import dit

from .conftest import load_config

FIXTURES = {"flux-dev": "flux1-dev-transformer.json", "flux-schnell": "flux1-schnell-transformer.json",
            "sd35-large": "sd35-large-transformer.json", "sd35-medium": "sd35-medium-transformer.json",
            "flux2-dev": "flux2-dev-transformer.json", "flux2-klein-4b": "flux2-klein-4b-transformer.json"}
PARAMS = {"flux-dev": 11_901_408_320, "flux-schnell": 11_891_178_560, "sd35-large": 8_056_627_520,
          "sd35-medium": 2_243_171_520, "flux2-dev": 32_223_281_152, "flux2-klein-4b": 3_875_544_576}
# dit-attn / dit-attn-mlp / dit-full: Flux 19 double x (8 / 12 / 14) + 38 single x (3 / 5 / 6); SD3.5 large 38 joint
# blocks x (8 / 12 / 14) less the last block's text-stream output, MLP (context_pre_only); medium 24 blocks + 13 attn2
# Flux.2: double blocks x (8 / 12 / 12) + single blocks x 2 (to_qkv_mlp_proj, to_out: attention and MLP fused) + the
# 3 shared modulation linears in dit-full; dev 8 + 48 blocks, klein 4B 5 + 20
COUNTS = {"flux-dev": (266, 418, 494), "flux-schnell": (266, 418, 494), "sd35-large": (303, 453, 529),
          "sd35-medium": (243, 337, 385), "flux2-dev": (160, 192, 195), "flux2-klein-4b": (80, 100, 103)}
PRESETS = ("dit-attn", "dit-attn-mlp", "dit-full")
# diffusers' DreamBooth LoRA scripts (train_dreambooth_lora_flux.py / _sd3.py): default PEFT target_modules
DIFFUSERS_ATTN = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                  "attn.add_v_proj", "attn.to_add_out"]
DIFFUSERS_FLUX = DIFFUSERS_ATTN + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
# train_dreambooth_lora_flux2*.py: image-stream attention, the single blocks' fused in/out (to_out by full name there)
DIFFUSERS_FLUX2 = ["to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj"]


def meta_transformer(fixture: str) -> nn.Module:
    from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel, SD3Transformer2DModel

    raw = load_config(fixture)
    cls = {"FluxTransformer2DModel": FluxTransformer2DModel, "SD3Transformer2DModel": SD3Transformer2DModel,
           "Flux2Transformer2DModel": Flux2Transformer2DModel}[raw["_class_name"]]
    with torch.device("meta"):
        return cls(**{k: v for k, v in raw.items() if not k.startswith("_")})


@pytest.fixture(scope="module", params=list(FIXTURES))
def dit_model(request):
    return request.param, meta_transformer(FIXTURES[request.param])


def _found(model, preset) -> set[str]:
    return set(ld.find_targets(model, ld.AdapterSpec(targets=preset)))


def test_presets_count_on_meta(dit_model):
    name, model = dit_model
    assert next(model.parameters()).is_meta
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]  # the config is the published one
    found = [_found(model, p) for p in PRESETS]
    assert tuple(len(f) for f in found) == COUNTS[name]
    assert found[0] < found[1] < found[2]
    assert all(type(model.get_submodule(n)) is nn.Linear for n in found[2])
    assert set(ld.find_targets(model, ld.AdapterSpec())) == found[1]  # the default preset of a DiT
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    # dit-full is every Linear of the blocks: only embedders and the output layer are left out
    assert {n.split(".")[0] for n in linears - found[2]} <= {"time_text_embed", "context_embedder", "x_embedder",
                                                              "norm_out", "proj_out", "time_guidance_embed"}


def _kohya_modules(family: str, model: nn.Module, modulation: bool) -> set[str]:
    """The diffusers modules a kohya file of the family addresses: sd-scripts targets every Linear of the blocks
    (double/single stream; SD3 joint x/context blocks), by default without the modulation linears."""
    targets, _ = dit.family_map(family, model.config)
    views = {n for n, _ in model.named_modules()}
    out = set()
    for dotted, paths in targets.items():
        if not dotted.startswith(("double_blocks", "single_blocks", "joint_blocks")) and not (
                modulation and "stream_modulation" in dotted):  # Flux.2's modulation is shared by the blocks
            continue
        if not modulation and ("_mod." in dotted or "modulation" in dotted):
            continue
        out |= {p for p in paths if p in views}
    return out


def test_presets_equal_the_kohya_layout(dit_model):
    name, model = dit_model
    family = name.split("-")[0].replace("sd35", "sd3")
    assert _found(model, "dit-attn-mlp") == _kohya_modules(family, model, modulation=False)
    assert _found(model, "dit-full") == _kohya_modules(family, model, modulation=True)
    if family == "flux":  # 19 x 10 + 38 x 3 = 304 original modules (the AutoLoRA layer list) with modulation
        targets, _ = dit.family_map(family, model.config)
        assert len([d for d in targets if d.startswith(("double_blocks", "single_blocks"))]) == 304


def test_presets_against_diffusers_peft_targets(dit_model):
    """PEFT's own matching of diffusers' DreamBooth target lists on the real model."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    name, model = dit_model
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]

    def peft(targets):
        cfg = LoraConfig(target_modules=targets)
        return {n for n in names if check_target_module_exists(cfg, n)}

    attn = _found(model, "dit-attn")
    if name.startswith("flux2"):  # + the text stream's projections, which diffusers' Flux.2 list leaves out
        singles = {n for n in names if n.startswith("single_transformer_blocks") and n.endswith("attn.to_out")}
        text = {n for n in attn if n.endswith(("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"))}
        assert peft(DIFFUSERS_FLUX2) | singles == attn - text
        assert len(text) == 4 * model.config.num_layers
    elif name.startswith("flux"):
        assert peft(DIFFUSERS_ATTN) == attn
        assert peft(DIFFUSERS_FLUX + ["proj_mlp"]) | {n for n in names if n.startswith("single_transformer_blocks")
                                                      and n.endswith("proj_out")} == _found(model, "dit-attn-mlp")
    else:  # SD3.5 medium's second attention (attn2) is not in diffusers' list: dit-attn adds its 13 x 4 linears
        extra = {n for n in attn if ".attn2." in n}
        assert peft(DIFFUSERS_ATTN) == attn - extra
        assert len(extra) == (52 if name == "sd35-medium" else 0)


def test_t5_presets_on_meta():
    from transformers import T5Config, T5EncoderModel

    raw = load_config("t5-v1_1-xxl-encoder.json")
    with torch.device("meta"):
        model = T5EncoderModel(T5Config(**{k: v for k, v in raw.items() if k != "architectures"}))
    assert sum(p.numel() for p in model.parameters()) == 4_762_310_656
    attn = ld.find_targets(model, ld.AdapterSpec(targets="t5-text"))
    assert Counter(n.rsplit(".", 1)[1] for n in attn) == {p: 24 for p in "qkvo"}
    assert set(ld.find_targets(model, ld.AdapterSpec())) == set(attn)
    full = ld.find_targets(model, ld.AdapterSpec(targets="t5-text-mlp"))
    assert len(full) == 24 * 7  # kohya's T5Attention + T5DenseGatedActDense (wi_0, wi_1, wo)
