"""The adapter library: a folder of files the app indexes (``lora_diffusion.io.library``), with import, rename,
export and delete. A file may have a sample image beside it (``<stem>.png``) and a JSON sidecar with the training
settings of a job (``<stem>.json``)."""

from __future__ import annotations

import json
import logging
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from lora_diffusion import AdapterError
from lora_diffusion.io.library import LoraLibrary

from .errors import AppError
from .settings import Settings

log = logging.getLogger("app")
_SAFE = re.compile(r"[^A-Za-z0-9._ -]+")
EXPORT_FORMATS = ("canonical", "kohya", "diffusers")


def safe_name(name: str, field: str = "name") -> str:
    """A file stem the user chose, made safe: no folders, no leading dots, printable; empty -> error."""
    stem = Path(str(name).replace("\\", "/")).name
    for suffix in (".safetensors",):
        stem = stem[: -len(suffix)] if stem.endswith(suffix) else stem
    stem = _SAFE.sub("_", stem).strip(" .")[:80]
    if not stem:
        raise AppError(f"{field}: expected a file name such as 'my-dog', got {name!r}")
    return stem


def _refine_family(e: dict[str, Any]) -> dict[str, Any]:
    """A transformer file whose widths do not tell Flux from SD3 ('dit': reduced models such as the SD3 demo) takes
    the family of the job that trained it (its sidecar)."""
    from lora_diffusion.io.bundle import FAMILY_NAMES

    fam = e.get("training", {}).get("family")
    if e.get("base_family") == "dit" and fam in ("flux", "sd3"):
        return dict(e, base_family=fam, base=FAMILY_NAMES[fam])
    return e


def _llm_base(path: Path) -> str:
    """The base model an LLM adapter records (``lora_diffusion.llm.save_llm_adapter``), else ''."""
    from lora_diffusion.io.files import read_header

    try:
        meta = read_header(path)[1]
    except (OSError, ValueError, AdapterError):
        return ""
    return meta.get("base_model", "") if "base_model_config" in meta else ""


class LibraryService:
    def __init__(self, settings: Settings, family: str | set[str] | None = None) -> None:
        self.settings = settings
        self.folder = settings.library
        self.index = LoraLibrary(self.folder)
        # the served models' families ('demo', 'sd1', 'sdxl', 'flux', 'sd3'); files of none of them are marked
        self.families = {family} if isinstance(family, str) else set(family or ())

    # --- reading ---
    def entries(self) -> list[dict[str, Any]]:
        """Every adapter, sorted by name, with sample image, sidecar settings and an ``other_family`` mark."""
        out = []
        for e in self.index.scan():
            if "/" in e["file"]:
                continue  # only the library's top level; sub-folders hold the app's own files
            path = self.folder / e["file"]
            side = path.with_suffix(".json")
            e = dict(e, name=path.stem, sample=str(path.with_suffix(".png")) if path.with_suffix(".png").is_file() else None,
                     training=json.loads(side.read_text()) if side.is_file() else {})
            e = _refine_family(e)
            e["llm_base"] = _llm_base(path) if not (e.get("base_family") or e.get("family_hint")) else ""
            fam = e.get("base_family") or e.get("family_hint")  # hint: "demo" (the embedded UNet's files)
            e["other_family"] = bool(fam and self.families and fam not in self.families and
                                     not (fam == "dit" and self.families & {"flux", "sd3"}))
            out.append(e)
        return sorted(out, key=lambda e: e["name"].lower())

    def nested(self) -> list[str]:
        """Adapter files in the library's sub-folders (relative paths): not entries of the Library tab (whose names
        are top-level file stems), but automatic retrieval reads them."""
        return sorted(e["file"] for e in self.index.scan() if "/" in e["file"] and not e.get("not_adapter"))

    def path(self, name: str) -> Path:
        """The file of entry ``name``; names that are not entries (paths, '..') are refused."""
        stem = safe_name(name, "adapter")
        path = self.folder / f"{stem}.safetensors"
        if stem != name.removesuffix(".safetensors") or not path.is_file():
            raise AppError(f"adapter: no adapter named {name!r} in the library")
        return path

    def entry(self, name: str) -> dict[str, Any]:
        from lora_diffusion.io.library import describe

        path = self.path(name)
        base = next((e for e in self.entries() if e["name"] == path.stem), {})
        return _refine_family({**base, **describe(path), "path": path.name})

    # --- changing ---
    def _free(self, stem: str) -> Path:
        path, k = self.folder / f"{stem}.safetensors", 2
        while path.exists():
            path, k = self.folder / f"{stem}-{k}.safetensors", k + 1
        return path

    def import_file(self, src: str | Path, original_name: str | None = None, sample: str | Path | None = None,
                    training: dict[str, Any] | None = None) -> str:
        """Copy an adapter file into the library (checked first: size, header, format); returns its entry name."""
        from .pipelines import check_adapter_file

        src = Path(src)
        label = Path(original_name or src.name).name
        if not label.endswith(".safetensors"):
            raise AppError(f"adapter file {label}: expected a .safetensors file")
        size = src.stat().st_size
        if size > self.settings.max_upload_mb * 2**20:
            raise AppError(f"adapter file {label}: {size / 2**20:.0f} MB, more than the {self.settings.max_upload_mb:g} MB "
                           "this server accepts")
        check_adapter_file(src, label)
        dst = self._free(safe_name(label, "file name"))
        tmp = dst.with_name(f".{uuid.uuid4().hex}.tmp")
        shutil.copyfile(src, tmp)
        tmp.replace(dst)
        if sample is not None and Path(sample).is_file():
            shutil.copyfile(sample, dst.with_suffix(".png"))
        if training:
            dst.with_suffix(".json").write_text(json.dumps(training, indent=1, default=str))
        log.info("library: imported %s as %s", label, dst.name)
        return dst.stem

    def import_server_path(self, path: str) -> str:
        if not self.settings.allow_server_paths:
            raise AppError("server path: this server does not allow importing files by path (start it with "
                           "--allow-server-paths); upload the file instead")
        p = Path(path).expanduser()
        if not p.is_file():
            raise AppError(f"server path: no such file: {path}")
        return self.import_file(p)

    def rename(self, name: str, new: str) -> str:
        path = self.path(name)
        stem = safe_name(new, "new name")
        dst = self.folder / f"{stem}.safetensors"
        if dst.exists():
            raise AppError(f"new name: '{stem}' is already in the library")
        for suffix in (".safetensors", ".png", ".json"):
            if path.with_suffix(suffix).exists():
                path.with_suffix(suffix).replace(dst.with_suffix(suffix))
        log.info("library: renamed %s to %s", path.stem, stem)
        return stem

    def delete(self, name: str) -> None:
        path = self.path(name)
        for suffix in (".safetensors", ".png", ".json"):
            path.with_suffix(suffix).unlink(missing_ok=True)
        log.info("library: deleted %s", path.stem)

    def export(self, name: str, fmt: str, folder: Path, pipe_factory: Any = None) -> Path:
        """The adapter written as ``fmt`` into ``folder`` (a session's own); T-LoRA/VeRA are loaded into the base model
        (``pipe_factory()``) since their frozen tensors are regenerated, others are converted from the file."""
        if fmt not in EXPORT_FORMATS:
            raise AppError(f"format: expected one of {list(EXPORT_FORMATS)}, got {fmt!r}")
        src = self.path(name)
        folder.mkdir(parents=True, exist_ok=True)
        dst = folder / (f"{src.stem}.safetensors" if fmt == "canonical" else
                        f"{src.stem}.{'kohya' if fmt == 'kohya' else 'diffusers'}.safetensors")
        if fmt == "canonical":
            shutil.copyfile(src, dst)
            return dst
        import lora_diffusion as ld

        try:
            try:
                from lora_diffusion.convert import convert

                return Path(convert(src, dst, fmt))
            except AdapterError:
                if pipe_factory is None:
                    raise
                pipe = pipe_factory()
                ld.load_adapter(pipe, src, name="export")
                return Path(ld.save_adapter(pipe, dst, name="export", format=fmt))
        except AdapterError as e:
            raise AppError(f"export {src.stem} as {fmt}: {str(e).replace(str(src), src.name)}") from None

    def squeeze(self, name: str, rank: int | None = None, energy: float | None = None,
                pipe_factory: Any = None) -> tuple[str, str]:
        """LoRA-Squeeze an entry into a new plain-LoRA entry ``<name>-r<k>`` / ``<name>-e<percent>`` beside it (sample
        image kept, a sidecar naming the source); returns (new entry name, one-line report). Files of the demo model
        or another non-SD base (and DoRA, which needs base weights) are read through the served model."""
        from lora_diffusion.io.library import describe
        from lora_diffusion.squeeze import check_target, squeeze_file

        src = self.path(name)
        try:
            check_target(rank, energy)
            info = describe(src)
            needs_model = info.get("base_family") not in ("sd1", "sd2", "sdxl") or "dora" in str(info.get("variant"))
            model = pipe_factory() if needs_model and pipe_factory is not None else None
            dst = self._free(f"{src.stem}-" + (f"r{rank}" if rank is not None else f"e{round(100 * energy)}"))
            rep = squeeze_file(src, dst, rank=rank, energy=energy, model=model)
        except AdapterError as e:
            raise AppError(f"squeeze {src.stem}: {str(e).replace(str(src), src.name)}") from None
        if src.with_suffix(".png").is_file():
            shutil.copyfile(src.with_suffix(".png"), dst.with_suffix(".png"))
        side = {"squeezed_from": src.stem, "target": rep.target, "total_error": rep.total_error,
                "params": [rep.params_before, rep.params_after]}
        dst.with_suffix(".json").write_text(json.dumps(side, indent=1))
        log.info("library: squeezed %s into %s (%s)", src.stem, dst.stem, rep.summary())
        return dst.stem, rep.summary()
