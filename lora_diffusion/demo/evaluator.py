"""An evaluator for images of the shapes world: which shape, color, background and texture they show.

A small CNN (about 0.2M parameters) with one classification head per attribute, trained on the
world generator's images (every shape and texture, the held-out ones included, so it can score
personalization of held-out concepts). Training images are blurred and noised at random so the
evaluator also reads VAE reconstructions and generated samples, which are softer than renders.

    >>> ev = load_evaluator()                       # assets/evaluator (see docs/demo_model.md)
    >>> ev.predict([pil_image])
    [{'shape': 'star', 'color': 'red', 'background': 'blue', 'texture': 'plain'}]
    >>> ev.accuracy(images, scenes)                 # {'shape': 0.99, ..., 'all': 0.97}
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from . import world

log = logging.getLogger(__name__)

HEADS: dict[str, tuple[str, ...]] = {
    "shape": world.SHAPES, "color": tuple(world.COLORS), "background": tuple(world.COLORS), "texture": world.TEXTURES,
}
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INPUT_RESOLUTION = 32


class EvaluatorError(RuntimeError):
    """A missing or damaged evaluator."""


ImageLike = Image.Image | np.ndarray | torch.Tensor


def images_to_tensor(images: Sequence[ImageLike] | np.ndarray | torch.Tensor, resolution: int = INPUT_RESOLUTION) -> torch.Tensor:
    """PIL images, uint8 arrays (N, H, W, 3) / (H, W, 3), or float tensors (N, 3, H, W) in [-1, 1] -> float
    tensor (N, 3, resolution, resolution) in [-1, 1] (area-resized when the size differs)."""
    if isinstance(images, torch.Tensor):
        x = images.float()
        if x.ndim == 3:
            x = x[None]
    else:
        if isinstance(images, np.ndarray):
            arr = images[None] if images.ndim == 3 else images
        else:
            arr = np.stack([np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im) for im in images])
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"expected RGB images (N, H, W, 3), got shape {arr.shape}")
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if x.shape[-1] != resolution or x.shape[-2] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="area" if x.shape[-1] > resolution else "bilinear")
    return x


class Evaluator(nn.Module):
    """CNN trunk (32x32 -> 4x4, GroupNorm + SiLU), average and max pooling, one linear head per attribute."""

    def __init__(self, width: int = 24, heads: dict[str, Sequence[str]] | None = None) -> None:
        super().__init__()
        self.heads_spec = {k: tuple(v) for k, v in (heads or HEADS).items()}
        self.width = width
        c1, c2, c3 = width, 2 * width, 3 * width

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU()]

        self.trunk = nn.Sequential(*block(3, c1, 1), *block(c1, c1, 2), *block(c1, c2, 1), *block(c2, c2, 2),
                                   *block(c2, c3, 1), *block(c3, c3, 2))
        self.heads = nn.ModuleDict({k: nn.Linear(2 * c3, len(v)) for k, v in self.heads_spec.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        h = torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: Sequence[ImageLike] | np.ndarray | torch.Tensor, batch_size: int = 256) -> list[dict[str, str]]:
        """Attribute names for each image."""
        self.eval()
        x = images_to_tensor(images).to(next(self.parameters()).device)
        out: list[dict[str, str]] = []
        for i in range(0, len(x), batch_size):
            logits = self(x[i:i + batch_size])
            idx = {k: v.argmax(1).tolist() for k, v in logits.items()}
            out += [{k: self.heads_spec[k][idx[k][j]] for k in idx} for j in range(len(x[i:i + batch_size]))]
        return out

    def accuracy(self, images: Sequence[ImageLike] | np.ndarray | torch.Tensor,
                 truth: Sequence[world.Scene | dict[str, str]]) -> dict[str, float]:
        """Fraction of images whose predicted attribute equals the truth, per attribute, and ``all`` (every
        attribute right). ``truth`` gives scenes or dicts; a dict may name only some attributes."""
        preds = self.predict(images)
        if len(preds) != len(truth):
            raise ValueError(f"{len(preds)} images but {len(truth)} truths")
        rows = [t if isinstance(t, dict) else {"shape": t.shape, "color": t.color, "background": t.background,
                                                "texture": t.texture} for t in truth]
        keys = [k for k in self.heads_spec if any(k in r for r in rows)]
        acc = {k: float(np.mean([p[k] == r[k] for p, r in zip(preds, rows) if k in r])) for k in keys}
        acc["all"] = float(np.mean([all(p[k] == r[k] for k in keys if k in r) for p, r in zip(preds, rows)]))
        return acc


# ---------------------------------------------------------------------------------------------------- training
def _targets(scenes: Sequence[world.Scene], heads: dict[str, tuple[str, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([v.index(getattr(s, k)) for s in scenes]) for k, v in heads.items()}


def soften(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random degradations like a small VAE's and a sampler's: blur (box down/up-sampling or Gaussian),
    small brightness/contrast shifts, Gaussian noise. ``x`` in [-1, 1], (N, 3, H, W)."""
    n, _, h, w = x.shape
    out = x.clone()
    kind = torch.randint(0, 4, (n,), generator=g)
    down = F.interpolate(F.interpolate(x, scale_factor=0.5, mode="area"), size=(h, w), mode="bilinear")
    k = torch.tensor([1.0, 2.0, 1.0])
    k2 = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
    blur = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k2, groups=3)
    out[kind == 1] = down[kind == 1]
    out[kind == 2] = blur[kind == 2]
    gain = 1 + 0.08 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)
    shift = 0.08 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)
    noise = torch.randn(out.shape, generator=g) * 0.06 * torch.rand(n, 1, 1, 1, generator=g)
    return (out * gain + shift + noise).clamp(-1, 1)


def sample_training_scenes(n: int, seed: int) -> list[world.Scene]:
    """Evaluator training/test scenes: every concept, wider sizes and positions than pretraining."""
    return world.sample_scenes(n, seed, "all", size_range=(0.45, 0.95), jitter=0.15, max_rotation=20.0, textured=0.5)


def train_evaluator(steps: int = 2000, batch_size: int = 64, lr: float = 3e-3, n_train: int = 12000, seed: int = 0,
                    width: int = 24, resolution: int = INPUT_RESOLUTION, max_minutes: float | None = None,
                    progress: bool = True) -> Evaluator:
    """Train an evaluator on ``n_train`` fresh renders (seed ``seed``), softened at random, AdamW + cosine LR."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    scenes = sample_training_scenes(n_train, seed)
    images = images_to_tensor(world.render_batch(scenes, resolution), resolution)
    targets = _targets(scenes, HEADS)
    log.info("rendered %d training images in %.1fs", n_train, time.time() - t0)
    model = Evaluator(width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    try:
        from tqdm.auto import tqdm
        bar: Any = tqdm(range(steps), desc="evaluator", disable=not progress)
    except ImportError:  # pragma: no cover
        bar = range(steps)
    model.train()
    for step in bar:
        idx = torch.randint(0, n_train, (batch_size,), generator=g)
        x = soften(images[idx], g)
        if torch.rand((), generator=g) < 0.5:  # every attribute is mirror-invariant except the moon's side
            keep = torch.tensor([scenes[i].shape != "moon" for i in idx.tolist()])
            x[keep] = x[keep].flip(-1)
        logits = model(x)
        loss = sum(F.cross_entropy(logits[k], targets[k][idx], label_smoothing=0.05) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[union-attr]
        opt.step()
        sched.step()
        if hasattr(bar, "set_postfix") and step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")  # type: ignore[union-attr]
        if max_minutes is not None and time.time() - t0 > 60 * max_minutes:
            log.warning("stopping at step %d: --max-minutes %.1f reached", step, max_minutes)
            break
    return model.eval()


# ---------------------------------------------------------------------------------------------------- files
def default_evaluator_path() -> Path:
    from .model import assets_dir

    return assets_dir() / "evaluator"


def save_evaluator(model: Evaluator, folder: str | Path, metrics: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` (fp16) and ``config.json`` (architecture, heads, measured metrics)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    tmp = folder / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(folder / WEIGHTS_NAME)
    cfg = {"format": "lora-diffusion-evaluator", "width": model.width, "input_resolution": INPUT_RESOLUTION,
           "heads": {k: list(v) for k, v in model.heads_spec.items()}, "metrics": metrics or {}}
    (folder / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
    return folder


def load_evaluator(folder: str | Path | None = None, device: str | torch.device = "cpu") -> Evaluator:
    """Load an evaluator folder (default ``assets/evaluator``); a missing or damaged one raises
    :class:`EvaluatorError` saying how to rebuild it."""
    folder = Path(folder) if folder is not None else default_evaluator_path()
    hint = "rebuild it with `python -m training.train_evaluator` (a few minutes on CPU)"
    if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
        raise EvaluatorError(f"no evaluator at {folder} (needs {CONFIG_NAME} and {WEIGHTS_NAME}); {hint}")
    try:
        from safetensors.torch import load_file

        cfg = json.loads((folder / CONFIG_NAME).read_text())
        model = Evaluator(int(cfg["width"]), cfg["heads"])
        state = {k: v.float() for k, v in load_file(str(folder / WEIGHTS_NAME)).items()}
        model.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - any damage becomes one clear message
        raise EvaluatorError(f"the evaluator at {folder} is damaged ({type(e).__name__}: {e}); {hint}") from e
    return model.to(device).eval()
