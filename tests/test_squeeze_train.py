"""LoRA-Squeeze then continue training: a squeezed file initialises the trainer (``--init_adapter``)."""

from __future__ import annotations

import pytest
import torch

import lora_diffusion as ld
from lora_diffusion.io.files import read_safetensors
from training.config import ConfigError, TLoRAConfig, resolve_defaults
from training.train_tlora import train

from .tiny_sd import _one_thread, sd_model, subject, tiny_config  # noqa: F401


def test_train_squeeze_then_continue_from_the_squeezed_file(sd_model, subject, tmp_path):  # noqa: F811
    from diffusers import StableDiffusionPipeline

    first = train(tiny_config(sd_model, subject, tmp_path / "a", max_train_steps=2, learning_rate=1e-2))
    pipe = StableDiffusionPipeline.from_pretrained(sd_model, safety_checker=None)
    sq = tmp_path / "squeezed.safetensors"
    rep = ld.squeeze_file(first.outputs["canonical"], sq, rank=2, model=pipe)
    assert {m.rank for m in rep.modules} == {2}
    # a negligible lr: the saved adapter is the squeezed file, so training started from it (a fresh init has B = 0)
    frozen = train(tiny_config(sd_model, subject, tmp_path / "b", max_train_steps=1, learning_rate=1e-12,
                               adam_weight_decay=0.0, init_adapter=str(sq)))
    got, want = read_safetensors(frozen.outputs["canonical"])[0], read_safetensors(sq)[0]
    adapter_keys = [k for k in want if ".lora_" in k]
    assert adapter_keys and all(torch.allclose(got[k], want[k], atol=1e-9) for k in adapter_keys)
    assert any(want[k].abs().max() > 1e-3 for k in adapter_keys if 'lora_B' in k)
    moved = train(tiny_config(sd_model, subject, tmp_path / "c", max_train_steps=2, learning_rate=1e-2,
                              init_adapter=str(sq)))
    pipe2 = StableDiffusionPipeline.from_pretrained(sd_model, safety_checker=None)
    name = ld.load_adapter(pipe2, moved.outputs["canonical"])
    spec = ld.get_spec(pipe2.unet, name)
    assert spec.variant == "lora" and spec.rank == 2
    assert not all(torch.equal(read_safetensors(moved.outputs["canonical"])[0][k], want[k]) for k in adapter_keys)


def test_init_adapter_bad_file_is_one_clear_error(tmp_path):
    cfg = TLoRAConfig()
    cfg.adapter.init_adapter = str(tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match="--init_adapter: .*missing.safetensors: no such file"):
        resolve_defaults(cfg, ld.variant_names())
