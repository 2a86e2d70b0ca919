"""What the operator decides at launch: folders, device, allowed base models, limits, users."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AppError

DEMO = "demo"  # the name of the embedded demo model in the base-model field
DEMO_DIT = "demo (SD3 transformer)"  # the embedded SD3-architecture demo model (assets/demo-sd3), when built
DEMO_DIT_SPEC = "demo-sd3"  # what --model calls it


def demo_dit_path() -> Path | None:
    """The embedded SD3-architecture demo model's folder (``assets/demo-sd3``), when it is there."""
    from lora_diffusion.demo.model import default_dit_model_path

    folder = default_dit_model_path(check=False)
    return folder if (folder / "model_index.json").is_file() else None


def default_models() -> dict[str, str | None]:
    """The embedded demo model, and the SD3-architecture one when it is built."""
    dit = demo_dit_path()
    return {DEMO: None, **({DEMO_DIT: str(dit)} if dit is not None else {})}


@dataclass
class Settings:
    library: Path = Path("outputs/app/library")  # adapter files (the Library tab)
    output: Path = Path("outputs/app")  # jobs/, sessions/
    device: str | None = None  # None: cuda when available
    models: dict[str, str | None] = field(default_factory=default_models)  # field value -> source (None: demo)
    llm_models: dict[str, str | None] = field(default_factory=lambda: {"smollm2": None})  # None: SmolLM2-135M GGUF
    allow_server_paths: bool = False  # Library: import a file by its path on the server
    max_upload_mb: float = 512.0  # adapter files; images are limited to max_image_mb
    max_image_mb: float = 20.0
    max_images: int = 16
    max_pipelines: int = 2  # cached base+adapter pipelines (one per different set of adapters)
    max_concurrent_generations: int = 1  # "one GPU job at a time"; the queue shows the others their place
    session_ttl_s: float = 3600.0  # session folders older than this (and of closed sessions) are removed
    hyper_dir: Path | None = None  # trained T2L/D2L hypernetworks (None: <output>/hypernetworks)
    stop_grace_s: float = 60.0  # Stop: how long a trainer may take to finish its step and save before it is killed

    def __post_init__(self) -> None:
        self.library, self.output = Path(self.library).resolve(), Path(self.output).resolve()
        self.hyper_dir = Path(self.hyper_dir or self.output / "hypernetworks").resolve()
        self.hyper_dir.mkdir(parents=True, exist_ok=True)
        self.library.mkdir(parents=True, exist_ok=True)
        self.output.mkdir(parents=True, exist_ok=True)
        if self.device is None:
            import torch

            self.device = "cuda" if torch.cuda.is_available() else "cpu"

    def model_source(self, name: str | None) -> str | None:
        """The source of a base model the operator allows; anything else (a server path, a hub id not listed) is
        refused, naming the field and the allowed choices."""
        name = (name or DEMO).strip() or DEMO
        if name not in self.models:
            raise AppError(f"base model: '{name}' is not one of the models this server offers: {sorted(self.models)}")
        return self.models[name]

    @property
    def jobs_dir(self) -> Path:
        return self.output / "jobs"

    @property
    def sessions_dir(self) -> Path:
        return self.output / "sessions"


def parse_models(specs: list[str]) -> dict[str, str | None]:
    """``--model`` values -> {name shown: source}; 'demo' is the embedded model, 'demo-sd3' the embedded SD3 one
    (nothing: both, when built); 'name=source' names a hub id, folder or .safetensors file; a bare source is shown by
    its last path component."""
    if not specs:
        return default_models()
    out: dict[str, str | None] = {}
    for spec in specs:
        if spec == DEMO:
            out[DEMO] = None
            continue
        if spec in (DEMO_DIT_SPEC, DEMO_DIT):
            dit = demo_dit_path()
            if dit is None:
                raise AppError(f"--model {spec}: the embedded SD3 demo model (assets/demo-sd3) is not built; build it "
                               "with `python -m training.pretrain_demo_dit`")
            out[DEMO_DIT] = str(dit)
            continue
        name, _, src = spec.partition("=") if "=" in spec else (Path(spec).name or spec, "", spec)
        out[name] = src
    return out


def read_users(auth: list[str], auth_file: str | None) -> list[tuple[str, str]]:
    """``user:pass`` values and a file of such lines (``#`` comments) -> [(user, password)]."""
    lines = list(auth or [])
    if auth_file:
        path = Path(auth_file)
        if not path.is_file():
            raise AppError(f"--auth-file {path}: no such file")
        lines += [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    users = []
    for ln in lines:
        user, sep, password = ln.partition(":")
        if not sep or not user or not password:
            raise AppError(f"--auth: expected user:password, got {ln.split(':')[0]!r}:...")
        users.append((user, password))
    return users


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")
