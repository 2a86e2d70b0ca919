"""Time and memory per generated token of each LLM mixture vs the same model with one LoRA, in one process.

    python benchmarks/xlora_speed.py                       # SmolLM2-135M-Instruct (GGUF, offline), CPU, 1 thread
    python benchmarks/xlora_speed.py --model FOLDER --device cuda --new-tokens 64
    python benchmarks/xlora_speed.py --cases lora,xlora,mole   # a subset

Cases, on one loaded model with N random rank-r LoRAs (``--adapters``) on the 7 Llama linears:

* ``lora``        one LoRA active, ``generate`` with its KV cache (what a user runs today)
* ``lora-nocache`` one LoRA, ``use_cache=False`` (the same no-cache generation X-LoRA does)
* ``xlora``       X-LoRA over the N LoRAs (PEFT defaults: classifier depth 1): scaling pass + real pass per step,
                  each with its own KV cache
* ``xlora-nocache`` the same without a KV cache: both passes over the whole sequence every step, which is what
                  PEFT's ``XLoraModel.generate`` does (it forces ``use_cache=False``)
* ``mole``        MoLE over the N LoRAs (one pass per step, with the KV cache)
* ``lag``         LAG over the N LoRAs (aligned copy; Arrow top-min(20, N), SpectR, one LoRA per token and layer)
* ``moa``         soft MoA with its defaults (LoRA experts r 8 on q, k, v, o, down; parallel FFN adapter; 10-token
                  prompt), random router and experts, installed for its case only (its hooks run whatever is active)

Greedy decoding of ``--new-tokens`` tokens after a ``--prompt-tokens`` prompt; the cases run round-robin
(``--repeats`` rounds, order rotated) so they share the machine's load; seconds per generated token = wall time /
new tokens; ratios are medians of the per-round ratios to ``lora``. Memory, once per case after the rounds: the
peak of one generation above the memory before it (CPU: VmRSS/VmHWM of this process; CUDA: max allocated), and
the mixture's own resident tensors (router, gates, LAG's aligned stacks, MoA's blocks; the N LoRAs not counted).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "benchmarks"):  # procmem by file: a site-packages 'benchmarks' package may shadow ours
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
from procmem import reset_hwm, rss_kib, trim  # noqa: E402

import lora_diffusion as ld  # noqa: E402
from lora_diffusion import llm  # noqa: E402
from lora_diffusion.fusion import FUSION_ATTR, fuse, unfuse  # noqa: E402
from lora_diffusion.fusion.moa import MoAConfig, add_moa, get_moa  # noqa: E402

log = logging.getLogger("xlora_speed")
CASES = ("lora", "lora-nocache", "xlora", "xlora-nocache", "mole", "lag", "moa")
MOA = "moa_bench"


def setup(model: torch.nn.Module, case: str, names: list[str]) -> dict:
    unfuse(model)
    if MOA in ld.list_adapters(model):
        ld.remove_adapters(model, [MOA])
    if case.startswith("lora"):
        ld.set_adapters(model, names[:1])
        return {"use_cache": case == "lora"}
    if case == "moa":
        ld.disable_adapters(model)
        add_moa(model, MoAConfig(seed=0), MOA, trainable=False)
        with torch.no_grad():  # B and the parallel adapter's up start at 0: random, so every expert does work
            for _, t in ld.adapter_parameters(model, MOA):
                t.add_(0.02 * torch.randn_like(t))
        ld.set_adapters(model, [MOA])
        return {"use_cache": True}
    opts = {"top_k": min(20, len(names))} if case == "lag" else {}
    fuse(model, names, method=case.removesuffix("-nocache"), **opts)
    return {"use_cache": not case.endswith("-nocache")}


def extra_mib(model: torch.nn.Module) -> float:
    """The mixture's own tensors (combiners, model-level modules, MoA blocks), the LoRAs it mixes excluded."""
    ts: dict[int, torch.Tensor] = {}
    f = model.__dict__.get(FUSION_ATTR)
    if f is not None:
        for c in f.combiners.values():
            ts.update({id(t): t for t in [*c.parameters(), *c.buffers()]})
        ts.update({id(t): t for t in [*f.modules.parameters(), *f.modules.buffers()]})
    moa = get_moa(model, MOA)
    if moa is not None:
        ts.update({id(t): t for b in moa.blocks.values() for t in [*b.parameters(), *b.buffers()]})
    return sum(t.numel() * t.element_size() for t in ts.values()) / 2**20


def peak_mib(model: torch.nn.Module, ids: torch.Tensor, new: int, kw: dict, device: str) -> float | None:
    """Peak memory of one generation above the memory before it (MiB; None where it cannot be read)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        one(model, ids, new, kw)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    trim()
    before = rss_kib("VmRSS")
    if before is None or not reset_hwm():
        return None
    one(model, ids, new, kw)
    return (rss_kib("VmHWM") - before) / 1024


@torch.no_grad()
def one(model: torch.nn.Module, ids: torch.Tensor, new: int, kw: dict) -> float:
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, pad_token_id=0, **kw)
    dt = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + new
    return dt / new


def run(a: argparse.Namespace) -> dict:
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
    cases = tuple(c for c in CASES if c in a.cases.split(","))
    if "lora" not in cases:
        raise SystemExit("--cases must include 'lora' (the reference)")
    times: dict[str, list[float]] = {c: [] for c in cases}
    for r in range(a.repeats + 1):  # round 0 warms up
        for c in cases[r % len(cases):] + cases[:r % len(cases)]:
            t = one(model, ids, a.new_tokens, setup(model, c, names))
            if r:
                times[c].append(t)
        log.info("round %d/%d done", r, a.repeats)
    mem = {}
    for c in cases:
        kw = setup(model, c, names)
        mem[c] = {"peak_mib": peak_mib(model, ids, a.new_tokens, kw, a.device), "extra_mib": extra_mib(model)}
    setup(model, "lora", names)
    ref = mem["lora"]["peak_mib"]
    res = {c: {"s_per_token": statistics.median(v),
               "ratio_to_lora": statistics.median(x / y for x, y in zip(v, times["lora"])), **mem[c],
               "peak_ratio_to_lora": mem[c]["peak_mib"] / ref if ref and mem[c]["peak_mib"] is not None else None}
           for c, v in times.items()}
    meta = {"model": llm.base_name(model), "adapters": a.adapters, "rank": a.rank, "prompt_tokens": a.prompt_tokens,
            "new_tokens": a.new_tokens, "repeats": a.repeats, "threads": a.threads, "device": a.device,
            "torch": torch.__version__}
    return {"meta": meta, "results": res}


def table(out: dict) -> str:
    lines = ["| case | s / generated token | vs one LoRA (KV cache) | peak MiB of one generation | vs one LoRA | "
             "mixture's own MiB |", "|---|---|---|---|---|---|"]
    for c, v in out["results"].items():
        pk, pr = v["peak_mib"], v["peak_ratio_to_lora"]
        lines.append(f"| {c} | {v['s_per_token']:.4f} | {v['ratio_to_lora']:.2f}x | "
                     f"{'-' if pk is None else f'{pk:.1f}'} | {'-' if pr is None else f'{pr:.2f}x'} | "
                     f"{v['extra_mib']:.2f} |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="folder, hub id or .gguf (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--adapters", type=int, default=3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "xlora_speed.json")
    return p


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("lora_diffusion").setLevel(logging.WARNING)
    out = run(a)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1))
    print(table(out))  # noqa: T201


if __name__ == "__main__":
    main()
