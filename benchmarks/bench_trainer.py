"""Training-step speed and peak memory: our trainer vs the diffusers DreamBooth-LoRA step (PEFT adapter).

    python benchmarks/bench_trainer.py                         # CPU: narrow SD1.5-shaped UNet, 256 px, rank 16
    python benchmarks/bench_trainer.py --device cuda           # GPU: SDXL-shaped UNet (tests/fixtures) at 1024 px

Both sides train the same UNet (same config and seed) at the same resolution and rank on
to_q/to_k/to_v/to_out.0 of every attention block, batch 1, AdamW, cached latents and text
embeddings (random here, as the step does not depend on their values), same precision and
gradient checkpointing setting, under one ``accelerate.Accelerator``:

- ours: ``ld.add_adapter`` + ``training.objectives.DiffusionObjective`` + ``training.loop.train_step``
  (what ``train_tlora.py`` runs each step, T-LoRA timestep mask included for ``--variant tlora``);
- diffusers: ``unet.add_adapter(LoraConfig(r, lora_alpha=r, init_lora_weights="gaussian", ...))``,
  then ``add_noise`` -> ``unet(...)`` -> MSE -> ``accelerator.backward`` -> ``optimizer.step``, as in
  ``examples/dreambooth/train_dreambooth_lora(_sdxl).py``.

Each side runs in its own process; peak memory is the process's peak RSS on CPU (minus the RSS
after building the model, reported as "train") or ``torch.cuda.max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_trainer")
SMALL_SD = {"block_out_channels": [64, 128, 256, 256], "attention_head_dim": 8, "norm_num_groups": 32}


def unet_config(name: str) -> dict[str, Any]:
    fixture = ROOT / "tests" / "fixtures" / ("sdxl-base-unet.json" if name == "sdxl" else "sd15-unet.json")
    cfg = json.loads(fixture.read_text())
    if name == "sd15-small":
        cfg.update(SMALL_SD)
    return cfg


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class CachedConditioning:
    """Stands in for ``training.objectives.Conditioner`` with its caches filled (cached latents/embeddings)."""

    def __init__(self, latents: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor | None) -> None:
        self.latents, self.emb, self.pooled = latents, text, pooled
        self.xl = pooled is not None

    def prompt(self, ex: Any) -> str:
        return "p"

    def posterior(self, ex: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.latents, torch.zeros_like(self.latents)

    def text(self, prompt: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.emb, self.pooled


def inputs(cfg: dict[str, Any], resolution: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(1, 4, resolution // 8, resolution // 8, generator=g).to(device)
    text = torch.randn(1, 77, cfg["cross_attention_dim"], generator=g).to(device)
    pooled = None
    if cfg.get("addition_embed_type") == "text_time":
        pooled = torch.randn(1, cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"],
                             generator=g).to(device)
    return lat, text, pooled


def worker(a: argparse.Namespace) -> dict[str, Any]:
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    acc = Accelerator(mixed_precision=a.mixed_precision, cpu=a.device == "cpu")
    dev, dtype = acc.device, {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.mixed_precision]
    cfg = unet_config(a.unet)
    unet = UNet2DConditionModel(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    unet.requires_grad_(False)
    lat, text, pooled = inputs(cfg, a.resolution, dev)
    sched = DDPMScheduler(num_train_timesteps=1000)
    step_fn = (ours if a.side == "ours" else diffusers_peft)(a, acc, unet, sched, dtype, lat, text, pooled)
    if a.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    r = time_steps(step_fn, dev, a.warmup, a.steps)
    n = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    return {"side": a.side, **r, "steps_per_s": 1 / r["s_per_step"], "trainable": n}


def time_steps(step_fn: Any, dev: torch.device, warmup: int, steps: int) -> dict[str, float]:
    """Seconds per step after ``warmup`` untimed steps; peak memory (CUDA: allocated, CPU: RSS) and what training
    added (CPU: RSS growth)."""
    rss0 = rss_mib()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step_fn()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        step_fn()
    _sync(dev)
    dt = (time.perf_counter() - t0) / steps
    mem = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else rss_mib()
    return {"s_per_step": dt, "peak_mib": mem, "train_mib": rss_mib() - rss0 if dev.type == "cpu" else mem}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def ours(a, acc, unet, sched, dtype, lat, text, pooled):
    import lora_diffusion as ld
    from training.data import Example
    from training.diffusion import cast_frozen
    from training.loop import LoopConfig, train_step
    from training.objectives import DiffusionObjective

    spec = ld.AdapterSpec(variant=a.variant, rank=a.rank, targets="unet-attn",
                          options={"min_rank": a.rank // 2} if a.variant == "tlora" else {})
    ld.add_adapter(unet, spec)
    cast_frozen(unet, dtype)
    unet.to(acc.device)
    opt = torch.optim.AdamW(ld.param_groups(unet, 1e-4, weight_decay=1e-4))
    model, opt = acc.prepare(unet, opt)
    obj = DiffusionObjective(model, unet, sched, CachedConditioning(lat, text, pooled), 0, resolution=a.resolution)

    class One:
        def next_batch(self) -> list[Any]:
            return [Example(0, 0, 0, False, 0)]

    data, cfg = One(), LoopConfig(max_steps=1)
    return lambda: train_step(acc, model, opt, data, obj, cfg, 1)


def diffusers_peft(a, acc, unet, sched, dtype, lat, text, pooled):
    import torch.nn.functional as F
    from peft import LoraConfig

    unet.to(acc.device, dtype)
    unet.add_adapter(LoraConfig(r=a.rank, lora_alpha=a.rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:  # diffusers' cast_training_params: trainable LoRA weights in fp32
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
    model, opt = acc.prepare(unet, opt)
    g = torch.Generator().manual_seed(0)
    r = a.resolution
    extra = {} if pooled is None else {"added_cond_kwargs": {
        "text_embeds": pooled.to(dtype), "time_ids": torch.tensor([[r, r, 0, 0, r, r]], device=lat.device, dtype=dtype)}}

    def step() -> None:
        noise = torch.randn(lat.shape, generator=g).to(lat.device)
        t = torch.randint(0, 1000, (1,), generator=g).to(lat.device)
        noisy = sched.add_noise(lat, noise, t)
        pred = model(noisy.to(dtype), t, text.to(dtype), **extra).sample
        loss = F.mse_loss(pred.float(), noise.float())
        acc.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def run_side(a: argparse.Namespace, side: str, script: str = __file__) -> dict[str, Any]:
    """One side's measurement in a fresh process of ``script`` (``--_side``): its last stdout line, JSON."""
    skip = ("_side", "gradient_checkpointing", "rounds")
    argv = [sys.executable, script, "--_side", side] + [f"--{k}={v}" for k, v in vars(a).items()
                                                          if k not in skip and v is not None]
    if a.gradient_checkpointing:
        argv.append("--gradient_checkpointing")
    p = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"{side} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--unet", default=None, choices=["sd15-small", "sd15", "sdxl"],
                   help="default: sd15-small on CPU, sdxl on CUDA")
    p.add_argument("--resolution", type=int, default=None, help="default: 256 on CPU, 1024 on CUDA")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--variant", default="lora", help="our side's variant (lora = the same method as PEFT's)")
    p.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"], help="default: no (CPU), bf16 (CUDA)")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="alternating runs per side; the fastest counts")
    p.add_argument("--_side", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    cuda = a.device == "cuda"
    a.unet = a.unet or ("sdxl" if cuda else "sd15-small")
    a.resolution = a.resolution or (1024 if cuda else 256)
    a.mixed_precision = a.mixed_precision or ("bf16" if cuda else "no")
    torch.set_num_threads(a.threads)
    if a._side:
        a.side = a._side
        sys.path.insert(0, str(ROOT))
        print(json.dumps(worker(a)))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    d, o = best_of_rounds(a)
    log.info("%s UNet, %d px, rank %d, %s, precision %s, grad ckpt %s, %d threads (%d timed steps after %d warm-up, "
             "best of %d alternating runs per side)", a.unet, a.resolution, a.rank, a.device, a.mixed_precision,
             a.gradient_checkpointing, a.threads, a.steps, a.warmup, a.rounds)
    log.info("| side | variant | s/step | steps/s | peak MiB | train MiB | trainable |")
    log.info("|---|---|---|---|---|---|---|")
    for name, r in (("diffusers+PEFT", d), ("ours", o)):
        log.info("| %s | %s | %.3f | %.2f | %.0f | %.0f | %d |", name, "lora" if name != "ours" else a.variant,
                 r["s_per_step"], r["steps_per_s"], r["peak_mib"], r["train_mib"], r["trainable"])
    log_ratios(d, o)


def best_of_rounds(a: argparse.Namespace, script: str = __file__) -> tuple[dict[str, Any], dict[str, Any]]:
    """``a.rounds`` alternating runs per side (diffusers first); each side's fastest (shared, noisy CPUs)."""
    runs: dict[str, list[dict[str, Any]]] = {"diffusers": [], "ours": []}
    for i in range(a.rounds):
        for side in runs:
            runs[side].append(run_side(a, side, script))
            log.info("round %d %s: %.3f s/step", i + 1, side, runs[side][-1]["s_per_step"])
    d, o = (min(runs[s], key=lambda r: r["s_per_step"]) for s in ("diffusers", "ours"))
    return d, o


def log_ratios(d: dict[str, Any], o: dict[str, Any]) -> None:
    log.info("ratio ours/diffusers: time %.2fx, peak memory %.2fx, train memory %.2fx", o["s_per_step"] / d["s_per_step"],
             o["peak_mib"] / d["peak_mib"], o["train_mib"] / max(d["train_mib"], 1e-9))


if __name__ == "__main__":
    main()
