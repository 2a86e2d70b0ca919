"""Generated adapters: a LoRA from a task description (Text-to-LoRA) or from a document (Doc-to-LoRA), one forward
pass of a trained hypernetwork, saved to the library.

Hypernetworks are files in ``Settings.hyper_dir`` (default ``<output>/hypernetworks``; a training run's output folder
may be put there whole: ``t2l/t2l.safetensors``), told apart by their header's ``format``. An LLM hypernetwork's LoRA
is for the server's LLM (the chat in the LLM tab); a T2L hypernetwork trained on a pipeline component (``train_t2l
--component unet``: the demo UNet) makes a diffusion LoRA for the Generate tab.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_diffusion import AdapterError

from .errors import AppError
from .library import LibraryService, safe_name
from .settings import DEMO, Settings

log = logging.getLogger("app")
KINDS = {"t2l": "Text-to-LoRA", "d2l": "Doc-to-LoRA"}
TRAIN_HINT = {"t2l": "python -m training.train_t2l --mode sft --out {folder}/t2l",
              "d2l": "python -m training.train_d2l --out {folder}/d2l"}
MAX_DOC_CHARS = 200_000


@dataclass(frozen=True)
class Hypernet:
    name: str  # its path inside the folder (what the dropdown shows)
    path: Path
    kind: str  # "t2l" | "d2l"
    component: str  # "" for an LLM, else the pipeline component it adapts ("unet")
    base_model: str  # what it was trained on (the checkpoint's record)
    rank: int

    @property
    def label(self) -> str:
        target = f"diffusion {self.component}" if self.component else "LLM"
        base = f", {Path(self.base_model).name}" if self.base_model else ""
        return f"{self.name} ({target}{base}, rank {self.rank})"


def read_hypernet(path: Path, folder: Path) -> Hypernet | None:
    """The hypernetwork in ``path`` (header only), or None when it is not a T2L/D2L checkpoint."""
    import json

    from lora_diffusion.hyper import d2l, t2l
    from lora_diffusion.io.files import read_header

    try:
        meta = read_header(path)[1]
        kind = {t2l.CHECKPOINT_FORMAT: "t2l", d2l.CHECKPOINT_FORMAT: "d2l"}.get(meta.get("format", ""))
        config = json.loads(meta.get("config", "{}")) if kind else {}
    except (OSError, ValueError, AdapterError):
        return None
    if kind is None:
        return None
    return Hypernet(str(path.relative_to(folder)), path, kind, str(config.get("component") or ""),
                    meta.get("base_model", ""), int(config.get("rank", 0)))


class HyperService:
    def __init__(self, settings: Settings, library: LibraryService) -> None:
        self.settings, self.library = settings, library
        self.folder = settings.hyper_dir

    def list(self, kind: str) -> list[Hypernet]:
        """The folder's hypernetworks of ``kind`` (its top level and one level of run folders), by name."""
        files = [*self.folder.glob("*.safetensors"), *self.folder.glob("*/*.safetensors")]
        found = [h for h in (read_hypernet(f, self.folder) for f in sorted(files)) if h is not None and h.kind == kind]
        return sorted(found, key=lambda h: h.name)

    def missing(self, kind: str) -> str:
        """What to do when there is no hypernetwork of ``kind``."""
        return (f"No {KINDS[kind]} hypernetwork in {self.folder}. Train one with "
                f"`{TRAIN_HINT[kind].format(folder=self.folder)}` (it writes {kind}.safetensors there), then Refresh.")

    def get(self, name: str | None, kind: str) -> Hypernet:
        found = {h.name: h for h in self.list(kind)}
        if not found:
            raise AppError(f"{KINDS[kind]}: {self.missing(kind)}")
        if not name or name not in found:
            raise AppError(f"{KINDS[kind]} hypernetwork: expected one of {sorted(found)}, got {name!r}")
        return found[name]

    def text_to_lora(self, hyper: str | None, task: str, llm: str, name: str = "") -> str:
        """Generate the LoRA for ``task`` and add it to the library; returns the entry's name."""
        from lora_diffusion.hyper.generate_cli import generate_lora

        h = self.get(hyper, "t2l")
        if not (task or "").strip():
            raise AppError("task description: empty; describe the task, e.g. 'Answer with the last word only.'")
        model = self._diffusion_source() if h.component else self._llm_source(llm)
        return self._to_library(lambda out: generate_lora(h.path, task.strip(), out, model=model), h,
                                name or task, {"t2l_task": task.strip()})

    def doc_to_lora(self, hyper: str | None, text: str, llm: str, name: str = "") -> str:
        """Internalize a pasted document into a LoRA and add it to the library; returns the entry's name."""
        from lora_diffusion.hyper.internalize_cli import internalize_file

        h = self.get(hyper, "d2l")
        if not (text or "").strip():
            raise AppError("document: empty; paste the text the model should know")
        if len(text) > MAX_DOC_CHARS:
            raise AppError(f"document: {len(text)} characters, more than the {MAX_DOC_CHARS} this server reads")
        work = self._work()
        doc = work / "document.txt"
        doc.write_text(text, encoding="utf-8")
        first = text.strip().splitlines()[0][:40]
        return self._to_library(lambda out: internalize_file(h.path, doc, out, self._llm_source(llm)), h,
                                name or f"doc {first}", {"d2l_document_chars": len(text)}, work)

    def _llm_source(self, llm: str) -> str | None:
        if llm not in self.settings.llm_models:
            raise AppError(f"LLM: '{llm}' is not one of the models this server offers: {sorted(self.settings.llm_models)}")
        return self.settings.llm_models[llm]

    def _diffusion_source(self) -> str | None:
        """The pipeline a component hypernetwork adapts: the embedded demo model when served, else the first model
        (one made for another base is refused by the hypernetwork's load, naming what differs)."""
        models = self.settings.models
        return None if DEMO in models else next(iter(models.values()))

    def _work(self) -> Path:
        work = self.settings.output / "tmp" / uuid.uuid4().hex[:12]
        work.mkdir(parents=True)
        return work

    def _to_library(self, make: Any, h: Hypernet, name: str, info: dict[str, Any], work: Path | None = None) -> str:
        """``make(out)`` writes the adapter; it is imported into the library under ``name`` (made safe)."""
        work = work or self._work()
        out = work / f"{safe_name(name[:60], 'name')}.safetensors"
        try:
            make(out)
        except (AdapterError, FileNotFoundError, OSError, ValueError) as e:
            raise AppError(f"{KINDS[h.kind]} with {h.name}: {str(e).replace(str(h.path), h.name)}") from None
        else:
            training = {"variant": "lora", "rank": h.rank, "hypernetwork": h.name, **info,
                        "kind": "diffusion" if h.component else "llm"}
            entry = self.library.import_file(out, out.name, training=training)
            log.info("%s: %s -> library entry %s", KINDS[h.kind], h.name, entry)
            return entry
        finally:
            shutil.rmtree(work, ignore_errors=True)
