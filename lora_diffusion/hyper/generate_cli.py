"""Describe a task, get a LoRA file: one forward pass of a trained Text-to-LoRA hypernetwork.

    python -m lora_diffusion.generate_lora --hyper runs/t2l/t2l.safetensors --task "Return only the last word." \\
        --out last_word.safetensors --peft_dir last_word_peft/
    python -m lora_diffusion.chat --adapter last_word.safetensors --prompt "apple river stone"
    python -m lora_diffusion.generate_lora --hyper outputs/t2l_unet/t2l.safetensors --task "a ring shape" \
        --out ring.safetensors                       # a UNet hypernetwork (train_t2l --component unet): demo model
    python -m lora_diffusion.generate --adapter ring.safetensors --prompt "a red ring on a blue background"

The canonical file records the base model (``lora_diffusion.chat`` and ``load_llm_adapter`` check it), the task
description and the hypernetwork it came from; ``--peft_dir`` also writes a folder that
``peft.PeftModel.from_pretrained(base, DIR)`` loads. ``--model`` must be the base the hypernetwork was trained for
(default: the offline SmolLM2-135M-Instruct): a checkpoint for another base (layer count, module names or widths
differ) is refused, naming what differs. Nothing is overwritten without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from ..api import remove_adapters
from ..core.errors import AdapterError
from .t2l import T2L, make_embedder, text_to_lora

log = logging.getLogger("lora_diffusion.generate_lora")


def generate_lora(hyper_path: str | Path, task: str, out: str | Path, peft_dir: str | Path | None = None,
                  model: str | None = None, embedder: str | None = None, name: str = "t2l",
                  overwrite: bool = False) -> dict[str, str]:
    """Load the base and the hypernetwork, generate the LoRA for ``task``, write it; returns the paths written."""
    from .. import llm

    if not isinstance(task, str) or not task.strip():
        raise AdapterError(f"--task {task!r}: expected a non-empty description of the task")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if peft_dir is not None and Path(peft_dir).exists() and any(Path(peft_dir).iterdir()) and not overwrite:
        raise FileExistsError(f"{peft_dir} exists and is not empty; pass --overwrite to replace it")
    if not Path(hyper_path).is_file():
        raise FileNotFoundError(f"hypernetwork checkpoint not found: {hyper_path}")
    if T2L.read_config(hyper_path)[0].component:
        if peft_dir is not None:
            raise AdapterError("--peft_dir: a PEFT folder is written for LLM hypernetworks; this one generates a "
                               "diffusion pipeline's LoRA (convert the file with ld.save_adapter(pipe, ..., "
                               "format='diffusers'))")
        return {"adapter": str(generate_pipeline_lora(hyper_path, task, out, model, embedder, name))}
    base, _ = llm.load_causal_lm(model)
    hyper = T2L.load(hyper_path, base)  # refuses another base, naming the differences
    emb = make_embedder(embedder if embedder is not None else _embedder_name(hyper.config.embedder))
    t0 = time.monotonic()
    text_to_lora(base, hyper, task, emb, name=name)
    log.info("generated a rank-%d LoRA for %d modules in %.1f ms", hyper.config.rank, len(hyper.slots),
             1e3 * (time.monotonic() - t0))
    meta = {"t2l_task": task, "t2l_hypernetwork": str(hyper_path)}
    written = {"adapter": str(llm.save_llm_adapter(base, out, name=name, metadata=meta, overwrite=overwrite))}
    if peft_dir is not None:
        written["peft"] = str(llm.save_peft_adapter(base, peft_dir, name=name, overwrite=overwrite))
    remove_adapters(base, [name])
    return written


def generate_pipeline_lora(hyper_path: str | Path, task: str, out: str | Path, model: str | None = None,
                           embedder: str | None = None, name: str = "t2l") -> Path:
    """A hypernetwork for a pipeline component (``T2LConfig.component``, e.g. the demo UNet): generate the LoRA on
    that component of ``model`` (default: the embedded demo model) and write a canonical pipeline file that
    ``python -m lora_diffusion.generate --adapter`` and ``ld.load_adapter(pipe, ...)`` load."""
    from .. import api
    from ..generate import load_pipeline

    pipe = load_pipeline(model)
    config, _ = T2L.read_config(hyper_path)
    comp = getattr(pipe, config.component, None)
    if not isinstance(comp, torch.nn.Module):
        raise AdapterError(f"{hyper_path}: the hypernetwork adapts the pipeline's '{config.component}', which "
                           f"{type(pipe).__name__} does not have")
    hyper = T2L.load(hyper_path, comp)  # refuses another base, naming the differences
    emb = make_embedder(embedder if embedder is not None else _embedder_name(hyper.config.embedder))
    t0 = time.monotonic()
    text_to_lora(comp, hyper, task, emb, name=name)
    log.info("generated a rank-%d LoRA for %d %s modules in %.1f ms", hyper.config.rank, len(hyper.slots),
             config.component, 1e3 * (time.monotonic() - t0))
    meta = {"t2l_task": task, "t2l_hypernetwork": str(hyper_path), "modelspec.description": task,
            "modelspec.title": task}
    try:
        return api.save_adapter(pipe, out, name=name, metadata=meta)
    finally:
        remove_adapters(comp, [name])


def _embedder_name(recorded: str) -> str | None:
    """The embedder recorded in the checkpoint: the default MiniLM, or a sentence-transformers folder 'st-NAME'
    (then pass --embedder FOLDER)."""
    if recorded == "all-MiniLM-L6-v2":
        return None
    raise AdapterError(f"this hypernetwork reads embeddings of '{recorded}'; pass --embedder with that "
                       "sentence-transformers model's folder")


def main(argv: list[str] | None = None) -> dict[str, str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hyper", required=True, help="T2L checkpoint (python -m training.train_t2l writes t2l.safetensors)")
    p.add_argument("--task", required=True, help="the task in words, e.g. 'Return only the last word.'")
    p.add_argument("--out", required=True, help="canonical adapter file (.safetensors)")
    p.add_argument("--peft_dir", default=None, help="also write a PEFT adapter folder here")
    p.add_argument("--model", default=None, help="base model (default: the offline SmolLM2-135M-Instruct; for a "
                   "UNet hypernetwork: the embedded demo diffusion model)")
    p.add_argument("--embedder", default=None, help="sentence-transformers folder (default: the checkpoint's)")
    p.add_argument("--name", default="t2l", help="adapter name inside the files")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    written = generate_lora(a.hyper, a.task, a.out, a.peft_dir, a.model, a.embedder, a.name, a.overwrite)
    for k, v in written.items():
        log.info("%s: %s", k, v)
    return written
