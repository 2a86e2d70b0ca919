"""Quickstart: inject an adapter into a tiny diffusers UNet, train it a few steps, save and reload it.

    python -m training.quickstart [--variant tlora] [--steps 60] [--output outputs/quickstart]

Runs on a CPU in well under a minute. The UNet is built from a config with random weights (no
download); the "subject" is one fixed latent, so the loss falling shows the adapter learning it.
The real one-image trainer is ``training/train_tlora.py`` (issue 4).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import lora_diffusion as ld

from .config import step_option_defaults

log = logging.getLogger("quickstart")


@dataclass
class QuickstartConfig:
    variant: str = "tlora"
    rank: int = 8
    steps: int = 60
    lr: float = 5e-3
    seed: int = 0
    output: Path = Path("outputs/quickstart")


def tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )


def train(cfg: QuickstartConfig) -> dict[str, float]:
    from diffusers import DDPMScheduler

    torch.manual_seed(cfg.seed)
    unet, sched = tiny_unet(), DDPMScheduler(num_train_timesteps=1000)
    options = step_option_defaults(cfg.variant, {}, cfg.steps)  # SingLoRA's ramp, AdaLoRA's total_step, ...
    spec = ld.AdapterSpec(variant=cfg.variant, rank=cfg.rank, targets="unet-attn", seed=cfg.seed, options=options)
    modules = ld.add_adapter(unet, spec)
    n_train = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    log.info("%s rank %d on %d attention linears: %d trainable parameters", cfg.variant, cfg.rank, len(modules), n_train)
    hooks = ld.TrainingHooks(unet)  # the step counter, post-step updates and regularization some variants need
    hooks.set_step(0)  # "before" is measured at step 0 (SingLoRA's ramp at 0: the base model)
    groups = ld.param_groups(unet, cfg.lr)
    opt = ld.variant_optimizer([unet], groups, lr=cfg.lr) or torch.optim.AdamW(groups, lr=cfg.lr)
    latent, text = torch.randn(1, 4, 16, 16), torch.randn(1, 5, 32)  # the "subject" and its prompt
    probe = fixed_probe(cfg.seed)
    before = eval_loss(unet, sched, latent, text, probe)
    losses = []
    bar = tqdm(total=cfg.steps, desc=f"train {cfg.variant}", unit="step")
    for step in range(1, cfg.steps + 1):
        hooks.begin_step(step)
        t = torch.randint(0, 1000, (1,))
        noise = torch.randn_like(latent)
        ld.set_timestep(unet, t)  # T-LoRA's rank mask follows the timestep
        pred = unet(sched.add_noise(latent, noise, t), t, text).sample
        loss = F.mse_loss(pred, noise)
        reg = hooks.regularization()
        opt.zero_grad()
        (loss if reg is None else loss + reg).backward()
        opt.step()
        hooks.after_step(step)
        bar.update(1)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}")
    bar.close()
    after = eval_loss(unet, sched, latent, text, probe)
    log.info("denoising loss on 16 fixed (timestep, noise) pairs: %.4f before, %.4f after training", before, after)
    return save_and_check(unet, cfg, losses) | {"eval_before": before, "eval_after": after}


def fixed_probe(seed: int, n: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed + 1)
    return [(torch.tensor([t]), torch.randn(1, 4, 16, 16, generator=g)) for t in torch.linspace(0, 999, n).long().tolist()]


@torch.no_grad()
def eval_loss(unet, sched, latent, text, probe) -> float:
    total = 0.0
    for t, noise in probe:
        ld.set_timestep(unet, t)
        total += F.mse_loss(unet(sched.add_noise(latent, noise, t), t, text).sample, noise).item()
    return total / len(probe)


def save_and_check(unet, cfg: QuickstartConfig, losses: list[float]) -> dict[str, float]:
    path = ld.save_adapter(unet, cfg.output / f"{cfg.variant}.safetensors", metadata={"trigger_word": "sks"})
    reloaded = tiny_unet()
    reloaded.load_state_dict({k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if ".adapters." not in k})
    ld.load_adapter(reloaded, path, name="default")
    x, t, text = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 5, 32)
    for m in (unet, reloaded):
        ld.set_timestep(m, t)
    with torch.no_grad():
        same = torch.equal(unet(x, t, text).sample, reloaded(x, t, text).sample)
    k = max(1, len(losses) // 5)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    log.info("loss %.4f -> %.4f (mean of first/last %d steps)", first, last, k)
    log.info("saved %s (%.1f KiB); reloaded output identical: %s", path, path.stat().st_size / 1024, same)
    return {"loss_first": first, "loss_last": last, "reload_identical": float(same)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="tlora", choices=ld.variant_names())
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=Path("outputs/quickstart"))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    train(QuickstartConfig(a.variant, a.rank, a.steps, a.lr, a.seed, a.output))
    log.info("done in %.1f s", time.perf_counter() - t0)


if __name__ == "__main__":
    main()
