"""Time per generated token: X-LoRA over N LoRAs vs the same model with one LoRA (and MoLE), in one process.

    python benchmarks/xlora_speed.py                       # SmolLM2-135M-Instruct (GGUF, offline), CPU, 1 thread
    python benchmarks/xlora_speed.py --model FOLDER --device cuda --new-tokens 64

Cases, on one loaded model with N random rank-r LoRAs (``--adapters``) on the 7 Llama linears:

* ``lora``        one LoRA active, ``generate`` with its KV cache (what a user runs today)
* ``lora-nocache`` one LoRA, ``use_cache=False`` (the same no-cache generation X-LoRA does)
* ``xlora``       X-LoRA over the N LoRAs (PEFT defaults: classifier depth 1): scaling pass + real pass per step,
                  each with its own KV cache
* ``xlora-nocache`` the same without a KV cache: both passes over the whole sequence every step, which is what
                  PEFT's ``XLoraModel.generate`` does (it forces ``use_cache=False``)
* ``mole``        MoLE over the N LoRAs (one pass per step, with the KV cache)

Greedy decoding of ``--new-tokens`` tokens after a ``--prompt-tokens`` prompt; the cases run round-robin
(``--repeats`` rounds, order rotated) so they share the machine's load; seconds per generated token = wall time /
new tokens; ratios are medians of the per-round ratios to ``lora``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lora_diffusion as ld  # noqa: E402
from lora_diffusion import llm  # noqa: E402
from lora_diffusion.fusion import fuse, unfuse  # noqa: E402

CASES = ("lora", "lora-nocache", "xlora", "xlora-nocache", "mole")


def setup(model: torch.nn.Module, case: str, names: list[str]) -> dict:
    unfuse(model)
    if case.startswith("lora"):
        ld.set_adapters(model, names[:1])
        return {"use_cache": case == "lora"}
    fuse(model, names, method=case.removesuffix("-nocache"))
    return {"use_cache": not case.endswith("-nocache")}


@torch.no_grad()
def one(model: torch.nn.Module, ids: torch.Tensor, new: int, kw: dict) -> float:
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, pad_token_id=0, **kw)
    dt = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + new
    return dt / new


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="folder, hub id or .gguf (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--adapters", type=int, default=3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "xlora_speed.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model, _ = llm.load_causal_lm(a.model, device=torch.device(a.device))
    model.eval().requires_grad_(False)
    names = [f"l{i}" for i in range(a.adapters)]
    for i, n in enumerate(names):
        ld.add_adapter(model, ld.AdapterSpec(rank=a.rank, targets="llm", seed=i), n, trainable=False)
        with torch.no_grad():
            for _, t in ld.adapter_parameters(model, n):
                t.add_(0.02 * torch.randn_like(t))
    ids = torch.randint(10, int(model.config.vocab_size) - 10, (1, a.prompt_tokens), device=a.device)
    times: dict[str, list[float]] = {c: [] for c in CASES}
    for r in range(a.repeats + 1):  # round 0 warms up
        order = CASES[r % len(CASES):] + CASES[:r % len(CASES)]
        for c in order:
            t = one(model, ids, a.new_tokens, setup(model, c, names))
            if r:
                times[c].append(t)
    unfuse(model)
    res = {c: {"s_per_token": statistics.median(v),
               "ratio_to_lora": statistics.median(x / y for x, y in zip(v, times["lora"]))} for c, v in times.items()}
    meta = {"model": llm.base_name(model), "adapters": a.adapters, "rank": a.rank, "prompt_tokens": a.prompt_tokens,
            "new_tokens": a.new_tokens, "repeats": a.repeats, "threads": a.threads, "device": a.device,
            "torch": torch.__version__}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"meta": meta, "results": res}, indent=1))
    print("| case | s / generated token | vs one LoRA (KV cache) |\n|---|---|---|")  # noqa: T201
    for c, v in res.items():
        print(f"| {c} | {v['s_per_token']:.4f} | {v['ratio_to_lora']:.2f}x |")  # noqa: T201


if __name__ == "__main__":
    main()
