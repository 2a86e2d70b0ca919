"""Turn a text file into a LoRA with a trained Doc-to-LoRA hypernetwork (docs/hyper.md), in one forward pass.

    python -m lora_diffusion.internalize --hyper outputs/d2l/d2l.safetensors --doc notes.txt --out notes.safetensors
    python -m lora_diffusion.chat --adapter notes.safetensors --prompt "What is the capital of Zorblat?"

The output is an ordinary canonical LoRA file tagged with its base model (``ld.load_adapter``,
``lora_diffusion.chat --adapter``); ``--peft_dir`` also writes a PEFT adapter folder. A document longer than
``--chunk_tokens`` is read in chunks whose LoRAs are concatenated along the rank (``--no_chunking`` refuses it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ..core.errors import AdapterError
from .d2l import D2L, internalize


def read_text(path: str | os.PathLike) -> str:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"document not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise AdapterError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); expected a plain text document") from None
    if not text.strip():
        raise AdapterError(f"{p}: the document is empty; expected some text to internalize")
    return text


def internalize_file(hyper_path: str | os.PathLike, doc: str | os.PathLike, out: str | os.PathLike,
                     model_source: str | None = None, chunking: bool | None = None, chunk_tokens: int | None = None,
                     max_chunks: int | None = None, peft_dir: str | os.PathLike | None = None,
                     overwrite: bool = False) -> Path:
    """Read ``doc`` with the base model, generate its LoRA with the hypernetwork at ``hyper_path``, write ``out``."""
    from ..llm import load_causal_lm, save_llm_adapter, save_peft_adapter

    out = Path(out)
    for p, what in ((out, "file"), (Path(peft_dir) if peft_dir else None, "folder")):
        if p is not None and p.exists() and (what == "file" or any(p.iterdir())) and not overwrite:
            raise FileExistsError(f"{p} exists; pass --overwrite to replace it")
    text = read_text(doc)
    model, tok = load_causal_lm(model_source)
    model.eval()
    hyper = D2L.load(hyper_path, model)  # refuses a checkpoint made for another base model
    c = hyper.config
    c.chunking = c.chunking if chunking is None else chunking
    c.chunk_tokens = chunk_tokens or c.chunk_tokens
    c.max_chunks = max_chunks or c.max_chunks
    try:
        internalize(model, text, hyper, tok, name="d2l")
    except AdapterError as e:
        raise AdapterError(f"{doc}: {e}") from None
    meta = {"d2l_hypernetwork": Path(hyper_path).name, "d2l_document": Path(doc).name}
    save_llm_adapter(model, out, name="d2l", metadata=meta, overwrite=overwrite)
    if peft_dir:
        save_peft_adapter(model, peft_dir, name="d2l", overwrite=overwrite)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hyper", required=True, help="trained D2L hypernetwork (python -m training.train_d2l)")
    p.add_argument("--doc", required=True, help="UTF-8 text file to internalize")
    p.add_argument("--out", required=True, help="adapter file to write (.safetensors)")
    p.add_argument("--model", default=None, help="base model: hub id, folder or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--peft_dir", default=None, help="also write a PEFT adapter folder here")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--chunking", dest="chunking", action="store_true", default=None,
                   help="read a long document in chunks (the checkpoint's setting by default)")
    g.add_argument("--no_chunking", dest="chunking", action="store_false", help="refuse a document longer than one chunk")
    p.add_argument("--chunk_tokens", type=int, default=None, help="tokens per chunk (default: the checkpoint's)")
    p.add_argument("--max_chunks", type=int, default=None, help="most chunks read (default: the checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out / --peft_dir")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        path = internalize_file(a.hyper, a.doc, a.out, a.model, a.chunking, a.chunk_tokens, a.max_chunks, a.peft_dir,
                                a.overwrite)
    except (AdapterError, FileExistsError, FileNotFoundError) as e:
        p.exit(2, f"error: {e}\n")
    logging.getLogger("lora_diffusion.internalize").info("wrote %s (chat: python -m lora_diffusion.chat --adapter %s)",
                                                          path, path)
