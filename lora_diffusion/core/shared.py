"""Frozen tensors shared by many layers (VeRA's projections), stored once per model.

The store is a submodule of the model root, so ``model.to(device)`` moves each tensor once;
adapters keep a plain (unregistered) reference to it and look tensors up by key. Buffers are
non-persistent: they are regenerated from a seed, never saved.
"""

from __future__ import annotations

import torch
from torch import nn

STORE_ATTR = "lora_shared"


class SharedStore(nn.Module):
    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self._device = torch.device(device)

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


def get_store(model: nn.Module, create: bool = True) -> SharedStore | None:
    store = getattr(model, STORE_ATTR, None)
    if store is None and create:
        p = next(model.parameters(), None)
        store = SharedStore(p.device if p is not None else "cpu")
        model.add_module(STORE_ATTR, store)
    return store
