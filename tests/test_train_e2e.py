"""The one-image trainer end to end on tiny SD / SDXL pipelines built from configs (CPU, few steps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lora_diffusion as ld
from training.train_tlora import train

from .tiny_sd import _one_thread, sd_model, sdxl_model, subject, tiny_config  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["tlora", "lora", "dora", "loha", "lokr", "vera"]


@pytest.mark.parametrize("variant", sorted(set(VARIANTS) | set(ld.variant_names())))
def test_every_variant_trains_and_saves(variant, sd_model, subject, tmp_path):  # noqa: F811
    res = train(tiny_config(sd_model, subject, tmp_path, variant=variant, max_train_steps=2))
    assert len(res.losses) == 2 and all(torch.isfinite(torch.tensor(res.losses)))
    pipe = _pipe(sd_model)
    name = ld.load_adapter(pipe, res.outputs["canonical"])
    assert ld.get_spec(pipe.unet, name).variant == variant


def _pipe(folder: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def probe_loss(pipe, image_dir: Path, n: int = 12) -> float:
    """Denoising loss on the training image at n fixed (timestep, noise) pairs, timestep set for T-LoRA."""
    from training.data import load_image

    px = load_image(sorted(image_dir.iterdir())[0], 32).unsqueeze(0)  # 40 px -> 32 px, the training view
    lat = pipe.vae.encode(px).latent_dist.mean * pipe.vae.config.scaling_factor
    emb, _ = pipe.encode_prompt("a photo of sks dog", "cpu", 1, False)
    g = torch.Generator().manual_seed(123)
    total = 0.0
    for t in torch.linspace(0, 999, n).long():
        noise = torch.randn(lat.shape, generator=g)
        ld.set_timestep(pipe.unet, t)
        pred = pipe.unet(pipe.scheduler.add_noise(lat, noise, t), t, emb).sample
        total += F.mse_loss(pred, noise).item()
    return total / n


@pytest.mark.slow
def test_loss_falls_when_overfitting_one_image(sd_model, subject, tmp_path):  # noqa: F811
    res = train(tiny_config(sd_model, subject, tmp_path, max_train_steps=60, learning_rate=1e-2, lora_rank=8,
                            min_rank=4))
    base = _pipe(sd_model)
    before = probe_loss(base, subject)
    ld.load_adapter(base, res.outputs["canonical"])
    after = probe_loss(base, subject)
    first, last = sum(res.losses[:15]) / 15, sum(res.losses[-15:]) / 15
    assert after < 0.85 * before, (before, after)  # measured: 1.063 -> 0.797
    assert last < first, (first, last)


@pytest.mark.slow
def test_resume_after_kill_reproduces_losses(sd_model, subject, tmp_path):  # noqa: F811
    """Kill (an exception right after step 5) then --resume_from_checkpoint latest: same losses as one run."""
    kw = dict(max_train_steps=6, checkpointing_steps=2, random_flip=True, lora_dropout=0.1)
    full = train(tiny_config(sd_model, subject, tmp_path / "a", **kw))
    import training.train_tlora as tt

    real_fit = tt.fit

    def killed_fit(*a, **kw):  # train() calls fit(acc, model, opt, sched, data, objective, loop, start, hooks, ...)
        return real_fit(*a[:8], [*a[8], _kill_after(5)], **kw)

    tt.fit = killed_fit
    try:
        with pytest.raises(KeyboardInterrupt):
            train(tiny_config(sd_model, subject, tmp_path / "b", **kw))
    finally:
        tt.fit = real_fit
    ckpts = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-2", "checkpoint-4"]
    resumed = train(tiny_config(sd_model, subject, tmp_path / "b", resume_from_checkpoint="latest", **kw))
    assert resumed.first_step == 5
    assert resumed.losses == full.losses[4:]
    ua, ub = _pipe(sd_model).unet, _pipe(sd_model).unet  # the same final weights
    ld.load_adapter(ua, full.outputs["canonical"], name="s")
    ld.load_adapter(ub, resumed.outputs["canonical"], name="s")
    for (k, va), (_, vb) in zip(ld.adapter_state_dict(ua, "s").items(), ld.adapter_state_dict(ub, "s").items()):
        assert torch.equal(va, vb), k


def _kill_after(step: int):
    def hook(s: int, logs: dict) -> None:
        if s == step:
            raise KeyboardInterrupt

    return hook


def test_sdxl_trains(sdxl_model, subject, tmp_path):  # noqa: F811
    res = train(tiny_config(sdxl_model, subject, tmp_path, max_train_steps=2, validation_prompts="a {0} on the beach",
                            num_inference_steps=2, checkpointing_steps=2))
    assert len(res.losses) == 2
    assert (tmp_path / "samples" / "step-2").is_dir()
    assert [p.name for p in res.checkpoints] == ["checkpoint-2"]


def test_prior_preservation_accumulation_bf16(sd_model, subject, tmp_path):  # noqa: F811
    from .tiny_sd import write_images

    classes = write_images(tmp_path / "class", n=2, size=36, seed=5)
    res = train(tiny_config(sd_model, subject, tmp_path / "out", max_train_steps=2, with_prior_preservation=True,
                            class_data_dir=str(classes), gradient_accumulation_steps=2, mixed_precision="bf16",
                            gradient_checkpointing=True, center_crop=False, random_flip=True,
                            prompt_template="a photo of {0}#a rendering of {0}"))
    assert len(res.losses) == 2 and all(torch.isfinite(torch.tensor(res.losses)))
    unet = _pipe(sd_model).unet
    ld.load_adapter(unet, res.outputs["canonical"])
    assert all(p.dtype == torch.float32 for _, p in ld.adapter_parameters(unet))


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
def test_cli_and_formats_load_in_diffusers(sd_model, subject, tmp_path):  # noqa: F811
    """The console entry (python -m training.train_tlora) with a YAML config; kohya/diffusers files load in diffusers."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model:\n  pretrained_model_name_or_path: {sd_model}\nadapter:\n  lora_rank: 4\n  min_rank: 2\n"
                   f"train_data_dir: {subject}\nclass_name: dog\nresolution: 32\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "training.train_tlora", "--config", str(cfg), "--max_train_steps", "3",
           "--checkpointing_steps", "3", "--output_dir", str(out), "--cpu", "--validation_prompts", "a {0} in the snow",
           "--num_inference_steps", "2"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "train tlora" in p.stderr and "loss=" in p.stderr  # the progress bar
    assert (out / "tlora.safetensors").is_file() and (out / "samples" / "step-3").is_dir()
    assert list((out / "logs").glob("events.out.tfevents.*"))
    if not (out / "pytorch_lora_weights.safetensors").is_file():
        pytest.skip("the library has no kohya/diffusers writer yet")
    for fname in ("pytorch_lora_weights.safetensors", "tlora.kohya.safetensors"):
        pipe = _pipe(sd_model)
        x, t = torch.randn(1, 4, 16, 16), torch.tensor([10])
        emb, _ = pipe.encode_prompt("a photo of sks dog", "cpu", 1, False)
        with torch.no_grad():
            before = pipe.unet(x, t, emb).sample
            pipe.load_lora_weights(str(out / fname), adapter_name="subject")
            after = pipe.unet(x, t, emb).sample
        assert not torch.allclose(before, after), f"{fname} changed nothing"
        ours = _pipe(sd_model)
        ld.load_adapter(ours, out / "tlora.safetensors")  # at full rank (no timestep) = the exported plain LoRA
        with torch.no_grad():
            ref = ours.unet(x, t, emb).sample
        torch.testing.assert_close(after, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
# AdaLoRA: a post-step hook reading all-reduced gradients; Delta-LoRA: a snapshot of the synchronised factors at K
@pytest.mark.parametrize("variant", ["tlora", "adalora", "deltalora"])
def test_accelerate_launch_two_cpu_processes(sd_model, subject, tmp_path, variant):  # noqa: F811
    """Data parallel on CPU (gloo). accelerate 1.15's launcher runs a single process for ``--cpu --num_processes 2``
    (multi-CPU needs mpirun), so two processes are started with its torchrun launcher and the trainer's --cpu."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "training.train_tlora",
           "--model", str(sd_model), "--instance_data_dir", str(subject), "--class_name", "dog", "--lora_rank", "4",
           "--resolution", "32", "--max_train_steps", "3", "--checkpointing_steps", "3",
           "--output_dir", str(out), "--cpu", "--report_to", "none", "--variant", variant]
    cmd += ["--min_rank", "2"] if variant == "tlora" else []
    cmd += ["--adapter_options", '{"start_step": 1}'] if variant == "deltalora" else []  # W moves at steps 2 and 3
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    ck = out / "checkpoints" / "checkpoint-3"
    assert json.loads((ck / "checkpoint.json").read_text())["num_processes"] == 2
    assert (ck / "local-0.pt").is_file() and (ck / "local-1.pt").is_file()
    assert (out / f"{variant}.safetensors").is_file()
    if variant == "deltalora":  # the snapshot (A_K, B_K) of step 1 is saved and W moved after it (A != A_K)
        from safetensors.torch import load_file

        sd = load_file(out / "deltalora.safetensors")
        snap = {k: v for k, v in sd.items() if k.endswith("lora_A_K")}
        assert snap and any(not torch.equal(v, sd[k[:-2]]) for k, v in snap.items())


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(sd_model, subject, tmp_path, monkeypatch):  # noqa: F811
    from training.objectives import DiffusionObjective
    from training.train_tlora import TrainingError

    real = DiffusionObjective.__call__
    calls = []

    def nan_at_3(self, batch):
        calls.append(1)
        loss = real(self, batch)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(DiffusionObjective, "__call__", nan_at_3)
    with pytest.raises(TrainingError, match=r"step 3: the loss is nan.*last good checkpoint: .*checkpoint-2"):
        train(tiny_config(sd_model, subject, tmp_path, max_train_steps=6, checkpointing_steps=2))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-2"]
    assert not (tmp_path / "tlora.safetensors").exists()
