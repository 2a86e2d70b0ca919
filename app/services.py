"""What the app does, without Gradio: load a base model (the embedded demo model by default), apply adapter
files, generate. The UI in ``app/ui.py`` only calls these; tests call them directly."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_diffusion import AdapterError
from lora_diffusion.generate import apply_adapters, generate, load_pipeline, resolve_source

#: prompts the demo model knows (docs/demo_model.md); "sks" is the placeholder a one-image adapter learns
DEMO_EXAMPLES = ("a red star on a blue background", "a green triangle on a black background",
                 "an orange striped cross on a gray background", "a purple circle on a yellow background",
                 "a yellow sks on a black background")


class AppError(ValueError):
    """A request the app cannot serve; the message says which input is wrong and what was expected."""


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    guidance: float = 4.0
    seed: int = 0
    num_images: int = 4
    model: str | None = None  # None: the embedded demo model
    adapters: tuple[str, ...] = ()
    scales: tuple[float, ...] = ()

    def check(self) -> None:
        if not self.prompt.strip():
            raise AppError("prompt: empty; describe the image, e.g. 'a red star on a blue background'")
        if not 1 <= self.steps <= 200:
            raise AppError(f"steps: expected 1..200, got {self.steps}")
        if not 1 <= self.num_images <= 16:
            raise AppError(f"number of images: expected 1..16, got {self.num_images}")
        if self.scales and len(self.scales) != len(self.adapters):
            raise AppError(f"{len(self.adapters)} adapter file(s) but {len(self.scales)} scale(s)")
        for a in self.adapters:
            if not Path(a).is_file():
                raise AppError(f"adapter file {a}: not found")


class GenerateService:
    """Keeps the last pipeline (base model + adapters) so repeated requests do not reload it."""

    def __init__(self, device: str | None = None) -> None:
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._key: tuple[Any, ...] | None = None
        self._pipe: Any = None
        self._lock = threading.Lock()  # one generation at a time: the pipeline is not re-entrant

    def _pipeline(self, req: GenerateRequest) -> Any:
        key = (resolve_source(req.model), tuple(_stamp(a) for a in req.adapters), req.scales)
        if key != self._key:
            self._pipe, self._key = None, None  # a failed load leaves nothing half-applied behind
            dtype = torch.float16 if self.device == "cuda" else torch.float32
            pipe = load_pipeline(req.model, dtype=dtype).to(self.device)
            pipe.set_progress_bar_config(disable=True)
            if req.adapters:
                apply_adapters(pipe, list(req.adapters), list(req.scales) or None)
            self._pipe, self._key = pipe, key
        return self._pipe

    def generate(self, req: GenerateRequest, progress: Any = None) -> list[Any]:
        """PIL images for ``req``; image i uses seed ``req.seed + i``. ``progress(fraction, desc)`` is called per
        denoising step when given."""
        req.check()
        with self._lock:
            try:
                pipe = self._pipeline(req)
            except AdapterError as e:
                raise AppError(str(e)) from None
            return generate(pipe, [req.prompt], req.steps, req.guidance, req.seed, req.num_images,
                            negative_prompt=req.negative_prompt or None, progress=progress)


def _stamp(path: str | os.PathLike) -> tuple[str, float, int]:
    """A file's identity for the pipeline cache: a re-saved adapter with the same name is reloaded."""
    st = os.stat(path)
    return str(Path(path).resolve()), st.st_mtime, st.st_size


def parse_adapters(files: Sequence[str] | None, scales_text: str) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Adapter paths from the UI and their scales from a comma-separated text ('' : all 1.0)."""
    paths = tuple(str(f) for f in (files or []))
    if not scales_text.strip():
        return paths, tuple(1.0 for _ in paths)
    try:
        scales = tuple(float(s) for s in scales_text.split(","))
    except ValueError:
        raise AppError(f"scales: expected comma-separated numbers such as '1.0, 0.5', got {scales_text!r}") from None
    if len(scales) != len(paths):
        raise AppError(f"scales: {len(scales)} value(s) for {len(paths)} adapter file(s)")
    return paths, scales
