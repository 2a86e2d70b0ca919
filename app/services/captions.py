"""The training caption of a demo-model job, read from its images: the demo recipe measured best with captions that
name the subject's and the background's colors (``a green {0} on a white background``): the trainer then repaints
half the views in other named colors, captioned so (``recolor_p``; docs/demo_model.md). A caption naming colors the
image does not have would teach the wrong colors and turn repainting off, so colors are named only when every image
is a flat two-color picture whose two colors are near the same two of the demo world's color words; otherwise the
caption is the bare ``a {0}``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger("app")
BARE = "a {0}"
MAX_OFF = 0.3  # how far (sRGB in [-1, 1], Euclidean) a color may be from the color word that names it (~40/255)


def _pixels(path: str | Path) -> torch.Tensor:
    """(3, H, W) in [-1, 1], as the trainer reads images."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1


def _nearest(color: torch.Tensor, exclude: str = "") -> tuple[str, float]:
    """The demo palette's color word nearest to ``color`` (3,) and its distance."""
    from training.data import COLOR_WORDS

    best = min((w for w in COLOR_WORDS if w not in ("grey", exclude)),
               key=lambda w: float((torch.tensor(COLOR_WORDS[w]) / 127.5 - 1 - color).norm()))
    return best, float((torch.tensor(COLOR_WORDS[best]) / 127.5 - 1 - color).norm())


def image_colors(path: str | Path) -> tuple[str, str] | None:
    """(subject, background) color words of a flat two-color image: the background is the median of its border
    pixels, the subject the median of the pixels far from it; None for a photo, a texture, or colors that no
    color word of the demo world names."""
    from training.data import is_two_color

    x = _pixels(path)  # (3, H, W)
    border = torch.cat([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], dim=1)  # (3, 2H + 2W)
    background = border.median(dim=1).values
    far = (x - background.view(3, 1, 1)).norm(dim=0) > 0.5  # (H, W): the subject's pixels
    if int(far.sum()) < 0.02 * far.numel():
        return None  # nothing but background
    subject = x[:, far].median(dim=1).values
    to_255 = [tuple(int(round(float(v))) for v in (c + 1) * 127.5) for c in (subject, background)]
    if not is_two_color(x, to_255[0], to_255[1]):
        return None
    bg_word, bg_off = _nearest(background)
    subject_word, subject_off = _nearest(subject, exclude=bg_word)
    return (subject_word, bg_word) if max(bg_off, subject_off) <= MAX_OFF else None


def demo_caption(paths: list[str | Path]) -> str:
    """``a {color} {0} on a {background} background`` when every image shows the same two named colors, else
    :data:`BARE` (``{0}``: the placeholder token and class word)."""
    found = {image_colors(p) for p in paths}
    if len(found) != 1 or None in found:
        log.info("demo caption: the images' colors are not one named pair (%s); the bare caption is used", found)
        return BARE
    subject, background = found.pop()
    article = "an" if subject[0] in "aeiou" else "a"
    return f"{article} {subject} {{0}} on a {background} background"
