"""Training objectives: the denoising loss of Stable Diffusion 1.x/2.x and SDXL.

``DiffusionObjective(batch)`` turns a micro-batch of examples into latents and text conditioning
(from caches when enabled), draws timesteps and noise from its own generator (saved in
checkpoints, so a resumed run draws the same ones), sets the adapters' timestep (T-LoRA's rank
mask) and returns the MSE between the UNet's prediction and the target (ε or v).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import lora_diffusion as ld

from .data import Example, ImageSet

log = logging.getLogger(__name__)


class Conditioner:
    """Latents (VAE posterior mean/std) and text conditioning of examples, optionally cached."""

    def __init__(self, pipe: Any, instances: ImageSet, classes: ImageSet | None, class_prompt: str | None,
                 cache_latents: bool, cache_text: bool) -> None:
        self.pipe, self.sets = pipe, {False: instances, True: classes}
        self.class_prompt = class_prompt
        self.cache_latents = (cache_latents and instances.center_crop and not instances.hue_jitter
                              and not instances.invert_p)
        if cache_latents and not instances.center_crop:
            log.info("random crops: latents are encoded every step (no latent cache)")
        self.cache_text = cache_text
        self.live_text = False  # set by the trainer when text-side parameters train
        self.xl = hasattr(pipe, "text_encoder_2")
        self._latents: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._text: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def prompt(self, ex: Example) -> str:
        s = self.sets[ex.prior]
        if ex.prior and self.class_prompt:
            return self.class_prompt
        return s.jitter_prompts[ex.prompt] if ex.jitter_prompt else s.prompts[ex.prompt]

    @torch.no_grad()
    def posterior(self, ex: Example, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the VAE latent of the example's view, scaled by the VAE's scaling factor."""
        key = (ex.prior, ex.image, ex.top, ex.left, ex.flip, ex.hue, ex.invert)
        if key in self._latents:
            return self._latents[key]
        vae = self.pipe.vae
        px = self.sets[ex.prior].pixels(ex).unsqueeze(0).to(device, vae.dtype)
        dist = vae.encode(px).latent_dist
        sf = vae.config.scaling_factor
        out = (dist.mean.float() * sf, dist.std.float() * sf)
        if self.cache_latents:
            self._latents[key] = out
        return out

    def text(self, prompt: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt embeddings (1, L, D), SDXL pooled embeddings (1, P) or None); with ``live_text`` (trained
        placeholder vectors or text adapters) computed with gradients every call, else cached."""
        if self.live_text:
            return self._encode(prompt, device)
        if prompt in self._text:
            return self._text[prompt]
        with torch.no_grad():
            out = self._encode(prompt, device)
        if self.cache_text:
            self._text[prompt] = out
        return out

    def _encode(self, prompt: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.xl:
            emb, _, pooled, _ = self.pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                                        do_classifier_free_guidance=False)
        else:
            emb, _ = self.pipe.encode_prompt(prompt, device, 1, False)
            pooled = None
        return emb, pooled

    def warm(self, device: torch.device) -> None:
        """Fill the caches up front (every image/flip view and every prompt)."""
        for prior, s in self.sets.items():
            if s is None:
                continue
            if self.cache_text and not self.live_text:
                for p in ([self.class_prompt] if prior and self.class_prompt else s.prompts + s.jitter_prompts):
                    self.text(p, device)
            if self.cache_latents:
                for i, img in enumerate(s.images):
                    _, h, w = img.shape
                    r = s.resolution
                    for flip in ([False, True] if s.random_flip else [False]):
                        self.posterior(Example(i, (h - r) // 2, (w - r) // 2, flip, 0, prior), device)


class DiffusionObjective:
    """The ε- or v-prediction MSE of a (possibly wrapped) UNet on a micro-batch of examples."""

    def __init__(self, model: nn.Module, unet: nn.Module, scheduler: Any, cond: Conditioner, seed: int,
                 prior_loss_weight: float = 1.0, resolution: int = 512, timestep_bias: float = 1.0) -> None:
        self.model, self.unet, self.scheduler, self.cond = model, unet, scheduler, cond
        self.gen = torch.Generator().manual_seed(seed)
        self.prior_loss_weight, self.resolution = prior_loss_weight, resolution
        self.timestep_bias = timestep_bias
        self.T = int(scheduler.config.num_train_timesteps)
        self.prediction_type = scheduler.config.prediction_type

    def inputs(self, batch: list[Example], device: torch.device) -> dict[str, torch.Tensor]:
        stats = [self.cond.posterior(ex, device) for ex in batch]
        mean = torch.cat([m for m, _ in stats]).to(device)
        std = torch.cat([s for _, s in stats]).to(device)
        eps = torch.randn(mean.shape, generator=self.gen).to(device)
        noise = torch.randn(mean.shape, generator=self.gen).to(device)
        t = self.timesteps(len(batch)).to(device)
        texts = [self.cond.text(self.cond.prompt(ex), device) for ex in batch]
        out = {"latents": mean + std * eps, "noise": noise, "timesteps": t,
               "text": torch.cat([e for e, _ in texts]).to(device)}
        if self.cond.xl:
            out["pooled"] = torch.cat([p for _, p in texts]).to(device)
        return out

    def timesteps(self, n: int) -> torch.Tensor:
        """Uniform integers in [0, T), or with ``timestep_bias`` b != 1: t = T (1 - (1 - u)^(1/b)), u ~ U(0, 1)."""
        if self.timestep_bias == 1.0:
            return torch.randint(0, self.T, (n,), generator=self.gen)
        u = torch.rand((n,), generator=self.gen, dtype=torch.float64)
        return (self.T * (1 - (1 - u) ** (1 / self.timestep_bias))).long().clamp(0, self.T - 1)

    def conditioning_kwargs(self, x: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, Any]:
        if "pooled" not in x:
            return {}
        r = self.resolution  # SDXL micro-conditioning: original size, crop (0, 0), target size
        ids = torch.tensor([[r, r, 0, 0, r, r]], device=x["text"].device, dtype=dtype)
        pooled = x["pooled"].to(dtype)
        return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids.expand(pooled.shape[0], -1)}}

    def __call__(self, batch: list[Example]) -> torch.Tensor:
        device = next(self.unet.parameters()).device
        x = self.inputs(batch, device)
        sched, t = self.scheduler, x["timesteps"]
        noisy = sched.add_noise(x["latents"], x["noise"], t)
        target = sched.get_velocity(x["latents"], x["noise"], t) if self.prediction_type == "v_prediction" else x["noise"]
        ld.set_timestep(self.unet, t, self.T)  # T-LoRA: rank mask r(t), one per sample
        dtype = next(p for p in self.unet.parameters() if not p.requires_grad).dtype
        pred = self.model(noisy.to(dtype), t, x["text"].to(dtype), **self.conditioning_kwargs(x, dtype)).sample.float()
        prior = torch.tensor([ex.prior for ex in batch], device=device)
        err = F.mse_loss(pred, target.float(), reduction="none").mean(dim=(1, 2, 3))
        loss = err[~prior].mean()
        if prior.any():
            loss = loss + self.prior_loss_weight * err[prior].mean()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])


class FixedTimestepObjective(DiffusionObjective):
    """The same loss on items ``(examples, t)``: every example of the micro-batch at timestep ``t`` (LoRA-drop's
    stratified sample: one timestep per stratum of [0, T), the same ones at every pass)."""

    def __call__(self, item: tuple[list[Example], int]) -> torch.Tensor:
        batch, self._t = item
        return super().__call__(batch)

    def timesteps(self, n: int) -> torch.Tensor:
        return torch.full((n,), int(self._t), dtype=torch.long)
