"""Walk a model's modules without descending into the adapters held by its adapted layers.

``model.named_modules()`` visits every adapter's own submodules too, so with n adapters on a model each walk costs
O(n) and adding a library of n adapters one by one costs O(n²) (a 1000-LoRA LAG library). ``walk_modules`` is
``named_modules()`` (same names, same pre-order, each module once) minus the adapter containers: of an
``AdaptedLayer`` it enters ``base_layer`` only (``into_base=False``: not even that, the layer stands for its base).
Code that needs the adapters reaches them through ``layer.adapters``.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from .layer import AdaptedLayer


def child_modules(module: nn.Module, into_base: bool = True) -> list[tuple[str, nn.Module]]:
    """The children ``walk_modules`` enters: all of a plain module's, only ``base_layer`` of an adapted layer."""
    if isinstance(module, AdaptedLayer):
        return [("base_layer", module.base_layer)] if into_base else []
    return [(n, m) for n, m in module._modules.items() if m is not None]


def walk_modules(model: nn.Module, into_base: bool = True) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) in ``named_modules()`` order, skipping every adapted layer's adapters and combiner."""
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        name, module = stack.pop()
        if id(module) in seen:  # a module reachable twice is yielded once, under its first name (as named_modules)
            continue
        seen.add(id(module))
        yield name, module
        kids = child_modules(module, into_base)
        stack.extend((f"{name}.{n}" if name else n, m) for n, m in reversed(kids))
