"""Sampling time with k = 1, 2, 3 LoRAs: gated vs static unfused vs diffusers set_adapters (same files) vs fused.

    python benchmarks/bench_fusion.py --library outputs/demo_library --threads 1          # the demo model, CPU
    python benchmarks/bench_fusion.py --size 128 --device cuda --dtype fp16                 # larger latents, GPU
    python benchmarks/bench_fusion.py --unet sd15 --steps 1 --reps 2 --threads 1            # SD1.5-sized layers, CPU
    python benchmarks/bench_fusion.py --unet sd15 --steps 1 --ks 3 --paired-rounds 30 --configs plain,fused,base

``--unet sd15``: the real SD1.5 UNet config (tests/fixtures/sd15-unet.json: 320-1280 channels, 768-d cross
attention) with random weights and ``--sd-layers`` resnet/attention layers per block (SD1.5: 2; default 1 so one
step takes seconds on one CPU thread), on ``--latent`` x ``--latent`` latents, with random prompt embeddings
(77 x 768) in place of a text encoder; three LoRAs of ``--rank`` (default 32, kohya's common dim) on the kohya
SD1.5 targets (attention q/k/v/out, proj_in/proj_out (1x1 convs in SD1.5), feed-forward), random weights, written
as diffusers files and loaded by both sides. Both pipelines share the UNet's base weights (one copy in memory).

One run, the same LoRA files for every row (the demo library's ring, dotted, heart; written once more in the
diffusers format for diffusers/PEFT), the same prompt, seed and step count; the UNet loop only
(``output_type="latent"``). Calls are interleaved across configurations (round-robin) so a busy machine slows all
of them alike; the median of ``--reps`` calls is reported (``--stat min``: the fastest, the least disturbed by
other jobs on a shared machine; ``--clock cpu``: the process's CPU time instead of wall-clock, which other jobs on a
shared CPU disturb far less). Ratios (targets from issue 12):

- gated / static unfused <= 1.3 (gated: with the per-role terms, the default; gated_compiled: the same gate with
  ``compile=True``, one fused kernel per layer, compiled in the warm-up round; gated_shared: ``per_role=False``,
  the paper's gate);  static unfused / diffusers set_adapters <= 1.0;  fused / plain within 3% (``plain``: the
  same base model with no adapter loaded, no wrappers; ``base``: ours with the LoRAs loaded and disabled).

``--paired-rounds N --configs plain,fused,base``: instead of the table, N rounds that call each listed
configuration once (order alternating), and per round each one's time divided by the first one's; the median of
those ratios with its distribution-free 95% interval, quartiles and range (small differences such as fused vs
plain, which a ratio of two medians taken minutes apart on a shared machine cannot resolve).

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
from dataclasses import dataclass
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
from lora_diffusion.inject.presets import PRESETS  # noqa: E402

log = logging.getLogger("bench_fusion")
NAMES = ("ring", "dotted", "heart")
SD_NAMES = ("lora_a", "lora_b", "lora_c")
SD_TARGETS = PRESETS["unet-attn-proj"] + PRESETS["unet-attn-ff"][1:]  # kohya's SD1.5 LoRA targets
CONFIGS = ("plain", "base", "lora-1", "fused", "static", "diffusers", "gated", "gated_compiled", "gated_shared", "klora",
           "scheduled", "mole")
PROMPT = "a red dotted ring on a blue background"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SD15_CONFIG = ROOT / "tests" / "fixtures" / "sd15-unet.json"


@dataclass
class Bench:
    """Our pipeline and the diffusers reference (same LoRA files), the LoRA names, the prompt arguments."""

    ours: Any
    ref: Any
    plain: Any  # the same base model without any adapter (no wrappers): what "base speed" means for a user
    names: tuple[str, ...]
    prompt: dict[str, Any]  # the pipeline call's prompt (a string, or embeddings for --unet sd15)
    size: int  # image height and width in pixels


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def call(b: Bench, pipe: Any, args: argparse.Namespace) -> float:
    """Seconds for one pipeline call: wall-clock, or with ``--clock cpu`` this process's CPU time (on a shared
    CPU the time the call itself computed, not the time other jobs held the cores)."""
    return clocked(b, pipe, args)[args.clock]


def clocked(b: Bench, pipe: Any, args: argparse.Namespace) -> dict[str, float]:
    """{"wall": seconds, "cpu": seconds of this process's CPU time} for one pipeline call."""
    g = torch.Generator().manual_seed(0)
    _sync(args.device)
    w0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        pipe(**b.prompt, num_inference_steps=args.steps, guidance_scale=4.0, generator=g, output_type="latent",
             height=b.size, width=b.size)
    _sync(args.device)
    return {"wall": time.perf_counter() - w0, "cpu": time.process_time() - c0}


def configs(k: int, b: Bench) -> dict[str, tuple[Any, Any]]:
    """name -> (pipeline, setup function)."""
    names, ours, ref = list(b.names[:k]), b.ours, b.ref

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

    return {"plain": (b.plain, lambda: None), "base": (ours, base), "lora-1": (ours, one),
            "fused": (ours, our("static", fuse=True)),
            "static": (ours, our("static")), "diffusers": (ref, diffusers), "gated": (ours, our("gated")),
            "gated_compiled": (ours, our("gated", compile=True)),
            "gated_shared": (ours, our("gated", per_role=False)), "klora": (ours, our("klora")) if k == 2 else None,
            "scheduled": (ours, our("scheduled")), "mole": (ours, our("mole")) if k >= 2 else None}


def reset(b: Bench, pipe: Any) -> None:
    """After a configuration's call: the reference's LoRAs off, our fusion removed (fused weights restored)."""
    if pipe is b.ref:
        b.ref.disable_lora()
    unfuse(b.ours)


def peak_mib(b: Bench, pipe: Any, args: argparse.Namespace) -> float | None:
    """Peak memory of one call above the memory before it (CPU: VmRSS/VmHWM; CUDA: max allocated)."""
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call(b, pipe, args)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    trim()
    before = rss_kib("VmRSS")
    if before is None or not reset_hwm():
        return None
    call(b, pipe, args)
    return (rss_kib("VmHWM") - before) / 1024


def build_demo(args: argparse.Namespace, tmp: Path) -> Bench:
    """The demo model, the demo library's ring, dotted and heart (re-saved as diffusers files for the reference)."""
    from lora_diffusion.generate import install_timestep_hook, load_pipeline

    dtype = DTYPES[args.dtype]
    ours, ref, plain = (load_pipeline(None, dtype).to(args.device) for _ in range(3))
    for p in (ours, ref, plain):
        p.set_progress_bar_config(disable=True)
    for n in NAMES:
        ld.load_adapter(ours, Path(args.library) / f"{n}.safetensors", name=n)
        ld.save_adapter(ours, tmp / f"{n}.safetensors", n, format="diffusers")
        ref.load_lora_weights(str(tmp / f"{n}.safetensors"), adapter_name=n)
    install_timestep_hook(ours.unet, ours.scheduler.config.num_train_timesteps)
    return Bench(ours, ref, plain, NAMES, {"prompt": PROMPT}, args.size)


def sd_unets(layers: int, dtype: torch.dtype, n: int = 3) -> list[Any]:
    """``n`` SD1.5-config UNets (random weights, seed 0, ``layers`` per block) sharing every base tensor."""
    from diffusers import UNet2DConditionModel

    cfg = {k: v for k, v in json.loads(SD15_CONFIG.read_text()).items() if not k.startswith("_")}
    cfg["layers_per_block"] = layers
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg).to(dtype).eval()
    twins = []
    for _ in range(n - 1):
        with torch.device("meta"):
            twin = UNet2DConditionModel(**cfg)
        twin.load_state_dict(unet.state_dict(), assign=True)  # the same tensors: fused weights are restored after use
        twins.append(twin.eval())
    return [unet, *twins]


def random_loras(unet: Any, rank: int, tmp: Path) -> list[Path]:
    """SD_NAMES as diffusers files: LoRAs of ``rank`` on SD_TARGETS, A as initialised, B random (seeded)."""
    paths = []
    for i, n in enumerate(SD_NAMES):
        ld.add_adapter(unet, ld.AdapterSpec(rank=rank, targets=SD_TARGETS, seed=i), name=n, trainable=False)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for pname, p in ld.adapter_parameters(unet, n):
                if pname.endswith("lora_B"):
                    p.copy_(0.02 * torch.randn(p.shape, generator=g).to(p.dtype))
        paths.append(ld.save_adapter(unet, tmp / f"{n}.safetensors", n, format="diffusers"))
        ld.remove_adapters(unet, [n])
    return paths


def build_sd(args: argparse.Namespace, tmp: Path) -> Bench:
    """The demo pipeline's scheduler (and unused text encoder/VAE) around two SD1.5-config UNets (see the top)."""
    from lora_diffusion.generate import install_timestep_hook, load_pipeline

    dtype = DTYPES[args.dtype]
    demo = load_pipeline(None, dtype)
    unets = sd_unets(args.sd_layers, dtype)
    ours, ref, plain = (type(demo)(**{**demo.components, "unet": u}).to(args.device) for u in unets)
    unet = unets[0]
    for p in (ours, ref, plain):
        p.set_progress_bar_config(disable=True)
    for n, path in zip(SD_NAMES, random_loras(unet, args.rank, tmp)):
        ld.load_adapter(ours, path, name=n)
        ref.load_lora_weights(str(path), adapter_name=n)
    install_timestep_hook(ours.unet, ours.scheduler.config.num_train_timesteps)
    g = torch.Generator().manual_seed(0)
    emb = [torch.randn(1, 77, unet.config.cross_attention_dim, generator=g).to(args.device, dtype) for _ in range(2)]
    prompt = {"prompt_embeds": emb[0], "negative_prompt_embeds": emb[1]}
    return Bench(ours, ref, plain, SD_NAMES, prompt, args.latent * ours.vae_scale_factor)


def selected(k: int, b: Bench, args: argparse.Namespace) -> dict[str, tuple[Any, Any]]:
    keep = set(args.configs.split(",")) if args.configs else None
    return {n: c for n, c in configs(k, b).items() if c is not None and (keep is None or n in keep)}


def time_k(k: int, b: Bench, args: argparse.Namespace) -> dict[str, float]:
    """{config: median (``--stat``) seconds per call (``--clock``)} over ``args.reps`` interleaved rounds after one
    warm-up round; also ``<config>/<clock>_<stat>`` for both clocks and both statistics (the same calls)."""
    cfgs = selected(k, b, args)
    times: dict[str, list[dict[str, float]]] = {n: [] for n in cfgs}
    graphs = 0
    for rep in range(args.reps + 1):  # the first round warms up (and compiles the compiled gate)
        for n, (pipe, setup) in cfgs.items():
            setup()
            t = clocked(b, pipe, args)
            if rep:
                times[n].append(t)
            reset(b, pipe)
        if rep == 0:
            graphs = compiled_graphs()
    if compiled_graphs() != graphs:
        log.warning("k=%d: torch.compile built %d graphs during the timed rounds", k, compiled_graphs() - graphs)
    stats = {"min": min, "median": statistics.median}
    out = {n: stats[args.stat]([t[args.clock] for t in v]) for n, v in times.items()}
    out.update({f"{n}/{c}_{st}": f([t[c] for t in v]) for n, v in times.items() for c in ("wall", "cpu")
                for st, f in stats.items()})
    for n, (pipe, setup) in cfgs.items() if args.memory else ():
        setup()
        out[f"{n}/peak_mib"] = peak_mib(b, pipe, args)
        reset(b, pipe)
    return out


def paired_k(k: int, b: Bench, args: argparse.Namespace) -> dict[str, list[float]]:
    """``--paired-rounds``: {config: its time / the first listed configuration's, one ratio per round}. Each round
    calls every configuration of ``--configs`` once, in forward order on odd rounds and reversed on even ones,
    after one warm-up round: the two sides of a ratio run seconds apart, so a change in the machine's load hits
    both (a ratio of medians taken minutes apart does not cancel it)."""
    cfgs = selected(k, b, args)
    order = [n for n in args.configs.split(",") if n in cfgs]
    if len(order) < 2:
        raise SystemExit(f"--paired-rounds: --configs needs a reference and at least one more of {CONFIGS}")
    ratios: dict[str, list[float]] = {n: [] for n in order[1:]}
    for rnd in range(args.paired_rounds + 1):
        t = {}
        for n in order if rnd % 2 else order[::-1]:
            pipe, setup = cfgs[n]
            setup()
            t[n] = call(b, pipe, args)
            reset(b, pipe)
        for n in ratios if rnd else ():
            ratios[n].append(t[n] / t[order[0]])
        if rnd and rnd % 10 == 0:
            log.info("k=%d: %d of %d rounds", k, rnd, args.paired_rounds)
    return ratios


def paired_table(res: dict[int, dict[str, list[float]]], args: argparse.Namespace) -> str:
    """Per k and configuration: the median of the per-round ratios, its 95% interval, quartiles, range."""
    from stats import median_ci

    ref = args.configs.split(",")[0]
    lines = [f"| k | config | median ratio to {ref} | 95% CI of the median | quartiles | min-max | rounds |",
             "|---|---|---|---|---|---|---|"]
    for k, per in res.items():
        for n, xs in per.items():
            med, lo, hi = median_ci(xs)
            q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
            lines.append(f"| {k} | {n} | {med:.4f} | {lo:.4f}-{hi:.4f} | {q[0]:.4f}-{q[2]:.4f} | "
                         f"{min(xs):.4f}-{max(xs):.4f} | {len(xs)} |")
    lines.append(f"\n{describe(args)}; {args.clock} clock, per-round ratios of interleaved calls (order alternating)")
    return "\n".join(lines)


def measure(args: argparse.Namespace) -> dict[int, dict[str, float]]:
    """{k: {config: median seconds per call}}; with ``args.memory`` also ``<config>/peak_mib`` (one call each)."""
    out: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        b = (build_sd if args.unet == "sd15" else build_demo)(args, Path(tmp))
        if args.profile:
            return profile(b, args)
        for k in (int(x) for x in args.ks.split(",")) if args.paired_rounds else ():
            out[k] = paired_k(k, b, args)
            log.info("k=%d: per-round ratios to %s: %s", k, args.configs.split(",")[0], {
                n: round(statistics.median(v), 4) for n, v in out[k].items()})
            if args.out:  # the figures so far (a time-boxed run keeps its finished k)
                args.out.write_text(json.dumps({str(j): v for j, v in out.items()}, indent=1))
        if args.paired_rounds:
            return out
        for k in (int(x) for x in args.ks.split(",")):
            out[k] = time_k(k, b, args)
            if args.out:  # the figures so far (a time-boxed run keeps its finished k)
                args.out.write_text(json.dumps({str(j): v for j, v in out.items()}, indent=1))
            log.info("k=%d: %s; torch.compile graphs so far: %d", k, ", ".join(
                f"{n} {1000 * v:.0f} ms" for n, v in out[k].items() if "/" not in n), compiled_graphs())
    return out


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process (the compiled gate: none may appear in timed rounds)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def profile(b: Bench, args: argparse.Namespace) -> dict[int, dict[str, float]]:
    """torch.profiler over one call of each selected configuration at the largest k (after one unprofiled call);
    prints the ops by self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    k = max(int(x) for x in args.ks.split(","))
    for n, (pipe, setup) in selected(k, b, args).items():
        setup()
        call(b, pipe, args)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            t = call(b, pipe, args)
        reset(b, pipe)
        print(f"\n## {n}, k = {k}: {1000 * t:.0f} ms under the profiler")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile))
    return {}


def table(res: dict[int, dict[str, float]], args: argparse.Namespace) -> str:
    cols = [c for c in CONFIGS if any(c in r for r in res.values())]
    lines = ["| k | " + " | ".join(f"{c} ms" for c in cols) + " | gated/static (<= 1.3) | gated_compiled/static | "
             "gated_shared/static | static/diffusers (<= 1.0) | fused/base | fused/plain (1 +- 0.03) |",
             "|---|" + "---|" * (len(cols) + 6)]

    def ratio(r: dict[str, float], a: str, b: str, fmt: str = ".2f") -> str:
        return f"{r[a] / r[b]:{fmt}}" if a in r and b in r else "-"

    for k, r in res.items():
        ms = " | ".join(f"{1000 * r[c]:.0f}" if c in r else "-" for c in cols)
        lines.append(f"| {k} | {ms} | {ratio(r, 'gated', 'static')} | {ratio(r, 'gated_compiled', 'static')} | "
                     f"{ratio(r, 'gated_shared', 'static')} | "
                     f"{ratio(r, 'static', 'diffusers')} | {ratio(r, 'fused', 'base', '.3f')} | "
                     f"{ratio(r, 'fused', 'plain', '.3f')} |")
    lines.append(f"\n{describe(args)}, {args.stat} of {args.reps} interleaved calls, {args.clock} clock")
    return "\n".join(lines)


RATIOS = (("gated", "static", "<= 1.3"), ("gated_compiled", "static", "<= 1.3"), ("static", "diffusers", "<= 1.0"),
          ("fused", "plain", "1 +- 0.03"), ("fused", "base", ""))


def views(res: dict[int, dict[str, float]]) -> str:
    """The target ratios under each view of the same calls: wall-clock or CPU time, median or min per config."""
    pairs = [(a, b, t) for a, b, t in RATIOS if any(f"{a}/wall_min" in r and b in r for r in res.values())]
    lines = ["| k | view | " + " | ".join(f"{a}/{b}" + (f" ({t})" if t else "") for a, b, t in pairs) + " |",
             "|---|---|" + "---|" * len(pairs)]
    for k, r in res.items():
        for view in ("wall_median", "wall_min", "cpu_median", "cpu_min"):
            cells = " | ".join(f"{r[f'{a}/{view}'] / r[f'{b}/{view}']:.3f}" for a, b, _ in pairs)
            lines.append(f"| {k} | {view.replace('_', ' ')} | {cells} |")
    return "\n".join(lines)


def describe(args: argparse.Namespace) -> str:
    model = (f"demo model, {args.size}x{args.size} px" if args.unet == "demo" else
             f"SD1.5-config UNet ({args.sd_layers} layers per block, random weights), {args.latent}x{args.latent} "
             f"latents, LoRAs rank {args.rank}")
    return (f"{model}, {args.steps} steps, CFG (UNet batch 2), {args.dtype}, {args.device}, "
            f"torch threads {torch.get_num_threads()}")


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
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall-clock, or the process's CPU time (CPU runs on a shared machine; one thread)")
    p.add_argument("--stat", choices=["median", "min"], default="median", help="per configuration, of --reps calls")
    p.add_argument("--memory", action="store_true", help="also the peak memory of one call per configuration")
    p.add_argument("--out", type=Path, default=None, help="the figures as JSON (default outputs/bench_fusion.json, "
                   "outputs/bench_fusion_sd15.json with --unet sd15)")
    p.add_argument("--unet", choices=["demo", "sd15"], default="demo",
                   help="demo: the embedded demo model and library; sd15: SD1.5-config UNet, random weights and LoRAs")
    p.add_argument("--sd-layers", type=int, default=1, help="--unet sd15: layers per block (SD1.5 itself: 2)")
    p.add_argument("--latent", type=int, default=32, help="--unet sd15: latent height and width (SD1.5 at 512 px: 64)")
    p.add_argument("--rank", type=int, default=32, help="--unet sd15: the random LoRAs' rank")
    p.add_argument("--paired-rounds", type=int, default=0, metavar="N",
                   help="instead of the table: N rounds calling each of --configs once (order alternating); per "
                        "round each one's time / the first one's; the median ratio with its 95%% interval")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="instead of timing: torch.profiler over one call per configuration at the largest k, "
                        "the top ROWS ops by self CPU time")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("lora_diffusion", "diffusers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    stem = ("bench_fusion_sd15" if args.unet == "sd15" else "bench_fusion") + ("_paired" if args.paired_rounds else "")
    args.out = args.out or ROOT / "outputs" / f"{stem}.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    res = measure(args)
    if args.profile:
        return
    args.out.write_text(json.dumps({str(k): v for k, v in res.items()}, indent=1))
    print(paired_table(res, args) if args.paired_rounds else table(res, args) + "\n\n" + views(res))


if __name__ == "__main__":
    main()
