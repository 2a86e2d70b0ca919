"""Time and memory of every mixture vs the single-LoRA model, per generated token (LLM) and per image (UNet): one command.

    python benchmarks/bench_mixtures.py                      # SmolLM2 (offline GGUF) + the demo UNet, CPU, 1 thread
    python benchmarks/bench_mixtures.py --device cuda --library outputs/demo_library

Two parts, one process, each measured round-robin against its own single-LoRA reference (ratios within a part):

* **LLM** (``xlora_speed.py``): X-LoRA (two cached passes), MoLE, LAG (Arrow top-min(20, N) + SpectR), MoA (soft,
  its defaults) over ``--adapters`` random rank-8 LoRAs on the 7 Llama linears, vs one LoRA with the KV cache;
  seconds per generated token (greedy, ``--new-tokens`` after ``--prompt-tokens``) and the peak memory of one
  generation above the memory before it
* **UNet** (``bench_fusion.py``): MoLE (untrained gates: the cost does not depend on their values) and gated fusion
  over the demo library's ring, dotted, heart vs the first of them alone (and the static sum), the demo model's
  sampler (``--steps`` steps, CFG, latents only); seconds per image and the peak memory of one image

The UNet part needs the demo library (``python -m training.build_demo_library --out outputs/demo_library``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
import bench_fusion  # noqa: E402
import xlora_speed  # noqa: E402

log = logging.getLogger("bench_mixtures")
LLM_CASES = ("lora", "xlora", "mole", "lag", "moa")
UNET_CONFIGS = ("lora-1", "static", "gated", "mole")


def llm_part(a: argparse.Namespace) -> dict[str, Any]:
    args = xlora_speed.parser().parse_args(
        ["--cases", ",".join(LLM_CASES), "--adapters", str(a.adapters), "--new-tokens", str(a.new_tokens),
         "--prompt-tokens", str(a.prompt_tokens), "--repeats", str(a.repeats), "--threads", str(a.threads),
         "--device", a.device] + (["--model", a.model] if a.model else []))
    return xlora_speed.run(args)


def unet_part(a: argparse.Namespace) -> dict[str, Any]:
    args = bench_fusion.parser().parse_args(
        ["--library", a.library, "--steps", str(a.steps), "--reps", str(a.repeats), "--threads", str(a.threads),
         "--device", a.device, "--ks", "3", "--configs", ",".join(UNET_CONFIGS), "--memory"])
    return bench_fusion.measure(args)[3]


def rows(llm: dict[str, Any] | None, unet: dict[str, float] | None, a: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for c, v in (llm or {}).get("results", {}).items():
        over = {"lora": "1", "moa": "its own 7 experts"}.get(c, str(a.adapters))
        out.append({"model": "LLM", "mixture": c, "over": over, "unit": "token",
                    "seconds": v["s_per_token"], "time_ratio": v["ratio_to_lora"], "peak_mib": v["peak_mib"],
                    "peak_ratio": v["peak_ratio_to_lora"], "own_mib": v["extra_mib"]})
    ref_t, ref_m = (unet or {}).get("lora-1"), (unet or {}).get("lora-1/peak_mib")
    for c in UNET_CONFIGS if unet else ():
        pk = unet.get(f"{c}/peak_mib")
        out.append({"model": "UNet", "mixture": c, "over": "1" if c == "lora-1" else "3", "unit": "image",
                    "seconds": unet[c], "time_ratio": unet[c] / ref_t,
                    "peak_mib": pk, "peak_ratio": pk / ref_m if pk is not None and ref_m else None, "own_mib": None})
    return out


def table(rs: list[dict[str, Any]]) -> str:
    def f(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    lines = ["| model | mixture | LoRAs | s per token / image | x single LoRA | peak MiB (one generation / image) | "
             "x single LoRA | mixture's own MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in rs:
        lines.append(f"| {r['model']} | {r['mixture']} | {r['over']} | {r['seconds']:.4f} / {r['unit']} | "
                     f"{r['time_ratio']:.2f}x | {f(r['peak_mib'], '.1f')} | "
                     f"{f(r['peak_ratio'], '.2f')}{'x' if r['peak_ratio'] is not None else ''} | "
                     f"{f(r['own_mib'], '.2f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="LLM: folder, hub id or .gguf (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--adapters", type=int, default=3, help="LLM: LoRAs mixed")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--library", default=str(ROOT / "outputs" / "demo_library"), help="UNet: the demo library")
    p.add_argument("--steps", type=int, default=20, help="UNet: sampling steps per image")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds per part")
    p.add_argument("--parts", default="llm,unet")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_mixtures.json")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("lora_diffusion", "diffusers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(a.threads)
    parts = a.parts.split(",")
    llm = llm_part(a) if "llm" in parts else None
    unet = unet_part(a) if "unet" in parts else None
    rs = rows(llm, unet, a)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "llm_meta": (llm or {}).get("meta"),
                                 "rows": rs}, indent=1))
    print(table(rs))  # noqa: T201 (the report)


if __name__ == "__main__":
    main()
