"""Convert adapter files between formats, and inspect them.

    python -m lora_diffusion.convert IN OUT --to kohya|diffusers|peft|bfl|canonical [--base BASE]
        (BASE: sd1|sd2|sdxl|flux|sd3|sd35-large|flux2|flux2-klein-4b)
    python -m lora_diffusion.convert inspect FILE [--json]
    python -m lora_diffusion.convert squeeze IN OUT --rank K | --energy 0.9 [--to FORMAT] [--model SRC] [--overwrite]

Conversion maps module names through an empty (meta-device) pipeline of the file's base family (from its
keys/metadata, or ``--base``), so no model is downloaded or loaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from torch import nn

from .api import _role_targets
from .core.errors import AdapterError
from .io import canonical
from .io.bundle import FAMILY_NAMES, Part, component_role, model_family, model_view
from .io.files import read_safetensors
from .io.formats import FORMATS, read_bundle, resolve, write_parts
from .io.library import describe
from .io.skeleton import Skeleton

log = logging.getLogger(__name__)


def _sd3_width(path: Path) -> int | None:
    """The attention width of an SD3 file's transformer (1536: SD3/3.5 medium, 2432: SD3.5 large)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            if ("qkv" in k or "to_q" in k or "to_k" in k) and ("down" in k or "lora_A" in k):
                return int(f.get_slice(k).get_shape()[-1])
    return None


def _unsupported(path: Path) -> str | None:
    from safetensors import safe_open

    from .io.detect import unsupported_family

    if not path.is_file() or path.suffix != ".safetensors":
        return None
    with safe_open(str(path), "pt") as f:
        return unsupported_family(list(f.keys()))


def _dit_width(path: Path) -> int | None:
    """The input width of a Flux.2 file's attention (LoRA or LoKr factors): 6144 FLUX.2-dev, 3072 klein 4B."""
    from safetensors import safe_open

    from .io.detect import module_dims

    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        dims = module_dims({k: f.get_slice(k).get_shape() for k in f.keys()})
    return next((i for m, (_, i) in dims.items() if m.endswith(("qkv", "to_q", "img_attn_proj"))), None)


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, base: str | None = None,
            model: Any = None, metadata: dict[str, str] | None = None) -> Path:
    """Read ``src`` (any format) and write it as ``to``, tensors as they are (no model is built or loaded).

    Module names are mapped through ``model`` (a pipeline or model; by default an empty meta-device pipeline of
    the file's base family). Canonical T-LoRA/VeRA adapters need their regenerated frozen tensors: load them
    into a model and use ``save_adapter`` instead.
    """
    path = resolve(src)
    if model is None:
        base = base or describe(path)["base_family"]
        other = _unsupported(path)
        if other:
            raise AdapterError(f"{src}: this LoRA is for {other}, a model family this project does not support")
        if base is None:
            raise AdapterError(f"{src}: cannot tell the base model family from the keys or metadata; pass --base sd1|sd2|sdxl")
        if base == "dit":
            raise AdapterError(f"{src}: this LoRA is for {FAMILY_NAMES[base]}; its keys and widths do not tell which; "
                               "pass --base flux|sd3|sd35-large")
        if base == "sd3" and _sd3_width(path) == 2432:
            base = "sd35-large"
        if base == "flux2" and _dit_width(path) == 3072:
            base = "flux2-klein-4b"
        model = Skeleton(base)
    targets = _role_targets(model)
    views = {role: model_view(m) for role, m in targets.items()}
    unet_config = getattr(targets.get("unet") or targets.get("transformer"), "config", None)
    loaded = read_safetensors(path) if path.is_file() else None
    meta = {k: v for k, v in (loaded[1] if loaded else {}).items() if k.startswith(("ss_", "modelspec.")) or
            k in ("trigger_word", "base_model", "name")} | (metadata or {})
    if loaded is not None and canonical.is_canonical(loaded[1]):
        entries = canonical.decode_metadata(loaded[1], str(path))
        role = component_role(next(iter(targets.values())))
        tensors = loaded[0]
        parts = [Part(c.partition(canonical.GROUP_SEP)[0] or role, e.spec, e.modules,
                      canonical.split_component(tensors, c) if c or len(entries) > 1 else tensors,
                      group=c.partition(canonical.GROUP_SEP)[2]) for c, e in entries.items()]
        if any(p.spec.variant in ("tlora", "vera") for p in parts):
            raise AdapterError(f"{src}: a {parts[0].spec.variant} adapter's frozen tensors are regenerated from its seed; "
                               "load it into a model and call save_adapter(..., format=...) instead")
    else:
        parts = read_bundle(path, views, unet_config, loaded, bare=isinstance(model, nn.Module), models=targets).parts
    if to == "canonical":
        raise AdapterError("converting to canonical: load the file with load_adapter and call save_adapter")
    family = model_family(model) or getattr(model, "family", None)
    out = write_parts(Path(dst), parts, to, views, meta, family, unet_config)
    log.info("converted %s -> %s (%s, %d modules)", src, out, to, sum(len(p.modules) for p in parts))
    return out


def _inspect(path: str, as_json: bool) -> int:
    """Print the description; exit status 3 when the format is unknown (the file is not a LoRA this library reads)."""
    info = describe(resolve(path))
    status = 3 if info["format"] == "unknown" else 0
    if status:
        sys.stderr.write(f"error: {path}: unknown adapter format; expected kohya, diffusers, PEFT or lora-diffusion keys\n")
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return status
    meta = info.pop("metadata")
    for k, v in info.items():
        sys.stdout.write(f"{k:>14}: {v}\n")
    sys.stdout.write(f"{'metadata':>14}: {len(meta)} keys\n")
    for k, v in sorted(meta.items()):
        sys.stdout.write(f"{'':>16}{k} = {v}\n")
    return status


def _squeeze_cli(argv: list[str]) -> Any:
    """``squeeze``: any additive adapter as a plain LoRA of rank K (or of the global energy fraction), by SVD."""
    from .squeeze import METHODS, SQUEEZE_FORMATS, squeeze_file

    p = argparse.ArgumentParser(prog="python -m lora_diffusion.convert squeeze", description=_squeeze_cli.__doc__)
    p.add_argument("src")
    p.add_argument("dst")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--rank", type=int, help="rank of every module (at most; never above what ΔW has), >= 1")
    g.add_argument("--energy", type=float, help="keep this fraction in (0, 1] of the singular-value energy, ranks "
                   "allocated globally across modules")
    p.add_argument("--to", choices=SQUEEZE_FORMATS, help="output format (default: the input's own; kohya for kohya)")
    p.add_argument("--base", choices=["sd1", "sd2", "sdxl"], help="base family when the file does not tell")
    p.add_argument("--model", help="base model (hub id, folder, .safetensors, 'demo'): module shapes of non-SD models "
                   "and the base weights DoRA needs")
    p.add_argument("--method", choices=METHODS, default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--table", action="store_true", help="print the per-module ranks and errors")
    a = p.parse_args(argv)

    def run() -> int:
        model = None
        if a.model:
            from .generate import load_pipeline

            model = load_pipeline(None if a.model == "demo" else a.model)
        rep = squeeze_file(a.src, a.dst, rank=a.rank, energy=a.energy, to=a.to, base=a.base, model=model,
                           overwrite=a.overwrite, method=a.method)
        if a.table:
            sys.stdout.write(rep.table() + "\n")
        sys.stdout.write(rep.summary() + "\n")
        return 0
    return run


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if argv[:1] == ["inspect"]:
        p = argparse.ArgumentParser(prog="python -m lora_diffusion.convert inspect")
        p.add_argument("file")
        p.add_argument("--json", action="store_true")
        a = p.parse_args(argv[1:])
        runner = lambda: _inspect(a.file, a.json)  # noqa: E731
    elif argv[:1] == ["squeeze"]:
        runner = _squeeze_cli(argv[1:])
    else:
        p = argparse.ArgumentParser(prog="python -m lora_diffusion.convert", description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("src")
        p.add_argument("dst")
        p.add_argument("--to", required=True, choices=FORMATS)
        p.add_argument("--base", choices=["sd1", "sd2", "sdxl", "flux", "sd3", "sd35-large", "flux2", "flux2-klein-4b"],
                       help="base family when the file does not tell (sd3: SD3/SD3.5 medium)")
        a = p.parse_args(argv)
        runner = lambda: (convert(a.src, a.dst, a.to, a.base), 0)[1]  # noqa: E731
    try:
        return runner()
    except AdapterError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
