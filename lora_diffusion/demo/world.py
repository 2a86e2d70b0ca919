"""A procedural world of shapes: seeded images with matching captions (pure numpy + PIL).

Every image is one shape (``circle``, ``square``, ...) of one color, optionally filled with a texture
(``striped``, ``dotted``, ...), on a flat background, with its caption::

    >>> scene = Scene("star", "red", "blue")
    >>> scene.caption()
    'a red star on a blue background'
    >>> image = render(scene, resolution=32)          # PIL RGB image, antialiased

Some shapes and textures are *held out* of the demo model's pretraining (``HELDOUT_SHAPES``,
``HELDOUT_TEXTURES``): they are the concepts and styles to personalize later from one image. A few
(shape, color, background) combinations of the pretraining concepts are held out too
(:func:`is_heldout_combination`), to measure whether the model composes attributes it learned apart.

Sampling is reproducible: the same seed gives the same scenes and the same pixels. Impossible
requests (unknown names, a shape that leaves the canvas, a shape the color of its background) raise
:class:`WorldError` naming the valid choices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "BACKGROUNDS", "CAPTION_TEMPLATES", "COLORS", "HELDOUT_SHAPES", "HELDOUT_TEXTURES", "PLACEHOLDERS", "PRETRAIN_SHAPES",
    "PRETRAIN_TEXTURES", "SHAPES", "SHAPE_COLORS", "SPLITS", "TEXTURES", "Scene", "WorldError", "caption",
    "is_heldout_combination",
    "make_dataset", "render", "render_batch", "sample_scene", "sample_scenes", "vocabulary",
]


class WorldError(ValueError):
    """An impossible request to the world generator (unknown name, shape off the canvas, ...)."""


PRETRAIN_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
HELDOUT_SHAPES: tuple[str, ...] = ("ring", "heart", "moon")
SHAPES: tuple[str, ...] = PRETRAIN_SHAPES + HELDOUT_SHAPES

PRETRAIN_TEXTURES: tuple[str, ...] = ("plain", "striped")
HELDOUT_TEXTURES: tuple[str, ...] = ("dotted", "checkered")
TEXTURES: tuple[str, ...] = PRETRAIN_TEXTURES + HELDOUT_TEXTURES

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "orange": (245, 135, 15), "yellow": (245, 215, 30), "green": (35, 165, 55),
    "blue": (35, 75, 215), "purple": (135, 45, 175), "white": (245, 245, 245), "black": (20, 20, 20),
    "gray": (125, 125, 125),
}
SHAPE_COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple")
BACKGROUNDS: tuple[str, ...] = ("white", "black", "gray", "blue", "yellow")

#: rare words with no meaning in the world, for personalization (DreamBooth's ``sks``, textual-inversion slots)
PLACEHOLDERS: tuple[str, ...] = ("sks", "<v1>", "<v2>", "<v3>", "<v4>")

#: templates; the first is canonical (evaluation prompts), the others vary the wording in training
CAPTION_TEMPLATES: tuple[str, ...] = (
    "{a} {color} {texture}{shape} on a {background} background",
    "a picture of {a} {color} {texture}{shape} on a {background} background",
    "{a} {color} {texture}{shape} , {background} background",
    "{background} background with {a} {color} {texture}{shape}",
)
_EXTRA_WORDS = ("a", "an", "the", "of", "in", "on", "with", "and", "picture", "photo", "image", "background", "style",
                "shape", "drawing", "small", "large", ",", ".")

SPLITS: tuple[str, ...] = ("pretrain", "pretrain-heldout-combos", "heldout-shapes", "heldout-textures", "all")


def vocabulary() -> list[str]:
    """Every word a caption of this world can contain, plus the placeholders (for a word-level tokenizer)."""
    words: list[str] = []
    for w in (*_EXTRA_WORDS, *SHAPES, *COLORS, *TEXTURES, *PLACEHOLDERS):
        if w not in words:
            words.append(w)
    return words


def caption(shape: str, color: str, background: str, texture: str = "plain", template: int | str = 0) -> str:
    """A caption from ``CAPTION_TEMPLATES[template]`` (or a format string with the same fields); ``shape`` may
    be any word, e.g. a placeholder such as ``sks``."""
    fmt = CAPTION_TEMPLATES[template] if isinstance(template, int) else template
    a = "an" if color[0] in "aeiou" else "a"
    return fmt.format(a=a, color=color, shape=shape, background=background,
                      texture="" if texture == "plain" else f"{texture} ")


def _choices(kind: str, name: str, valid: Sequence[str]) -> WorldError:
    return WorldError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(valid)}")


@dataclass(frozen=True)
class Scene:
    """One image of the world. ``size`` is the shape's diameter and ``x``, ``y`` its center, as fractions of
    the canvas; ``rotation`` is in degrees."""

    shape: str
    color: str
    background: str
    texture: str = "plain"
    size: float = 0.7
    x: float = 0.5
    y: float = 0.5
    rotation: float = 0.0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise _choices("shape", self.shape, SHAPES)
        if self.color not in COLORS:
            raise _choices("color", self.color, list(COLORS))
        if self.background not in COLORS:
            raise _choices("background", self.background, list(COLORS))
        if self.texture not in TEXTURES:
            raise _choices("texture", self.texture, TEXTURES)
        if self.color == self.background:
            raise WorldError(f"a {self.color} shape on a {self.background} background would be invisible; pick another color")
        if not all(math.isfinite(v) for v in (self.size, self.x, self.y, self.rotation)):
            raise WorldError(f"size, x, y and rotation must be finite numbers, got {self}")
        if not 0.1 <= self.size <= 1.0:
            raise WorldError(f"size {self.size} is outside the canvas range: use 0.1 <= size <= 1.0 (fraction of the width)")
        r, eps = self.size / 2, 1e-6
        if self.x - r < -eps or self.x + r > 1 + eps or self.y - r < -eps or self.y + r > 1 + eps:
            raise WorldError(f"a shape of size {self.size} centered at ({self.x}, {self.y}) leaves the canvas; "
                             f"need {r:.3g} <= x, y <= {1 - r:.3g}")

    def caption(self, template: int | str = 0) -> str:
        """The caption, from ``CAPTION_TEMPLATES[template]`` or a format string with the same fields."""
        return caption(self.shape, self.color, self.background, self.texture, template)

    def labels(self) -> dict[str, int]:
        """Class indices of the attributes (what the evaluator predicts)."""
        return {"shape": SHAPES.index(self.shape), "color": list(COLORS).index(self.color),
                "background": list(COLORS).index(self.background), "texture": TEXTURES.index(self.texture)}


# ---------------------------------------------------------------------------------------------------- drawing
def _polygon(shape: str) -> list[tuple[float, float]] | None:
    """Outline in unit coordinates (radius 1, y down), or None for shapes drawn from circles."""
    if shape == "square":
        s = 0.82
        return [(-s, -s), (s, -s), (s, s), (-s, s)]
    if shape == "triangle":  # equilateral, centroid at the origin shifted down so the bounding box is centered
        return [(math.cos(math.radians(a)), math.sin(math.radians(a)) + 0.25) for a in (-90, 30, 150)]
    if shape == "star":
        pts = []
        for i in range(10):
            r = 1.0 if i % 2 == 0 else 0.42
            a = math.radians(-90 + 36 * i)
            pts.append((r * math.cos(a), r * math.sin(a) + 0.1))
        return pts
    if shape == "cross":
        w, L = 0.32, 0.95
        return [(-w, -L), (w, -L), (w, -w), (L, -w), (L, w), (w, w), (w, L), (-w, L), (-w, w), (-L, w), (-L, -w), (-w, -w)]
    if shape == "heart":
        ts = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        x = 16 * np.sin(ts) ** 3
        y = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
        x, y = x / 17.0, (y + 2.5) / 17.0
        return list(zip(x.tolist(), y.tolist()))
    return None


def _mask(scene: Scene, size: int) -> np.ndarray:
    """Coverage mask (float in [0, 1]) of the shape on a ``size`` x ``size`` canvas."""
    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    cx, cy, r = scene.x * size, scene.y * size, scene.size * size / 2
    rot = math.radians(scene.rotation)
    cos, sin = math.cos(rot), math.sin(rot)

    def tf(px: float, py: float) -> tuple[float, float]:
        return cx + r * (px * cos - py * sin), cy + r * (px * sin + py * cos)

    def disc(px: float, py: float, rr: float, fill: int) -> None:
        qx, qy = tf(px, py)
        d.ellipse([qx - r * rr, qy - r * rr, qx + r * rr, qy + r * rr], fill=fill)

    poly = _polygon(scene.shape)
    if poly is not None:
        d.polygon([tf(px, py) for px, py in poly], fill=255)
    elif scene.shape == "circle":
        disc(0, 0, 0.95, 255)
    elif scene.shape == "ring":
        disc(0, 0, 1.0, 255)
        disc(0, 0, 0.55, 0)
    elif scene.shape == "moon":
        disc(0, 0, 1.0, 255)
        disc(0.5, -0.25, 0.8, 0)
    return np.asarray(m, dtype=np.float32) / 255.0


def _shade(rgb: np.ndarray) -> np.ndarray:
    """The second color of a texture: darker for light colors, lighter for dark ones."""
    lum = float(rgb @ np.array([0.299, 0.587, 0.114]))
    return rgb * 0.45 if lum > 90 else rgb + (255 - rgb) * 0.55


def _fill(scene: Scene, size: int) -> np.ndarray:
    """The shape's fill (H, W, 3) float: flat color or a texture of the color and its shade."""
    rgb = np.array(COLORS[scene.color], dtype=np.float32)
    out = np.broadcast_to(rgb, (size, size, 3)).copy()
    if scene.texture == "plain":
        return out
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size  # canvas fractions
    if scene.texture == "striped":  # diagonal stripes, 5 periods across
        on = ((xx + yy) * 5 % 1.0) < 0.5
    elif scene.texture == "dotted":  # dots on a 5 x 5 grid
        fx, fy = (xx * 5) % 1.0 - 0.5, (yy * 5) % 1.0 - 0.5
        on = fx * fx + fy * fy < 0.3 ** 2
    else:  # checkered, 4 x 4
        on = ((np.floor(xx * 4) + np.floor(yy * 4)) % 2) == 1
    out[on] = _shade(rgb)
    return out


def render(scene: Scene, resolution: int = 32, supersample: int = 4) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``resolution`` x ``resolution`` pixels (antialiased by supersampling)."""
    if not isinstance(resolution, int) or not 8 <= resolution <= 1024:
        raise WorldError(f"resolution must be an integer in [8, 1024], got {resolution!r}")
    if not isinstance(supersample, int) or not 1 <= supersample <= 8:
        raise WorldError(f"supersample must be an integer in [1, 8], got {supersample!r}")
    big = resolution * supersample
    m = _mask(scene, big)[..., None]
    bg = np.array(COLORS[scene.background], dtype=np.float32)
    img = bg * (1 - m) + _fill(scene, big) * m
    if supersample > 1:  # box filter = exact area coverage
        img = img.reshape(resolution, supersample, resolution, supersample, 3).mean(axis=(1, 3))
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def render_batch(scenes: Sequence[Scene], resolution: int = 32, supersample: int = 4) -> np.ndarray:
    """Render many scenes: uint8 array (N, H, W, 3)."""
    return np.stack([np.asarray(render(s, resolution, supersample)) for s in scenes])


# ---------------------------------------------------------------------------------------------------- sampling
def is_heldout_combination(shape: str, color: str, background: str) -> bool:
    """About one in seven (shape, color, background) combinations of pretraining concepts, never shown in pretraining."""
    if shape not in PRETRAIN_SHAPES:
        return False
    i, j, k = PRETRAIN_SHAPES.index(shape), SHAPE_COLORS.index(color), BACKGROUNDS.index(background)
    return (i + 2 * j + 3 * k) % 7 == 0


def _split_choices(split: str) -> tuple[tuple[str, ...], tuple[str, ...], bool | None]:
    """(shapes, textures, held-out combos wanted: True / False / None = either) for a split."""
    if split == "pretrain":
        return PRETRAIN_SHAPES, PRETRAIN_TEXTURES, False
    if split == "pretrain-heldout-combos":
        return PRETRAIN_SHAPES, PRETRAIN_TEXTURES, True
    if split == "heldout-shapes":
        return HELDOUT_SHAPES, PRETRAIN_TEXTURES, None
    if split == "heldout-textures":
        return PRETRAIN_SHAPES, HELDOUT_TEXTURES, None
    if split == "all":
        return SHAPES, TEXTURES, None
    raise _choices("split", split, SPLITS)


def sample_scene(rng: np.random.Generator, split: str = "pretrain", *, size_range: tuple[float, float] = (0.6, 0.85),
                 jitter: float = 0.06, max_rotation: float = 10.0, textured: float = 0.3) -> Scene:
    """Draw one scene of ``split`` from ``rng``: uniform attributes, size in ``size_range``, center within
    ``jitter`` of the middle (kept on the canvas), rotation within +-``max_rotation`` degrees, and a
    non-plain texture with probability ``textured``."""
    shapes, textures, combos = _split_choices(split)
    lo, hi = size_range
    if not 0.1 <= lo <= hi <= 1.0:
        raise WorldError(f"size_range must satisfy 0.1 <= low <= high <= 1.0, got {size_range}")
    if not 0.0 <= textured <= 1.0 or jitter < 0 or max_rotation < 0:
        raise WorldError("textured must be in [0, 1]; jitter and max_rotation must be >= 0")
    for _ in range(1000):
        shape = shapes[rng.integers(len(shapes))]
        color = SHAPE_COLORS[rng.integers(len(SHAPE_COLORS))]
        background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        if color == background:
            continue
        if combos is not None and is_heldout_combination(shape, color, background) != combos:
            continue
        plain = textures[0] == "plain" and (len(textures) == 1 or rng.random() >= textured)
        texture = "plain" if plain else textures[rng.integers(1 if textures[0] == "plain" else 0, len(textures))]
        size = float(rng.uniform(lo, hi))
        room = max(0.0, 0.5 - size / 2)
        x, y = (0.5 + float(np.clip(rng.uniform(-jitter, jitter), -room, room)) for _ in range(2))
        rotation = float(rng.uniform(-max_rotation, max_rotation)) if shape not in ("circle", "ring") else 0.0
        return Scene(shape, color, background, texture, size, x, y, rotation)
    raise WorldError(f"could not sample a scene for split {split!r}")  # pragma: no cover


def sample_scenes(n: int, seed: int, split: str = "pretrain", **kwargs: float | tuple[float, float]) -> list[Scene]:
    """``n`` scenes from a generator seeded with ``seed`` (same seed, same scenes)."""
    if n < 0:
        raise WorldError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, split, **kwargs) for _ in range(n)]  # type: ignore[arg-type]


def make_dataset(n: int, seed: int, split: str = "pretrain", resolution: int = 32, caption_variety: float = 0.0,
                 **kwargs: float | tuple[float, float]) -> tuple[np.ndarray, list[str], list[Scene]]:
    """``n`` rendered scenes: (uint8 images (N, H, W, 3), captions, scenes). With ``caption_variety`` > 0 that
    fraction of captions uses a random non-canonical template."""
    scenes = sample_scenes(n, seed, split, **kwargs)
    rng = np.random.default_rng([seed, 1])
    captions = [s.caption(int(rng.integers(1, len(CAPTION_TEMPLATES))) if rng.random() < caption_variety else 0)
                for s in scenes]
    return render_batch(scenes, resolution), captions, scenes


def with_attributes(scene: Scene, **changes: str | float) -> Scene:
    """A copy of ``scene`` with some attributes changed (validated again)."""
    return replace(scene, **changes)  # type: ignore[arg-type]
