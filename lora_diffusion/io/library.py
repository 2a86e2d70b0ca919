"""Describe adapter files from their header alone, and index a folder of them (cached, refreshed on change).

``describe`` never loads a tensor: format, base family, modules, rank, variant and size come from the
safetensors header (names, shapes); alpha, trigger words and tags from the metadata (``ss_network_alpha``,
``modelspec.trigger_phrase``, ``ss_tag_frequency``, ...). The index adds the file's sha256 and is kept in
``<folder>/.lora_library.json``; a file is re-read only when its size or mtime changes. The descriptive
metadata (titles, descriptions, captions, trigger words: ``TEXT_KEYS``) is kept in the index for
:mod:`lora_diffusion.retrieval`, which builds a text description of each file from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from ..core.errors import AdapterError
from . import canonical, peft_format
from .bundle import FAMILY_NAMES
from .detect import KOHYA_PREFIXES, detect_format, file_family
from .files import read_header

log = logging.getLogger(__name__)
CACHE = ".lora_library.json"
RANK_KEYS = ("lora_down.weight", "lora_A.weight", "hada_w1_b", "lokr_w1_b", "lokr_w2_b", "lora_A", ".down.weight",
             "q_layer.weight", ":down")  # old diffusers / official T-LoRA, official ortho T-LoRA, cloneofsimo
INDEX_VERSION = 3  # entries of an older index are re-read
# files that live beside LoRAs but are not adapters (metadata ``format``): kept out of the index
GATES_FORMAT = "lora-diffusion-gates"
NOT_ADAPTERS = (GATES_FORMAT,)
#: metadata worth reading as text: kohya/SAI titles, comments, dataset folders; our trainer's trigger and captions
TEXT_KEYS = ("ss_output_name", "ss_training_comment", "ss_dataset_dirs", "modelspec.title", "modelspec.description",
             "modelspec.trigger_phrase", "modelspec.tags", "modelspec.architecture", "trigger_word", "placeholder_token",
             "class_name", "prompt_template", "captions", "training_captions", "description", "name", "base_model",
             "base_model_family")


def _component(key: str, fmt: str) -> str:
    if fmt == "kohya":
        return next((p.rstrip("_") for p in sorted(KOHYA_PREFIXES, key=len, reverse=True) if key.startswith(p)), "")
    if fmt == "diffusers":
        return key.split(".")[0] if key.split(".")[0] in ("unet", "text_encoder", "text_encoder_2", "transformer") else ""
    if fmt == "canonical":
        return key.split(".")[0]
    if fmt == "cloneofsimo":
        return key.split(":")[0]
    return ""


def _variant(keys: list[str]) -> str:
    s = " ".join(keys)
    base = "loha" if "hada_w" in s else "lokr" if "lokr_w" in s else "vera" if "vera_lambda" in s else "lora"
    return f"dora({base})" if "dora_scale" in s or "magnitude" in s else base


def tags(meta: dict[str, str], top: int = 20) -> list[str]:
    """Most frequent training tags (kohya ``ss_tag_frequency`` = {dataset: {tag: count}}) and ``modelspec.tags``."""
    counts: Counter[str] = Counter()
    try:
        for per_dir in json.loads(meta.get("ss_tag_frequency", "{}")).values():
            counts.update({t.strip(): int(n) for t, n in per_dir.items() if t.strip()})
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        log.warning("ss_tag_frequency is not the expected JSON {dataset: {tag: count}}; ignored")
    out = [t for t, _ in counts.most_common(top)]
    out += [t.strip() for t in meta.get("modelspec.tags", "").split(",") if t.strip() and t.strip() not in out]
    return out


_COMMENT_TRIGGER = re.compile(r"(?:trigger|activation|instance)\s*(?:words?|phrases?|prompts?|tokens?)?\s*[:=]\s*([^\n;]+)", re.I)


def _dataset_concepts(meta: dict[str, str]) -> list[str]:
    """kohya dataset folders are named '<repeats>_<trigger> <class>' ('10_sks dog'): the concept, without the count."""
    try:
        dirs = list(json.loads(meta.get("ss_tag_frequency", "{}")))
    except (json.JSONDecodeError, TypeError):
        return []
    return [m.group(1).strip() for d in dirs if (m := re.fullmatch(r"\d+_(.+)", str(d).strip()))]


def trigger_words(meta: dict[str, str], tag_list: list[str]) -> list[str]:
    """Explicit trigger fields (``modelspec.trigger_phrase``, ``trigger_word``), 'trigger: …' in
    ``ss_training_comment``, the output name, the kohya dataset folders' concepts (``ss_tag_frequency`` keys), then
    the most frequent caption tag."""
    words = [meta.get(k, "") for k in ("modelspec.trigger_phrase", "trigger_word")]
    m = _COMMENT_TRIGGER.search(meta.get("ss_training_comment", ""))
    words += [w for w in m.group(1).split(",")] if m else []
    words += [meta.get("ss_output_name", ""), *_dataset_concepts(meta), *tag_list[:1]]
    return [w for w in dict.fromkeys(w.strip() for w in words) if w]


def _alpha_tensors(path: Path, keys: list[str]) -> str | None:
    """The most common ``.alpha`` tensor value (kohya files whose metadata lacks ``ss_network_alpha``); reads only
    those scalars."""
    alphas = [k for k in keys if k.endswith(".alpha")]
    if not alphas:
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        values = Counter(float(f.get_tensor(k).float()) for k in alphas)
    v = values.most_common(1)[0][0]
    return str(int(v)) if v == int(v) else str(v)


def family_hint(shapes: dict[str, list[int]], meta: dict[str, str]) -> str | None:
    """"demo" for the embedded demo model (cross-attention keys 64 wide). ``detect.file_family`` does not name it
    (and calls its files SD1.x: conv proj_in); retrieval trusts this over ``base_family``."""
    for k, s in shapes.items():
        if ("attn2_to_k" in k or "attn2.to_k" in k) and ("lora_down" in k or "lora_A" in k) and len(s) >= 2 and s[1] == 64:
            return "demo"
    return None


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """Format, base family, components and module counts, rank, alpha, variant, trigger words, tags: header only."""
    path = Path(path)
    config = {}
    if path.is_dir():
        if (path / peft_format.CONFIG).is_file():
            config = json.loads((path / peft_format.CONFIG).read_text())
        path = path / peft_format.WEIGHTS
    header, meta = read_header(path)
    keys = list(header)
    shapes = {k: v["shape"] for k, v in header.items()}
    fmt = "peft" if config else detect_format(keys, meta)
    modules: Counter[str] = Counter()
    ranks: Counter[int] = Counter()
    for k in keys:
        mod, _, param = k.partition(".") if fmt == "kohya" else (k.rsplit(".", 2)[0], "", k)
        if any(param.endswith(r) for r in RANK_KEYS) or (fmt != "kohya" and k.endswith(RANK_KEYS)):
            modules[_component(k, fmt) or "model"] += 1
            ranks[int(shapes[k][0])] += 1
    allocated, extra = None, {}
    if fmt == "canonical":
        entries = canonical.decode_metadata(meta, str(path))
        modules = Counter()
        for c, e in entries.items():  # a variant group ("<component>+<group>") counts for its component
            modules[c.partition(canonical.GROUP_SEP)[0] or "model"] += len(e.modules)
        ranks = Counter({e.spec.rank: 1 for e in entries.values()})
        if any(e.spec.variant == "adalora" for e in entries.values()):
            allocated = _allocated_ranks(path, [k for k in keys if k.endswith(".lora_E")])
        drop = next((e for e in entries.values() if e.spec.variant == "loradrop"), None)
        if drop is not None:  # LoRA-drop: layers with their own adapter, and the shared groups' sizes
            groups = drop.spec.options.get("shared", [])
            extra["lora_drop"] = {"own_adapter": len(drop.modules) - sum(map(len, groups)),
                                  "shared": [f"{len(g)} modules share one adapter ({g[0]}, ...)" for g in groups],
                                  "threshold": drop.spec.options.get("threshold")}
    family = file_family(shapes, meta)
    tag_list = tags(meta)
    alpha = meta.get("ss_network_alpha") or meta.get("alpha") or config.get("lora_alpha") or _alpha_tensors(path, keys)
    return {"path": str(path), "format": fmt, "base_family": family, "base": FAMILY_NAMES.get(family or "", "unknown"),
            "variant": meta.get("variant") or (str(config.get("peft_type", "")).lower() or _variant(keys)),
            "components": dict(modules), "modules": sum(modules.values()),
            "rank": ranks.most_common(1)[0][0] if ranks else None, "ranks": sorted(ranks),
            "alpha": alpha, "size": path.stat().st_size, "trigger_words": trigger_words(meta, tag_list), "tags": tag_list,
            "family_hint": family_hint(shapes, meta),
            **({"allocated_ranks": allocated} if allocated is not None else {}), **extra, "index_version": INDEX_VERSION,
            "text_metadata": {k: meta[k][:2000] for k in TEXT_KEYS if meta.get(k)},
            "metadata": {k: (v if len(v) < 200 else v[:200] + "...") for k, v in meta.items()}}


def _allocated_ranks(path: Path, e_keys: list[str]) -> dict[str, Any]:
    """AdaLoRA: the rank each module kept (non-zero λ), read from the r-float ``lora_E`` tensors only."""
    from safetensors import safe_open

    per = {}
    with safe_open(str(path), framework="pt") as f:
        for k in e_keys:
            per[k[: -len(".lora_E")]] = int((f.get_tensor(k) != 0).sum())
    return {"total": sum(per.values()), "per_module": per}


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class LoraLibrary:
    """An index of the adapter files under ``folder`` (``*.safetensors`` and PEFT folders), cached on disk."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise AdapterError(f"{self.folder}: not a folder")
        self.cache_path = self.folder / CACHE

    def _load_cache(self) -> dict[str, Any]:
        try:
            return json.loads(self.cache_path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def files(self) -> list[Path]:
        """Adapter files and PEFT folders under the folder; hidden folders (caches such as ``.lora_embeddings``) skipped."""
        def visible(p: Path) -> bool:
            return not any(part.startswith(".") for part in p.relative_to(self.folder).parts)

        out = [p for p in self.folder.rglob("*.safetensors") if visible(p) and not (p.parent / peft_format.CONFIG).is_file()]
        return sorted(out + [p.parent for p in self.folder.rglob(peft_format.CONFIG) if visible(p)])

    def scan(self) -> list[dict[str, Any]]:
        """Every adapter's entry; files new or changed since the cache are re-read (header + sha256), others reused."""
        old, new = self._load_cache(), {}
        for p in self.files():
            f = p / peft_format.WEIGHTS if p.is_dir() else p
            rel, st = str(p.relative_to(self.folder)), f.stat()
            stamp = [st.st_size, st.st_mtime_ns]
            fresh = "error" in old.get(rel, {}) or old.get(rel, {}).get("index_version") == INDEX_VERSION
            if rel in old and old[rel].get("stamp") == stamp and fresh:
                new[rel] = old[rel]
                continue
            try:
                if p.is_file() and read_header(p)[1].get("format") in NOT_ADAPTERS:
                    new[rel] = {"file": rel, "stamp": stamp, "not_adapter": True, "index_version": INDEX_VERSION}
                    continue
                entry = describe(p)
            except AdapterError as e:
                entry = {"path": str(f), "error": str(e)}
                log.warning("%s", e)
            except Exception as e:  # a header that parses but is not what a safetensors header holds
                entry = {"path": str(f), "error": f"{f}: unreadable header ({type(e).__name__}: {e})"}
                log.warning("%s", entry["error"])
            entry.update({"file": rel, "stamp": stamp, "sha256": sha256(f)})
            entry.pop("metadata", None)
            new[rel] = entry
        if new != old:
            tmp = self.cache_path.with_suffix(".tmp")
            try:
                tmp.write_text(json.dumps(new, indent=1, sort_keys=True))
                tmp.replace(self.cache_path)
            except OSError as e:  # a read-only library still works, only uncached
                log.warning("%s: cannot write the index cache (%s); the library is re-read next time", self.cache_path, e)
        return [e for e in new.values() if not e.get("not_adapter")]

    def find(self, text: str) -> list[dict[str, Any]]:
        """Entries whose file name, trigger words or tags contain ``text`` (case-insensitive)."""
        t = text.lower()
        return [e for e in self.scan()
                if t in e["file"].lower() or any(t in w.lower() for w in e.get("trigger_words", []) + e.get("tags", []))]
