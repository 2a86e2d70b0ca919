"""Rank a library's entries against a prompt: cosine of sentence embeddings, optionally mixed with the
weight-based retriever's score, top-k, optional threshold; every decision is kept in the result.

Phrase-level text score: a prompt names several things ("a red striped crescent moon on a blue background":
a concept AND a style), and one embedding of the whole prompt is dominated by the strongest of them, so the
second LoRA can rank below other LoRAs of the first kind. An entry's text score is therefore the best cosine
between its description and the whole prompt or any of its phrases (1-3 consecutive words, not starting or
ending in a function word): ``max(cos(d, prompt), max_p cos(d, p))``. ``Match.phrase`` tells which won.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .embedders import TextEmbedder
from .library import LibraryEntry

if TYPE_CHECKING:
    from .library import LoraLibrary

log = logging.getLogger(__name__)


@dataclass
class Match:
    """One retrieved entry: ``score`` ranks; ``text_score`` / ``weight_score`` are its parts (cosines)."""

    entry: LibraryEntry
    score: float
    text_score: float
    weight_score: float | None = None
    phrase: str = ""  # the part of the prompt that matched best (the whole prompt, or one of its phrases)

    @property
    def path(self) -> Path:
        return self.entry.path

    def __getitem__(self, key: str) -> Any:
        """``match["path"]``, ``match["score"]``, ...: the fields, for callers that treat results as dicts."""
        if key not in ("path", "entry", "score", "text_score", "weight_score", "phrase"):
            raise KeyError(key)
        return getattr(self, key)

    def __repr__(self) -> str:
        w = "" if self.weight_score is None else f", text {self.text_score:.3f}, weights {self.weight_score:.3f}"
        return f"Match({self.entry.file!r}, {self.score:.3f}{w})"


@dataclass
class Retrieval:
    """What ``retrieve`` chose for a prompt. Iterates, indexes and measures like its list of matches.

    ``skipped``: (entry, reason) for entries never applied (another base family, unreadable, a second copy);
    ``below_threshold``: the best candidates the threshold turned away; ``message``: one line for the user
    (e.g. that nothing is relevant, so the base model alone should generate).
    """

    prompt: str
    matches: list[Match]
    skipped: list[tuple[LibraryEntry, str]] = field(default_factory=list)
    below_threshold: list[Match] = field(default_factory=list)
    threshold: float | None = None
    embedder: str = ""
    message: str = ""

    def __iter__(self) -> Iterator[Match]:
        return iter(self.matches)

    def __len__(self) -> int:
        return len(self.matches)

    def __getitem__(self, i: int) -> Match:
        return self.matches[i]

    @property
    def entries(self) -> list[LibraryEntry]:
        return [m.entry for m in self.matches]


def _message(lib: LoraLibrary, n_usable: int, matches: list[Match], below: list[Match], threshold: float | None,
             skipped: list[tuple[LibraryEntry, str]]) -> str:
    names = "; ".join(f"{e.file}: {why if len(why) < 80 else why[:77] + '...'}" for e, why in skipped[:3])
    notes = f" ({len(skipped)} file(s) skipped: {names}{'; ...' if len(skipped) > 3 else ''})" if skipped else ""
    if not lib.entries:
        return f"the library {lib.folder} has no LoRA files: generating with the base model alone"
    if n_usable == 0:
        return f"no LoRA in {lib.folder} can be applied to this model{notes}: generating with the base model alone"
    if not matches and below:
        best = below[0]
        return (f"no LoRA in {lib.folder} is relevant to the prompt (best: {best.entry.file} at {best.score:.3f}, "
                f"under the threshold {threshold}){notes}: generating with the base model alone")
    chosen = ", ".join(f"{m.entry.file} ({m.score:.2f})" for m in matches)
    return f"retrieved {chosen}{notes}"


#: MiniLM phrase-level scores on the test library (tests/retrieval_library.py): the right LoRAs 0.42-0.72, the
#: best match of unrelated prompts 0.25-0.45 (docs/autolora.md). They overlap: a starting point for ``threshold``,
#: to check with ``python -m lora_diffusion.retrieval --library DIR --prompt ...`` on your own folder
SUGGESTED_THRESHOLD = 0.4

#: words that do not start or end a phrase (articles, prepositions, and words generic to any prompt)
STOP_WORDS = frozenset("a an the and or of on in at to for by from with without into onto over under near its it is are "
                       "this that style styled background image picture drawing drawn made looking like very".split())


def phrases(prompt: str, max_words: int = 3) -> list[str]:
    """The prompt's phrases of 1..``max_words`` consecutive words that neither start nor end in a stop word."""
    words = re.findall(r"[\w'-]+", prompt.lower())
    out: dict[str, None] = {}
    for n in range(1, max_words + 1):
        for i in range(len(words) - n + 1):
            g = words[i:i + n]
            if g[0] not in STOP_WORDS and g[-1] not in STOP_WORDS:
                out[" ".join(g)] = None
    return list(out)


def retrieve(lib: LoraLibrary, prompt: str, k: int = 3, threshold: float | None = None, family: str | None = None,
             embedder: TextEmbedder | None = None, weights: Any = None, weight_mix: float = 0.5,
             phrase_words: int = 3) -> Retrieval:
    """Top-``k`` entries of ``lib`` for ``prompt``; see :meth:`LoraLibrary.retrieve`."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not 0.0 <= weight_mix <= 1.0:
        raise ValueError(f"weight_mix must be in [0, 1], got {weight_mix}")
    embedder = embedder or lib.embedder
    skipped = lib.skipped(family)
    usable = lib.usable(family)
    for e, why in skipped:
        log.info("retrieval: %s skipped: %s", e.file, why)
    scored = score_entries(lib, usable, prompt, embedder, weights, weight_mix, phrase_words)
    scored.sort(key=lambda m: -m.score)
    top = scored[:k]
    matches = [m for m in top if threshold is None or m.score >= threshold]
    below = [m for m in top if m not in matches]
    msg = _message(lib, len(usable), matches, below, threshold, skipped)
    log.info("retrieval for %r: %s", prompt, msg)
    return Retrieval(prompt, matches, skipped, below, threshold, embedder.id, msg)


def search(prompt: str, library: str | os.PathLike | LoraLibrary, top_k: int = 3, threshold: float | None = None,
           family: str | None = None, **kwargs: Any) -> Retrieval:
    """``LoraLibrary(library).retrieve(prompt, k=top_k, ...)`` in one call (a folder or an open library)."""
    from .library import LoraLibrary

    lib = library if isinstance(library, LoraLibrary) else LoraLibrary(library)
    return lib.retrieve(prompt, k=top_k, threshold=threshold, family=family, **kwargs)


def score_entries(lib: LoraLibrary, entries: list[LibraryEntry], prompt: str, embedder: TextEmbedder,
                  weights: Any = None, weight_mix: float = 0.5, phrase_words: int = 3) -> list[Match]:
    """A :class:`Match` for every entry (unsorted): phrase-level text cosine, mixed with the weight cosine
    (whole prompt) where ``weights`` is given and can read the entry."""
    if not entries:
        return []
    docs = lib.embedding_cache(embedder).embed([e.description for e in entries])  # (N, dim)
    queries = [prompt, *[p for p in phrases(prompt, phrase_words) if p != prompt.lower()]] if phrase_words else [prompt]
    q = embedder.embed(queries)  # (Q, dim); row 0 is the whole prompt
    best, which = (q @ docs.T).max(dim=0)  # (N,)
    wscores = weights.scores(lib, entries, q[0], embedder) if weights is not None else {}  # {file: cosine}
    out = []
    for e, s, i in zip(entries, best.tolist(), which.tolist()):
        w = wscores.get(e.file)
        out.append(Match(e, s if w is None else (1 - weight_mix) * s + weight_mix * w, s, w, queries[i]))
    return out


def similarity(embedder: TextEmbedder, a: list[str], b: list[str]) -> torch.Tensor:
    """(len(a), len(b)) cosine similarities, e.g. to inspect why an entry ranks where it does."""
    return embedder.embed(a) @ embedder.embed(b).T
