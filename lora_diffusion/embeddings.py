"""Placeholder-token embeddings (textual inversion, pivotal tuning) on a pipeline's text encoder(s).

Textual inversion (Gal et al. 2022, https://arxiv.org/abs/2208.01618) learns the input embedding e* of a
new word S*: ``e* = argmin_e E[ || eps - eps_theta(z_t, t, c_theta("a photo of S*", e)) ||^2 ]`` with the text
encoder c_theta and UNet frozen; pivotal tuning learns e* jointly with (or before) an adapter on the UNet.

A placeholder with ``n`` vectors is ``n`` tokens. By default they are named ``<tok>, <tok>_1, ..., <tok>_{n-1}``
(diffusers' convention: its pipelines expand ``<tok>`` in a prompt into all of them, so a prompt only ever
names ``<tok>``); the diffusers advanced script names them ``<s0>, <s1>, ...`` and prompts write them all.
SDXL pipelines have two text encoders, each with its own vectors (``clip_l``: text_encoder, width 768;
``clip_g``: text_encoder_2, width 1280).

Applying embeddings never edits the pipeline's tokenizer or embedding layer in place: the tokenizer is
copied and the embedding module replaced by an extended copy, so ``remove_embeddings`` puts the original
objects back (bit-exact). ``TrainableTokens`` trains the new rows only: a forward hook swaps them in from
its own parameters, so no other row can change and the optimizer state covers only the new rows.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .core.errors import AdapterFileError

log = logging.getLogger(__name__)
ENCODERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
ROLE_NAMES = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}  # the names SDXL embedding files use
REGISTRY_ATTR = "_lora_embeddings"
_SPLIT = re.compile(r"<[^<>\s]+>")


class EmbeddingError(AdapterFileError):
    """Embeddings that cannot be applied (wrong width, NaN, a clash of tokens); nothing was changed."""


@dataclass
class TokenEmbeddings:
    """One placeholder: its token names (one per vector) and the vectors per text encoder ({role: (n, width)})."""

    token: str
    vectors: dict[str, torch.Tensor]
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = next(iter(self.vectors.values())).shape[0] if self.vectors else 1
        if not self.names:
            self.names = token_names(self.token, n)

    @property
    def num_vectors(self) -> int:
        return len(self.names)


def token_names(token: str, n: int) -> list[str]:
    """The tokens of an ``n``-vector placeholder: ``<s0><s1>`` (written out) or ``tok, tok_1, ...``."""
    parts = _SPLIT.findall(token)
    if len(parts) == n and n > 1 and "".join(parts) == token:
        return parts
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def encoders(pipe: Any) -> dict[str, tuple[Any, nn.Module]]:
    """{role: (tokenizer, text encoder)} of a pipeline's CLIP encoders (SD: one; SDXL, SD3: two; Flux: CLIP-L only,
    its ``text_encoder_2`` is T5, as SD3's ``text_encoder_3``, which see a placeholder as ordinary word pieces)."""
    out = {}
    for role, tok_attr in ENCODERS.items():
        te, tok = getattr(pipe, role, None), getattr(pipe, tok_attr, None)
        if te is not None and tok is not None and "T5" not in type(te).__name__:
            out[role] = (tok, te)
    return out


def expand_prompt(pipe: Any, prompt: str) -> str:
    """``<tok>`` of a multi-vector placeholder -> ``<tok> <tok>_1 ...`` for pipelines that do not do it themselves
    (SD3 and Flux have no ``TextualInversionLoaderMixin``); SD/SDXL's ``encode_prompt`` does it: unchanged."""
    if hasattr(pipe, "maybe_convert_prompt"):
        return prompt
    for e in (e for embs in loaded_embeddings(pipe).values() for e in embs):
        if e.num_vectors > 1 and e.names[0] == e.token:  # not the written-out <s0><s1> form
            word, names = re.compile(rf"(?<![\w<]){re.escape(e.token)}(?![\w>])"), " ".join(e.names)
            prompt = word.sub(lambda _, r=names: r, prompt)
    return prompt


def width(text_encoder: nn.Module) -> int:
    return int(text_encoder.get_input_embeddings().weight.shape[1])


def _registry(pipe: Any) -> dict[str, list[TokenEmbeddings]]:
    return pipe.__dict__.setdefault(REGISTRY_ATTR, {})


def loaded_embeddings(pipe: Any) -> dict[str, list[TokenEmbeddings]]:
    """{adapter name: its placeholders} currently applied to ``pipe``."""
    return dict(pipe.__dict__.get(REGISTRY_ATTR, {}))


def tokens_in_use(pipe: Any) -> dict[str, str]:
    """{token name: adapter name} of every applied placeholder token."""
    return {n: name for name, embs in loaded_embeddings(pipe).items() for e in embs for n in e.names}


# --- checks (before anything changes) ---
def check(pipe: Any, embs: list[TokenEmbeddings], source: str, allow_existing: bool = True) -> None:
    """Raise ``EmbeddingError`` naming the token, the file and what was expected, or return (nothing changed)."""
    encs = encoders(pipe)
    if not embs:
        return
    if not encs:
        raise EmbeddingError(f"{source}: embeddings need a pipeline with a tokenizer and text encoder; "
                             f"found {type(pipe).__name__}")
    used = tokens_in_use(pipe)
    seen: set[str] = set()
    for e in embs:
        missing = [ROLE_NAMES.get(r, r) if len(encs) > 1 else r for r in encs if r not in e.vectors]
        extra = [r for r in e.vectors if r not in encs]
        if extra or missing:
            want = " and ".join(f"'{ROLE_NAMES[r]}' ({width(encs[r][1])} wide)" for r in encs) if len(encs) > 1 \
                else f"one vector set of width {width(next(iter(encs.values()))[1])}"
            raise EmbeddingError(f"{source}: token '{e.token}' has vectors for {sorted(e.vectors)}; this pipeline "
                                 f"expects {want}")
        for role, v in e.vectors.items():
            w = width(encs[role][1])
            if v.dim() != 2 or v.shape[1] != w or v.shape[0] != e.num_vectors:
                label = f"'{ROLE_NAMES[role]}' " if len(encs) > 1 else ""
                raise EmbeddingError(f"{source}: token '{e.token}' {label}embedding has shape {tuple(v.shape)}; this "
                                     f"model's text encoder {role} expects ({e.num_vectors}, {w}) (width {w}: "
                                     f"an embedding made for another model family?)")
            if not torch.isfinite(v).all():
                raise EmbeddingError(f"{source}: token '{e.token}' embedding for {role} contains NaN or Inf values")
        for n in e.names:
            if n in used or n in seen:
                raise EmbeddingError(f"{source}: token '{n}' is already loaded (by "
                                     f"'{used.get(n, 'this file')}'); remove it first or rename the token")
            seen.add(n)
            for role, (tok, _) in encs.items():
                _check_token(tok, n, role, source, allow_existing)


def _check_token(tok: Any, name: str, role: str, source: str, allow_existing: bool) -> None:
    if not name or any(c.isspace() for c in name):
        raise EmbeddingError(f"{source}: token {name!r}: expected one word without spaces")
    if is_vocabulary_word(tok, name) and not allow_existing:
        raise EmbeddingError(f"{source}: token '{name}' is already a word of the {ENCODERS[role]} vocabulary; pick "
                             f"a new token (e.g. '<{name.strip('<>')}>') or allow reusing it (--allow_existing_token)")


def is_vocabulary_word(tok: Any, name: str) -> bool:
    """Whether ``name`` already means something to the tokenizer (one known token, e.g. BPE 'sks</w>')."""
    if name in tok.get_vocab():
        return True
    pieces = tok.tokenize(name)
    return len(pieces) == 1 and pieces[0] != getattr(tok, "unk_token", None)


def init_vectors(pipe: Any, word: str | None, n: int, source: str = "--initializer_token") -> dict[str, torch.Tensor]:
    """(n, width) per text encoder: copies of ``word``'s embedding (one token), or the vocabulary mean."""
    out = {}
    for role, (tok, te) in encoders(pipe).items():
        weight = te.get_input_embeddings().weight.detach().float()
        if word:
            ids = tok(word, add_special_tokens=False).input_ids
            if len(ids) != 1:
                pieces = tok.convert_ids_to_tokens(ids)
                raise EmbeddingError(f"{source} {word!r}: the {ENCODERS[role]} splits it into {len(ids)} tokens "
                                     f"{pieces}; expected a word that is one token (e.g. the class word)")
            row = weight[ids[0]]
        else:
            row = weight.mean(0)
        out[role] = row.expand(n, -1).clone()
    return out


# --- applying and removing ---
@dataclass
class _Snapshot:
    tokenizers: dict[str, Any]
    modules: dict[str, nn.Module]
    vocab_sizes: dict[str, int]


def apply_embeddings(pipe: Any, name: str, embs: list[TokenEmbeddings], source: str = "embeddings",
                     allow_existing: bool = True) -> None:
    """Add the tokens of ``embs`` to the tokenizer(s) and set their rows, as adapter ``name`` (all or nothing)."""
    check(pipe, embs, source, allow_existing)
    if not embs:
        return
    snap = _snapshot(pipe)
    try:
        _extend(pipe, embs)
    except BaseException:
        _restore(pipe, snap)
        raise
    _registry(pipe)[name] = embs
    pipe.__dict__.setdefault("_lora_embedding_snapshots", {})[name] = snap
    for e in embs:
        log.info("token '%s' (%d vector(s)) added to %s for adapter '%s'", e.token, e.num_vectors,
                 ", ".join(encoders(pipe)), name)
        if e.num_vectors > 1 and e.names[0] == e.token and not hasattr(pipe, "maybe_convert_prompt"):
            log.warning("token '%s' has %d vectors and a %s does not expand it: calling the pipeline directly, write "
                        "'%s' in the prompt (lora_diffusion's generate and trainer expand '%s' themselves)", e.token,
                        e.num_vectors, type(pipe).__name__, " ".join(e.names), e.token)


def _snapshot(pipe: Any) -> _Snapshot:
    encs = encoders(pipe)
    return _Snapshot({r: tok for r, (tok, _) in encs.items()},
                     {r: te.get_input_embeddings() for r, (_, te) in encs.items()},
                     {r: int(te.config.vocab_size) for r, (_, te) in encs.items()})


def _restore(pipe: Any, snap: _Snapshot) -> None:
    for role, tok in snap.tokenizers.items():
        setattr(pipe, ENCODERS[role], tok)
    for role, module in snap.modules.items():
        te = getattr(pipe, role)
        te.set_input_embeddings(module)
        te.config.vocab_size = snap.vocab_sizes[role]


def _extend(pipe: Any, embs: list[TokenEmbeddings]) -> None:
    shared: dict[int, Any] = {}  # SDXL pipelines may share one tokenizer object between both encoders
    for role, (tok, te) in encoders(pipe).items():
        new_tok = shared.get(id(tok)) or copy.deepcopy(tok)
        if id(tok) not in shared:
            new_tok.add_tokens([n for e in embs for n in e.names if n not in new_tok.get_vocab()])
            shared[id(tok)] = new_tok
        old = te.get_input_embeddings()
        size = max(len(new_tok), old.weight.shape[0])
        new = nn.Embedding(size, old.weight.shape[1], padding_idx=old.padding_idx, device=old.weight.device,
                           dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight[: old.weight.shape[0]] = old.weight
            if size > old.weight.shape[0]:
                new.weight[old.weight.shape[0]:] = old.weight.mean(0)
            for e in embs:
                ids = new_tok.convert_tokens_to_ids(e.names)
                new.weight[ids] = e.vectors[role].to(new.weight)
        new.weight.requires_grad_(old.weight.requires_grad)
        te.set_input_embeddings(new)
        te.config.vocab_size = size
        setattr(pipe, ENCODERS[role], new_tok)


def remove_embeddings(pipe: Any, name: str) -> bool:
    """Undo ``apply_embeddings(pipe, name, ...)``: the original tokenizer and embedding objects come back.

    Removing the latest one restores its snapshot; removing an earlier one restores the pipeline to before it
    and re-applies the later ones. Returns whether ``name`` had embeddings.
    """
    reg = pipe.__dict__.get(REGISTRY_ATTR, {})
    if name not in reg:
        return False
    snaps = pipe.__dict__["_lora_embedding_snapshots"]
    order = list(reg)
    later = order[order.index(name) + 1:]
    _restore(pipe, snaps[name])
    reg.pop(name)
    snaps.pop(name)
    for other in later:
        embs = reg.pop(other)
        snaps.pop(other)
        apply_embeddings(pipe, other, embs, "re-applied", allow_existing=True)
    return True


def current_vectors(pipe: Any, name: str) -> list[TokenEmbeddings]:
    """The placeholders of adapter ``name`` with the vectors now in the text encoders (after training)."""
    out = []
    for e in pipe.__dict__.get(REGISTRY_ATTR, {}).get(name, []):
        vecs = {}
        for role, (tok, te) in encoders(pipe).items():
            ids = tok.convert_tokens_to_ids(e.names)
            vecs[role] = te.get_input_embeddings().weight.detach()[ids].float().cpu().clone()
        out.append(TokenEmbeddings(e.token, vecs, list(e.names)))
    return out


# --- training the new rows only ---
class TrainableTokens(nn.Module):
    """Trainable vectors of the placeholders of adapter ``name``; a forward hook swaps them into the embedding output.

    ``state_dict`` holds the vectors (checkpoints); ``commit`` writes them into the embedding rows.
    """

    def __init__(self, pipe: Any, name: str) -> None:
        super().__init__()
        self.pipe, self.name = pipe, name
        self.vectors = nn.ParameterDict()
        self._hooks: list[Any] = []
        self._lookup: dict[str, torch.Tensor] = {}
        embs = pipe.__dict__.get(REGISTRY_ATTR, {}).get(name, [])
        for role, (tok, te) in encoders(pipe).items():
            weight = te.get_input_embeddings().weight
            ids = [i for e in embs for i in tok.convert_tokens_to_ids(e.names)]
            lookup = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
            lookup[ids] = torch.arange(len(ids), device=weight.device)
            self._lookup[role] = lookup
            self.vectors[role] = nn.Parameter(weight.detach()[ids].float().clone())
            self._hooks.append(te.get_input_embeddings().register_forward_hook(self._hook(role)))

    def _hook(self, role: str) -> Any:
        def swap(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            idx = self._lookup[role].to(args[0].device)[args[0]]  # (B, L): row of the vectors, or -1
            mask = idx >= 0
            if not bool(mask.any()):
                return out
            rows = self.vectors[role].to(out.dtype)[idx.clamp(min=0)]  # (B, L, width)
            return torch.where(mask.unsqueeze(-1), rows, out)
        return swap

    def set_trainable(self, on: bool) -> None:
        for p in self.vectors.values():
            p.requires_grad_(on)

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.vectors.values())

    def commit(self) -> None:
        """Write the trained vectors into the embedding rows (the hook keeps working)."""
        with torch.no_grad():
            for role, (_, te) in encoders(self.pipe).items():
                weight = te.get_input_embeddings().weight
                ids = (self._lookup[role] >= 0).nonzero().squeeze(1)
                weight[ids] = self.vectors[role].to(weight)[self._lookup[role][ids]]

    def close(self) -> None:
        """Commit and remove the hooks."""
        self.commit()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def parameters_by_role(self) -> Iterator[nn.Parameter]:
        yield from self.vectors.values()


__all__ = ["EmbeddingError", "TokenEmbeddings", "TrainableTokens", "apply_embeddings", "check", "current_vectors",
           "encoders", "expand_prompt", "init_vectors", "loaded_embeddings", "remove_embeddings", "token_names", "tokens_in_use"]
