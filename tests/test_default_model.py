"""The embedded demo model is the default base: training and generation run on it with no model named."""

from __future__ import annotations

import pytest

import lora_diffusion as ld
from lora_diffusion.demo import world
from lora_diffusion.demo.model import DemoModelError, default_model_path

from .tiny_sd import tiny_config

try:
    DEMO = default_model_path()
except DemoModelError as e:  # the shipped model is part of the repo; a missing one is a failure, not a skip
    DEMO, WHY = None, str(e)


@pytest.fixture
def ring(tmp_path):
    """One image of a held-out concept (a ring the model never saw), the one-image subject."""
    img = world.render(world.Scene("ring", "red", "blue", size=0.75), resolution=40)
    (tmp_path / "subject").mkdir()
    img.save(tmp_path / "subject" / "ring.png")
    return tmp_path / "subject"


def test_demo_model_is_shipped():
    assert DEMO is not None, WHY


@pytest.mark.slow
def test_train_tlora_and_generate_without_naming_a_model(ring, tmp_path):
    from lora_diffusion.generate import generate, load_pipeline
    from training.train_tlora import train

    cfg = tiny_config("unused", ring, tmp_path / "out", max_train_steps=3, placeholder_token="sks", class_name="ring")
    cfg.model.pretrained_model_name_or_path = None  # the embedded default
    train(cfg)
    adapter = tmp_path / "out" / "tlora.safetensors"
    assert adapter.is_file()
    pipe = load_pipeline(None)
    ld.load_adapter(pipe, adapter, name="subject")
    images = generate(pipe, ["a sks ring on a green background"], steps=4, seed=0)
    assert len(images) == 1 and images[0].size == (32, 32)
    assert len(set(images[0].getdata())) > 1  # an image, not a blank


def test_demo_model_loads_with_diffusers_defaults():
    """No torch_dtype: fp32 weights (fp16-rounded) and an fp32 text-encoder config, so CPU generation just works and
    equals our loader's (which asks for fp32 explicitly)."""
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    from lora_diffusion.demo.model import load_demo_pipeline

    assert DEMO is not None, WHY
    theirs = DiffusionPipeline.from_pretrained(str(DEMO))
    assert {m.dtype for m in (theirs.unet, theirs.vae, theirs.text_encoder)} == {torch.float32}
    kw = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    a = theirs("a red star on a blue background", **kw).images
    kw["generator"] = torch.Generator().manual_seed(0)
    b = load_demo_pipeline()("a red star on a blue background", **kw).images
    assert np.isfinite(a).all() and np.array_equal(a, b)
