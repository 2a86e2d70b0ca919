"""Model-level mixtures: what an adapter carries beyond its per-layer tensors, kept on the model by adapter name.

MoA's routers, prompt prefix and parallel adapters are modules of the model's blocks, not of the adapted layers;
such a mixture is installed under the name of the adapter that holds its LoRA experts. A *kind* registers how to
rebuild one from a canonical file (``register_mixture_kind``, as ``fusion/moa.py`` does); the api then saves,
loads, refuses to merge or export, and removes every kind the same way, without knowing any of them:

    file:  tensors ``<kind>.<key>``,  metadata ``<kind>`` (the kind's config) and whatever ``metadata()`` adds
    model: ``model.__dict__[ATTR]`` = {adapter name: installed mixture}

An installed mixture has ``kind`` (its kind's key), ``state()`` (tensors), ``metadata()`` (str -> str, including
the ``kind`` key) and ``remove()`` (hooks and modules off the model; the LoRA experts stay adapters).

Whole-file mixtures (X-LoRA, MoLE, LAG: several adapters plus what their fusion learned, ``fusion/mixture.py``)
are a file of their own: ``register_file_kind`` names the metadata key that marks one and the function that loads
it, and ``load_adapter`` hands such a canonical file to it (``file_loader``) instead of loading one adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from .errors import AdapterError

ATTR = "_lora_mixtures"


class ModelMixture(Protocol):
    kind: str

    def state(self) -> dict[str, torch.Tensor]: ...

    def metadata(self) -> dict[str, str]: ...

    def remove(self) -> None: ...


@dataclass(frozen=True)
class MixtureKind:
    key: str  # the metadata key marking a file that holds one, and its tensors' prefix
    label: str  # in messages ("MoA")
    holds: str  # what only the canonical file keeps ("its router and extra experts"): other formats are refused
    why_unmergeable: str  # why its experts cannot be folded into the base weights (merging is refused)
    # (model, adapter name, its tensors without the prefix, file metadata, source, trainable) -> the installed mixture
    load: Callable[[nn.Module, str, dict[str, torch.Tensor], dict[str, str], str, bool], ModelMixture]


KINDS: dict[str, MixtureKind] = {}


def register_mixture_kind(kind: MixtureKind) -> MixtureKind:
    KINDS[kind.key] = kind
    return kind


# (model or pipeline, source file, (tensors, metadata), adapter name) -> the name it was loaded under
FileLoader = Callable[[Any, Path, tuple[dict[str, torch.Tensor], dict[str, str]], str], str]
FILE_KINDS: dict[str, FileLoader] = {}


def register_file_kind(key: str, load: FileLoader) -> None:
    """Canonical files whose metadata has ``key`` are whole-file mixtures that ``load`` installs."""
    FILE_KINDS[key] = load


def file_loader(meta: dict[str, str]) -> FileLoader | None:
    """The loader of the whole-file mixture a canonical file's metadata marks, or None for an adapter file."""
    return next((load for key, load in FILE_KINDS.items() if key in meta), None)


def model_mixtures(model: nn.Module) -> dict[str, ModelMixture]:
    """The model-level mixtures installed on ``model`` by adapter name."""
    return model.__dict__.get(ATTR, {})


def attach(model: nn.Module, name: str, mixture: ModelMixture) -> None:
    model.__dict__.setdefault(ATTR, {})[name] = mixture


def detach(model: nn.Module, name: str) -> None:
    model_mixtures(model).pop(name, None)


def _kinds(model: nn.Module, names: Sequence[str]) -> dict[str, MixtureKind]:
    return {n: KINDS[m.kind] for n, m in model_mixtures(model).items() if n in names and m.kind in KINDS}


def refuse_merge(model: nn.Module, names: Sequence[str]) -> None:
    """One error naming the adapters among ``names`` that hold a mixture, and why; nothing is changed."""
    mixed = _kinds(model, names)
    if mixed:
        labels = ", ".join(sorted({k.label for k in mixed.values()}))
        why = "; ".join(sorted({k.why_unmergeable for k in mixed.values()}))
        raise AdapterError(f"adapter(s) {sorted(mixed)} are mixtures ({labels}): {why}, so they cannot be merged into "
                           "the base weights")


def refuse_export(model: nn.Module, name: str, fmt: str) -> None:
    """Formats other than the canonical file would drop a mixture's model-level part: one error, nothing written."""
    kind = _kinds(model, [name]).get(name)
    if kind is not None:
        raise AdapterError(f"adapter '{name}' is a mixture ({kind.label}): only the canonical file holds {kind.holds}; "
                           f"format {fmt!r} would keep the LoRA experts alone")


def saved_state(model: nn.Module, name: str, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors ``<prefix><kind>.<key>``, metadata) of the mixture held by adapter ``name``; empty when none."""
    mix = model_mixtures(model).get(name)
    if mix is None:
        return {}, {}
    return {f"{prefix}{mix.kind}.{k}": v for k, v in mix.state().items()}, mix.metadata()


def split_state(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> dict[str, dict[str, torch.Tensor]]:
    """Pop each registered kind's tensors (those the file's metadata marks) out of ``tensors``: {kind: {key: t}}."""
    out = {}
    for key in KINDS:
        if key in meta:
            pre = f"{key}."
            out[key] = {k[len(pre):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(pre)]}
    return out


def install(model: nn.Module, name: str, parts: dict[str, dict[str, torch.Tensor]], meta: dict[str, str],
            source: str, trainable: bool) -> None:
    """Rebuild the mixtures ``split_state`` found on adapter ``name`` (its LoRA experts already loaded)."""
    for key, tensors in parts.items():
        attach(model, name, KINDS[key].load(model, name, tensors, meta, source, trainable))


def remove(model: nn.Module, names: Sequence[str]) -> None:
    """Take the mixtures held by ``names`` off the model (their hooks and modules); the adapters themselves stay."""
    for n in names:
        mix = model_mixtures(model).get(n)
        if mix is not None:
            mix.remove()
            detach(model, n)
