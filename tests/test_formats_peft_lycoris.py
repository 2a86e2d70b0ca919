"""PEFT LoHa and LoKr folders (``peft_type`` LOHA / LOKR), both directions, against PEFT itself: folders PEFT writes
load here, and ours load in ``PeftModel.from_pretrained``, with identical logits (tiny Llama, GPT-2's Linear head) and
identical UNet outputs. PEFT's LoKr scales alpha/r even when both Kronecker factors are full (LyCORIS and we: 1); that
case is covered both ways."""

from __future__ import annotations

import json

import pytest
import torch

import lora_diffusion as ld
from lora_diffusion import llm

from .conftest import perturb
from .test_formats_helpers import close, sd15_pipeline, unet_call
from .test_formats_peft_diffusers import _llama, _logits

pytestmark = pytest.mark.usefixtures("one_thread")

LLM_T = ["q_proj", "v_proj", "down_proj"]
PEFT_CONFIGS = {  # name -> (config class, kwargs)
    "loha": ("LoHaConfig", dict(r=4, alpha=8, rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3})),
    "lokr": ("LoKrConfig", dict(r=2, alpha=4)),
    "lokr_decompose_both": ("LoKrConfig", dict(r=2, alpha=3, decompose_both=True, decompose_factor=4)),
    "lokr_both_full": ("LoKrConfig", dict(r=16, alpha=4)),  # r >= max(b, d)/2: W2 full too; PEFT scale alpha/r = 1/4
}
OUR_SPECS = {
    "loha": ld.AdapterSpec("loha", rank=4, alpha=2, targets=LLM_T, rank_pattern={"down_proj": 2}),
    "lokr": ld.AdapterSpec("lokr", rank=2, alpha=4, targets=LLM_T, options={"decompose_both": True, "factor": 4}),
    "lokr_both_full": ld.AdapterSpec("lokr", rank=16, alpha=4, targets=LLM_T),
}


def _peft_model(model, case: str, targets: list[str], **extra):
    import peft

    cls, kw = PEFT_CONFIGS[case]
    cfg = getattr(peft, cls)(target_modules=targets, init_weights=False, **kw, **extra)
    return peft.get_peft_model(model, cfg).eval()


@pytest.mark.parametrize("case", list(PEFT_CONFIGS))
def test_peft_written_folder_loads_here(tmp_path, case):
    theirs = _peft_model(_llama(), case, LLM_T)
    theirs.save_pretrained(str(tmp_path / "p"))
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["peft_type"] in ("LOHA", "LOKR")
    ours = _llama()
    ld.load_adapter(ours, tmp_path / "p", name="p")
    assert ld.get_spec(ours, "p").variant == case[:4]
    assert close(_logits(ours), _logits(theirs))


@pytest.mark.parametrize("case", list(OUR_SPECS))
def test_our_folder_loads_in_peft(tmp_path, case):
    from peft import PeftModel

    model = _llama()
    ld.add_adapter(model, OUR_SPECS[case], "a")
    perturb(model, "a", std=0.1)
    folder = llm.save_peft_adapter(model, tmp_path / "peft", "a")  # what the LLM trainer writes
    theirs = PeftModel.from_pretrained(_llama(), str(folder)).eval()
    assert close(_logits(theirs), _logits(model))
    again = _llama()
    ld.load_adapter(again, folder, name="b")
    assert close(_logits(again), _logits(model))


def test_gpt2_linear_head_both_ways_and_conv1d_refused(tmp_path):
    from peft import PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=128, n_positions=32,
                                          bos_token_id=0, eos_token_id=0)).eval()

    theirs = _peft_model(gpt2(), "loha", ["lm_head"])
    theirs.save_pretrained(str(tmp_path / "p"))
    ours = gpt2()
    ld.load_adapter(ours, tmp_path / "p")  # PEFT also wrote lm_head.base_layer.weight (an embedding layer): checked
    assert close(_logits(ours), _logits(theirs))
    from lora_diffusion.io.files import read_safetensors, write_safetensors

    sd, meta = read_safetensors(tmp_path / "p" / "adapter_model.safetensors")
    sd["base_model.model.lm_head.base_layer.weight"] = sd["base_model.model.lm_head.base_layer.weight"] + 1
    write_safetensors(tmp_path / "p" / "adapter_model.safetensors", sd, meta)
    other = gpt2()
    with pytest.raises(ld.AdapterFileError, match=r"key 'base_model.model.lm_head.base_layer.weight': a copy of the base "
                                                  r"weight of 'lm_head' that differs"):
        ld.load_adapter(other, tmp_path / "p")
    assert ld.list_adapters(other) == []
    model = gpt2()
    ld.add_adapter(model, ld.AdapterSpec("lokr", rank=4, alpha=2, targets=["lm_head"]), "a")
    perturb(model, "a", std=0.1)
    folder = ld.save_adapter(model, tmp_path / "ours", "a", format="peft")
    assert close(_logits(PeftModel.from_pretrained(gpt2(), str(folder)).eval()), _logits(model))
    ld.add_adapter(model, ld.AdapterSpec("loha", rank=4, targets=["c_attn"]), "conv1d")
    with pytest.raises(ld.AdapterFileError, match=r"module 'transformer.h.0.attn.c_attn': PEFT's loha has no form for "
                                                  r"GPT-2 Conv1D layers"):
        ld.save_adapter(model, tmp_path / "c", "conv1d", format="peft")


@pytest.mark.parametrize("case", ["loha", "lokr"])
def test_peft_unet_folder_with_effective_conv2d_loads_here(tmp_path, case):
    """PEFT on a bare UNet, 3x3 convs with use_effective_conv2d (our use_tucker)."""
    pipe = sd15_pipeline()
    theirs = _peft_model(sd15_pipeline().unet, case, ["to_q", "to_v", "conv1", "conv2", "proj_in"], use_effective_conv2d=True)
    theirs.save_pretrained(str(tmp_path / "u"))
    ld.load_adapter(pipe.unet, tmp_path / "u", name="u")
    assert close(unet_call(pipe.unet), unet_call(theirs), 1e-4)
