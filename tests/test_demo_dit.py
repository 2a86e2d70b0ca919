"""The DiT demo model (issue 18): the folder our builder writes is a stock ``StableDiffusion3Pipeline`` that loads
with default arguments and generates 32x32 images; the cheap training forward (one zero "T5" token with an ln(256)
attention bias) is exactly the stock forward with 256 zero tokens; the pretrain command stops, resumes, refuses
another architecture and exports a loadable folder; the shipped folder is small."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_diffusion.demo import model as dm
from training import pretrain_demo_dit as pdd

TINY = pdd.DitArch(layers=2, heads=2, head_dim=8, text_hidden=16, text_layers=2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return pdd.build_demo_dit_pipeline(tmp_path_factory.mktemp("dit") / "demo-sd3", seed=0)


def test_builder_folder_loads_in_stock_diffusers_and_generates(folder):
    from diffusers import DiffusionPipeline, StableDiffusion3Pipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder))  # default arguments
    assert isinstance(pipe, StableDiffusion3Pipeline)
    t5 = pipe.text_encoder_3(pipe.tokenizer_3(["a red star"], return_tensors="pt").input_ids)[0]
    assert t5.abs().max() == 0  # the stand-in T5 gives what the pipeline uses without one
    assert pipe.transformer.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red star on a blue background", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
    info = dm.demo_model_info(folder)
    assert info["family"] == "sd3" and info["resolution"] == 32 and info["arch"] == pdd.asdict(pdd.DitArch())
    assert dm.is_demo_model(folder) and dm.check_model_folder(folder) == []
    assert type(dm.load_demo_pipeline(folder)).__name__ == "StableDiffusion3Pipeline"


def test_damaged_dit_folder_names_the_file_and_the_dit_rebuild_command(folder, tmp_path):
    import shutil

    broken = Path(shutil.copytree(folder, tmp_path / "demo-sd3"))
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    assert any("transformer has no .safetensors" in p for p in dm.check_model_folder(broken))
    with pytest.raises(dm.DemoModelError, match=r"transformer has no \.safetensors.*python -m training\.pretrain_demo_dit"):
        dm.load_demo_pipeline(broken)


def test_shipped_arch_fits_the_size_budget(folder):
    size = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
    assert size <= 20 * 2**20, f"{size / 2**20:.1f} MB"


def _tiny_pipe(dtype=torch.float64):
    from diffusers import StableDiffusion3Pipeline

    torch.manual_seed(0)
    tok = pdd.build_tokenizer(TINY.max_length)
    m = pdd.build_models(TINY, len(tok))
    for mod in m["transformer"].modules():  # adaLN-Zero makes the blocks the identity: perturb them
        if isinstance(mod, torch.nn.Linear):
            torch.nn.init.normal_(mod.weight, std=0.3)
    m["vae"].register_to_config(scaling_factor=1.0, shift_factor=0.0)
    pipe = StableDiffusion3Pipeline(transformer=m["transformer"], scheduler=pdd.build_scheduler(TINY), vae=m["vae"],
                                    text_encoder=m["text_encoder"], tokenizer=tok, text_encoder_2=m["text_encoder_2"],
                                    tokenizer_2=tok, text_encoder_3=m["text_encoder_3"], tokenizer_3=tok)
    return pipe.to(dtype)


def test_training_forward_equals_the_stock_forward_with_256_zero_tokens():
    pipe = _tiny_pipe()
    prompts = ["a red star on a blue background", "", "a large green moon in a photo"]
    stock_ctx, _, stock_pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False)
    assert stock_ctx.shape == (3, TINY.max_length + 256, TINY.joint_dim)  # what the pipeline really appends
    pipe.text_encoder_3 = None  # and what it does without a T5
    torch.testing.assert_close(pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False)[0],
                               stock_ctx, rtol=0, atol=0)
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=TINY.max_length, truncation=True,
                         return_tensors="pt").input_ids
    ctx, pooled = pdd.encode_text([pipe.text_encoder, pipe.text_encoder_2], ids, TINY.joint_dim)
    torch.testing.assert_close(ctx, stock_ctx[:, :TINY.max_length], rtol=0, atol=0)
    torch.testing.assert_close(pooled, stock_pooled, rtol=0, atol=0)
    x = torch.randn(3, 4, TINY.latent_size, TINY.latent_size, dtype=torch.float64)
    t = torch.tensor([990.0, 500.0, 20.0], dtype=torch.float64)
    tr = pipe.transformer
    stock = tr(hidden_states=x, timestep=t, encoder_hidden_states=stock_ctx, pooled_projections=stock_pooled,
               return_dict=False)[0]
    tr.set_attn_processor(pdd.zero_tokens_processor(256))
    ours = pdd.training_forward(tr, x, t, ctx, pooled)
    torch.testing.assert_close(ours, stock, rtol=1e-10, atol=1e-10)
    tr.set_attn_processor(pdd.zero_tokens_processor(1))  # without the bias: another function
    assert (pdd.training_forward(tr, x, t, ctx, pooled) - stock).abs().max() > 1e-3


def test_sigma_sampling_is_the_schedulers_shift_of_a_logit_normal():
    g = torch.Generator().manual_seed(0)
    s = pdd.sample_sigmas(20000, pdd.DitTrain(), 3.0, g)
    assert 0 < s.min() and s.max() < 1
    assert abs(float(s.median()) - 0.75) < 0.01  # shift(0.5) = 3*0.5/(1+2*0.5)
    sched = pdd.build_scheduler(pdd.DitArch())
    sched.set_timesteps(28)
    sig = sched.sigmas[:-1].double()
    u = sig / (3 - 2 * sig)  # the inverse of the shift: the pipeline's steps are the shift of an even grid
    assert float(u[0]) == pytest.approx(1.0) and torch.allclose(u.diff(), u.diff().mean(), atol=1e-6)


def _run(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "training.pretrain_demo_dit", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_pretrain_command_stops_resumes_refuses_another_arch_and_exports(tmp_path):
    init = dm.default_model_path(check=False)
    if dm.check_model_folder(init):
        pytest.skip("assets/demo-sd not built (python -m training.pretrain_demo)")
    common = ["--out", str(tmp_path / "work"), "--model-dir", str(tmp_path / "model"), "--bank", "64", "--batch", "4",
              "--steps", "2", "--checkpoint-every", "1", "--layers", "2", "--measure", "0", "--threads", "1"]
    r = _run([*common, "--max-minutes", "0"], tmp_path)  # stops after its first step, with a checkpoint
    assert r.returncode == 3, r.stderr[-2000:]
    r = _run([*common[:-4], "--layers", "3", "--measure", "0", "--resume"], tmp_path)
    assert r.returncode != 0 and "another architecture" in r.stderr and "layers" in r.stderr
    r = _run([*common[:-4], "--measure", "1", "--sample-steps", "2", "--threads", "1", "--resume"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads((tmp_path / "model" / "demo_model.json").read_text())
    assert info["trained"] and info["family"] == "sd3" and info["metrics"]["latents"]["scaling_factor"] > 0
    assert {"pretrain", "pretrain-heldout-combos"} <= set(info["metrics"]["generation"])  # the evaluator's figures
    pipe = dm.load_demo_pipeline(tmp_path / "model")
    assert pipe.vae.config.shift_factor == pytest.approx(info["metrics"]["latents"]["shift_factor"], abs=1e-5)
    img = pipe("a red star on a blue background", num_inference_steps=2, output_type="np").images[0]
    assert img.shape == (32, 32, 3)


def test_shipped_dit_demo_model_is_complete_and_small():
    path = dm.default_dit_model_path(check=False)
    if not path.exists():
        pytest.skip("assets/demo-sd3 not built (python -m training.pretrain_demo_dit)")
    assert dm.check_model_folder(path) == []
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size <= 20 * 2**20, f"{size / 2**20:.1f} MB"
    info = dm.demo_model_info(path)
    assert info["trained"] and info["family"] == "sd3"
    gen = info["metrics"]["generation"]
    assert (gen["steps"], gen["guidance"]) == (28, 7.0)  # measured with the pipeline's default call arguments
    assert {"shape", "color", "background"} <= set(gen["pretrain-heldout-combos"])


def test_shipped_dit_demo_model_draws_prompts_with_default_call_arguments():
    """The stock pipeline, default load and default call (28 steps, guidance 7), on held-out combinations."""
    from diffusers import DiffusionPipeline

    from lora_diffusion.demo import world
    from lora_diffusion.demo.evaluator import load_evaluator

    path = dm.default_dit_model_path(check=False)
    if not path.exists():
        pytest.skip("assets/demo-sd3 not built (python -m training.pretrain_demo_dit)")
    pipe = DiffusionPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    scenes = world.sample_scenes(8, 99, "pretrain-heldout-combos", textured=0.0)
    images = pipe([s.caption() for s in scenes], generator=torch.Generator().manual_seed(0), output_type="np").images
    arr = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    acc = load_evaluator().accuracy(arr, [{"shape": s.shape, "color": s.color, "background": s.background} for s in scenes])
    assert acc["shape"] >= 6 / 8 and acc["color"] >= 6 / 8 and acc["background"] >= 7 / 8, acc
