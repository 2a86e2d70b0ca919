"""T2L reconstruction training: fit the hypernetwork to a library of (description, LoRA file) pairs.

    target_m = (A_m, (s_file / s_hyper) · B_m)             the file's ΔW kept at the hypernetwork's scale s = alpha/r
    z        = (target - mean_{type,A|B}) / std_{type,A|B}  z-scored over the library (every task and layer)
    loss     = mean over modules of MSE(raw_m(e_desc), z_m)

Charakorn et al. 2025 (arXiv 2506.06105) "reconstruction" mode. The statistics are stored in the hypernetwork, so
``generate`` returns raw · std + mean; the init offsets are zeroed first, so training starts from the library's
mean LoRA (bias-hyper-init is for SFT, where there is no library).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.errors import AdapterError, AdapterFileError
from ..io import canonical
from ..io.files import read_safetensors
from .t2l import T2L, _key, check_embedder, embed_description

log = logging.getLogger(__name__)


@dataclass
class ReconConfig:
    steps: int = 1000
    lr: float = 1e-3  # peak; linear warmup over warmup_frac of the steps, then cosine decay to 0
    warmup_frac: float = 0.1
    weight_decay: float = 0.0
    batch_tasks: int = 4  # library entries per step (all when the library is smaller)
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 100


def read_lora_factors(path: str | os.PathLike, hyper: T2L) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A (r, in·k), B (out, r))} from a canonical LoRA file, B rescaled to the hypernetwork's alpha/r.

    A bare-model file for an LLM hypernetwork; for one built for a pipeline component (``T2LConfig.component``,
    e.g. "unet") that component's entry of a pipeline file (or a bare file saved from the component); its other
    parts (a pivotal-tuning token embedding, a text-encoder LoRA) are not reconstructed.
    Conv factors are flattened (A rows over in·kh·kw).
    """
    tensors, meta = read_safetensors(path)
    entries = canonical.decode_metadata(meta, str(path))
    comp = hyper.config.component
    if comp not in entries and list(entries) == [""]:  # a bare-component file (saved from pipe.unet itself)
        comp = ""
    if comp not in entries:
        want = f"a LoRA on the pipeline's '{comp}'" if comp else "a bare-model LoRA (save it with ld.save_adapter(model, ...))"
        raise AdapterFileError(f"{path}: adapts {sorted(k or '(the bare model)' for k in entries)}; expected {want}")
    spec = entries[comp].spec
    prefix = f"{comp}." if comp else ""
    r = hyper.config.rank
    if spec.variant not in ("lora", "rslora") or spec.rank_pattern or spec.alpha_pattern:
        what = f"variant '{spec.variant}'" + (" with rank/alpha patterns" if spec.rank_pattern or spec.alpha_pattern else "")
        raise AdapterFileError(f"{path}: {what}; expected a plain LoRA of one rank and alpha (T2L reconstructs A, B)")
    if spec.rank != r:
        raise AdapterFileError(f"{path}: rank {spec.rank}; the hypernetwork generates rank {r}")
    alpha = spec.alpha if spec.alpha is not None else spec.rank
    s_file = alpha / (math.sqrt(r) if spec.rslora or spec.variant == "rslora" else r)
    out = {}
    for s in hyper.slots:
        key = f"{prefix}{s.name}"
        a, b = tensors.get(f"{key}.lora_A"), tensors.get(f"{key}.lora_B")
        if a is None or b is None:
            raise AdapterFileError(f"{path}: no LoRA for module '{s.name}' (key '{key}.lora_A'/'lora_B'); "
                                   f"expected every module the hypernetwork targets ({len(hyper.slots)})")
        ones = (1,) * len(s.kernel)
        if tuple(a.shape) != (r, s.in_features, *s.kernel) or tuple(b.shape) != (s.out_features, r, *ones):
            raise AdapterFileError(f"{path}: module '{s.name}' has A {tuple(a.shape)}, B {tuple(b.shape)}; expected "
                                   f"A {(r, s.in_features, *s.kernel)}, B {(s.out_features, r, *ones)}")
        out[s.name] = (a.float().reshape(r, -1), b.float().reshape(s.out_features, r) * (s_file / hyper.scaling))
    return out


def _stack_targets(hyper: T2L, loras: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> dict[str, list[torch.Tensor]]:
    """{type: [A (T, S, r, in), B (T, S, out, r)]} over the T library LoRAs, the type's slots in order."""
    out = {}
    for t in hyper.types:
        names = [s.name for s in hyper.slots if s.type == t]
        out[t] = [torch.stack([torch.stack([lo[n][i] for n in names]) for lo in loras]) for i in (0, 1)]
    return out


def set_zscore(hyper: T2L, targets: dict[str, list[torch.Tensor]]) -> None:
    """Store per-(type, A|B) elementwise mean and std over tasks and layers; zero the init offsets."""
    with torch.no_grad():
        for t, pair in targets.items():
            for ab, x in zip("AB", pair):
                flat = x.flatten(0, 1)  # (T*S, ...)
                mean = flat.mean(0)
                std = flat.std(0, unbiased=False) if flat.shape[0] > 1 else torch.ones_like(mean)
                mean_buf, std_buf = hyper.stats(t, ab)
                mean_buf.copy_(mean)
                std_buf.copy_(torch.where(std > 1e-8, std, torch.ones_like(std)))
            hyper.init_A[_key(t)].zero_()
            hyper.init_B[_key(t)].zero_()


def train_reconstruction(hyper: T2L, library: Sequence[tuple[str, str | os.PathLike]], embedder: Any,
                         config: ReconConfig | None = None) -> list[float]:
    """Fit ``hyper`` to reproduce each library LoRA from its description; returns the loss per step.

    ``library``: (description, canonical LoRA file) pairs; a file may appear with several descriptions.
    """
    cfg = config or ReconConfig()
    if not library:
        raise AdapterError("train_reconstruction: the library is empty; expected (description, LoRA file) pairs")
    check_embedder(hyper, embedder)
    files = {str(p): read_lora_factors(p, hyper) for p in dict.fromkeys(str(p) for _, p in library)}
    emb = torch.stack([embed_description(embedder, d) for d, _ in library]).float()  # (T, emb_dim), frozen
    targets = _stack_targets(hyper, [files[str(p)] for _, p in library])
    set_zscore(hyper, targets)
    z = {t: [(x - hyper.stats(t, ab)[0]) / hyper.stats(t, ab)[1] for ab, x in zip("AB", pair)]
         for t, pair in targets.items()}
    opt = torch.optim.AdamW([p for p in hyper.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    warm = max(1, int(cfg.warmup_frac * cfg.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min((i + 1) / warm, 0.5 * (1 + math.cos(
        math.pi * max(0, i - warm) / max(1, cfg.steps - warm)))))
    g = torch.Generator().manual_seed(cfg.seed)
    hyper.train()
    losses, t0 = [], time.monotonic()
    for step in range(cfg.steps):
        idx = torch.randperm(len(library), generator=g)[: cfg.batch_tasks]
        raw = hyper.raw(emb[idx])
        loss = torch.stack([torch.nn.functional.mse_loss(raw[t][i], z[t][i][idx])
                            for t in hyper.types for i in (0, 1)]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hyper.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            eta = (time.monotonic() - t0) / (step + 1) * (cfg.steps - step - 1)
            log.info("T2L recon step %d/%d loss %.4g (ETA %.0fs)", step + 1, cfg.steps, losses[-1], eta)
    hyper.eval()
    return losses


# --- a library of LoRA files with descriptions ---
DESCRIPTIONS_FILE = "descriptions.json"
_PHRASINGS = {  # by the file's ``lora_kind`` metadata; {t}: its trigger word
    "concept": ("a {t} shape", "draw a {t}", "the {t} shape in any color", "an image of a {t}"),
    "style": ("{t} texture", "a {t} pattern", "shapes with a {t} texture", "fill the shape with a {t} pattern"),
}
_DEFAULT_PHRASINGS = ("{t}", "an image with {t}", "make it {t}")


def describe_file(path: str | os.PathLike) -> list[str]:
    """Phrasings that describe a LoRA file from its metadata: per-kind templates over its trigger word, plus its
    ``modelspec.title`` and ``modelspec.description``."""
    from ..io.files import read_header

    meta = read_header(path)[1]
    trigger = meta.get("trigger_word") or meta.get("modelspec.trigger_phrase") or meta.get("name") or Path(path).stem
    out = [p.format(t=trigger) for p in _PHRASINGS.get(meta.get("lora_kind", ""), _DEFAULT_PHRASINGS)]
    out += [meta[k].strip() for k in ("modelspec.title", "modelspec.description") if meta.get(k, "").strip()]
    return list(dict.fromkeys(out))


def library_pairs(folder: str | os.PathLike, exclude: Sequence[str] = ()) -> list[tuple[str, Path]]:
    """(description, file) pairs of a folder of LoRA files: ``descriptions.json`` ({stem: [phrasing, ...]}) when the
    folder has one (files it does not name are skipped), else ``describe_file`` of every ``*.safetensors``;
    ``exclude``: stems held out."""
    import json

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"LoRA library folder not found: {folder}")
    listing = folder / DESCRIPTIONS_FILE
    if listing.is_file():
        try:
            named = {str(k): [str(d) for d in v] for k, v in json.loads(listing.read_text()).items()}
        except (json.JSONDecodeError, AttributeError, TypeError) as e:
            raise AdapterFileError(f"{listing}: expected {{\"<file stem>\": [\"description\", ...]}} ({e})") from None
        missing = [k for k in named if not (folder / f"{k}.safetensors").is_file()]
        if missing:
            raise FileNotFoundError(f"{listing} names {missing}, which have no <name>.safetensors in {folder}")
    else:
        named = {p.stem: describe_file(p) for p in sorted(folder.glob("*.safetensors"))}
    unknown = sorted(set(exclude) - set(named))
    if unknown:
        raise AdapterError(f"held-out names {unknown} are not in the library {folder} (it has {sorted(named)})")
    pairs = [(d, folder / f"{k}.safetensors") for k, ds in named.items() if k not in exclude for d in ds]
    if not pairs:
        raise AdapterError(f"{folder}: no LoRA files with descriptions left to train on")
    return pairs
