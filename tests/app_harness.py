"""Launch the real app on a loopback port for end-to-end, security, load and browser tests."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

import lora_diffusion as ld
from app.__main__ import launch
from app.services import AppServices, Settings
from app.ui import build_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, root: Path, users: list[tuple[str, str]] | None = None, **settings: Any) -> None:
        self.settings = Settings(library=root / "lib", output=root / "out", device="cpu", **settings)
        self.services = AppServices(self.settings)
        self.demo = build_app(self.services)
        self.port = free_port()
        launch(self.demo, self.settings, "127.0.0.1", self.port, users=users, prevent_thread_lock=True, quiet=True)
        self.url = f"http://127.0.0.1:{self.port}/"

    def close(self) -> None:
        self.demo.close()
        for job in self.services.jobs.list():
            if job.state in ("running", "stopping", "queued"):
                self.services.jobs.stop(job.id)


def served_with_library(root: Path) -> Served:
    """A launched app whose library already holds one LoRA ("dotted"), as the e2e and browser tests start."""
    s = Served(root)
    s.services.library.import_file(random_lora(root / "dotted.safetensors"), "dotted.safetensors")
    return s


def random_lora(path: Path, seed: int = 0, rank: int = 4) -> Path:
    """A LoRA on the demo model's UNet with random weights (strong enough to change images)."""
    from lora_diffusion.generate import load_pipeline

    pipe = load_pipeline(None)
    ld.add_adapter(pipe.unet, ld.AdapterSpec("lora", rank=rank, targets="unet-full", seed=seed))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in ld.adapter_parameters(pipe.unet):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return ld.save_adapter(pipe.unet, path, metadata={"trigger_word": "dotted"})


def subject_image(path: Path) -> Path:
    """A red ring on blue, 48x40 (the training crop is its centered square)."""
    im = Image.new("RGB", (48, 40), (30, 60, 200))
    from PIL import ImageDraw

    ImageDraw.Draw(im).ellipse((10, 6, 38, 34), outline=(220, 30, 30), width=5)
    im.save(path)
    return path


def poll(fn: Any, until: Any, timeout: float = 150.0, every: float = 0.5) -> Any:
    end, value = time.time() + timeout, None
    while time.time() < end:
        value = fn()
        if until(value):
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s; last value: {value!r}")
