"""Whole-file mixtures reach their loader through the registry (core/mixtures.py), not through api edits."""

from __future__ import annotations

import pytest
import torch

import lora_diffusion as ld
from lora_diffusion.core import mixtures
from lora_diffusion.fusion import mixture
from lora_diffusion.io import canonical
from lora_diffusion.io.files import write_safetensors


def test_mixture_files_are_registered():
    assert mixtures.file_loader({mixture.META_KEY: "{}"}) is mixture.load_mixture
    assert mixtures.file_loader({"format": canonical.FORMAT}) is None


def test_a_new_file_kind_is_loaded_without_api_edits(tmp_path, tiny_unet, monkeypatch):
    calls = []

    def load(obj, src, loaded, name):
        calls.append((obj, src, sorted(loaded[0]), loaded[1]["toy_mixture"], name))
        return name

    monkeypatch.setitem(mixtures.FILE_KINDS, "toy_mixture", load)
    path = tmp_path / "toy.safetensors"
    write_safetensors(path, {"w": torch.zeros(2)}, {"format": canonical.FORMAT,
                                                    "format_version": canonical.FORMAT_VERSION, "toy_mixture": "x"})
    assert ld.load_adapter(tiny_unet, path, name="n") == "n"
    assert calls == [(tiny_unet, path, ["w"], "x", "n")]
    assert ld.list_adapters(tiny_unet) == []


@pytest.mark.parametrize("key", [mixture.META_KEY])
def test_a_non_canonical_file_is_not_taken_for_a_mixture(tmp_path, tiny_unet, key):
    """The marker counts only in our canonical files: a foreign file with such a key goes the format route."""
    path = tmp_path / "foreign.safetensors"
    write_safetensors(path, {"lora_unet_x.lora_down.weight": torch.zeros(1, 2)}, {key: "{}"})
    with pytest.raises(ld.AdapterError):
        ld.load_adapter(tiny_unet, path)
    assert ld.list_adapters(tiny_unet) == []
