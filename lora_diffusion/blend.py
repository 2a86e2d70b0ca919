"""Blend LoRAs into one generation: pick them (files, or a library searched by the prompt), fuse, generate, report.

    python -m lora_diffusion.blend --prompt "a red dotted ring on a blue background" \\
        --lora ring.safetensors --lora dotted.safetensors --method gated --gates gates.safetensors
    python -m lora_diffusion.blend --prompt "..." --library loras/ --top-k 2           # retrieval picks them

Writes the images, ``blend.json`` (what was chosen: LoRAs, scores, weights, roles, notes, gate statistics per
timestep) and ``gates.png`` (gate strength per layer x timestep). Files of another base family are skipped with a
note, damaged files are reported and skipped, and with nothing usable the base model generates (and says so).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import api
from .core.errors import AdapterError, AdapterFileError
from .families import denoiser
from .fusion import FUSION_METHODS, fuse, layer_map, unfuse
from .fusion.base import GateStats
from .fusion.gated import find_gates, gate_notes, load_gates
from .io.bundle import FAMILY_NAMES, model_family
from .io.library import describe, sha256

log = logging.getLogger(__name__)
KIND_ROLES = {"concept": "subject", "subject": "subject", "character": "subject", "style": "style"}
LOADED_ATTR = "_blend_loaded"  # {resolved path: (adapter name, sha256)} on the pipeline's UNet or transformer


@dataclass
class Chosen:
    name: str
    path: str
    weight: float
    role: str
    score: float | None = None
    sha256: str = ""
    kind: str = ""


@dataclass
class BlendResult:
    images: list[Any]
    prompt: str
    method: str
    chosen: list[Chosen]
    notes: list[str] = field(default_factory=list)
    gate_stats: GateStats | None = None

    def summary(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "method": self.method, "chosen": [asdict(c) for c in self.chosen],
                "notes": self.notes, "gate_stats": self.gate_stats.summary() if self.gate_stats else None}


def _name(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", path.stem if path.suffix else path.name)


def inspect_files(pipe: Any, paths: Sequence[str | os.PathLike], notes: list[str]) -> list[Chosen]:
    """Header-only checks: damaged files and files of another base family are noted and left out."""
    have, out = model_family(pipe), []
    for p in map(Path, paths):
        try:
            d = describe(p)
        except (AdapterError, OSError, ValueError) as e:
            notes.append(f"skipped {p}: cannot be read ({e})")
            continue
        fam = d.get("base_family")
        if fam and fam != have and not (fam == "dit" and have in ("flux", "sd3")):  # "dit": Flux or SD3, by shapes
            notes.append(f"skipped {p.name}: a {FAMILY_NAMES.get(fam, fam)} LoRA; the model is "
                         f"{FAMILY_NAMES.get(have or '', 'the embedded demo model' if have is None else have)}")
            continue
        kind = d.get("metadata", {}).get("lora_kind", "")
        out.append(Chosen(_name(p), str(p), 1.0, KIND_ROLES.get(kind, "other"), kind=kind))
    return out


def load_chosen(pipe: Any, chosen: list[Chosen], notes: list[str]) -> list[Chosen]:
    """Load each file once per pipeline (kept for later blends); a file that fails to load is noted and skipped."""
    loaded: dict[str, tuple[str, str]] = denoiser(pipe).__dict__.setdefault(LOADED_ATTR, {})
    ok = []
    for c in chosen:
        key = str(Path(c.path).resolve())
        digest = sha256(Path(c.path)) if Path(c.path).is_file() else ""
        if key in loaded and loaded[key][1] == digest:
            c.name, c.sha256 = loaded[key][0], digest
            ok.append(c)
            continue
        name = c.name
        while name in api.list_adapters(pipe):
            name += "_"
        try:
            api.load_adapter(pipe, c.path, name=name)
        except (AdapterError, OSError, ValueError) as e:
            notes.append(f"skipped {Path(c.path).name}: {e}")
            continue
        loaded[key] = (name, digest)
        c.name, c.sha256 = name, digest
        ok.append(c)
    return ok


def retrieve(pipe: Any, prompt: str, library: str | os.PathLike, top_k: int, threshold: float | None,
             notes: list[str]) -> list[tuple[str, float]]:
    """(path, score) of the library's LoRAs that fit the prompt, best first (``lora_diffusion.retrieval``: MiniLM
    over the descriptions, plus the weight-based retriever when one was trained on the folder). Files of another
    base family and damaged files are never returned; the retrieval's message goes to ``notes``."""
    from .retrieval import LibraryError, LoraLibrary, pipeline_family

    try:
        r = LoraLibrary(library).retrieve(prompt, k=top_k, threshold=threshold, family=pipeline_family(pipe))
    except LibraryError as e:
        raise AdapterError(str(e)) from None
    notes.append(r.message)
    return [(str(m.entry.path), float(m.score)) for m in r]


def _roles(chosen: list[Chosen], roles: dict[str, str] | None) -> dict[str, str]:
    """Explicit roles (by name or file stem) win, then the files' kinds; without any, first subject, rest style."""
    roles = roles or {}
    out = {c.name: roles.get(c.name) or roles.get(Path(c.path).stem) or c.role for c in chosen}
    if all(r == "other" for r in out.values()) and len(out) > 1:
        out = {n: "subject" if i == 0 else "style" for i, n in enumerate(out)}
    for c in chosen:
        c.role = out[c.name]
    return out


def blend(pipe: Any, prompt: str, loras: Sequence[str | os.PathLike] = (), library: str | os.PathLike | None = None,
          method: str = "gated", weights: Sequence[float] | None = None, roles: dict[str, str] | None = None,
          gates: str | os.PathLike | None = None, allow_unseen: bool = False, top_k: int = 2,
          threshold: float | None = None, steps: int = 20, guidance_scale: float | None = None, seed: int = 0,
          num_images: int = 1, options: dict[str, Any] | None = None,
          progress: Callable[[float, str], None] | None = None, height: int | None = None,
          width: int | None = None) -> BlendResult:
    """Generate ``prompt`` with the LoRAs given (or retrieved from ``library``) fused by ``method``, on any
    supported pipeline (SD1.x/SDXL UNets, Flux.1/SD3 transformers: the adapters and the fusion go on its denoiser).
    ``guidance_scale`` None: 4.0 on a UNet, the stock pipeline's default on Flux (3.5) and SD3 (7.0)."""
    from .generate import generate

    check_method(pipe, method)
    notes: list[str] = []
    scores: dict[str, float] = {}
    paths = [str(p) for p in loras]
    if library is not None and not paths:
        hits = retrieve(pipe, prompt, library, top_k, threshold, notes)
        scores = {str(Path(p).resolve()): s for p, s in hits}
        paths = [p for p, _ in hits]
    chosen = load_chosen(pipe, inspect_files(pipe, paths, notes), notes)
    for c in chosen:
        c.score = scores.get(str(Path(c.path).resolve()))
    if weights is not None:
        if len(weights) != len(chosen):
            raise AdapterError(f"{len(weights)} weights for {len(chosen)} usable LoRAs {[c.name for c in chosen]}")
        for c, w in zip(chosen, weights):
            c.weight = float(w)
    unfuse(pipe)
    fusion = None
    if not chosen:
        notes.append("no relevant LoRA" + (f" (none scored over the threshold {threshold})" if threshold else "")
                     + ": generated with the base model")
        api.disable_adapters(pipe)
    else:
        if method == "gated" and gates is None and library is not None:
            gates = _library_gates(library, chosen, notes)
        fusion = _fuse(pipe, chosen, method, roles, gates, allow_unseen, options or {}, notes)
        fusion.record()
    for n in notes:
        log.warning("%s", n)
    with torch.no_grad():
        images = generate(pipe, [prompt], steps, default_guidance(pipe) if guidance_scale is None else guidance_scale,
                          seed, num_images, height, width, progress=progress)
    stats = fusion.stats() if fusion is not None else None
    if fusion is not None:
        fusion.record(False)
    return BlendResult(images, prompt, method if chosen else "base", chosen, notes, stats)


def family_label(pipe: Any) -> str:
    """The pipeline's base family for messages: "Flux", "SD3", "SD1.x", ... (the demo model: "the demo model")."""
    fam = model_family(pipe)
    return FAMILY_NAMES.get(fam or "", "the embedded demo model" if fam is None else fam)


def check_method(pipe: Any, method: str) -> None:
    """One clear error for a method that is not registered or does not apply to a diffusion pipeline."""
    if method not in FUSION_METHODS:
        raise AdapterError(f"unknown fusion method '{method}'; registered: {list(FUSION_METHODS)}")
    if "diffusion" not in FUSION_METHODS[method].models:
        usable = [m for m, c in FUSION_METHODS.items() if "diffusion" in c.models]
        raise AdapterError(f"fusion method '{method}' applies to language models only ({FUSION_METHODS[method].formula}"
                           f"), not to diffusion pipelines (this one: {family_label(pipe)}); for diffusion use one of "
                           f"{usable}")


def default_guidance(pipe: Any) -> float:
    """4.0 on a UNet (the demo world's setting), the stock pipeline's default on Flux (3.5) and SD3 (7.0)."""
    from .generate import GUIDANCE

    return GUIDANCE.get(model_family(pipe) or "", 4.0)


def _library_gates(library: str | os.PathLike, chosen: list[Chosen], notes: list[str]) -> Path | None:
    """The library's gates file trained with the chosen LoRAs (``find_gates``), noted either way."""
    path, why = find_gates(library, {c.name: c.sha256 for c in chosen})
    notes.extend(why)
    notes.append(f"gates from the library: {path}" if path else
                 f"no gates file in {library} was trained with {[c.name for c in chosen]}")
    return path


def _fuse(pipe: Any, chosen: list[Chosen], method: str, roles: dict[str, str] | None, gates: Any, allow_unseen: bool,
          options: dict[str, Any], notes: list[str]) -> Any:
    names = [c.name for c in chosen]
    fusion = fuse(pipe, names, method=method, weights=[c.weight for c in chosen], roles=_roles(chosen, roles), **options)
    if method == "gated":
        if gates is None:
            notes.append("gated fusion without a gates file: the untrained gate equals the static sum at weight 1 "
                         "(train gates with python -m training.train_gates)")
        else:
            check_gates_model(pipe, gates)
            hashes = {c.name: c.sha256 for c in chosen}
            notes.extend(gate_notes(load_gates(fusion, gates, hashes, allow_unseen), fusion, hashes))
    elif method == "mole":
        notes.append("mole with untrained gates: the uniform mean of the LoRAs; MoLE gates trained by train_gates "
                     "--method mole load with their LoRAs: ld.load_adapter(pipe, 'mole.safetensors')"
                     + (" (--gates ignored)" if gates is not None else ""))
    elif gates is not None:
        notes.append(f"--gates ignored: method '{method}' has no gates")
    return fusion


def check_gates_model(pipe: Any, path: str | os.PathLike) -> None:
    """Refuse a gates file trained on another kind of denoiser (UNet gates on a Flux/SD3 transformer or back): its
    layers do not exist here, whatever LoRAs it names. Headers only."""
    from .io.files import read_header

    keys = [k for k in read_header(path)[0] if k != "__metadata__"]
    have = {k.split(".", 1)[0] for k in layer_map(pipe)}
    comps = sorted({k.split(".", 1)[0] for k in keys} - {"text_encoder", "text_encoder_2", "text_encoder_3"})
    if comps and not set(comps) & have:
        raise AdapterFileError(
            f"{path}: gates trained on a model whose denoiser is {comps} (layers {keys[0]!r}, ...); this "
            f"{family_label(pipe)} pipeline has {sorted(have)}: gates do not carry across model families; train "
            "gates on this model with python -m training.train_gates --model <this model>")


def plot_gate_stats(stats: GateStats, path: str | os.PathLike, title: str = "") -> Path:
    """PNG: mean gate strength per timestep (top) and per layer x timestep for each LoRA (heatmaps, one color scale;
    a constant strength, e.g. untrained gates, is said in the title rather than stretched over the scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(stats.names)
    heat_h = max(3.0, 0.12 * len(stats.layers) + 1.5)  # the heat maps (bottom row) under the per-step curves (top)
    fig, grid = plt.subplot_mosaic([["steps"] * n, [f"h{i}" for i in range(n)]], layout="constrained",
                                   figsize=(1.5 + 4.2 * n, 3.0 + heat_h), height_ratios=[3.0, heat_h])
    axes = [grid["steps"], *[grid[f"h{i}"] for i in range(n)]]
    ax = axes[0]
    for k, (name, vals) in enumerate(stats.per_timestep().items()):  # dashes tell apart lines that coincide
        ax.plot(stats.timesteps, vals, marker="o", ms=3, ls=("-", "--", ":", "-.")[k % 4], label=name)
    ax.invert_xaxis()
    ax.set(xlabel="timestep t (sampling runs left to right)", ylabel="effective weight (mean over layers)",
           title="per denoising step")
    ax.legend(fontsize=8, title="LoRA", title_fontsize=8)
    lo, hi = float(np.nanmin(stats.strength)), float(np.nanmax(stats.strength))
    constant = hi - lo < 1e-6
    if constant:  # one value everywhere: a scale around it, not matplotlib's arbitrary stretch
        lo, hi = lo - max(0.05, abs(lo) * 0.1), hi + max(0.05, abs(hi) * 0.1)
    labels = [_short(layer) for layer in stats.layers]
    step = max(1, len(stats.timesteps) // 6)
    for i, name in enumerate(stats.names):
        ax = axes[i + 1]
        im = ax.imshow(stats.strength[:, :, i], aspect="auto", cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(f"{name}: per layer and step", fontsize=9)
        ax.set_xticks(range(len(stats.timesteps))[::step])
        ax.set_xticklabels([f"{t:.0f}" for t in stats.timesteps][::step], fontsize=7)
        ax.set_xlabel("timestep t")
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels if i == 0 else [""] * len(labels), fontsize=5)
        if i == 0:
            ax.set_ylabel("layer (tb/stb: transformer/single block)" if all(k.startswith("transformer.") for k in
                          stats.layers) else "layer (D/M/U: down/mid/up block)", fontsize=8)
    fig.colorbar(im, ax=axes[1:], shrink=0.8, label="effective weight (1: the LoRA at full strength)")
    if constant:
        title += f"{' · ' if title else ''}every layer and step at {float(np.nanmin(stats.strength)):.3g}"
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _short(layer: str) -> str:
    for a, b in (("unet.", ""), ("transformer.", ""), ("single_transformer_blocks", "stb"), ("down_blocks", "D"),
                 ("up_blocks", "U"), ("mid_block", "M"), ("attentions", "att"), ("transformer_blocks", "tb"),
                 ("resnets", "res"), ("downsamplers", "down"), ("upsamplers", "up")):
        layer = layer.replace(a, b)
    return layer


def _pairs(items: Sequence[str], what: str) -> dict[str, str]:
    out = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep:
            raise SystemExit(f"error: {what} {it!r}: expected NAME=VALUE")
        out[k] = v
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", required=True, help="what to generate (with --library: also what the LoRAs are "
                   "retrieved by)")
    p.add_argument("--lora", action="append", default=[], help="LoRA file (repeat); instead of --library")
    p.add_argument("--library", default=None, help="folder of LoRAs searched by the prompt (see --top-k, --threshold)")
    p.add_argument("--method", default="gated", choices=list(FUSION_METHODS),
                   help="how the LoRAs are fused (default: gated; without --gates its untrained gate is the static "
                        "sum): static (weighted sum), gated (AutoLoRA gates from training.train_gates), "
                        "klora and scheduled (training-free subject + style; see --role), mole (MoLE gate; uniform "
                        "mean untrained); all of them on UNet (SD1.x/SDXL) and Flux/SD3 models. lag and xlora route "
                        "LLM tokens (python -m lora_diffusion.chat) and are refused here")
    p.add_argument("--weight", action="append", type=float, default=None,
                   help="weight per usable LoRA, in order (repeat once per LoRA; default: 1 each)")
    p.add_argument("--role", action="append", default=[], help="NAME=subject|style|other (repeat; NAME: the file's "
                   "stem; default: the file's lora_kind metadata, else the first LoRA subject and the rest style)")
    p.add_argument("--option", action="append", default=[], help="fusion option NAME=VALUE of --method, VALUE in "
                   "JSON (repeat), e.g. width=0.2 (scheduled), compile=true (gated); docs/autolora.md")
    p.add_argument("--gates", default=None, help="gates file from training.train_gates (gated; with --library and no "
                   "--gates: a gates file in the library trained with the chosen LoRAs, if any)")
    p.add_argument("--allow-unseen-loras", action="store_true", help="apply gates to LoRAs they were not trained with")
    p.add_argument("--top-k", type=int, default=2, help="with --library: how many LoRAs retrieval picks (default: 2)")
    p.add_argument("--threshold", type=float, default=None, help="with --library: leave out LoRAs whose retrieval "
                   "score (cosine) is below this; with none left the base model generates (default: no threshold)")
    p.add_argument("--model", default=None, help="hub id, diffusers folder or .safetensors (default: the demo model)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default: 20)")
    p.add_argument("--guidance_scale", "--guidance-scale", type=float, default=None,
                   help="classifier-free guidance (Flux.1-dev: its guidance input) (default: 4.0 on a UNet, the stock "
                        "pipeline's 3.5 on Flux and 7.0 on SD3)")
    p.add_argument("--height", type=int, default=None, help="image height (default: the pipeline's)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the pipeline's)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--num_images", "--num-images", type=int, default=1, help="images to generate (default: 1)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="weights' dtype (default: fp32; fp16/bf16 for a GPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="(default: cuda when available, else cpu)")
    p.add_argument("--output", type=Path, default=Path("outputs/blend"),
                   help="folder for the images, blend.json and gates.png (default: outputs/blend)")
    return p


def main(argv: list[str] | None = None) -> None:
    from .generate import _slug, load_pipeline

    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not a.lora and a.library is None:
        raise SystemExit("error: give LoRA files (--lora) or a library folder (--library)")
    options = {k: json.loads(v) for k, v in _pairs(a.option, "--option").items()}
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    try:
        pipe = load_pipeline(a.model, dtype).to(a.device)
        pipe.set_progress_bar_config(disable=True)
        res = blend(pipe, a.prompt, a.lora, a.library, a.method, a.weight, _pairs(a.role, "--role"), a.gates,
                    a.allow_unseen_loras, a.top_k, a.threshold, a.steps, a.guidance_scale, a.seed, a.num_images, options,
                    height=a.height, width=a.width)
    except AdapterError as e:
        raise SystemExit(f"error: {e}") from None
    a.output.mkdir(parents=True, exist_ok=True)
    for k, im in enumerate(res.images):
        im.save(a.output / f"{_slug(a.prompt)}-{k}.png")
    (a.output / "blend.json").write_text(json.dumps(res.summary(), indent=1))
    if res.gate_stats is not None:
        plot_gate_stats(res.gate_stats, a.output / "gates.png", f"{res.method}: {a.prompt}")
    log.info("chosen: %s", ", ".join(f"{c.name} ({c.role}, w={c.weight:g})" for c in res.chosen) or "none (base model)")
    log.info("wrote %d image(s), blend.json%s to %s", len(res.images), ", gates.png" if res.gate_stats else "", a.output)


if __name__ == "__main__":
    main()
