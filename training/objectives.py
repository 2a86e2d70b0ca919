"""Training objectives: the denoising loss of Stable Diffusion 1.x/2.x and SDXL, rectified flow for Flux.1 and SD3.

``DiffusionObjective(batch)`` turns a micro-batch of examples into latents and text conditioning
(from caches when enabled), draws timesteps and noise from its own generator (saved in
checkpoints, so a resumed run draws the same ones), sets the adapters' timestep (T-LoRA's rank
mask) and returns the MSE between the UNet's prediction and the target (ε or v).

``FlowMatchingObjective`` (Flux, SD3; Esser et al. 2024, arXiv 2403.03206):

    σ = shift(u) = s·u / (1 + (s - 1)·u),  u ~ U(0, 1) | sigmoid(N(m, s²)) (logit-normal) | mode sampling
    x_σ = (1 - σ)·x0 + σ·ε,   loss = ‖v_θ(x_σ, σ) - (ε - x0)‖²

and hands T-LoRA t = 1000·σ, the scale its r(t) is defined on (lora_diffusion/families.py).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import lora_diffusion as ld
from lora_diffusion.embeddings import expand_prompt
from lora_diffusion.families import family_of

from .data import Example, ImageSet, caption_colors, recolor_caption, swap_colors

log = logging.getLogger(__name__)


class Conditioner:
    """Latents (VAE posterior mean/std) and text conditioning of examples, optionally cached."""

    def __init__(self, pipe: Any, instances: ImageSet, classes: ImageSet | None, class_prompt: str | None,
                 cache_latents: bool, cache_text: bool) -> None:
        self.pipe, self.sets = pipe, {False: instances, True: classes}
        self.class_prompt = class_prompt
        self.cache_latents = (cache_latents and instances.center_crop and not instances.hue_jitter
                              and not instances.invert_p and not instances.recolor_p)
        if cache_latents and not instances.center_crop:
            log.info("random crops: latents are encoded every step (no latent cache)")
        self.cache_text = cache_text
        self.live_text = False  # set by the trainer when text-side parameters train
        self.family = family_of(pipe).name
        self.xl = self.family == "sdxl"
        self.max_sequence_length: int | None = None  # Flux/SD3: T5 tokens (None: the pipeline's default)
        self._latents: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._text: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def prompt(self, ex: Example) -> str:
        s = self.sets[ex.prior]
        if ex.prior and self.class_prompt:
            return self.class_prompt
        text = s.jitter_prompts[ex.prompt] if ex.jitter_prompt else s.prompts[ex.prompt]
        if ex.colors:  # a repainted view (--recolor_p)
            return swap_colors(text, caption_colors(text), ex.colors)
        return recolor_caption(text, ex.hue) if s.recolor and ex.hue else text

    @torch.no_grad()
    def posterior(self, ex: Example, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the VAE latent of the example's view, scaled by the VAE's scaling factor."""
        key = (ex.prior, ex.image, ex.top, ex.left, ex.flip, ex.hue, ex.invert, ex.colors)
        if key in self._latents:
            return self._latents[key]
        vae = self.pipe.vae
        px = self.sets[ex.prior].pixels(ex).unsqueeze(0).to(device, vae.dtype)
        dist = vae.encode(px).latent_dist
        sf, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0  # Flux/SD3 shift
        out = ((dist.mean.float() - shift) * sf, dist.std.float() * sf)
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
        seq = {"max_sequence_length": self.max_sequence_length} if self.max_sequence_length else {}
        prompt = expand_prompt(self.pipe, prompt)  # SD3/Flux: <tok> -> <tok> <tok>_1 ... (SD/SDXL do it themselves)
        if self.family == "flux":  # (1, L, 4096) T5 tokens, (1, 768) CLIP pooled; text ids are zeros
            emb, pooled, _ = self.pipe.encode_prompt(prompt, None, device=device, num_images_per_prompt=1, **seq)
            return emb, pooled
        if self.family == "sd3":  # CLIP-L ⊕ CLIP-G padded to T5's width, then T5 tokens (zeros without T5)
            emb, _, pooled, _ = self.pipe.encode_prompt(prompt, None, None, device=device, num_images_per_prompt=1,
                                                        do_classifier_free_guidance=False, **seq)
            return emb, pooled
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
        if texts[0][1] is not None:
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

    def predict(self, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction, target) of the UNet on the noised latents."""
        sched, t = self.scheduler, x["timesteps"]
        noisy = sched.add_noise(x["latents"], x["noise"], t)
        target = sched.get_velocity(x["latents"], x["noise"], t) if self.prediction_type == "v_prediction" else x["noise"]
        ld.set_timestep(self.unet, t, self.T)  # T-LoRA: rank mask r(t), one per sample
        dtype = self.frozen_dtype()
        pred = self.model(noisy.to(dtype), t, x["text"].to(dtype), **self.conditioning_kwargs(x, dtype)).sample
        return pred, target

    def frozen_dtype(self) -> torch.dtype:
        return next(p for p in self.unet.parameters() if not p.requires_grad).dtype

    def __call__(self, batch: list[Example]) -> torch.Tensor:
        device = next(self.unet.parameters()).device
        pred, target = self.predict(self.inputs(batch, device))
        prior = torch.tensor([ex.prior for ex in batch], device=device)
        err = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
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


@dataclass
class FlowSampling:
    """How σ is drawn (diffusers' ``compute_density_for_timestep_sampling`` names), then shifted by ``shift``."""

    weighting_scheme: str = "uniform"  # "uniform" | "logit_normal" | "mode"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0

    def sigmas(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """(n,) float64 σ in [0, 1]."""
        if self.weighting_scheme == "logit_normal":
            u = torch.sigmoid(torch.randn((n,), generator=gen, dtype=torch.float64) * self.logit_std + self.logit_mean)
        else:
            u = torch.rand((n,), generator=gen, dtype=torch.float64)
            if self.weighting_scheme == "mode":
                u = 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        s = self.shift
        return (s * u / (1 + (s - 1) * u)).clamp(0.0, 1.0)


def pipeline_shift(scheduler_config: Any, image_tokens: int) -> float:
    """The σ shift the stock pipeline samples with: Flux (dynamic shifting) exp(μ), μ linear in the number of image
    tokens between (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift); SD3 the config's ``shift``."""
    c = scheduler_config
    if not c.get("use_dynamic_shifting", False):
        return float(c.get("shift", 1.0))
    x0, x1 = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
    y0, y1 = c.get("base_shift", 0.5), c.get("max_shift", 1.15)
    mu = y0 + (y1 - y0) / (x1 - x0) * (image_tokens - x0)
    return math.exp(mu)


class FlowMatchingObjective(DiffusionObjective):
    """Rectified-flow MSE of a (possibly wrapped) Flux or SD3 transformer (module docstring)."""

    def __init__(self, model: nn.Module, transformer: nn.Module, cond: Conditioner, seed: int, sampling: FlowSampling,
                 prior_loss_weight: float = 1.0, resolution: int = 1024, guidance: float = 1.0,
                 num_train_timesteps: int = 1000) -> None:
        self.model, self.unet, self.cond, self.sampling = model, transformer, cond, sampling
        self.gen = torch.Generator().manual_seed(seed)
        self.prior_loss_weight, self.resolution, self.guidance = prior_loss_weight, resolution, guidance
        self.T = num_train_timesteps
        self.flux = cond.family == "flux"

    def timesteps(self, n: int) -> torch.Tensor:
        """t = T·σ (float): the scale the T-LoRA schedule and SD3's transformer use."""
        return (self.sampling.sigmas(n, self.gen) * self.T).float()

    def predict(self, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        t, x0, eps = x["timesteps"], x["latents"], x["noise"]
        sigma = (t / self.T).view(-1, *([1] * (x0.dim() - 1)))
        noisy, target = (1 - sigma) * x0 + sigma * eps, eps - x0  # (B, C, H, W)
        ld.set_timestep(self.unet, t, self.T)  # T-LoRA: r(1000·σ), one mask per sample
        dtype = self.frozen_dtype()
        text, pooled = x["text"].to(dtype), x["pooled"].to(dtype)
        if not self.flux:
            pred = self.model(hidden_states=noisy.to(dtype), timestep=t, encoder_hidden_states=text,
                              pooled_projections=pooled, return_dict=False)[0]
            return pred, target
        from diffusers import FluxPipeline

        b, c, h, w = noisy.shape  # Flux sees 2x2 latent patches as tokens: (B, H/2·W/2, 4C)
        packed, target = (FluxPipeline._pack_latents(z, b, c, h, w) for z in (noisy.to(dtype), target))
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, dtype)
        txt_ids = torch.zeros(text.shape[1], 3, device=noisy.device, dtype=dtype)
        guidance = (torch.full((b,), self.guidance, device=noisy.device, dtype=torch.float32)
                    if self.unet.config.guidance_embeds else None)
        pred = self.model(hidden_states=packed, timestep=(t / self.T).to(dtype), guidance=guidance,
                          pooled_projections=pooled, encoder_hidden_states=text, txt_ids=txt_ids, img_ids=img_ids,
                          return_dict=False)[0]
        return pred, target
