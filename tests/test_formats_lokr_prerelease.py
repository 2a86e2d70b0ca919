"""LoKr files of pre-release LyCORIS: factor layouts no current option set makes (the input side split the other
way round, 3x3 kernels spread across both factors). The layout is read from the tensors and ΔW follows the rule A1111
and ComfyUI apply: kron(W1 or W1a·W1b, W2 or W2a·W2b).reshape(weight.shape) · alpha/dim (scale 1 when both are full)."""

from __future__ import annotations

import copy

import pytest
import torch

import lora_diffusion as ld
from lora_diffusion.io.files import read_safetensors, write_safetensors

from .test_formats_helpers import adaptable_weights, close, max_rel_diff, sd15_pipeline, unet_call

pytestmark = pytest.mark.usefixtures("one_thread")

FF = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"  # Linear 32 -> 256
FF2 = FF.replace("attentions.0", "attentions.1")
CONV = "down_blocks.0.resnets.0.conv1"  # Conv 32 -> 32, 3x3: fan_in 288
CONV2 = CONV.replace("resnets.0", "resnets.1")
# module, W1 (a, c), W2 (b, d), which factor is decomposed; current LyCORIS would split in = 32 so that c | 32
LAYOUTS = [(FF, (16, 8), (16, 4), "w2"), (CONV, (8, 24), (4, 12), "w2"), (CONV2, (4, 36), (8, 8), "w1"),
           (FF2, (32, 4), (8, 8), "none")]


def _factor(g, shape, r, decomposed, std=1.0):
    if not decomposed:
        return {"": torch.randn(*shape, generator=g) * std}
    return {"_a": torch.randn(shape[0], r, generator=g) * std, "_b": torch.randn(r, shape[1], generator=g)}


def _file(pipe, path, r=2, alpha=1.0, seed=0):
    """The file and the rule's merged weights: W + kron(W1, W2).reshape(W.shape) · (alpha/r, or 1 if both full)."""
    g = torch.Generator().manual_seed(seed)
    sd, want = {}, adaptable_weights(pipe.unet)
    for mod, s1, s2, dec in LAYOUTS:
        flat = f"lora_unet_{mod.replace('.', '_')}"
        f1, f2 = _factor(g, s1, r, dec == "w1"), _factor(g, s2, r, dec == "w2", 0.1)
        sd |= {f"{flat}.lokr_w1{k}": v for k, v in f1.items()} | {f"{flat}.lokr_w2{k}": v for k, v in f2.items()}
        sd[f"{flat}.alpha"] = torch.tensor(alpha)
        w1, w2 = (f[""] if "" in f else f["_a"] @ f["_b"] for f in (f1, f2))
        scale = 1.0 if dec == "none" else alpha / r
        want[mod] = want[mod] + (torch.kron(w1, w2) * scale).reshape(want[mod].shape)
    write_safetensors(path, sd, {"ss_network_module": "lycoris.kohya"})
    return sd, want


def test_prerelease_lokr_layouts_follow_the_a1111_comfyui_rule(tmp_path):
    pipe = sd15_pipeline()
    path = tmp_path / "old_lokr.safetensors"
    sd, want = _file(pipe, path)
    ours = copy.deepcopy(pipe)
    ld.load_adapter(ours, path, name="k")
    used = sum(len(ld.adapter_state_dict(ours.unet, n)) for n in ld.list_adapters(ours.unet))
    assert used == sum(1 for k in sd if not k.endswith(".alpha"))  # every tensor consumed
    out = unet_call(ours.unet)
    ld.merge_adapters(ours)
    assert max_rel_diff(adaptable_weights(ours.unet), want) < 1e-5
    ld.unmerge_adapters(ours)
    again_path = ld.save_adapter(ours, tmp_path / "again.safetensors", "k", format="kohya")  # the same layout back
    assert set(read_safetensors(again_path)[0]) == set(sd)
    again = sd15_pipeline()
    ld.load_adapter(again, again_path)
    assert close(unet_call(again.unet), out, 1e-5)


def test_lokr_factors_that_cannot_fit_say_what_they_give(tmp_path):
    pipe = sd15_pipeline()
    flat = f"lora_unet_{FF.replace('.', '_')}"
    bad = {f"{flat}.lokr_w1": torch.randn(16, 8), f"{flat}.lokr_w2": torch.randn(16, 5)}
    write_safetensors(tmp_path / "bad.safetensors", bad, {})
    with pytest.raises(ld.AdapterFileError, match=r"bad.safetensors: key '.*ff_net_0_proj.lokr_w1': LoKr factors W1 \(16x8\) "
                                                  r"and W2 \(16x5\) give a \(256x40\) Kronecker product; expected "
                                                  r"out·fan_in = 256x32"):
        ld.load_adapter(pipe, tmp_path / "bad.safetensors")
    assert ld.list_adapters(pipe) == []
