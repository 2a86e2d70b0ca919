"""Frozen tensors shared by many layers (VeRA's projections), stored once per adapter.

One store per adapter name, registered as the ``shared`` child of that adapter's first layer
instance (not of the model root: ``nn.Sequential`` and friends iterate their children), so
``model.to(device)`` moves each tensor once and removing the adapter removes the store. The other
layers keep a plain (unregistered) reference and look tensors up by key. Buffers are
non-persistent: they are regenerated from a seed, never saved.

``links`` holds build-time links between the layers of one adapter (LoRA-drop: which layer's adapter owns the
tensors a group of layers shares); it is read while the adapters are constructed and never saved.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class SharedStore(nn.Module):
    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self._device = torch.device(device)
        self.links: dict[str, Any] = {}

    @property
    def device(self) -> torch.device:
        buf = next(iter(self._buffers.values()), None)
        return buf.device if buf is not None else self._device

    def put(self, key: str, tensor: torch.Tensor) -> None:
        self.register_buffer(key, tensor.to(self.device), persistent=False)

    def get(self, key: str) -> torch.Tensor:
        return self._buffers[key]

    def drop_suffix(self, suffix: str) -> None:
        """Drop the tensors of one adapter (keys end in ``__<adapter name>``)."""
        for k in [k for k in self._buffers if k.endswith(suffix)]:
            del self._buffers[k]

    def extra_repr(self) -> str:
        return ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self._buffers.items())
