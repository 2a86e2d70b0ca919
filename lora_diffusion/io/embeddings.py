"""Embedding files: textual-inversion / pivotal-tuning vectors in the forms people exchange.

- kohya bundle, inside a LoRA file (sd-scripts pivotal tuning; also our canonical file):
  ``bundle_emb.<token>.string_to_param.*`` (SD1/2), ``bundle_emb.<token>.clip_l`` / ``.clip_g`` (SDXL);
- A1111 / ComfyUI / Civitai embedding: ``emb_params`` (SD1/2) or ``clip_l`` + ``clip_g`` (SDXL);
  ``.pt``: ``{"string_to_param": {"*": ...}}``;
- diffusers advanced script (train_dreambooth_lora_sdxl_advanced.py): ``clip_l`` (+ ``clip_g``), its tokens
  ``<s0><s1>...`` written out in prompts;
- diffusers textual_inversion.py (learned_embeds): ``{<token>: (width,) or (n, width)}``.

Vectors are (n, width) per text encoder: ``text_encoder`` (SD; SDXL ``clip_l``) and ``text_encoder_2`` (``clip_g``).
An A1111 file names no token: the token is the file name's stem (as in A1111 and ComfyUI).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..embeddings import ROLE_NAMES, EmbeddingError, TokenEmbeddings, encoders, loaded_embeddings, token_names
from .files import read_safetensors, write_safetensors

BUNDLE = "bundle_emb."
SINGLE_KEYS = ("emb_params", "string_to_param.*")
XL_KEYS = {v: k for k, v in ROLE_NAMES.items()}  # clip_l -> text_encoder, clip_g -> text_encoder_2
META_TOKENS = "embedding_tokens"  # canonical/kohya metadata: {token: [token names]}
EMBEDDING_FORMATS = ("a1111", "diffusers")


# --- reading ---
def split_bundle(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(the adapter's tensors, {token: {key: tensor}} of its ``bundle_emb.*`` entries)."""
    rest, raw = {}, {}
    for k, v in tensors.items():
        if k.startswith(BUNDLE):
            token, _, key = k[len(BUNDLE):].partition(".")
            raw.setdefault(token, {})[key] = v
        else:
            rest[k] = v
    return rest, raw


def is_embedding_file(tensors: dict[str, torch.Tensor]) -> bool:
    """A standalone embedding file (A1111, diffusers): a few 1-2D tensors under embedding keys, no adapter keys."""
    keys = set(tensors)
    if not keys or len(keys) > 2:
        return False
    if keys <= set(XL_KEYS) or keys <= set(SINGLE_KEYS):
        return True
    return len(keys) == 1 and tensors[next(iter(keys))].dim() <= 2 and "." not in next(iter(keys))


def _to_roles(pipe: Any, token: str, raw: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """{key in the file: tensor} -> {text encoder role: (n, width)}."""
    roles = list(encoders(pipe))
    raw = {k: (v.unsqueeze(0) if v.dim() == 1 else v).float() for k, v in raw.items()}
    if set(raw) & set(XL_KEYS) and (len(roles) > 1 or "clip_g" in raw):
        return {XL_KEYS.get(k, k): v for k, v in raw.items()}
    if len(raw) == 1:
        return {roles[0] if roles else "text_encoder": next(iter(raw.values()))}
    raise EmbeddingError(f"{source}: token '{token}': keys {sorted(raw)}; expected one of {list(SINGLE_KEYS)} "
                         f"(SD 1.x/2.x) or 'clip_l' and 'clip_g' (SDXL)")


def from_bundle(pipe: Any, raw: dict[str, dict[str, torch.Tensor]], meta: dict[str, str],
                source: str) -> list[TokenEmbeddings]:
    names = _meta_tokens(meta)
    out = []
    for token, keys in raw.items():
        vecs = _to_roles(pipe, token, keys, source)
        n = next(iter(vecs.values())).shape[0]
        out.append(TokenEmbeddings(token, vecs, names.get(token) or token_names(token, n)))
    return out


def _meta_tokens(meta: dict[str, str]) -> dict[str, list[str]]:
    try:
        return {k: list(v) for k, v in json.loads(meta.get(META_TOKENS, "{}")).items()}
    except (json.JSONDecodeError, AttributeError, TypeError):
        return {}


def read_embedding_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a ``.safetensors``, or of an A1111/diffusers ``.pt``/``.bin`` (weights only)."""
    p = Path(path)
    if p.suffix == ".safetensors":
        return read_safetensors(p)
    try:
        data = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EmbeddingError(f"{p}: not a readable embedding file ({type(e).__name__}: {e})") from None
    if isinstance(data, dict) and isinstance(data.get("string_to_param"), dict):
        return {"string_to_param.*": next(iter(data["string_to_param"].values()))}, {"name": str(data.get("name", p.stem))}
    if isinstance(data, dict) and all(isinstance(v, torch.Tensor) for v in data.values()):
        return dict(data), {}
    raise EmbeddingError(f"{p}: expected an embedding file (A1111 'string_to_param'/'emb_params', 'clip_l'/'clip_g', "
                         f"or {{token: tensor}}), found {type(data).__name__}")


def embeddings_from_file(pipe: Any, tensors: dict[str, torch.Tensor], meta: dict[str, str], source: str,
                         token: str | None = None) -> list[TokenEmbeddings]:
    """A standalone embedding file -> placeholders. The token: ``token``, the file's metadata, its one key
    (diffusers textual inversion), or the file name's stem (A1111)."""
    keys = set(tensors)
    if not (keys <= set(XL_KEYS) or keys <= set(SINGLE_KEYS)):  # diffusers: {token: tensor}
        key = next(iter(keys))
        return [TokenEmbeddings(token or key, _to_roles(pipe, key, {key: tensors[key]}, source))]
    names = _meta_tokens(meta)
    name = token or (next(iter(names)) if names else None) or meta.get("name") or Path(source).stem
    vecs = _to_roles(pipe, name, tensors, source)
    n = next(iter(vecs.values())).shape[0]
    return [TokenEmbeddings(name, vecs, names.get(name) or token_names(name, n))]


# --- writing ---
def bundle_tensors(pipe: Any, embs: list[TokenEmbeddings]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``bundle_emb.*`` tensors (kohya's layout) and the metadata that keeps the token names."""
    xl = len(encoders(pipe)) > 1
    out = {}
    for e in embs:
        for role, v in e.vectors.items():
            key = ROLE_NAMES[role] if xl else "string_to_param.*"
            out[f"{BUNDLE}{e.token}.{key}"] = v.detach().float().cpu().contiguous()
    return out, {META_TOKENS: json.dumps({e.token: e.names for e in embs})} if embs else {}


def embedding_file_tensors(pipe: Any, emb: TokenEmbeddings, fmt: str) -> dict[str, torch.Tensor]:
    """One placeholder as an A1111/ComfyUI (``emb_params`` or ``clip_l``/``clip_g``) or diffusers-advanced
    (``clip_l`` (+ ``clip_g``)) file's tensors."""
    if fmt not in EMBEDDING_FORMATS:
        raise EmbeddingError(f"embedding format {fmt!r}; expected one of {list(EMBEDDING_FORMATS)}")
    xl = len(encoders(pipe)) > 1
    vecs = {r: v.detach().float().cpu().contiguous() for r, v in emb.vectors.items()}
    if xl or fmt == "diffusers":
        return {ROLE_NAMES[r]: v for r, v in vecs.items()}
    return {"emb_params": next(iter(vecs.values()))}


def save_embeddings(pipe: Any, path: str | os.PathLike, name: str = "default", fmt: str = "a1111",
                    token: str | None = None) -> Path:
    """Write the placeholder of adapter ``name`` (or the one called ``token``) as an embedding file.

    ``a1111``: ``emb_params`` (SD) / ``clip_l`` + ``clip_g`` (SDXL); the prompt names the file's stem.
    ``diffusers``: ``clip_l`` (+ ``clip_g``) for ``load_textual_inversion(sd["clip_l"], token=[...])``; the
    metadata records the token names (``<s0><s1>`` for the advanced script's convention).
    """
    from ..embeddings import current_vectors

    embs = current_vectors(pipe, name)
    if token is not None:
        embs = [e for e in embs if e.token == token]
    if len(embs) != 1:
        have = [e.token for e in current_vectors(pipe, name)]
        raise EmbeddingError(f"save_embeddings: adapter '{name}' has placeholders {have}; an embedding file holds "
                             f"exactly one (pass token=)")
    e = embs[0]
    meta = {"name": e.token, META_TOKENS: json.dumps({e.token: e.names}), "format": f"embedding-{fmt}"}
    write_safetensors(Path(path), embedding_file_tensors(pipe, e, fmt), meta)
    return Path(path)


def embedding_names(pipe: Any) -> list[str]:
    return list(loaded_embeddings(pipe))


__all__ = ["BUNDLE", "EMBEDDING_FORMATS", "bundle_tensors", "embedding_file_tensors", "embeddings_from_file",
           "from_bundle", "is_embedding_file", "read_embedding_file", "save_embeddings", "split_bundle"]
