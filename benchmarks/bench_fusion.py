"""Sampling time with k = 1, 2, 3 LoRAs: gated vs static unfused vs diffusers set_adapters (same files) vs fused.

    python benchmarks/bench_fusion.py --library outputs/demo_library --threads 1          # the demo model, CPU
    python benchmarks/bench_fusion.py --size 128 --device cuda --dtype fp16                 # larger latents, GPU

One run, the same LoRA files for every row (the demo library's ring, dotted, heart; written once more in the
diffusers format for diffusers/PEFT), the same prompt, seed and step count; the UNet loop only
(``output_type="latent"``). Calls are interleaved across configurations (round-robin) so a busy machine slows all
of them alike; the median of ``--reps`` calls is reported. Ratios (targets from issue 12):

- gated / static unfused <= 1.3 (gated: with the per-role terms, the default; gated_shared: ``per_role=False``,
  the paper's gate);  static unfused / diffusers set_adapters <= 1.0;  fused / base within 3%.

Also measured in each k block: ``lora-1`` (the first LoRA alone: the single-LoRA model) and ``mole`` (MoLE gates,
untrained); ``--memory`` adds the peak memory of one call per configuration (``benchmarks/bench_mixtures.py`` reads
these as ratios to ``lora-1``).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
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
from lora_diffusion.fusion import fuse, unfuse  # noqa: E402

log = logging.getLogger("bench_fusion")
NAMES = ("ring", "dotted", "heart")
CONFIGS = ("base", "lora-1", "fused", "static", "diffusers", "gated", "gated_shared", "klora", "scheduled", "mole")
PROMPT = "a red dotted ring on a blue background"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def call(pipe: Any, args: argparse.Namespace) -> float:
    g = torch.Generator().manual_seed(0)
    _sync(args.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=4.0, generator=g, output_type="latent",
             height=args.size, width=args.size)
    _sync(args.device)
    return time.perf_counter() - t0


def configs(k: int, ours: Any, ref: Any) -> dict[str, tuple[Any, Any]]:
    """name -> (pipeline, setup function)."""
    names = list(NAMES[:k])

    def our(method: str, **kw: Any):
        return lambda: fuse(ours, names, method, **kw)

    def base():
        unfuse(ours)
        ld.disable_adapters(ours)

    def diffusers():
        ref.enable_lora()
        ref.set_adapters(names, [1.0] * k)

    def one():
        unfuse(ours)
        ld.set_adapters(ours, names[:1])

    return {"base": (ours, base), "lora-1": (ours, one), "fused": (ours, our("static", fuse=True)),
            "static": (ours, our("static")), "diffusers": (ref, diffusers), "gated": (ours, our("gated")),
            "gated_shared": (ours, our("gated", per_role=False)), "klora": (ours, our("klora")) if k == 2 else None,
            "scheduled": (ours, our("scheduled")), "mole": (ours, our("mole")) if k >= 2 else None}


def peak_mib(pipe: Any, args: argparse.Namespace) -> float | None:
    """Peak memory of one call above the memory before it (CPU: VmRSS/VmHWM; CUDA: max allocated)."""
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call(pipe, args)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    trim()
    before = rss_kib("VmRSS")
    if before is None or not reset_hwm():
        return None
    call(pipe, args)
    return (rss_kib("VmHWM") - before) / 1024


def build(args: argparse.Namespace, tmp: Path) -> tuple[Any, Any]:
    from lora_diffusion.generate import install_timestep_hook, load_pipeline

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    ours, ref = load_pipeline(None, dtype).to(args.device), load_pipeline(None, dtype).to(args.device)
    for p in (ours, ref):
        p.set_progress_bar_config(disable=True)
    for n in NAMES:
        ld.load_adapter(ours, Path(args.library) / f"{n}.safetensors", name=n)
        ld.save_adapter(ours, tmp / f"{n}.safetensors", n, format="diffusers")
        ref.load_lora_weights(str(tmp / f"{n}.safetensors"), adapter_name=n)
    install_timestep_hook(ours.unet, ours.scheduler.config.num_train_timesteps)
    return ours, ref


def measure(args: argparse.Namespace) -> dict[int, dict[str, float]]:
    """{k: {config: median seconds per call}}; with ``args.memory`` also ``<config>/peak_mib`` (one call each)."""
    out: dict[int, dict[str, float]] = {}
    keep = set(args.configs.split(",")) if args.configs else None
    with tempfile.TemporaryDirectory() as tmp:
        ours, ref = build(args, Path(tmp))
        for k in (int(x) for x in args.ks.split(",")):
            cfgs = {n: c for n, c in configs(k, ours, ref).items() if c is not None and (keep is None or n in keep)}
            times: dict[str, list[float]] = {n: [] for n in cfgs}
            for rep in range(args.reps + 1):  # the first round warms up
                for n, (pipe, setup) in cfgs.items():
                    setup()
                    t = call(pipe, args)
                    if rep:
                        times[n].append(t)
                    if pipe is ref:
                        ref.disable_lora()
                unfuse(ours)
            out[k] = {n: statistics.median(v) for n, v in times.items()}
            for n, (pipe, setup) in cfgs.items() if args.memory else ():
                setup()
                out[k][f"{n}/peak_mib"] = peak_mib(pipe, args)
                if pipe is ref:
                    ref.disable_lora()
                unfuse(ours)
            log.info("k=%d: %s", k, ", ".join(f"{n} {1000 * v:.0f} ms" for n, v in out[k].items() if "/" not in n))
    return out


def table(res: dict[int, dict[str, float]], args: argparse.Namespace) -> str:
    cols = ["base", "lora-1", "fused", "static", "diffusers", "gated", "gated_shared", "klora", "scheduled", "mole"]
    lines = ["| k | " + " | ".join(f"{c} ms" for c in cols) + " | gated/static (<= 1.3) | gated_shared/static | "
             "static/diffusers (<= 1.0) | fused/base (1 +- 0.03) |", "|---|" + "---|" * (len(cols) + 4)]

    def ratio(r: dict[str, float], a: str, b: str, fmt: str = ".2f") -> str:
        return f"{r[a] / r[b]:{fmt}}" if a in r and b in r else "-"

    for k, r in res.items():
        ms = " | ".join(f"{1000 * r[c]:.0f}" if c in r else "-" for c in cols)
        lines.append(f"| {k} | {ms} | {ratio(r, 'gated', 'static')} | {ratio(r, 'gated_shared', 'static')} | "
                     f"{ratio(r, 'static', 'diffusers')} | {ratio(r, 'fused', 'base', '.3f')} |")
    lines.append(f"\n{args.steps} steps, {args.size}x{args.size} px, CFG (UNet batch 2), {args.dtype}, {args.device}, "
                 f"torch threads {torch.get_num_threads()}, median of {args.reps} interleaved calls")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--library", default=str(ROOT / "outputs" / "demo_library"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=32, help="image size in pixels (the demo model: 32; larger = more work)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ks", default="1,2,3", help="numbers of LoRAs blended, comma-separated")
    p.add_argument("--configs", default="", help=f"a comma-separated subset of {', '.join(CONFIGS)} (default: all)")
    p.add_argument("--memory", action="store_true", help="also the peak memory of one call per configuration")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_fusion.json")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("lora_diffusion", "diffusers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    res = measure(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({str(k): v for k, v in res.items()}, indent=1))
    print(table(res, args))


if __name__ == "__main__":
    main()
