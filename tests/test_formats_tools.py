"""The command-line converter and inspector, the LoRA library index, and T-LoRA export at full rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import lora_diffusion as ld
from lora_diffusion.convert import convert, main
from lora_diffusion.io.files import read_safetensors, write_safetensors
from lora_diffusion.io.library import LoraLibrary, describe

from .conftest import perturb
from .test_formats_helpers import close, sd15_pipeline, unet_call

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # real SD1.5: 320 -> 320
K2 = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"  # real SD1.5: 768 -> 1280


def sd15_kohya(path, rank=4):
    g = torch.Generator().manual_seed(0)
    t = {}
    for mod, (o, i) in {Q: (320, 320), K2: (1280, 768)}.items():
        f = "lora_unet_" + mod.replace(".", "_")
        t |= {f"{f}.lora_down.weight": torch.randn(rank, i, generator=g),
              f"{f}.lora_up.weight": torch.randn(o, rank, generator=g), f"{f}.alpha": torch.tensor(2.0)}
    t |= {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(rank, 768, generator=g),
          "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(768, rank, generator=g)}
    meta = {"ss_base_model_version": "sd_v1", "ss_network_alpha": "2", "ss_output_name": "mystyle",
            "ss_tag_frequency": json.dumps({"10_sks dog": {"sks dog": 12, "grass": 3, "smiling": 5}})}
    write_safetensors(path, t, meta)
    return path


def test_cli_convert_kohya_to_diffusers_and_peft_and_back(tmp_path):
    src = sd15_kohya(tmp_path / "civitai.safetensors")
    assert main([str(src), str(tmp_path / "d.safetensors"), "--to", "diffusers"]) == 0  # real SD1.5 names on meta
    d, dmeta = read_safetensors(tmp_path / "d.safetensors")
    assert f"unet.{Q}.lora_A.weight" in d
    assert "text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight" in d  # transformers 5 module names
    assert json.loads(dmeta["lora_adapter_metadata"])["unet.lora_alpha"] == 4  # scale 0.5 baked into lora_B: alpha = r
    convert(tmp_path / "d.safetensors", tmp_path / "k.safetensors", "kohya")
    a, b = read_safetensors(src)[0], read_safetensors(tmp_path / "k.safetensors")[0]
    alpha_te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"
    assert set(b) == set(a) | {alpha_te}

    def delta(sd, flat):  # the kohya rule: (alpha/r)·up·down, alpha = r when absent
        down, up = sd[f"{flat}.lora_down.weight"], sd[f"{flat}.lora_up.weight"]
        return float(sd.get(f"{flat}.alpha", down.shape[0])) / down.shape[0] * up @ down

    for flat in {k.partition(".")[0] for k in a}:
        assert torch.allclose(delta(a, flat), delta(b, flat), atol=1e-5)
    convert(src, tmp_path / "peft", "peft")
    assert (tmp_path / "peft" / "unet" / "adapter_config.json").is_file()


def test_cli_subprocess_and_errors(tmp_path):
    src = sd15_kohya(tmp_path / "x.safetensors")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    r = subprocess.run([sys.executable, "-m", "lora_diffusion.convert", "inspect", str(src)], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0 and "format: kohya" in r.stdout and "base: SD1.x" in r.stdout and "sks dog" in r.stdout
    assert main([str(tmp_path / "nope.safetensors"), str(tmp_path / "o"), "--to", "kohya"]) == 2


def test_inspect_reads_the_header_only(tmp_path, monkeypatch):
    src = sd15_kohya(tmp_path / "x.safetensors")
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("tensors were loaded"))
    info = describe(src)
    assert info["format"] == "kohya" and info["base_family"] == "sd1" and info["rank"] == 4 and info["alpha"] == "2"
    assert info["components"] == {"lora_unet": 2, "lora_te": 1} and info["variant"] == "lora"
    assert info["trigger_words"] == ["mystyle", "sks dog"] and info["tags"][:2] == ["sks dog", "smiling"]


def test_library_index_is_cached_and_refreshed(tmp_path, monkeypatch):
    lib = tmp_path / "loras"
    lib.mkdir()
    sd15_kohya(lib / "a.safetensors")
    pipe = sd15_pipeline()
    ld.add_adapter(pipe.unet, ld.AdapterSpec(rank=2, targets="unet-attn"), "b")
    ld.save_adapter(pipe, lib / "sub" / "b.safetensors", "b", format="diffusers", trigger_word="ohwx")
    (lib / "broken.safetensors").write_bytes(b"\x00" * 4)
    entries = {e["file"]: e for e in LoraLibrary(lib).scan()}
    assert entries["a.safetensors"]["format"] == "kohya" and len(entries["a.safetensors"]["sha256"]) == 64
    assert entries["sub/b.safetensors"]["trigger_words"] == ["ohwx"] and "error" in entries["broken.safetensors"]
    import lora_diffusion.io.library as library

    calls = []
    real = library.describe
    monkeypatch.setattr(library, "describe", lambda p: calls.append(p) or real(p))
    LoraLibrary(lib).scan()
    assert calls == []  # nothing changed: all from the cache
    sd15_kohya(lib / "a.safetensors", rank=8)
    assert {e["file"]: e for e in LoraLibrary(lib).scan()}["a.safetensors"]["rank"] == 8 and len(calls) == 1
    assert [e["file"] for e in LoraLibrary(lib).find("sks")] == ["a.safetensors"]


def test_tlora_export_full_rank_exact_and_canonical_keeps_schedule(tmp_path, caplog):
    pipe = sd15_pipeline()
    ld.add_adapter(pipe.unet, ld.AdapterSpec("tlora", rank=4, targets="unet-attn", seed=1), "t")
    perturb(pipe.unet, "t", std=0.05)
    ref = unet_call(pipe.unet)  # no timestep set: full rank
    k = ld.save_adapter(pipe, tmp_path / "t_kohya.safetensors", "t", format="kohya")
    assert "T-LoRA 't' written to kohya at full rank" in caplog.text
    c = ld.save_adapter(pipe, tmp_path / "t.safetensors", "t")
    for path, variant in ((k, "lora"), (c, "tlora")):
        fresh = sd15_pipeline()
        name = ld.load_adapter(fresh, path)
        assert ld.get_spec(fresh.unet, name).variant == variant and close(unet_call(fresh.unet), ref, 1e-4)
    assert ld.get_spec(fresh.unet, name).options == ld.get_spec(pipe.unet, "t").options  # the schedule survives
