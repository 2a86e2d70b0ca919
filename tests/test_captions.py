"""Per-image caption sidecars (kohya's ``<image>.txt``): each image trains with its own caption."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from training.data import DataError, ImageSet, files_digest, find_images, read_captions


def _images(folder, n):
    folder.mkdir(exist_ok=True)
    for i in range(n):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i}.png")
    return find_images(folder)


def test_each_image_trains_with_its_own_caption(tmp_path):
    images = _images(tmp_path / "d", 3)
    before = files_digest(images)
    for i, p in enumerate(images):
        p.with_suffix(".txt").write_text(f"caption {i} of {{0}}\n")
    caps = read_captions(images, "sks dog")
    assert caps == [f"caption {i} of sks dog" for i in range(3)]
    assert files_digest(images) != before  # captions are part of a checkpoint's identity
    s = ImageSet(images, 8, caps, per_image=True)
    g = torch.Generator().manual_seed(0)
    assert all(ex.prompt == ex.image for ex in (s.draw(g) for _ in range(20)))


def test_captions_for_some_images_only_are_refused(tmp_path):
    images = _images(tmp_path / "d", 3)
    assert read_captions(images, "x") is None
    images[1].with_suffix(".txt").write_text("one")
    with pytest.raises(DataError, match=r"2 of 3 images have no \.txt caption.*'0\.png', '2\.png'"):
        read_captions(images, "x")
