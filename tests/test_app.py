"""The app's services (no Gradio) and the Gradio handler, on the embedded demo model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import lora_diffusion as ld
from app.services import AppError, GenerateRequest, GenerateService, parse_adapters
from lora_diffusion.generate import load_pipeline


@pytest.fixture(scope="module")
def service() -> GenerateService:
    return GenerateService("cpu")


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


def test_generates_with_the_embedded_model_by_default(service) -> None:
    seen: list[float] = []
    images = service.generate(GenerateRequest("a red star on a blue background", steps=3, num_images=2),
                              progress=lambda f, desc: seen.append(f))
    assert len(images) == 2 and images[0].size == (32, 32)
    assert seen[-1] == pytest.approx(1.0) and len(seen) == 6
    pipe = service._pipe
    again = service.generate(GenerateRequest("a red star on a blue background", steps=3, num_images=2))
    assert service._pipe is pipe  # cached, not reloaded
    assert (pixels(images) == pixels(again)).all()  # seeded


def test_adapter_files_change_the_images(service, tmp_path) -> None:
    pipe = load_pipeline(None)
    ld.add_adapter(pipe.unet, ld.AdapterSpec("lora", rank=4, targets="unet-full", seed=0))
    with torch.no_grad():
        for _, p in ld.adapter_parameters(pipe.unet):
            p.normal_(0, 0.2)
    path = ld.save_adapter(pipe.unet, tmp_path / "a.safetensors")
    req = GenerateRequest("a red star on a blue background", steps=3, num_images=1)
    plain = pixels(service.generate(req))
    adapted = pixels(service.generate(GenerateRequest(req.prompt, steps=3, num_images=1, adapters=(str(path),))))
    assert np.abs(plain.astype(int) - adapted.astype(int)).max() > 10


@pytest.mark.parametrize("req, match", [
    (GenerateRequest(" "), "prompt: empty"),
    (GenerateRequest("a star", steps=0), "steps: expected 1..200"),
    (GenerateRequest("a star", num_images=99), "number of images"),
    (GenerateRequest("a star", adapters=("/nope/a.safetensors",)), "adapter file /nope/a.safetensors: not found"),
    (GenerateRequest("a star", model="/nope/model"), "/nope/model"),
])
def test_bad_requests_are_named(service, req, match) -> None:
    with pytest.raises(AppError, match=match):
        service.generate(req)


def test_parse_adapters() -> None:
    assert parse_adapters(["a", "b"], "") == (("a", "b"), (1.0, 1.0))
    assert parse_adapters(["a", "b"], "1, 0.5") == (("a", "b"), (1.0, 0.5))
    with pytest.raises(AppError, match="scales: 1 value"):
        parse_adapters(["a", "b"], "1")
    with pytest.raises(AppError, match="comma-separated numbers"):
        parse_adapters(["a"], "x")


def test_gradio_handler(service) -> None:
    import gradio as gr

    from app.ui import build_app, make_generate_fn

    assert isinstance(build_app(service), gr.Blocks)
    run = make_generate_fn(service)
    images = run("a green triangle on a black background", "", 2, 4.0, 1, 2, "", None, "", progress=lambda f, desc: None)
    assert len(images) == 2 and images[0].size == (256, 256)  # the 32x32 demo images, enlarged for the gallery
    with pytest.raises(gr.Error, match="prompt: empty"):
        run("", "", 2, 4.0, 1, 2, "", None, "", progress=lambda f, desc: None)


@pytest.mark.slow
def test_served_app_answers_an_api_call(service) -> None:
    """The real server: launch on a free port, call the Generate endpoint over HTTP with gradio_client."""
    import socket

    from gradio_client import Client

    from app.ui import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = build_app(service).queue()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        out = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(
            "a purple circle on a yellow background", "", 3, 4.0, 3, 2, "", [], "", api_name="/generate")
        assert len(out) == 2 and all(Path(item["image"]).is_file() for item in out)
    finally:
        demo.close()
