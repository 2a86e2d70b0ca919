"""A folder of LoRA files as typed entries, each with a text description to retrieve it by.

The header index (:class:`lora_diffusion.io.library.LoraLibrary`, cached in ``<folder>/.lora_library.json``)
reads every file's header; this module turns each into a :class:`LibraryEntry`: its base family, whether it
could be read, and a description built from, in this order:

1. a user-written sidecar next to the file (``<stem>.txt``; ``<stem>.json`` with ``description`` /
   ``activation text`` / ``notes`` / ``sd version`` as A1111 writes it; ``<stem>.civitai.info`` with
   ``trainedWords`` / ``description`` / ``baseModel`` / ``tags`` as Civitai Helper writes it),
2. the file's name (``concept_ring_v2.safetensors`` -> "concept ring"),
3. descriptive metadata: ``description``, ``modelspec.title`` / ``.description``, ``ss_training_comment``,
   our trainer's ``class_name`` and ``captions`` (a JSON list or one string),
4. trigger words, and training tags (kohya ``ss_tag_frequency``, ``ss_dataset_dirs`` folder names).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import AdapterError
from ..io.bundle import FAMILY_NAMES
from ..io.library import LoraLibrary as HeaderIndex

log = logging.getLogger(__name__)

FAMILIES = {**FAMILY_NAMES, "demo": "the demo model"}
DIT = ("flux", "sd3")  # what a "dit" file (Flux or SD3, the widths cannot tell) may be applied to; loading checks
_A1111_VERSION = {"SD1": "sd1", "SD2": "sd2", "SDXL": "sdxl"}
_CIVITAI_BASE = (("SDXL", "sdxl"), ("SD 1", "sd1"), ("SD 2", "sd2"), ("SD 3", "sd3"), ("Flux.2", "flux2"), ("Flux", "flux"))
_NOISE = re.compile(r"^(v\d+(\.\d+)*|\d+|e\d+|lora|lycoris|locon|loha|lokr|dora|final|last|pytorch|weights|adapter|model|"
                    r"kohya|safetensors|fp16|bf16)$", re.IGNORECASE)
_GENERIC_STEMS = {"pytorch_lora_weights", "adapter_model", "adapter", "lora", "model"}


class LibraryError(AdapterError):
    """A library folder that cannot be used (missing, not a folder)."""


@dataclass
class LibraryEntry:
    """One adapter file (or PEFT folder) of a library, read from its header and sidecar only.

    ``error`` is set (and nothing else is trustworthy) when the file could not be read; ``family`` is
    "sd1" | "sd2" | "sdxl" | "flux" | "demo" | None (unknown).
    """

    file: str  # relative to the library folder, e.g. "styles/dotted.safetensors"
    path: Path
    name: str  # human name from the file name ("concept ring")
    description: str = ""
    family: str | None = None
    format: str = ""
    variant: str = ""
    rank: int | None = None
    alpha: str | None = None
    size: int = 0
    sha256: str = ""
    trigger_words: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)  # the descriptive metadata keys (io.library.TEXT_KEYS)
    sidecar: Path | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def base(self) -> str:
        return FAMILIES.get(self.family or "", "unknown base")

    def incompatibility(self, family: str | None) -> str | None:
        """Why this entry must not be applied to a model of ``family`` (None = no check), or None if it may be."""
        if self.error:
            return f"unreadable: {self.error}"
        if family and self.family and self.family != family and not (self.family == "dit" and family in DIT):
            return f"made for {self.base}, not {FAMILIES.get(family, family)}"
        return None


# ---------------------------------------------------------------------------------------------------- description
def human_name(path: Path) -> str:
    """``concept_ring-v2.safetensors`` -> "concept ring"; a generic stem (``pytorch_lora_weights``) -> the folder's name."""
    stem = path.name.removesuffix(".safetensors") if path.is_file() or path.suffix == ".safetensors" else path.name
    if stem.lower() in _GENERIC_STEMS and path.parent.name:
        stem = path.parent.name
    stem = re.sub(r"([a-z])([A-Z])", r"\1 \2", stem)
    words = [w for w in re.split(r"[\s_\-.]+", stem) if w and not _NOISE.match(w)]
    return " ".join(words) or stem


def _read_sidecar(path: Path) -> tuple[Path | None, dict[str, Any]]:
    """The first sidecar found next to ``path``, as {description, trigger_words, tags, family}."""
    stem = path.with_name(path.name.removesuffix(".safetensors"))
    for suffix in (".txt", ".json", ".civitai.info"):
        side = stem.with_name(stem.name + suffix)
        if not side.is_file():
            continue
        try:
            text = side.read_text(encoding="utf-8", errors="replace")
            if suffix == ".txt":
                return side, {"description": text.strip()}
            return side, _sidecar_fields(json.loads(text))
        except (OSError, json.JSONDecodeError, AttributeError, TypeError) as e:
            log.warning("%s: sidecar ignored (%s)", side, e)
    return None, {}


def _words(v: Any) -> list[str]:
    items = v if isinstance(v, list) else str(v or "").split(",")
    return [str(w).strip() for w in items if str(w).strip()]


def _sidecar_fields(d: dict[str, Any]) -> dict[str, Any]:
    """A1111 (``activation text``, ``sd version``), Civitai (``trainedWords``, ``baseModel``) or ours."""
    parts = [str(d.get(k, "")).strip() for k in ("description", "notes") if d.get(k)]
    fam = _A1111_VERSION.get(str(d.get("sd version", "")).upper())
    base = str(d.get("baseModel", d.get("base_model_family", "")))
    if not fam:
        fam = next((f for p, f in _CIVITAI_BASE if base.startswith(p)), None) or (base if base in FAMILIES else None)
    return {"description": " ".join(parts), "trigger_words": _words(d.get("activation text") or d.get("trainedWords")
                                                                       or d.get("trigger_words")),
            "tags": _words(d.get("tags")), "family": fam}


def _captions(meta: dict[str, str], n: int = 3) -> list[str]:
    raw = meta.get("captions") or meta.get("training_captions") or ""
    try:
        caps = json.loads(raw) if raw.startswith("[") else [raw]
    except json.JSONDecodeError:
        caps = [raw]
    return [str(c).strip() for c in caps if str(c).strip()][:n]


def _dataset_dirs(meta: dict[str, str]) -> list[str]:
    """kohya ``ss_dataset_dirs`` = {"10_sks ring": {...}} -> ["sks ring"] (the repeat count prefix dropped)."""
    try:
        return [re.sub(r"^\d+_", "", d).strip() for d in json.loads(meta.get("ss_dataset_dirs", "{}"))]
    except (json.JSONDecodeError, TypeError):
        return []


def build_description(name: str, meta: dict[str, str], trigger: list[str], tags: list[str], side: dict[str, Any]) -> str:
    """The text retrieval embeds: sidecar first (the user's own words), then name, metadata, triggers, tags."""
    out: list[str] = []

    def add(text: str) -> None:
        text = " ".join(re.sub(r"<[^>]+>", " ", str(text)).split()).rstrip(".")  # Civitai descriptions are HTML
        if text and text.lower() not in (o.lower() for o in out):
            out.append(text)

    add(side.get("description", ""))
    add(name)
    for k in ("description", "modelspec.description", "modelspec.title", "ss_training_comment", "class_name"):
        add(meta.get(k, ""))
    for c in _captions(meta):
        add(c)
    words = list(dict.fromkeys([*side.get("trigger_words", []), *trigger]))
    if words:
        add("trigger: " + ", ".join(words))
    tag_words = list(dict.fromkeys([*side.get("tags", []), *_dataset_dirs(meta), *tags]))[:12]
    if tag_words:
        add("tags: " + ", ".join(tag_words))
    return ". ".join(out)


def entry_from_index(folder: Path, raw: dict[str, Any]) -> LibraryEntry:
    """A :class:`LibraryEntry` from one header-index record plus its sidecar."""
    path = folder / raw["file"]
    sidecar, side = _read_sidecar(path)
    meta = dict(raw.get("text_metadata", {}))
    name = human_name(path)
    trigger = [w for w in raw.get("trigger_words", []) if w != meta.get("ss_output_name")] or raw.get("trigger_words", [])
    entry = LibraryEntry(file=raw["file"], path=path, name=name, sidecar=sidecar, sha256=raw.get("sha256", ""),
                         error=raw.get("error"), size=raw.get("size", 0))
    if entry.error:
        return entry
    entry.family = side.get("family") or raw.get("family_hint") or raw.get("base_family")  # hint: the demo model
    entry.format, entry.variant, entry.rank, entry.alpha = raw["format"], raw["variant"], raw.get("rank"), raw.get("alpha")
    entry.trigger_words = list(dict.fromkeys([*side.get("trigger_words", []), *trigger]))
    entry.tags, entry.metadata = raw.get("tags", []), meta
    entry.description = build_description(name, meta, trigger, entry.tags, side)
    return entry


# ---------------------------------------------------------------------------------------------------- the library
class LoraLibrary:
    """Every adapter file under ``folder`` (sub-folders too), described for retrieval.

    >>> lib = LoraLibrary("~/loras")
    >>> [e.name for e in lib.entries]            # every file, unreadable ones too (``e.error``)
    >>> lib.retrieve("a dotted heart", k=3, family="sd1")   # -> Retrieval (a list of Match)
    """

    def __init__(self, folder: str | os.PathLike, embedder: Any = None) -> None:
        self.folder = Path(folder).expanduser()
        if not self.folder.exists():
            raise LibraryError(f"{self.folder}: no such folder (a LoRA library is a folder of .safetensors files)")
        if not self.folder.is_dir():
            raise LibraryError(f"{self.folder}: not a folder (a LoRA library is a folder of .safetensors files)")
        self._embedder = embedder
        self._caches: dict[str, Any] = {}
        self._weights: tuple[int, Any] | None = None
        self.entries: list[LibraryEntry] = []
        self.refresh()

    def refresh(self) -> list[LibraryEntry]:
        """Re-read the folder (only new or changed files are opened; sidecars are always re-read)."""
        self.entries = [entry_from_index(self.folder, r) for r in HeaderIndex(self.folder).scan()]
        for e in self.errors:
            log.warning("library %s: %s skipped: %s", self.folder, e.file, e.error)
        return self.entries

    @property
    def errors(self) -> list[LibraryEntry]:
        """Entries that could not be read (corrupted, truncated, not safetensors), with ``error`` saying why."""
        return [e for e in self.entries if e.error]

    def usable(self, family: str | None = None) -> list[LibraryEntry]:
        """Readable entries that may be applied to a model of ``family`` (None: any family), each file content once."""
        copies = self._copies()
        return [e for e in self.entries if self._why_not(e, family, copies) is None]

    def skipped(self, family: str | None = None) -> list[tuple[LibraryEntry, str]]:
        """(entry, reason) for every entry that must not be applied to a model of ``family``, and for a second copy
        of the same file (same sha256: retrieving both would apply one LoRA twice)."""
        copies = self._copies()
        return [(e, why) for e in self.entries if (why := self._why_not(e, family, copies))]

    def _copies(self) -> dict[str, str]:
        """{file: the first file with the same contents} for each later copy."""
        first: dict[str, str] = {}
        out = {}
        for e in self.entries:
            if e.sha256:
                out.update({e.file: first[e.sha256]} if e.sha256 in first else {})
                first.setdefault(e.sha256, e.file)
        return out

    @staticmethod
    def _why_not(entry: LibraryEntry, family: str | None, copies: dict[str, str]) -> str | None:
        why = entry.incompatibility(family)
        return why or (f"the same file as {copies[entry.file]}" if entry.file in copies else None)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, file: str) -> LibraryEntry:
        for e in self.entries:
            if e.file == file or e.name == file:
                return e
        raise KeyError(f"{file!r} is not in the library {self.folder}; files: {[e.file for e in self.entries]}")

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            from .embedders import default_embedder

            self._embedder = default_embedder()
        return self._embedder

    def embedding_cache(self, embedder: Any) -> Any:
        """The description-embedding cache of ``embedder`` (on disk in the folder when it is writable)."""
        if embedder.id not in self._caches:
            from .embedders import EmbeddingCache

            self._caches[embedder.id] = EmbeddingCache(self.folder if os.access(self.folder, os.W_OK) else None, embedder)
        return self._caches[embedder.id]

    def weight_retriever(self) -> Any:
        """The weight retriever trained on this folder (``<folder>/.lora_retriever.safetensors``), or None."""
        from .weights import DEFAULT_NAME, WeightRetriever

        path = self.folder / DEFAULT_NAME
        if not path.is_file():
            return None
        stamp = path.stat().st_mtime_ns
        if self._weights is None or self._weights[0] != stamp:
            self._weights = (stamp, WeightRetriever.load(path))
        return self._weights[1]

    def retrieve(self, prompt: str, k: int = 3, threshold: float | None = None, family: str | None = None,
                 embedder: Any = None, weights: Any = "auto", weight_mix: float = 0.5, phrase_words: int = 3) -> Any:
        """The ``k`` entries most relevant to ``prompt`` (a :class:`~lora_diffusion.retrieval.search.Retrieval`).

        ``family`` drops entries for another base family (listed in ``.skipped``); ``threshold`` drops matches
        scoring below it; ``weights`` (a :class:`~lora_diffusion.retrieval.weights.WeightRetriever`; "auto": the
        one trained on this folder, if any and trained against the same embedder; None: text only) mixes in the
        weight-based score: score = (1 - weight_mix) * text + weight_mix * weight. The text score is the best
        cosine over the whole prompt and its phrases of up to ``phrase_words`` words (0: the whole prompt only).
        """
        from .search import retrieve

        embedder = embedder or self.embedder
        if isinstance(weights, str) and weights == "auto":
            weights = self.weight_retriever()
            if weights is not None and weights.embedder_id != embedder.id:
                log.info("%s: weight retriever trained against %s, not %s: text scores only", self.folder,
                         weights.embedder_id, embedder.id)
                weights = None
        return retrieve(self, prompt, k=k, threshold=threshold, family=family, embedder=embedder,
                        weights=weights, weight_mix=weight_mix, phrase_words=phrase_words)

    def listing(self, family: str | None = None) -> str:
        """A readable table of the library: file, base, variant/rank, status, description."""
        rows = []
        for e in self.entries:
            why = e.incompatibility(family)
            status = "ok" if why is None else ("ERROR " + (e.error or "") if e.error else "never applied: " + why)
            kind = f"{e.variant} r{e.rank}" if e.ok else "-"
            rows.append(f"{e.file}  [{e.base if e.ok else '?'}, {kind}]  {status}\n    {e.description[:160]}")
        return "\n".join(rows) if rows else f"{self.folder}: no LoRA files (*.safetensors or PEFT folders)"
