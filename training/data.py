"""One-image (or few-image) subject data: folder checks, augmentation, prompts, a resumable sampler.

Images are decoded once, resized so the short side equals the resolution, and kept in memory
(one to a few photos). Each step the sampler draws which image, crop, flip and prompt to use from
its own generator, so the exact sequence of examples resumes from a checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CAPTION_EXT = ".txt"


class DataError(ValueError):
    """A data folder, image or prompt that cannot be trained on."""


def find_images(folder: str | Path | None, one_image: str | None = None, what: str = "--instance_data_dir") -> list[Path]:
    """Image files of ``folder`` (sorted); with ``one_image`` the one file whose name ends with it."""
    if folder is None:
        raise DataError(f"{what}: no folder given; pass a folder holding one or a few images of the subject")
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{what}: {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTS]
    if not images:
        seen = ", ".join(p.name for p in files[:5]) or "nothing"
        raise DataError(f"{what}: no images in {folder} (looked for {', '.join(IMAGE_EXTS)}; found {seen})")
    if one_image:
        picked = [p for p in images if p.name.endswith(one_image)]
        if len(picked) != 1:
            raise DataError(f"--one_image {one_image!r}: matches {len(picked)} images in {folder}: "
                            f"{[p.name for p in picked] or [p.name for p in images]}")
        images = picked
    return images


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """(3, H, W) in [-1, 1], short side resized to ``resolution`` (Lanczos)."""
    try:
        with Image.open(path) as im:
            im.load()
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None
    w, h = im.size
    if min(w, h) < resolution:
        raise DataError(f"{path}: {w}x{h} pixels is smaller than the training resolution {resolution}; "
                        f"use a larger image or a smaller --resolution")
    s = resolution / min(w, h)
    im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.LANCZOS)
    t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.size[1], im.size[0], 3)
    return t.permute(2, 0, 1).float().div(127.5).sub(1.0)


def files_digest(paths: list[Path]) -> str:
    """Content hash of the training files and their caption sidecars (part of a checkpoint's identity)."""
    h = hashlib.sha1()
    for p in paths:
        h.update(p.name.encode())
        h.update(hashlib.sha1(p.read_bytes()).digest())
        if p.with_suffix(CAPTION_EXT).is_file():
            h.update(hashlib.sha1(p.with_suffix(CAPTION_EXT).read_bytes()).digest())
    return h.hexdigest()[:16]


def read_captions(images: list[Path], phrase: str) -> list[str] | None:
    """kohya-style sidecar captions: ``<image stem>.txt`` next to every image gives that image its own caption
    (``{0}`` in it becomes the subject phrase). None when no image has one; an error when only some do."""
    files = [p.with_suffix(CAPTION_EXT) for p in images]
    have = [f.is_file() for f in files]
    if not any(have):
        return None
    if not all(have):
        missing = [p.name for p, h in zip(images, have) if not h]
        raise DataError(f"{images[0].parent}: {len(missing)} of {len(images)} images have no {CAPTION_EXT} caption "
                        f"({missing[:5]}); give every image a caption file or none (then --prompt_template is used)")
    caps = [f.read_text().strip().replace("{0}", phrase) for f in files]
    empty = [f.name for f, c in zip(files, caps) if not c]
    if empty:
        raise DataError(f"empty caption files: {empty[:5]}")
    return caps


def check_single_token(tokenizer: Any, token: str) -> None:
    """The placeholder must be one token, or the model sees pieces of it as unrelated words."""
    pieces = tokenizer.tokenize(token)
    if len(pieces) != 1:
        raise DataError(f"--placeholder_token {token!r}: the tokenizer splits it into {pieces}; pick a rare word "
                        f"that is a single token (the official T-LoRA uses 'sks')")


def subject_phrase(token: str, class_name: str) -> str:
    return f"{token} {class_name}".strip()


def expand_prompts(templates: str, phrase: str) -> list[str]:
    """'#'-separated templates, ``{0}`` replaced by the subject phrase."""
    out = [t.strip().format(phrase) for t in templates.split("#") if t.strip()]
    if not out:
        raise DataError("--prompt_template: no prompt given")
    return out


@dataclass(frozen=True)
class Example:
    """Which image, crop and flip, and which prompt; ``prior`` marks a class image."""

    image: int
    top: int
    left: int
    flip: bool
    prompt: int
    prior: bool = False
    hue: float = 0.0  # degrees of hue rotation (augmentation)
    invert: bool = False  # colors inverted, x -> 255 - x (augmentation)
    jitter_prompt: bool = False  # ``prompt`` indexes the prompts of hue-jittered views
    colors: tuple[str, str] | None = None  # repainted in these (subject, background) color words (--recolor_p)


#: basic color words and the sRGB each names (the demo world's palette), for --jitter_color_words
COLOR_WORDS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "orange": (245, 135, 15), "yellow": (245, 215, 30), "green": (35, 165, 55),
    "blue": (35, 75, 215), "purple": (135, 45, 175), "white": (245, 245, 245), "black": (20, 20, 20),
    "gray": (125, 125, 125), "grey": (125, 125, 125),
}
_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def hue_angle(rgb: tuple[float, ...]) -> float | None:
    """The angle (degrees) of an sRGB color in the YIQ chroma plane, the plane :func:`rotate_hue` turns; None for a
    color without hue (white, black, gray)."""
    y, i, q = (sum(m * c / 255 for m, c in zip(row, rgb)) for row in _YIQ)
    return None if math.hypot(i, q) < 0.05 else math.degrees(math.atan2(q, i))


def recolor_caption(caption: str, degrees: float, palette: dict[str, tuple[int, int, int]] | None = None) -> str:
    """The caption of a view whose hue :func:`rotate_hue` turned by ``degrees``: each color word with a hue becomes
    the palette's word nearest in hue to its turned color (``a blue sks on a yellow background``, -74 deg: ``a
    purple sks on a green background``); words without hue (white, black, gray) and other words stay."""
    palette = palette or COLOR_WORDS
    hues = {w: a for w, a in ((w, hue_angle(c)) for w, c in palette.items()) if a is not None}

    def turn(m: re.Match) -> str:  # the word's color turned as the pixels are (clamped to sRGB), then named
        rgb = torch.tensor(palette[m.group(2).lower()], dtype=torch.float64).view(3, 1, 1) / 127.5 - 1
        a = hue_angle(tuple(((rotate_hue(rgb, degrees) + 1) * 127.5).view(3).tolist())) or 0.0
        word = min(hues, key=lambda w: abs((hues[w] - a + 180) % 360 - 180))
        article = m.group(1) and m.group(1)[0] + ("n " if word[0] in "aeiou" else " ")  # a red / an orange
        return (article or "") + word

    pattern = rf"\b(an? )?({'|'.join(hues)})\b"
    return re.sub(pattern, turn, caption, flags=re.IGNORECASE) if degrees and hues else caption


def caption_colors(caption: str, palette: dict[str, tuple[int, int, int]] | None = None) -> tuple[str, str] | None:
    """(subject color, background color): the caption's first color word and the color word right before
    ``background`` (``a blue sks on a white background``: blue, white); None unless it names both."""
    words = "|".join(palette or COLOR_WORDS)
    subject = re.search(rf"\b({words})\b", caption, re.IGNORECASE)
    background = re.search(rf"\b({words}) background\b", caption, re.IGNORECASE)
    if subject is None or background is None or subject.start() == background.start():
        return None
    return subject.group(1).lower(), background.group(1).lower()


def swap_colors(caption: str, old: tuple[str, str], new: tuple[str, str]) -> str:
    """``caption`` with its subject and background color words (``old``, as :func:`caption_colors` found them)
    replaced by ``new``, articles fixed (a red / an orange)."""
    out = re.sub(rf"\b{re.escape(old[1])}(?= background\b)", "\x00B", caption, count=1, flags=re.IGNORECASE)
    out = re.sub(rf"\b{re.escape(old[0])}\b", "\x00S", out, count=1, flags=re.IGNORECASE)
    words = {"S": new[0], "B": new[1]}

    def put(m: re.Match) -> str:
        word = words[m.group(2)]
        return (m.group(1)[0] + ("n " if word[0] in "aeiou" else " ") if m.group(1) else "") + word

    return re.sub(r"(?:\b(an?) )?\x00([SB])", put, out, flags=re.IGNORECASE)


def parse_color_pairs(text: str | None) -> set[tuple[str, str]]:
    """``'green/gray#red/blue'`` -> {(green, gray), (red, blue)} (--recolor_exclude); an unknown color is an error."""
    pairs = set()
    for item in filter(None, (t.strip() for t in (text or "").split("#"))):
        subject, sep, background = (w.strip().lower() for w in item.partition("/"))
        if not sep or subject not in COLOR_WORDS or background not in COLOR_WORDS:
            raise DataError(f"--recolor_exclude: {item!r} is not 'color/background' with colors among "
                            f"{sorted(COLOR_WORDS)}")
        pairs.add((subject, background))
    return pairs


def _mix(x: torch.Tensor, f: torch.Tensor, b: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """(1, H, W): each pixel's share a of the subject color in the closest mix a·f + (1 - a)·b, a in [0, 1] (with a
    ``margin`` past both ends: a resized image's ringing overshoots the two colors a little along the same line)."""
    a = ((x - b) * (f - b)).sum(0, keepdim=True) / ((f - b) ** 2).sum().clamp_min(1e-6)
    return a.clamp(-margin, 1 + margin)


def _rgb(c: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(c, dtype=like.dtype).view(3, 1, 1) / 127.5 - 1


def is_two_color(x: torch.Tensor, subject: tuple[int, ...], background: tuple[int, ...],
                 tolerance: float = 0.02) -> bool:
    """Whether a (3, H, W) image in [-1, 1] is (nearly) a flat mix of the two colors: under ``tolerance`` of its
    pixels off the segment between them (extended by a quarter at each end) by more than 0.1 (13/255). A texture's
    second shade or a photo is not; a flat image resized (a linear filter whose weights sum to 1: its ringing stays
    on that line, a little past the two colors) still is."""
    f, b = _rgb(subject, x), _rgb(background, x)
    a = _mix(x, f, b, margin=0.25)
    return float(((x - (a * f + (1 - a) * b)).norm(dim=0) > 0.1).float().mean()) < tolerance


def recolor_view(x: torch.Tensor, old: tuple[tuple[int, ...], tuple[int, ...]],
                 new: tuple[tuple[int, ...], tuple[int, ...]]) -> torch.Tensor:
    """A flat two-color image (3, H, W) in [-1, 1] repainted: each pixel is read as a mix a·f + (1 - a)·b of the old
    subject and background colors (antialiased edges: 0 < a < 1) and redrawn as a·f' + (1 - a)·b'."""
    a = _mix(x, _rgb(old[0], x), _rgb(old[1], x))
    return a * _rgb(new[0], x) + (1 - a) * _rgb(new[1], x)


def rotate_hue(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate the hue of a (3, H, W) image in [-1, 1] by ``degrees`` (a rotation of the YIQ chroma plane)."""
    if not degrees:
        return x
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64)
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    rot = torch.tensor([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=torch.float64)
    m = (torch.linalg.inv(yiq) @ rot @ yiq).to(x.dtype)
    rgb = (x + 1) / 2
    return (torch.einsum("ij,jhw->ihw", m, rgb).clamp(0, 1) * 2 - 1).contiguous()


class ImageSet:
    """Images in memory plus how to cut a training view out of them. With ``per_image`` prompts, prompt i is
    image i's own caption; otherwise any prompt goes with any image."""

    def __init__(self, paths: list[Path], resolution: int, prompts: list[str], center_crop: bool = True,
                 random_flip: bool = False, per_image: bool = False) -> None:
        if per_image and len(prompts) != len(paths):
            raise DataError(f"{len(paths)} images but {len(prompts)} captions")
        self.paths, self.resolution, self.prompts, self.per_image = paths, resolution, prompts, per_image
        self.center_crop, self.random_flip = center_crop, random_flip
        self.hue_jitter = 0.0  # degrees; set by the trainer (--hue_jitter)
        self.invert_p = 0.0  # probability; set by the trainer (--invert_p)
        self.jitter_prompts: list[str] = []  # prompts of hue-jittered views (--jitter_prompt_template)
        self.recolor = False  # jittered views: color words renamed to the turned colors (--jitter_color_words)
        self.recolor_p = 0.0  # probability of a view repainted in other named colors (--recolor_p)
        self._two_color: dict[tuple[int, str], bool] = {}  # (image, caption) -> a flat mix of the named colors
        self.recolor_exclude: set[tuple[str, str]] = set()  # (color, background) pairs never painted
        self.images = [load_image(p, resolution) for p in paths]

    def __len__(self) -> int:
        return len(self.images)

    def draw(self, gen: torch.Generator, prior: bool = False) -> Example:
        i = int(torch.randint(len(self.images), (1,), generator=gen))
        _, h, w = self.images[i].shape
        r = self.resolution
        if self.center_crop:
            top, left = (h - r) // 2, (w - r) // 2
        else:
            top = int(torch.randint(h - r + 1, (1,), generator=gen))
            left = int(torch.randint(w - r + 1, (1,), generator=gen))
        flip = bool(torch.rand((), generator=gen) < 0.5) if self.random_flip else False
        hue = float(torch.empty(()).uniform_(-self.hue_jitter, self.hue_jitter, generator=gen)) if self.hue_jitter else 0.0
        repaint = bool(torch.rand((), generator=gen) < self.recolor_p) if self.can_repaint() else False
        hue = 0.0 if repaint else hue
        jittered = bool(hue) and bool(self.jitter_prompts)
        prompts = self.jitter_prompts if jittered else self.prompts
        p = i if self.per_image and not jittered else \
            int(torch.randint(len(prompts), (1,), generator=gen)) if len(prompts) > 1 else 0
        colors = self._new_colors(i, prompts[p], gen) if repaint else None
        invert = bool(torch.rand((), generator=gen) < self.invert_p) if self.invert_p else False
        return Example(i, top, left, flip, p, prior, hue, invert, jittered, colors)

    def can_repaint(self) -> bool:
        """--recolor_p is on and some image is a flat mix of the two colors its caption names (else views are
        drawn exactly as without it: the same random sequence)."""
        pairs = enumerate(self.prompts) if self.per_image else \
            ((i, p) for i in range(len(self.images)) for p in self.prompts)
        return bool(self.recolor_p) and any(self._paintable(i, p) for i, p in pairs)

    def _paintable(self, image: int, caption: str) -> bool:
        """The caption names a subject and a background color and the image is a flat mix of the two (cached)."""
        key = (image, caption)
        if key not in self._two_color:
            colors = caption_colors(caption)
            self._two_color[key] = colors is not None and is_two_color(
                self.images[image], COLOR_WORDS[colors[0]], COLOR_WORDS[colors[1]])
        return self._two_color[key]

    def _new_colors(self, image: int, caption: str, gen: torch.Generator) -> tuple[str, str] | None:
        """Random (subject, background) color words for a repainted view: a color with hue for the subject, any
        other color for the background; None (the view stays as is) unless the caption names both colors and the
        image is a flat mix of them."""
        if not self._paintable(image, caption):
            return None
        names = list(dict.fromkeys(n for n, c in COLOR_WORDS.items() if n != "grey"))
        subjects = [n for n in names if hue_angle(COLOR_WORDS[n]) is not None]
        if all((s, b) in self.recolor_exclude for s in subjects for b in names if b != s):
            return None
        while True:  # redrawn while the pair is held out (--recolor_exclude)
            subject = subjects[int(torch.randint(len(subjects), (1,), generator=gen))]
            backgrounds = [n for n in names if n != subject]
            pair = subject, backgrounds[int(torch.randint(len(backgrounds), (1,), generator=gen))]
            if pair not in self.recolor_exclude:
                return pair

    def pixels(self, ex: Example) -> torch.Tensor:
        """(3, r, r) view of the example's image."""
        r = self.resolution
        view = self.images[ex.image][:, ex.top:ex.top + r, ex.left:ex.left + r]
        view = rotate_hue(view.flip(-1) if ex.flip else view, ex.hue)
        if ex.colors:
            old = caption_colors(self.prompts[ex.prompt])
            view = recolor_view(view, (COLOR_WORDS[old[0]], COLOR_WORDS[old[1]]),
                                (COLOR_WORDS[ex.colors[0]], COLOR_WORDS[ex.colors[1]]))
        return -view if ex.invert else view  # [-1, 1]: -x is 255 - x


class ExampleSampler:
    """Draws micro-batches of examples (instance, then class images) from its own generator."""

    def __init__(self, instances: ImageSet, batch_size: int, seed: int, classes: ImageSet | None = None) -> None:
        self.instances, self.classes, self.batch_size = instances, classes, batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def next_batch(self) -> list[Example]:
        batch = [self.instances.draw(self.gen) for _ in range(self.batch_size)]
        if self.classes is not None:
            batch += [self.classes.draw(self.gen, prior=True) for _ in range(self.batch_size)]
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])
