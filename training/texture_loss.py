"""Detail terms for a denoising objective, in pixel space: what a latent MSE barely sees.

A denoising MSE in latent space is dominated by what covers most of the image (shape, color, background); a
fine texture (dots, checks, brush strokes) is a small part of it, so an objective can improve while the texture
is lost. These terms decode the model's predicted clean latent with the frozen VAE and compare its fine detail
with the training image's, each as a per-image relative error (0 = the same detail, 1 = as wrong as no detail):

    x̂0 = sqrt(ᾱ_t) x_t - sqrt(1 - ᾱ_t) v̂        (v-prediction; ε: (x_t - sqrt(1 - ᾱ_t) ε̂) / sqrt(ᾱ_t))
    x̂0 = x_σ - σ v̂                              (rectified flow, Flux/SD3: x_σ = (1-σ) x0 + σ ε, v = ε - x0;
                                                 the Euler step of FlowMatchEulerDiscreteScheduler to σ = 0)
    highpass:  ‖H(D(x̂0)) - H(D(x0))‖² / ‖H(D(x0))‖²         H(x) = x - blur3x3(x), D the VAE decoder
    spectrum:  ‖|FFT2 H(D(x̂0))| - |FFT2 H(D(x0))|‖² / ‖|FFT2 H(D(x0))|‖²   the amplitude spectrum of the fine
               detail: which frequencies and orientations the texture has, not where it sits (a shifted copy of
               the target scores 0), so a texture drawn out of phase with the training image is not punished

weighted per image by ᾱ_t, on flow models by 1 - σ, the weight of x0 in x_σ as sqrt(ᾱ_t) is in x_t (at high
noise x̂0 is a blur whose detail cannot be predicted, so it counts little).
Every network here is frozen: only the parameters that produced the prediction (the gates) get gradients.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

TEXTURE_LOSSES = ("none", "highpass", "spectrum")


def predicted_x0(scheduler: Any, noisy: torch.Tensor, t: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """The clean latent a DDPM-family prediction implies (v- or ε-prediction). (B, C, h, w) -> same."""
    abar = scheduler.alphas_cumprod.to(noisy.device)[t].float().view(-1, 1, 1, 1)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    if scheduler.config.prediction_type == "v_prediction":
        return a * noisy - s * pred
    if scheduler.config.prediction_type == "epsilon":
        return (noisy - s * pred) / a
    raise ValueError(f"texture loss: prediction_type {scheduler.config.prediction_type!r} not supported "
                     f"(expected 'v_prediction' or 'epsilon')")


def decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (B, 4, h, w) -> pixels (B, 3, H, W) in about [-1, 1], differentiable through the frozen VAE."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype)).sample.float()


def highpass(x: torch.Tensor) -> torch.Tensor:
    """x minus its 3x3 box blur (replicate padding): the finest detail. (B, C, H, W) -> same."""
    return x - F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)


def amplitude(x: torch.Tensor) -> torch.Tensor:
    """|FFT2| of the fine detail, per channel: (B, C, H, W) -> (B, C, H, W // 2 + 1)."""
    return torch.fft.rfft2(highpass(x)).abs()


def _relative(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample ‖pred - target‖² / ‖target‖² over all but the first dimension. -> (B,)"""
    dims = tuple(range(1, pred.ndim))
    return (pred - target).pow(2).sum(dims) / target.pow(2).sum(dims).clamp_min(1e-8)


def detail_error(kind: str, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image relative error of ``image``'s detail against ``target``'s (pixels, (B, 3, H, W)). -> (B,)"""
    if kind == "highpass":
        return _relative(highpass(image), highpass(target))
    if kind == "spectrum":
        return _relative(amplitude(image), amplitude(target))
    raise ValueError(f"texture loss: unknown kind {kind!r} (expected one of {TEXTURE_LOSSES})")


def flow_x0(noisy: torch.Tensor, sigma: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """The clean latent a rectified-flow velocity implies: x_σ - σ v̂. (B, C, h, w), σ (B,) -> (B, C, h, w)."""
    return noisy - sigma.view(-1, *([1] * (noisy.ndim - 1))) * pred


def unpack_2x2(tokens: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Flux's 2x2-patch tokens (B, h/2·w/2, 4C) back to latents of ``shape`` (B, C, h, w) (inverse of
    ``FluxPipeline._pack_latents``)."""
    b, c, h, w = shape
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def detail_loss(kind: str, vae: Any, x0_hat: torch.Tensor, x0: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The ``weight``-weighted (B,) mean detail error of the decoded ``x0_hat`` against the training latent ``x0``."""
    with torch.no_grad():
        target = decode(vae, x0)
    err = detail_error(kind, decode(vae, x0_hat), target)
    return (weight * err).sum() / weight.sum().clamp_min(1e-8)


def texture_loss(kind: str, vae: Any, scheduler: Any, noisy: torch.Tensor, t: torch.Tensor, pred: torch.Tensor,
                 x0: torch.Tensor) -> torch.Tensor:
    """DDPM: the ᾱ_t-weighted mean detail error of the prediction's clean image against the training latent ``x0``."""
    x0_hat = predicted_x0(scheduler, noisy, t, pred.float())
    return detail_loss(kind, vae, x0_hat, x0, scheduler.alphas_cumprod.to(noisy.device)[t].float())


def flow_texture_loss(kind: str, vae: Any, noisy: torch.Tensor, sigma: torch.Tensor, pred: torch.Tensor,
                      x0: torch.Tensor) -> torch.Tensor:
    """Rectified flow: the same term, x̂0 = x_σ - σ v̂ weighted by 1 - σ (in place of ᾱ_t: x0's weight in x_σ).
    ``pred`` (B, C, h, w) or Flux's packed tokens (B, h/2·w/2, 4C)."""
    pred = unpack_2x2(pred, x0.shape) if pred.ndim == 3 else pred
    return detail_loss(kind, vae, flow_x0(noisy, sigma.float(), pred.float()), x0, 1 - sigma.float())
