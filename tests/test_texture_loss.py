"""The texture terms of the gate objective (training/texture_loss.py): their limits (zero when the prediction is the
target, the x0 reconstruction exact for both prediction types), that they see texture and not position, and that
their gradient reaches only the parameters that made the prediction."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from lora_diffusion.demo import world
from lora_diffusion.demo.evaluator import images_to_tensor
from lora_diffusion.demo.model import load_demo_pipeline
from training.texture_loss import TEXTURE_LOSSES, decode, detail_error, flow_x0, predicted_x0, texture_loss, unpack_2x2

pytestmark = pytest.mark.usefixtures("one_thread")
KINDS = [k for k in TEXTURE_LOSSES if k != "none"]


@pytest.fixture(scope="module")
def pipe():
    return load_demo_pipeline()


def _scenes(*textures: str) -> torch.Tensor:
    return images_to_tensor([world.render(world.Scene("ring", "red", "blue", t)) for t in textures], 64)


def _latents(pipe, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_predicted_x0_inverts_the_forward_process(prediction_type):
    sched = DDPMScheduler(prediction_type=prediction_type)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 500, 990])
    target = sched.get_velocity(x0, noise, t) if prediction_type == "v_prediction" else noise
    assert torch.allclose(predicted_x0(sched, sched.add_noise(x0, noise, t), t, target), x0, atol=1e-3)
    with pytest.raises(ValueError, match="prediction_type 'sample' not supported"):
        predicted_x0(DDPMScheduler(prediction_type="sample"), x0, t, x0)


@pytest.mark.parametrize("kind", KINDS)
def test_texture_loss_is_zero_when_the_prediction_is_the_target(pipe, kind):
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    x0 = _latents(pipe, _scenes("dotted", "checkered"))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 600])
    noisy = sched.add_noise(x0, noise, t)
    exact = texture_loss(kind, pipe.vae, sched, noisy, t, sched.get_velocity(x0, noise, t), x0)
    assert float(exact.detach()) < 1e-6
    assert float(texture_loss(kind, pipe.vae, sched, noisy, t, torch.zeros_like(x0), x0)) > 0.05


@pytest.mark.parametrize("kind", KINDS)
def test_texture_loss_tells_textures_apart(pipe, kind):
    """A dotted ring against a dotted target: a plain or checkered one is off; the spectrum does not care where
    the texture sits (a shifted copy scores 0), the high-pass error does."""
    plain, dotted, checkered = _scenes("plain", "dotted", "checkered")
    target = dotted[None]
    errs = {n: float(detail_error(kind, x[None], target)) for n, x in
            (("plain", plain), ("checkered", checkered), ("dotted", dotted))}
    assert errs["dotted"] == 0 and errs["plain"] > 0.2 and errs["checkered"] > 0.2, errs
    shifted = float(detail_error(kind, torch.roll(dotted, 3, dims=-1)[None], target))
    assert shifted < 1e-6 if kind == "spectrum" else shifted > 1.0


def test_texture_gradient_reaches_only_the_predictor(pipe):
    """Frozen VAE: gradients flow through the decoder into the prediction, never into the VAE."""
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    pipe.vae.requires_grad_(False)
    x0 = _latents(pipe, _scenes("checkered"))
    scale = torch.nn.Parameter(torch.tensor(0.5))
    t = torch.tensor([200])
    noisy = sched.add_noise(x0, torch.randn(x0.shape), t)
    pred = scale * sched.get_velocity(x0, torch.randn(x0.shape), t)
    texture_loss("spectrum", pipe.vae, sched, noisy, t, pred, x0).backward()
    assert scale.grad is not None and float(scale.grad.abs()) > 0
    assert all(p.grad is None for p in pipe.vae.parameters())
    assert decode(pipe.vae, x0).shape == (1, 3, 64, 64)


def test_flow_x0_inverts_the_rectified_flow_forward_process():
    """x_σ = (1-σ) x0 + σ ε with v = ε - x0 (training/objectives.py): x_σ - σ v is x0, at every σ; Flux's packed
    tokens unpack to the latents they were packed from."""
    from diffusers import FluxPipeline

    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 16, 8, 8, generator=g), torch.randn(4, 16, 8, 8, generator=g)
    sigma = torch.tensor([0.0, 0.25, 0.7, 1.0])
    s = sigma.view(-1, 1, 1, 1)
    assert torch.allclose(flow_x0((1 - s) * x0 + s * eps, sigma, eps - x0), x0, atol=1e-6)
    assert torch.equal(unpack_2x2(FluxPipeline._pack_latents(x0, 4, 16, 8, 8), x0.shape), x0)
