"""train_tlora on Flux.1 / SD3 transformers: the rectified-flow objective against diffusers' own scheduler and
pipeline helpers, and the trainer end to end on tiny pipelines (train, save, reload on the stock pipeline, generate)."""

from __future__ import annotations

import math

import pytest
import torch

import lora_diffusion as ld
from lora_diffusion.core.functional import active_rank
from lora_diffusion.generate import apply_adapters, generate, load_pipeline
from training.config import ConfigError
from training.objectives import FlowSampling, pipeline_shift
from training.train_tlora import build, train

from .tiny_dit import flux_model, sd3_model  # noqa: F401
from .tiny_sd import _one_thread, sd_model, subject, tiny_config  # noqa: F401

FAMILY_FIXTURES = ["flux_model", "sd3_model"]


def test_shift_is_the_one_the_stock_pipeline_samples_with():
    """Flux: exp(μ) with diffusers' calculate_shift(image tokens); the shifted σ equal the scheduler's own."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    flux = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)
    for tokens in (256, 1024, 4096):
        mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
        assert pipeline_shift(flux.config, tokens) == pytest.approx(math.exp(mu), rel=1e-12)
        u = torch.linspace(1.0, 1 / 28, 28).numpy()
        flux.set_timesteps(sigmas=u, mu=mu)
        ours = FlowSampling(shift=pipeline_shift(flux.config, tokens))
        s = ours.shift
        mine = s * torch.tensor(u, dtype=torch.float64) / (1 + (s - 1) * torch.tensor(u, dtype=torch.float64))
        torch.testing.assert_close(mine.float(), flux.sigmas[:-1].float(), rtol=1e-5, atol=1e-6)
    sd3 = FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert pipeline_shift(sd3.config, 4096) == 3.0


def test_sigma_sampling_matches_its_distribution():
    g = torch.Generator().manual_seed(0)
    ln = FlowSampling("logit_normal", logit_mean=0.5, logit_std=0.8).sigmas(20000, g)
    logit = torch.log(ln / (1 - ln))
    assert logit.mean().item() == pytest.approx(0.5, abs=0.03) and logit.std().item() == pytest.approx(0.8, abs=0.03)
    uni = FlowSampling("uniform", shift=3.0).sigmas(20000, g)  # P(σ' <= s) = u(s) with u = s / (3 - 2 s)
    for s in (0.25, 0.5, 0.75):
        assert (uni <= s).double().mean().item() == pytest.approx(s / (3 - 2 * s), abs=0.015)
    mode = FlowSampling("mode", mode_scale=1.29).sigmas(20000, g)
    assert 0 <= mode.min() and mode.max() <= 1 and (mode - 0.5).abs().mean() < (uni - 0.5).abs().mean()


@pytest.mark.parametrize("fixture", FAMILY_FIXTURES)
def test_objective_noises_like_the_scheduler_and_sets_r_of_1000_sigma(fixture, request, subject, tmp_path):  # noqa: F811
    """x_σ = (1-σ)x0 + σε equals FlowMatchEulerDiscreteScheduler.scale_noise; the adapters see t = 1000·σ (one per
    sample); the loss is the MSE to ε - x0 of the transformer's output (Flux: on packed 2x2 patches)."""
    run = build(tiny_config(request.getfixturevalue(fixture), subject, tmp_path, max_train_steps=1, train_batch_size=2))
    obj = run.objective
    x = obj.inputs(run.sampler.next_batch(), torch.device("cpu"))
    sigma = x["timesteps"] / 1000
    assert x["timesteps"].dtype == torch.float32 and x["timesteps"].shape == (2,)
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    for i in range(2):  # an unshifted scheduler whose one step is our σ: its timestep is 1000·σ
        ref = FlowMatchEulerDiscreteScheduler(shift=1.0)
        ref.set_timesteps(sigmas=[float(sigma[i])])
        want = ref.scale_noise(x["latents"][i:i + 1], ref.timesteps[:1], x["noise"][i:i + 1])
        got = (1 - sigma[i]) * x["latents"][i:i + 1] + sigma[i] * x["noise"][i:i + 1]
        torch.testing.assert_close(got, want)
    seen = []
    layer = next(ad for _, lay in ld.api.adapted_layers(run.unet) for ad in lay.adapters.values())
    holder = ld.api.model_state(run.unet).holder
    run.unet.register_forward_pre_hook(lambda m, a: seen.append(layer.mask(holder.current()).sum(-1).tolist()))
    pred, target = obj.predict(x)
    assert seen == [[active_rank(float(t), 4, 2, 1000) for t in x["timesteps"]]]
    assert pred.shape == target.shape
    if fixture == "flux_model":  # Flux's tokens are 2x2 latent patches: unpack with the pipeline's own helper
        target = FluxPipeline._unpack_latents(target, 32, 32, run.pipe.vae_scale_factor)
    torch.testing.assert_close(target, x["noise"] - x["latents"])


@pytest.mark.parametrize("fixture", FAMILY_FIXTURES)
def test_train_save_reload_generate_with_the_stock_pipeline(fixture, request, subject, tmp_path):  # noqa: F811
    src = request.getfixturevalue(fixture)
    res = train(tiny_config(src, subject, tmp_path, max_train_steps=3, learning_rate=1e-2))
    assert len(res.losses) == 3 and all(math.isfinite(v) for v in res.losses)
    pipe = load_pipeline(src)  # the stock FluxPipeline / StableDiffusion3Pipeline class
    assert type(pipe).__name__ in ("FluxPipeline", "StableDiffusion3Pipeline")
    pipe.set_progress_bar_config(disable=True)
    base = generate(pipe, ["a photo of sks dog"], steps=3, guidance_scale=1.0, height=32, width=32)[0]
    [name] = apply_adapters(pipe, [res.outputs["canonical"]])
    spec = ld.get_spec(pipe.transformer, name)
    assert spec.variant == "tlora" and spec.options["min_rank"] == 2
    img = generate(pipe, ["a photo of sks dog"], steps=3, guidance_scale=1.0, height=32, width=32)[0]
    assert list(img.getdata()) != list(base.getdata())


def test_family_is_detected_and_checked(flux_model, sd_model, subject, tmp_path):  # noqa: F811
    from training.config import resolve_defaults

    cfg = resolve_defaults(tiny_config(flux_model, subject, tmp_path), ld.variant_names())
    assert cfg.model.model_family == "flux" and cfg.adapter.targets == "dit-attn"
    assert cfg.flow.weighting_scheme == "uniform"
    with pytest.raises(ConfigError, match="--model_family sd3: the model .* is a FluxPipeline"):
        build(tiny_config(flux_model, subject, tmp_path, model_family="sd3"))
    with pytest.raises(ConfigError, match="--drop_t5: SD3 only"):
        build(tiny_config(flux_model, subject, tmp_path, drop_t5=True))
    with pytest.raises(ConfigError, match="--train_embedding .*flux transformer"):
        build(tiny_config(flux_model, subject, tmp_path, train_embedding=True))


def test_sd3_without_t5_trains(sd3_model, subject, tmp_path):  # noqa: F811
    run = build(tiny_config(sd3_model, subject, tmp_path, drop_t5=True))
    assert run.pipe.text_encoder_3 is None
    emb, pooled = run.cond.text("a photo of sks dog", torch.device("cpu"))
    assert emb.shape[-1] == 32 and pooled.shape == (1, 32)
    assert run.objective(run.sampler.next_batch()).isfinite()


@pytest.mark.parametrize("fixture", FAMILY_FIXTURES)
def test_diffusers_file_loads_in_diffusers_with_equal_outputs(fixture, request, subject, tmp_path):  # noqa: F811
    """The trained run's pytorch_lora_weights.safetensors through diffusers' own load_lora_weights gives the same
    transformer output as our adapter without a timestep (full rank: the exported T-LoRA is the exact t = 0 LoRA)."""
    src = request.getfixturevalue(fixture)
    res = train(tiny_config(src, subject, tmp_path, max_train_steps=2, learning_rate=1e-2))
    assert "diffusers" in res.outputs
    ours, theirs = load_pipeline(src), load_pipeline(src)
    ld.load_adapter(ours, res.outputs["canonical"])
    theirs.load_lora_weights(str(res.outputs["diffusers"]))
    assert sum(n.endswith("lora_A") for n, _ in theirs.transformer.named_modules()) == len(
        ld.api.model_state(ours.transformer).modules[res.outputs["canonical"].stem])
    g = torch.Generator().manual_seed(0)
    if fixture == "flux_model":
        kw = dict(hidden_states=torch.randn(1, 64, 16, generator=g), encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
                  pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.7]),
                  guidance=torch.tensor([3.5]), txt_ids=torch.zeros(5, 3), img_ids=torch.zeros(64, 3))
    else:
        kw = dict(hidden_states=torch.randn(1, 4, 16, 16, generator=g), encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
                  pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([700.0]))
    with torch.no_grad():
        a = ours.transformer(**kw, return_dict=False)[0]
        b = theirs.transformer(**kw, return_dict=False)[0]
        base = load_pipeline(src).transformer(**kw, return_dict=False)[0]
    assert (a - base).abs().max() > 1e-4  # the adapter does something
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_flux_run_resumes_exactly(flux_model, subject, tmp_path):  # noqa: F811
    """A Flux run stopped after step 2 and resumed draws the same σ and noise: the same losses as one 4-step run."""
    kw = dict(checkpointing_steps=2, learning_rate=1e-2)
    full = train(tiny_config(flux_model, subject, tmp_path / "a", max_train_steps=4, **kw))
    train(tiny_config(flux_model, subject, tmp_path / "b", max_train_steps=2, **kw))
    resumed = train(tiny_config(flux_model, subject, tmp_path / "b", max_train_steps=4, resume_from_checkpoint="latest",
                                **kw))
    assert resumed.first_step == 3 and resumed.losses == full.losses[2:]
    from training.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="differs in: flow=.*'uniform'.*this run: .*'logit_normal'"):
        train(tiny_config(flux_model, subject, tmp_path / "b", max_train_steps=6, resume_from_checkpoint="latest",
                          weighting_scheme="logit_normal", **kw))


@pytest.mark.parametrize("fixture", FAMILY_FIXTURES)
def test_gradient_checkpointing_gives_the_same_run(fixture, request, subject, tmp_path):  # noqa: F811
    """The transformer's own checkpointing with the T-LoRA context restored on recomputation: the second step's
    loss (after one update from the recomputed gradients) is the same."""
    src = request.getfixturevalue(fixture)
    a = train(tiny_config(src, subject, tmp_path / "a", max_train_steps=2, learning_rate=1e-2))
    b = train(tiny_config(src, subject, tmp_path / "b", max_train_steps=2, learning_rate=1e-2,
                          gradient_checkpointing=True))
    assert a.losses == pytest.approx(b.losses, rel=1e-6) and a.losses[0] != a.losses[1]


@torch.no_grad()
def flow_probe_loss(pipe, image_dir, n: int = 12) -> float:
    """Flow-matching loss on the training image at n fixed (σ, noise) pairs, T-LoRA's t = 1000·σ set."""
    from diffusers import FluxPipeline

    from training.data import load_image

    px = load_image(sorted(image_dir.iterdir())[0], 32).unsqueeze(0)
    vae = pipe.vae
    x0 = (vae.encode(px).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    emb, pooled, _ = pipe.encode_prompt("a photo of sks dog", None, device="cpu", max_sequence_length=16)
    b, c, h, w = x0.shape
    ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", x0.dtype)
    g, total = torch.Generator().manual_seed(123), 0.0
    for sigma in torch.linspace(0.05, 0.95, n):
        eps = torch.randn(x0.shape, generator=g)
        ld.set_timestep(pipe.transformer, 1000 * sigma, 1000)
        pred = pipe.transformer(hidden_states=FluxPipeline._pack_latents((1 - sigma) * x0 + sigma * eps, b, c, h, w),
                                timestep=sigma[None], guidance=torch.ones(1), pooled_projections=pooled,
                                encoder_hidden_states=emb, txt_ids=torch.zeros(emb.shape[1], 3), img_ids=ids,
                                return_dict=False)[0]
        total += torch.nn.functional.mse_loss(pred, FluxPipeline._pack_latents(eps - x0, b, c, h, w)).item()
    return total / n


@pytest.mark.slow
def test_flux_tlora_learns_the_image(flux_model, subject, tmp_path):  # noqa: F811
    res = train(tiny_config(flux_model, subject, tmp_path, max_train_steps=60, learning_rate=1e-2, lora_rank=8,
                            min_rank=4, max_sequence_length=16))
    pipe = load_pipeline(flux_model)
    before = flow_probe_loss(pipe, subject)
    ld.load_adapter(pipe, res.outputs["canonical"])
    after = flow_probe_loss(pipe, subject)
    assert after < 0.85 * before, (before, after)  # measured: 1.740 -> 1.352


def test_family_unknown_before_loading_is_settled_by_the_pipeline(flux_model, subject, tmp_path, monkeypatch):  # noqa: F811
    """An uncached hub id has no model_index.json to read beforehand: the family is guessed from the name, and the
    loaded pipeline corrects it with the defaults that follow (not SD's targets)."""
    import lora_diffusion.families as fam
    from training.config import guess_family, resolve_defaults
    from training.objectives import FlowMatchingObjective

    assert [guess_family(s) for s in ("black-forest-labs/FLUX.1-dev", "stabilityai/stable-diffusion-3.5-medium",
                                       "stabilityai/stable-diffusion-xl-base-1.0", None)] == ["flux", "sd3", "sd", "sd"]
    monkeypatch.setattr(fam, "detect_family", lambda source: None)
    (tmp_path / "some-model").symlink_to(flux_model)  # a name that says nothing
    cfg = resolve_defaults(tiny_config(tmp_path / "some-model", subject, tmp_path), ld.variant_names())
    assert cfg.model.model_family == "sd" and cfg.adapter.targets == "unet-attn"
    run = build(tiny_config(tmp_path / "some-model", subject, tmp_path / "out"))
    assert run.cfg.model.model_family == "flux" and run.cfg.adapter.targets == "dit-attn"
    assert isinstance(run.objective, FlowMatchingObjective) and run.cfg.flow.weighting_scheme == "uniform"
    with pytest.raises(ConfigError, match="--model_family sd3: the model .* is a FluxPipeline"):  # named: no guess
        build(tiny_config(tmp_path / "some-model", subject, tmp_path / "o2", model_family="sd3"))


@pytest.mark.parametrize("fixture", FAMILY_FIXTURES)
def test_bf16_run_with_validation_images(fixture, request, subject, tmp_path):  # noqa: F811
    """Frozen transformer and text encoders in bf16 (adapters fp32), validation images drawn by the stock pipeline."""
    from accelerate.state import AcceleratorState, GradientState

    try:
        res = train(tiny_config(request.getfixturevalue(fixture), subject, tmp_path, max_train_steps=2,
                                mixed_precision="bf16", validation_prompts="a photo of {0}"))
    finally:  # later tests in this process build their own Accelerator without resetting the shared state
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert all(math.isfinite(v) for v in res.losses)
    assert [p.name for p in (tmp_path / "samples" / "step-2").iterdir()] == ["a_photo_of_sks_dog-0.png"]
