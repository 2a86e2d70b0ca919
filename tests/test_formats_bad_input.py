"""A corpus of broken files: each gives one clear error naming the file, the key and what was expected,
and nothing is applied unless everything applies."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

import lora_diffusion as ld
from lora_diffusion import AdapterError, AdapterFileError

from .test_formats_helpers import adaptable_weights, sd15_pipeline

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


pytestmark = pytest.mark.usefixtures("one_thread")  # one intra-op thread, restored after the module


@pytest.fixture(scope="module")
def pipe():
    return sd15_pipeline()


def good(pipe) -> dict[str, torch.Tensor]:
    return {f"{Q}.lora_down.weight": torch.randn(4, 32), f"{Q}.lora_up.weight": torch.randn(32, 4),
            f"{Q}.alpha": torch.tensor(4.0)}


def untouched(pipe, before) -> bool:
    return ld.list_adapters(pipe) == [] and all(torch.equal(a, before[k]) for k, a in adaptable_weights(pipe.unet).items())


def write(path, tensors, meta=None):
    save_file(tensors, str(path), metadata=meta)
    return path


def test_truncated_file(tmp_path, pipe):
    p = write(tmp_path / "trunc.safetensors", good(pipe))
    p.write_bytes(p.read_bytes()[:-40])
    with pytest.raises(AdapterFileError, match=r"trunc.safetensors: tensors need \d+ bytes but the file has \d+; .*truncated"):
        ld.load_adapter(pipe, p)


def test_header_lies_about_size(tmp_path, pipe):
    p = write(tmp_path / "liar.safetensors", good(pipe))
    raw = p.read_bytes()
    p.write_bytes(struct.pack("<Q", 10**7) + raw[8:])
    with pytest.raises(AdapterFileError, match=r"liar.safetensors: header claims 10000000 bytes but the file has"):
        ld.load_adapter(pipe, p)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_tensor_named(tmp_path, pipe, bad):
    t = good(pipe)
    t[f"{Q}.lora_up.weight"][3, 1] = bad
    p = write(tmp_path / "nan.safetensors", t)
    with pytest.raises(AdapterFileError, match=rf"nan.safetensors: tensor '{Q}.lora_up.weight' contains NaN or Inf"):
        ld.load_adapter(pipe, p)


def test_shape_that_does_not_fit_applies_nothing(tmp_path, pipe):
    before = adaptable_weights(pipe.unet)
    t = good(pipe)
    k = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"
    t.update({f"{k}.lora_down.weight": torch.randn(4, 99), f"{k}.lora_up.weight": torch.randn(32, 4)})
    p = write(tmp_path / "shape.safetensors", t)
    with pytest.raises(AdapterFileError, match=rf"shape.safetensors: key '{k}.lora_down.weight': shape \(4, 99\) does not "
                                               r"fit the model; expected \(4, 32\)"):
        ld.load_adapter(pipe, p)
    assert untouched(pipe, before)


def test_rank_mismatch_between_down_and_up_applies_nothing(tmp_path, pipe):
    before = adaptable_weights(pipe.unet)
    t = good(pipe)
    t[f"{Q}.lora_up.weight"] = torch.randn(32, 3)
    p = write(tmp_path / "rank.safetensors", t)
    with pytest.raises(AdapterFileError, match=rf"rank.safetensors: key '{Q}.lora_up.weight': shape \(32, 3\).*"
                                               r"expected \(32, 4\)"):
        ld.load_adapter(pipe, p)
    assert untouched(pipe, before)


def test_sdxl_lora_on_sd15_model(tmp_path):
    sd15 = sd15_pipeline(cross=768)
    t = {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(4, 1280),
         "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(1280, 4),
         "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.randn(4, 2048),
         "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.randn(640, 4)}
    p = write(tmp_path / "sdxl_style.safetensors", t, {"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(AdapterFileError, match=r"sdxl_style.safetensors: this LoRA is for SDXL; the model is SD1.x"):
        ld.load_adapter(sd15, p)
    assert ld.list_adapters(sd15) == []


def test_unknown_format(tmp_path, pipe):
    p = write(tmp_path / "weird.safetensors", {"model.diffusion.something": torch.zeros(2)})
    with pytest.raises(AdapterFileError, match=r"weird.safetensors: key 'model.diffusion.something': unknown adapter format"
                                               r".*expected kohya"):
        ld.load_adapter(pipe, p)


def test_unsupported_lycoris_algorithm(tmp_path, pipe):
    p = write(tmp_path / "full.safetensors", {f"{Q}.diff": torch.zeros(32, 32)})
    with pytest.raises(AdapterFileError, match=rf"full.safetensors: key '{Q}.diff': LyCORIS full fine-tune \(diff\) modules "
                                               "are not supported"):
        ld.load_adapter(pipe, p)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_pickle_refused(tmp_path, pipe, suffix):
    p = tmp_path / f"old{suffix}"
    torch.save(good(pipe), p)
    with pytest.raises(AdapterFileError, match=rf"old\{suffix}: .*pickle"):
        ld.load_adapter(pipe, p)


def test_dotdot_in_key_and_name(tmp_path, pipe):
    k = "lora_unet_../../etc/passwd.lora_down.weight"
    p = write(tmp_path / "dots.safetensors", {k: torch.zeros(4, 32)})
    with pytest.raises(AdapterFileError, match=r"dots.safetensors: key 'lora_unet_\.\./\.\./etc/passwd\.lora_down\.weight'"):
        ld.load_adapter(pipe, p)
    p = write(tmp_path / "ok.safetensors", good(pipe))
    with pytest.raises(AdapterError, match=r"adapter name '\.\./evil': expected a non-empty name without"):
        ld.load_adapter(pipe, p, name="../evil")
    with pytest.raises(AdapterFileError, match=r"\.\./no/such\.safetensors: no such file or folder"):
        ld.load_adapter(pipe, "../no/such.safetensors")
    assert ld.list_adapters(pipe) == []


def test_uncached_hub_repo_is_a_clear_error(pipe, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(AdapterFileError, match=r"someone/some-lora: not a local file or folder, and the Hugging Face repo "
                                               r"'someone/some-lora' is not in the local cache"):
        ld.load_adapter(pipe, "someone/some-lora")


def test_peft_folder_with_bad_config(tmp_path, pipe):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "adapter_config.json").write_text("{not json")
    write(tmp_path / "p" / "adapter_model.safetensors", {"base_model.model.x.lora_A.weight": torch.zeros(1, 1)})
    with pytest.raises(AdapterFileError, match=r"adapter_config.json: not a readable JSON config"):
        ld.load_adapter(pipe.unet, tmp_path / "p")
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1}))
    with pytest.raises(AdapterFileError, match=r"adapter_model.safetensors: key 'base_model.model.x.lora_A.weight': module 'x' "
                                               r"is not in the model"):
        ld.load_adapter(pipe.unet, tmp_path / "p")
