"""Generation: base pipelines with adapters, cached by (model, adapter contents); scales change in place.

An adapter is identified by the sha256 of its file, so the same file uploaded twice (or under two names, such as
two runs' ``tlora.safetensors``) loads once, and two different files with the same name load side by side. Up to
``Settings.max_pipelines`` pipelines are kept (least recently used goes first), so users blending different
adapters do not evict each other at every request. Adapter files are checked (header, format) before any base
model is loaded.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_diffusion import AdapterError
from lora_diffusion.generate import apply_adapters, generate, load_pipeline

from .errors import AppError
from .presets import PRESETS, model_family
from .settings import Settings

log = logging.getLogger("app")
MAX_SEED = 2**64 - 1
MAX_SCALE = 4.0
#: prompts the demo model knows (docs/demo_model.md); "sks" is the placeholder a one-image adapter learns
DEMO_EXAMPLES = ("a red star on a blue background", "a green triangle on a black background",
                 "an orange striped cross on a gray background", "a purple circle on a yellow background",
                 "a yellow sks on a black background")


def known_prompts(settings: Settings, model: str | None) -> tuple[str, ...]:
    """The example prompts a base model knows: :data:`DEMO_EXAMPLES` on the embedded demo models (the UNet one and
    the SD3 transformer share one world), each kept only if every word is in that model's vocabulary (its
    ``demo_model.json``); none on any other model (a real checkpoint does not know this world's prompts)."""
    import json

    from lora_diffusion.demo.model import default_model_path

    try:
        family = model_family(settings, model)
    except AppError:
        return ()
    if family not in ("demo", "demo-sd3"):
        return ()
    source = settings.model_source(model)
    folder = default_model_path(check=False) if source is None else Path(source)
    try:
        vocabulary = set(json.loads((folder / "demo_model.json").read_text())["vocabulary"])
    except (OSError, ValueError, KeyError, TypeError):
        return ()
    return tuple(p for p in DEMO_EXAMPLES if set(p.split()) <= vocabulary)


@dataclass(frozen=True)
class AdapterUse:
    path: str  # a file the app owns (library, a job, a session upload)
    scale: float = 1.0
    label: str = ""  # what the user calls it (file name); used in every message instead of the path
    enabled: bool = True

    @property
    def name(self) -> str:
        return self.label or Path(self.path).name


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    guidance: float = 4.0
    seed: int = 0
    num_images: int = 4
    model: str | None = None  # a name from Settings.models (None: the demo model)
    adapters: tuple[AdapterUse, ...] = ()
    width: int | None = None  # None: the model's size
    height: int | None = None

    def check(self) -> None:
        if not self.prompt.strip():
            raise AppError("prompt: empty; describe the image, e.g. 'a red star on a blue background'")
        if not 1 <= self.steps <= 200:
            raise AppError(f"steps: expected 1..200, got {self.steps}")
        if not 1 <= self.num_images <= 16:
            raise AppError(f"number of images: expected 1..16, got {self.num_images}")
        if not (math.isfinite(self.guidance) and 0 <= self.guidance <= 30):
            raise AppError(f"guidance: expected a number in 0..30, got {self.guidance}")
        if not 0 <= self.seed <= MAX_SEED - self.num_images + 1:  # image i uses seed + i
            raise AppError(f"seed: expected an integer in 0..2^64-{self.num_images} for {self.num_images} image(s), "
                           f"got {self.seed}")
        for side, v in (("width", self.width), ("height", self.height)):
            if v is not None and not (8 <= v <= 2048 and v % 8 == 0):
                raise AppError(f"{side}: expected a multiple of 8 in 8..2048, got {v}")
        for a in self.adapters:
            check_scale(a.scale, f"weight of {a.name}")
            if not Path(a.path).is_file():
                raise AppError(f"adapter {a.name}: the file is gone; import it again")


def check_scale(value: float, field: str) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and -MAX_SCALE <= value <= MAX_SCALE):
        raise AppError(f"{field}: expected a finite number in -{MAX_SCALE:g}..{MAX_SCALE:g}, got {value}")
    return float(value)


def parse_seed(value: Any) -> int:
    """A seed from a UI field (text or number): empty, fractional, negative or beyond 64 bits -> error naming it."""
    bad = AppError(f"seed: expected an integer in 0..2^64-1, got {value!r}")
    if value is None or (isinstance(value, str) and not value.strip()):
        raise AppError("seed: empty; expected an integer in 0..2^64-1 (e.g. 0)")
    if isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            raise bad
        value = int(value)
    try:
        seed = int(str(value).strip())
    except ValueError:
        raise bad from None
    if not 0 <= seed <= MAX_SEED:
        raise bad
    return seed


class Hashes:
    """sha256 of files, remembered per (path, size, mtime) so a file is hashed once."""

    def __init__(self) -> None:
        self._memo: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()

    def __call__(self, path: str | os.PathLike) -> str:
        st = os.stat(path)
        key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._memo:
                return self._memo[key]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        with self._lock:
            self._memo[key] = h.hexdigest()
        return self._memo[key]


def check_adapter_file(path: str | os.PathLike, label: str) -> dict[str, Any]:
    """The header of an adapter file, read without loading anything; a bad file -> AppError naming ``label``."""
    from lora_diffusion.io.library import describe

    try:
        return describe(path)
    except (AdapterError, OSError, ValueError) as e:
        msg = str(e).replace(str(path), label)
        raise AppError(f"adapter {label}: not a readable adapter file ({msg})") from None


class GenerateService:
    """Pipelines per (model, adapter contents), least recently used dropped beyond ``max_pipelines``."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.device = self.settings.device
        self.hashes = Hashes()
        self._pipes: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._lock = threading.Lock()  # one generation at a time: a pipeline is not re-entrant
        self.loads = 0  # base-model loads (tests and the load benchmark read it)

    def _key(self, req: GenerateRequest) -> tuple[tuple[Any, ...], list[str]]:
        digests = [self.hashes(a.path) for a in req.adapters]
        return (req.model or "demo", tuple(sorted(set(digests)))), digests

    def _pipeline(self, req: GenerateRequest, key: tuple[Any, ...], digests: list[str]) -> Any:
        if key in self._pipes:
            self._pipes.move_to_end(key)
            return self._pipes[key]
        for a in req.adapters:  # a bad adapter fails here, before a base model is loaded
            check_adapter_file(a.path, a.name)
        pipe = self._load(req.model)
        first = {d: a for d, a in zip(digests, req.adapters)}
        if first:
            try:
                apply_adapters(pipe, [a.path for a in first.values()], names=[f"a{d[:16]}" for d in first])
            except AdapterError as e:
                a = next(iter(first.values()))
                raise AppError(_user_message(str(e), req.adapters) or f"adapter {a.name}: {e}") from None
        self._pipes[key] = pipe
        while len(self._pipes) > self.settings.max_pipelines:
            self._pipes.popitem(last=False)
        return pipe

    def generate(self, req: GenerateRequest, progress: Callable[[float, str], None] | None = None) -> list[Any]:
        """PIL images at the model's native size; image i uses seed ``req.seed + i``."""
        req.check()
        self.settings.model_source(req.model)
        key, digests = self._key(req)
        with self._lock:
            pipe = self._pipeline(req, key, digests)
            self._set_scales(pipe, req, digests)
            return generate(pipe, [req.prompt], req.steps, req.guidance, req.seed, req.num_images, req.height,
                            req.width, negative_prompt=req.negative_prompt or None, progress=progress)

    def blend(self, req: GenerateRequest, method: str, library: Path | None = None, top_k: int = 2,
              plot_to: Path | None = None, progress: Callable[[float, str], None] | None = None) -> dict[str, Any]:
        """Fused generation (``lora_diffusion.blend``): ``req.adapters`` at their weights, or with ``library`` and no
        adapters, the LoRAs retrieved for the prompt. Returns images, what was chosen (scores, weights, roles),
        notes, and the gate-strength plot (layer x timestep) when ``plot_to`` is given. A pipeline of its own per
        model, since fusion hooks stay on it."""
        from lora_diffusion.blend import blend, plot_gate_stats
        from lora_diffusion.fusion import FUSION_METHODS

        req.check()
        if method not in FUSION_METHODS:
            raise AppError(f"fusion method: expected one of {list(FUSION_METHODS)}, got {method!r}")
        if not 1 <= top_k <= 8:
            raise AppError(f"number of LoRAs to retrieve: expected 1..8, got {top_k}")
        model_family(self.settings, req.model)  # an unknown model name: one clear error before anything loads
        on = [a for a in req.adapters if a.enabled]
        for a in on:
            check_adapter_file(a.path, a.name)
        key = ("blend", req.model or "demo")
        with self._lock:
            if key not in self._pipes:
                self._pipes[key] = self._load(req.model)
            pipe = self._pipes[key]
            self._pipes.move_to_end(key)
            try:
                r = blend(pipe, req.prompt, [a.path for a in on], None if on else library, method,
                          [a.scale for a in on] or None, top_k=top_k, steps=req.steps, guidance_scale=req.guidance,
                          seed=req.seed, num_images=req.num_images, progress=progress, height=req.height,
                          width=req.width)
            except AdapterError as e:
                raise AppError(_user_message(str(e), req.adapters) or f"blend: {e}") from None
            while len(self._pipes) > self.settings.max_pipelines + 1:
                self._pipes.popitem(last=False)
        names = {str(Path(a.path).resolve()): a.name for a in on}
        chosen = [{"name": names.get(str(Path(c.path).resolve()), Path(c.path).stem), "score": c.score,
                   "weight": c.weight, "role": c.role} for c in r.chosen]
        plot = None
        if plot_to is not None and r.gate_stats is not None:
            plot = plot_gate_stats(r.gate_stats, plot_to, f"{r.method}: {req.prompt[:60]}")
        notes = [_user_message(n, req.adapters) or n for n in r.notes]
        return {"images": r.images, "method": r.method, "chosen": chosen, "notes": notes, "plot": plot}

    def _load(self, model: str | None) -> Any:
        """A base pipeline on the device: float32 on a CPU; on a GPU the preset's precision (bf16 for SDXL, Flux and
        SD3, whose activations overflow fp16; fp16 for SD1.x)."""
        source = self.settings.model_source(model)
        half = PRESETS[model_family(self.settings, model)].get("mixed_precision", "fp16")
        dtype = torch.float32 if self.device == "cpu" else torch.bfloat16 if half == "bf16" else torch.float16
        try:
            pipe = load_pipeline(source, dtype=dtype).to(self.device)
        except AdapterError as e:
            raise AppError(f"base model {model or 'demo'}: {e}") from None
        self.loads += 1
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @staticmethod
    def _set_scales(pipe: Any, req: GenerateRequest, digests: list[str]) -> None:
        """In place: the enabled adapters at their weights (the same file twice: weights add), others off."""
        import lora_diffusion as ld

        scales: dict[str, float] = {}
        for d, a in zip(digests, req.adapters):
            if a.enabled:
                scales[f"a{d[:16]}"] = scales.get(f"a{d[:16]}", 0.0) + a.scale
        if scales:
            ld.set_adapters(pipe, list(scales), scales)
        elif ld.list_adapters(pipe):
            ld.disable_adapters(pipe)


def _user_message(msg: str, adapters: tuple[AdapterUse, ...]) -> str:
    """An error from the library with server paths replaced by the names the user knows."""
    for a in adapters:
        msg = msg.replace(str(a.path), a.name)
    return msg if any(a.name in msg for a in adapters) else ""
