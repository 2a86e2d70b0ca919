"""The app's services on diffusion transformers (no Gradio): Flux.1 / SD3 model folders get their family from the
model and their presets, Personalize launches the trainer with the family's settings, a trained SD3 job lands in the
library under its family and generates through the stock pipeline with the T-LoRA mask hook, Flux files generate and
blend (every diffusion fusion; LLM-only ones refused with one message), and the Library marks families."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import lora_diffusion as ld
from app.services import AdapterUse, AppError, AppServices, GenerateRequest, JobRequest, Settings
from app.services.presets import PRESETS, model_family, trainer_family
from lora_diffusion.generate import HOOK_ATTR, load_pipeline

from .tiny_dit import build_tiny_flux, flux_model, sd3_model  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
FLUX_DEV = "black-forest-labs/FLUX.1-dev"  # not cached here: only its name can be read


def services(root: Path, **models: str | None) -> AppServices:
    return AppServices(Settings(library=root / "lib", output=root / "out", device="cpu", models=models))


def dit_lora(folder: Path, path: Path, seed: int = 0) -> Path:
    """A T-LoRA on a tiny transformer with random weights (strong enough to change images)."""
    pipe = load_pipeline(str(folder))
    ld.add_adapter(pipe.transformer, ld.AdapterSpec("tlora", rank=4, targets="dit-attn", seed=seed))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in ld.adapter_parameters(pipe.transformer):
            p.copy_(torch.randn(p.shape, generator=g))
    return ld.save_adapter(pipe, path)


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images]).astype(int)


def test_families_come_from_the_model_not_its_name(flux_model, sd3_model, tmp_path) -> None:  # noqa: F811
    misnamed = tmp_path / "my-flux-finetune"  # an SD3 pipeline whose folder name says Flux
    shutil.copytree(sd3_model, misnamed)
    schnell = build_tiny_flux(tmp_path / "sd3-named-schnell", guidance_embeds=False)
    s = Settings(library=tmp_path / "l", output=tmp_path / "o", device="cpu",
                 models={"demo": None, "f": str(flux_model), "s": str(sd3_model), "m": str(misnamed),
                         "schnell": str(schnell), "hub": FLUX_DEV})
    found = {m: model_family(s, m) for m in s.models}
    assert found == {"demo": "demo", "f": "flux", "s": "sd3", "m": "sd3", "schnell": "flux-schnell", "hub": "flux"}
    assert {m: trainer_family(s, m) for m in s.models} == {  # an uncached hub id: the trainer settles it on load
        "demo": "sd", "f": "flux", "s": "sd3", "m": "sd3", "schnell": "flux", "hub": "auto"}
    flux, sd3, fs = PRESETS["flux"], PRESETS["sd3"], PRESETS["flux-schnell"]
    assert (flux["resolution"], flux["mixed_precision"], flux["gradient_checkpointing"]) == (1024, "bf16", True)
    assert flux["guidance_scale"] == 3.5 and 20 <= flux["num_inference_steps"] <= 28
    assert (sd3["resolution"], sd3["mixed_precision"], sd3["num_inference_steps"]) == (1024, "bf16", 28)
    assert 4.5 <= sd3["guidance_scale"] <= 5 and (fs["num_inference_steps"], fs["guidance_scale"]) == (4, 0.0)
    assert PRESETS["demo-sd3"]["resolution"] == 32 and PRESETS["demo-sd3"]["model_family"] == "sd3"


@pytest.mark.parametrize("which", ["flux", "sd3"])
def test_dit_job_starts_the_trainer_with_the_family_settings(which, flux_model, sd3_model, tmp_path,  # noqa: F811
                                                              monkeypatch) -> None:
    """On a GPU server: the family, targets, 1024 px, bf16 and gradient checkpointing; pivotal tuning (not on Flux
    in the trainer) is off there even when the box was left on, on SD3 as asked."""
    from app.services.jobs import JobManager

    monkeypatch.setattr(JobManager, "_launch", lambda self, job: None)  # the config is what is checked here
    folder = {"flux": flux_model, "sd3": sd3_model}[which]
    s = AppServices(Settings(library=tmp_path / "lib", output=tmp_path / "out", device="cuda",
                             models={which: str(folder)}))
    photo = tmp_path / "photo.png"
    Image.new("RGB", (1100, 1024), (200, 30, 30)).save(photo)
    job = s.jobs.create(JobRequest([str(photo)], class_word="dog", model=which, steps=10, pivotal=True))
    cfg = yaml.safe_load((s.jobs.dir(job) / "config.yaml").read_text())
    assert job.family == which
    assert {k: cfg[k] for k in ("model_family", "targets", "resolution", "mixed_precision", "gradient_checkpointing",
                                "train_embedding", "guidance_scale", "num_inference_steps")} == {
        "model_family": which, "targets": "dit-attn", "resolution": 1024, "mixed_precision": "bf16",
        "gradient_checkpointing": True, "train_embedding": which == "sd3", "guidance_scale": PRESETS[which]["guidance_scale"],
        "num_inference_steps": PRESETS[which]["num_inference_steps"]}
    assert cfg["pretrained_model_name_or_path"] == str(folder)
    with pytest.raises(AppError, match=r"image small.png: 200x200 px, smaller than the 1024 px this model trains at"):
        Image.new("RGB", (200, 200)).save(tmp_path / "small.png")
        s.jobs.create(JobRequest([str(tmp_path / "small.png")], model=which))


def test_sd3_job_trains_into_the_library_and_generates_with_the_mask_hook(sd3_model, tmp_path,  # noqa: F811
                                                                          monkeypatch) -> None:
    """A real trainer run on the tiny SD3 pipeline (the preset shrunk to its 32 px): done, in the library as an SD3
    file, and 'try a prompt' generates through StableDiffusion3Pipeline with the adapter and the timestep hook."""
    from .test_app import image, wait

    monkeypatch.setitem(PRESETS["sd3"], "resolution", 32)
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    s = services(tmp_path, sd3=str(sd3_model))
    job = s.jobs.create(JobRequest([image(tmp_path / "a.png")], model="sd3", steps=2, rank=4, sample_every=2, sample_steps=2,
                                   checkpoint_every=2, name="sd3-job"))
    wait(s.jobs, job, timeout=240)
    assert job.state == "done", s.jobs.log_tail(job, 30)
    entry = s.library.entry(job.library_name)
    assert (entry["base"], entry["base_family"], entry["other_family"]) == ("SD3", "sd3", False)
    assert entry["variant"] == "tlora" and entry["training"]["family"] == "sd3"
    req = GenerateRequest("a photo of sks", steps=2, num_images=1, model="sd3", guidance=PRESETS["sd3"]["guidance_scale"],
                          adapters=(AdapterUse(str(s.jobs.current_adapter(job)), 1.0, job.name),))
    images = s.generator.generate(req)
    pipe = next(iter(s.generator._pipes.values()))
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and images[0].size == (32, 32)
    assert getattr(pipe.transformer, HOOK_ATTR, None) is not None and ld.list_adapters(pipe)


def test_flux_generates_and_blends_with_every_diffusion_fusion(flux_model, tmp_path) -> None:  # noqa: F811
    from tests.app_harness import random_lora

    s = services(tmp_path, flux=str(flux_model))
    flux_file = dit_lora(flux_model, tmp_path / "glow-style.safetensors")
    name = s.library.import_file(flux_file, "glow-style.safetensors")
    unet = s.library.import_file(random_lora(tmp_path / "dotted.safetensors"), "dotted.safetensors")
    entries = {e["name"]: e for e in s.library.entries()}
    assert (entries[name]["base"], entries[name]["other_family"]) == ("Flux", False)
    assert entries[unet]["other_family"]  # a demo-UNet file on a Flux-only server is marked, not hidden
    kw = dict(steps=2, num_images=1, model="flux", guidance=3.5, width=32, height=32)
    base = pixels(s.generator.generate(GenerateRequest("a glow style photo", **kw)))
    use = AdapterUse(str(s.library.path(name)), 1.0, name)
    adapted = pixels(s.generator.generate(GenerateRequest("a glow style photo", adapters=(use,), **kw)))
    assert np.abs(adapted - base).mean() > 1.0
    static = s.generator.blend(GenerateRequest("a glow style photo", adapters=(use,), **kw), "static")
    assert (pixels(static["images"]) == adapted).all() and static["chosen"][0]["name"] == name
    gated = s.generator.blend(GenerateRequest("a glow style photo", adapters=(use,), **kw), "gated",
                              plot_to=tmp_path / "gates.png")
    assert (pixels(gated["images"]) == adapted).all()  # the untrained gate: the plain LoRA
    assert gated["plot"].read_bytes()[:4] == b"\x89PNG" and any("without a gates file" in n for n in gated["notes"])
    with pytest.raises(AppError, match=r"K-LoRA fuses one subject and one style LoRA"):
        s.generator.blend(GenerateRequest("a glow style photo", adapters=(use,), **kw), "klora")
    with pytest.raises(AppError, match=r"fusion method 'xlora' applies to language models only"):
        s.generator.blend(GenerateRequest("a glow style photo", adapters=(use,), **kw), "xlora")
    auto = s.generator.blend(GenerateRequest("a glow style photo", **kw), "static", s.settings.library, top_k=2)
    assert [c["name"] for c in auto["chosen"]] == ["glow-style"]  # the UNet file is not retrieved for Flux
    assert (pixels(auto["images"]) == adapted).all()


def test_embedded_dit_demo_is_offered_with_its_presets(tmp_path, monkeypatch) -> None:
    """assets/demo-sd3 (here a random-weight copy from the builder): offered by default as "demo (SD3 transformer)",
    32 px, the trainer's demo recipe (its targets, pivotal tuning), generated by the stock SD3 pipeline."""
    from app.services.jobs import JobManager
    from app.services.settings import DEMO_DIT, parse_models
    from training.pretrain_demo_dit import build_demo_dit_pipeline

    from .test_app import image

    monkeypatch.setenv("LORA_DIFFUSION_ASSETS", str(tmp_path / "assets"))
    with pytest.raises(AppError, match=r"--model demo-sd3: the embedded SD3 demo model .* is not built; build it with "
                                       r"`python -m training.pretrain_demo_dit`"):
        parse_models(["demo-sd3"])
    folder = build_demo_dit_pipeline(tmp_path / "assets" / "demo-sd3")
    assert parse_models([]) == {"demo": None, DEMO_DIT: str(folder)} == parse_models(["demo", "demo-sd3"])
    s = AppServices(Settings(library=tmp_path / "lib", output=tmp_path / "out", device="cpu"))
    assert list(s.settings.models) == ["demo", DEMO_DIT] and model_family(s.settings, DEMO_DIT) == "demo-sd3"
    monkeypatch.setattr(JobManager, "_launch", lambda self, job: None)
    job = s.jobs.create(JobRequest([image(tmp_path / "a.png")], model=DEMO_DIT, steps=4))
    cfg = yaml.safe_load((s.jobs.dir(job) / "config.yaml").read_text())
    assert (cfg["resolution"], cfg["model_family"], cfg["train_embedding"]) == (32, "sd3", True)
    assert "targets" not in cfg  # the trainer's DiT demo recipe decides (attention and MLP linears)
    images = s.generator.generate(GenerateRequest("a red star on a blue background", steps=2, num_images=1,
                                                  model=DEMO_DIT))
    assert images[0].size == (32, 32)


def test_library_exports_a_flux_tlora_through_the_flux_model(flux_model, tmp_path) -> None:  # noqa: F811
    """Export and squeeze load a T-LoRA's base (its frozen copies are regenerated): the served model of the file's
    family, not the first one offered."""
    from app.services.presets import model_for
    from app.ui import UI
    from lora_diffusion.io.library import describe

    s = services(tmp_path, demo=None, flux=str(flux_model))
    name = s.library.import_file(dit_lora(flux_model, tmp_path / "glow.safetensors"), "glow.safetensors")
    assert model_for(s.settings, "flux") == "flux" and model_for(s.settings, "sd1") == "demo"
    out, said = UI(s).library_export(name, "diffusers")
    assert said.startswith(f"Exported **{name}** as diffusers")
    d = describe(out)
    assert (d["format"], d["base_family"]) == ("diffusers", "flux")


def test_dit_demo_job_gets_the_measured_recipe(tmp_path, monkeypatch) -> None:
    """A Personalize job on the DiT demo model with the page's defaults resolves, through the trainer's own defaults,
    to the recipe docs/demo_model.md measured best: attention + MLP linears, pivotal tuning, hue jitter 180, repainted
    views (recolor_p 0.5, which needs a caption naming the image's two colors: read from the image), lr 10x, 400
    steps; the sampling settings the model was measured with (28 steps, guidance 7)."""
    from app.services.jobs import JobManager, _sections
    from app.services.settings import DEMO_DIT, demo_dit_path
    from tests.app_harness import subject_image
    from training.config import TLoRAConfig, resolve_defaults

    if demo_dit_path() is None:
        pytest.fail("assets/demo-sd3 is missing: python -m training.pretrain_demo_dit")
    s = AppServices(Settings(library=tmp_path / "lib", output=tmp_path / "out", device="cpu"))
    monkeypatch.setattr(JobManager, "_launch", lambda self, job: None)
    job = s.jobs.create(JobRequest([str(subject_image(tmp_path / "ring.png"))], model=DEMO_DIT))  # red ring on blue
    cfg = yaml.safe_load((s.jobs.dir(job) / "config.yaml").read_text())
    assert cfg["prompt_template"] == "a red {0} on a blue background" == job.request["caption"]
    assert (cfg["num_inference_steps"], cfg["guidance_scale"]) == (28, 7.0)
    r = resolve_defaults(TLoRAConfig(**_sections(cfg)), ld.variant_names())
    assert (r.adapter.targets, r.adapter.variant, r.optim.max_train_steps) == ("dit-attn-mlp", "tlora", 400)
    assert (r.data.recolor_p, r.data.hue_jitter, r.model.model_family) == (0.5, 180.0, "sd3")
    assert r.optim.learning_rate == pytest.approx(1e-3) and r.embedding.train_embedding is True
    assert (r.adapter.lora_rank, r.adapter.min_rank) == (64, 32)  # T-LoRA rank 64, r_min 32: the rows measured
    assert cfg["validation_prompts"] == "a yellow {0} on a black background#a green {0} on a white background"


def test_demo_prompts_are_offered_on_the_demo_models_only(flux_model, tmp_path) -> None:  # noqa: F811
    """"Prompts the demo models know": both embedded demo models (one world, one vocabulary) get them, every word in
    the model's vocabulary; a real checkpoint (here Flux) gets none, so the panel is hidden there."""
    import json

    from app.services.pipelines import DEMO_EXAMPLES, known_prompts
    from app.services.settings import DEMO_DIT, demo_dit_path

    if demo_dit_path() is None:
        pytest.fail("assets/demo-sd3 is missing: python -m training.pretrain_demo_dit")
    s = services(tmp_path, demo=None, **{DEMO_DIT: str(demo_dit_path())}, flux=str(flux_model))
    assert known_prompts(s.settings, "demo") == known_prompts(s.settings, DEMO_DIT) == DEMO_EXAMPLES
    vocabulary = set(json.loads((demo_dit_path() / "demo_model.json").read_text())["vocabulary"])
    assert all(set(p.split()) <= vocabulary for p in DEMO_EXAMPLES)
    assert known_prompts(s.settings, "flux") == () and known_prompts(s.settings, "not served") == ()
