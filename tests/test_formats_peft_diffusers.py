"""diffusers files and PEFT folders, both directions: what we write loads in diffusers (``load_lora_weights``)
and PEFT (``PeftModel.from_pretrained``) with identical outputs, and what they write loads here."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import lora_diffusion as ld
from lora_diffusion.io.files import read_safetensors

from .conftest import perturb
from .test_formats_helpers import close, sd15_pipeline, te_call, unet_call

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one intra-op thread (conftest)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 33, 70, 2]])).logits


SPECS = {
    "lora_patterns": ld.AdapterSpec(rank=4, alpha=8, targets="llm", rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3}),
    "rslora": ld.AdapterSpec(rank=4, alpha=6, targets="llm-attn", rslora=True),
    "dora": ld.AdapterSpec("dora", rank=4, alpha=4, targets="llm"),
    "vera": ld.AdapterSpec("vera", rank=8, targets=["q_proj", "v_proj", "up_proj"], seed=3),
}


@pytest.mark.parametrize("case", list(SPECS))
def test_peft_folder_export_loads_in_peft(tmp_path, case):
    from peft import PeftModel

    model = _llama()
    ld.add_adapter(model, SPECS[case], "a")
    perturb(model, "a", std=0.1)
    folder = ld.save_adapter(model, tmp_path / "peft", "a", format="peft")
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == ("VERA" if case == "vera" else "LORA")
    theirs = PeftModel.from_pretrained(_llama(), str(folder)).eval()
    assert close(_logits(theirs), _logits(model))
    again = _llama()
    ld.load_adapter(again, folder, name="b")  # and back
    assert close(_logits(again), _logits(model))


@pytest.mark.parametrize("case", ["lora_patterns", "dora", "vera"])
def test_peft_folder_from_peft_loads_here(tmp_path, case):
    from peft import LoraConfig, VeraConfig, get_peft_model

    cfg = {"lora_patterns": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                       rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3}, init_lora_weights=False),
           "dora": LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "up_proj"], use_dora=True, init_lora_weights=False),
           "vera": VeraConfig(r=8, target_modules=["q_proj", "v_proj"], projection_prng_key=5, init_weights=False)}[case]
    peft_model = get_peft_model(_llama(), cfg).eval()
    peft_model.save_pretrained(str(tmp_path / "p"))
    ours = _llama()
    ld.load_adapter(ours, tmp_path / "p", name="p")
    assert close(_logits(ours), _logits(peft_model))


def test_diffusers_export_loads_in_diffusers(tmp_path):
    pipe = sd15_pipeline()
    ld.add_adapter(pipe.unet, ld.AdapterSpec(rank=4, alpha=2, targets="unet-full", rank_pattern={"conv1": 2},
                                             alpha_pattern={"to_v": 5}), "d")
    ld.add_adapter(pipe.text_encoder, ld.AdapterSpec(rank=4, alpha=8, targets="clip-text", rslora=True), "d")
    for m in (pipe.unet, pipe.text_encoder):
        perturb(m, "d", std=0.2)
    path = ld.save_adapter(pipe, tmp_path / "pytorch_lora_weights.safetensors", "d", format="diffusers")
    sd, meta = read_safetensors(path)
    assert all(k.startswith(("unet.", "text_encoder.")) for k in sd) and "lora_adapter_metadata" in meta
    ref = sd15_pipeline()
    ref.load_lora_weights(str(path), adapter_name="x")
    assert close(unet_call(ref.unet), unet_call(pipe.unet)) and close(te_call(ref.text_encoder), te_call(pipe.text_encoder))
    ours = sd15_pipeline()
    ld.load_adapter(ours, tmp_path, name="d")  # a folder holding pytorch_lora_weights.safetensors
    assert close(unet_call(ours.unet), unet_call(pipe.unet))


def test_kohya_export_sd15_loads_in_diffusers(tmp_path):
    pipe = sd15_pipeline()
    ld.add_adapter(pipe.unet, ld.AdapterSpec(rank=4, alpha=2, targets="unet-full"), "k")
    perturb(pipe.unet, "k", std=0.2)
    path = ld.save_adapter(pipe, tmp_path / "k.safetensors", "k", format="kohya")
    ref = sd15_pipeline()
    ref.load_lora_weights(str(path))
    assert close(unet_call(ref.unet), unet_call(pipe.unet))


def test_diffusers_saved_file_loads_here(tmp_path):
    """A file written by diffusers' own ``save_lora_weights`` (with its lora_adapter_metadata)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = sd15_pipeline()
    ref = copy.deepcopy(pipe)
    ref.unet.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_v", "conv1"], init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=get_peft_model_state_dict(ref.unet),
                                              unet_lora_adapter_metadata=ref.unet.peft_config["default"].to_dict())
    ld.load_adapter(pipe, tmp_path / "pytorch_lora_weights.safetensors")
    assert close(unet_call(pipe.unet), unet_call(ref.unet))
