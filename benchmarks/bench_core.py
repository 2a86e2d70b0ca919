"""Adapter core benchmark: one training step of a diffusers UNet with attention adapters.

Compares, on the same UNet weights and the same inputs:

* ``ours-lora``  -- ``ld.add_adapter(unet, AdapterSpec("lora", rank=r, targets="unet-attn"))``
* ``peft-lora``  -- ``unet.add_adapter(peft.LoraConfig(r=r, lora_alpha=r, init_lora_weights="gaussian",
  target_modules=["to_q", "to_k", "to_v", "to_out.0"]))``
* ``ours-tlora`` -- ``AdapterSpec("tlora", rank=r, options={"min_rank": r // 2})``, timestep set every
  step with ``ld.set_timestep(unet, t)``
* ``peft-lorafa`` -- ``peft-lora`` (default init) trained by ``peft.optimizers.create_lorafa_optimizer`` (A frozen,
  B's gradient projected); compared with ``ours-lorafa`` (``variant_optimizer``: the same projection)
* ``peft-adalora`` -- ``peft.AdaLoraModel(unet, AdaLoraConfig(init_r=r, target_r=8, total_step=...))``, the step
  adding PEFT's orthogonality penalty (its ``forward`` only adds it to a ``.loss`` output, which a UNet has not)
  and calling ``update_and_allocate`` after ``AdamW.step``; compared with ``ours-adalora``

A training step is forward + MSE loss + backward + ``AdamW.step`` + ``zero_grad(set_to_none=True)``
over the adapter parameters only (everything else frozen).

How it measures (each measurement in a fresh subprocess of this script):

* Step time: one timing worker builds one UNet per case (same seed, so the same weights) and runs
  the cases round-robin, one step each, rotating the order every round. Every case therefore sees
  the same machine load (a 2-core CPU shared with other jobs is noisy). The ratios use the "quiet"
  rounds, whose total time is within ``--quiet-slack`` of the fastest round (whole rounds are dropped,
  so no case is favoured); median over all rounds, min and per-round paired ratios are shown too.
* Peak memory: one worker per case. After the UNet is built the baseline is taken, then the adapter
  is added, the optimizer built and ``--mem-steps`` steps run.
  - CPU: peak RSS above the baseline (VmHWM is reset through /proc/self/clear_refs after the baseline,
    ``ru_maxrss`` is the fallback), and the peak of live torch tensor bytes above the baseline: the
    adapter's persistent tensors (parameters, buffers, AdamW state) plus the peak of one steady-state
    step traced with the torch profiler's allocator events (``profile_memory=True``).
  - CUDA: ``torch.cuda.max_memory_allocated()`` above ``memory_allocated()`` at the baseline.

Usage::

    python benchmarks/bench_core.py                      # reduced SD1.5-like UNet, CPU, a few minutes
    python benchmarks/bench_core.py --config sd15 --device cuda --steps 50
    python benchmarks/bench_core.py --profile            # also print the top ops per case (torch.profiler)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks.procmem import reset_hwm, rss_kib, trim  # noqa: E402

SD15_CONFIG = ROOT / "tests" / "fixtures" / "sd15-unet.json"
CASES = ("ours-lora", "peft-lora", "ours-tlora")


def all_cases() -> list[str]:
    """The default cases plus ``ours-<variant>`` for every registered variant that adapts Linear layers."""
    import lora_diffusion as ld

    return list(CASES) + [f"ours-{v}" for v in ld.variant_names()
                          if f"ours-{v}" not in CASES and "linear" in ld.get_variant(v).kinds] + list(PEFT_PEERS)


PEFT_PEERS = {"peft-lorafa": "ours-lorafa", "peft-adalora": "ours-adalora"}  # PEFT case -> our case it is compared to
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
RESULT_TAG = "BENCH_RESULT "
MiB = 2**20


# --------------------------------------------------------------------------- model and inputs
def unet_config(name: str) -> dict[str, Any]:
    """The SD1.5 UNet config, or (``small``) the same architecture scaled down to run on a laptop CPU."""
    cfg = json.loads(SD15_CONFIG.read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    if name == "small":
        cfg.update(
            block_out_channels=[64, 128, 256],
            down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            cross_attention_dim=256,
            sample_size=32,
        )
    elif name != "sd15":
        raise SystemExit(f"--config: expected 'small' or 'sd15', found {name!r}")
    return cfg


def build_unet(args: argparse.Namespace):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(args.seed)  # same seed -> same weights in every case and every process
    unet = UNet2DConditionModel(**unet_config(args.config)).to(args.device)
    return unet if args.dtype == "float32" else unet.to(DTYPES[args.dtype])


def make_inputs(args: argparse.Namespace, cross_dim: int, n_steps: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(args.seed + 1)
    side = args.resolution // 8
    dt = DTYPES[args.dtype]
    shape = (args.batch, 4, side, side)
    return {
        "sample": torch.randn(shape, generator=g).to(args.device, dt),
        "target": torch.randn(shape, generator=g).to(args.device, dt),
        "encoder_hidden_states": torch.randn(args.batch, 77, cross_dim, generator=g).to(args.device, dt),
        "timesteps": torch.randint(0, 1000, (n_steps,), generator=g).tolist(),  # one t per step, same for all cases
    }


def add_case_adapter(unet, case: str, args: argparse.Namespace) -> Any:
    """Add the case's adapter; returns the PEFT tuner for ``peft-lorafa``/``peft-adalora``, else None."""
    if case == "peft-lorafa":  # a PEFT tuner (create_lorafa_optimizer reads its active_adapters/peft_config)
        from peft import LoraConfig, LoraModel

        cfg = LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS, lora_dropout=0.0)
        return LoraModel(unet, cfg, "default")  # injects LoRA layers into unet in place
    if case == "peft-adalora":
        from peft import AdaLoraConfig, AdaLoraModel

        cfg = AdaLoraConfig(init_r=args.rank, target_r=8, lora_alpha=args.rank, target_modules=TARGETS,
                            total_step=args.warmup + args.steps + 1000, lora_dropout=0.0)
        return AdaLoraModel(unet, cfg, "default")  # injects SVDLinear layers into unet in place
    if case == "peft-lora":
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS,
                                    init_lora_weights="gaussian", lora_dropout=0.0))
        for n, p in unet.named_parameters():  # PEFT already does this; make it explicit
            p.requires_grad_("lora_" in n)
        return None
    import lora_diffusion as ld

    if case == "ours-lora":
        spec = ld.AdapterSpec(variant="lora", rank=args.rank, targets="unet-attn", options={"init": "gaussian"})
    elif case == "ours-tlora":
        spec = ld.AdapterSpec(variant="tlora", rank=args.rank, targets="unet-attn",
                              options={"min_rank": args.min_rank or args.rank // 2})
    elif case.startswith("ours-") and case[5:] in ld.variant_names():
        from training.config import step_option_defaults

        total = args.warmup + args.steps + 1000  # SingLoRA's ramp, AdaLoRA's schedule: sized to a long run
        spec = ld.AdapterSpec(variant=case[5:], rank=args.rank, targets="unet-attn",
                              options=step_option_defaults(case[5:], {}, total))
    else:
        raise SystemExit(f"unknown case {case!r}; expected one of {all_cases()}")
    ld.add_adapter(unet, spec)
    return None


def peft_orth_reg(model: Any, weight: float) -> torch.Tensor:
    """PEFT AdaLoraModel.forward's orthogonality penalty (PEFT 0.21), for a model whose output has no ``.loss``."""
    reg, n = 0.0, 0
    for name, p in model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and "default" in name:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            reg = reg + torch.norm(cov - torch.eye(*cov.size(), out=torch.empty_like(cov)), p="fro")
            n += 1
    return weight * reg / max(n, 1)


def adapted_module_count(unet, case: str) -> int:
    if case.startswith("peft-"):
        return sum(1 for _, m in unet.named_modules() if hasattr(m, "lora_A") and len(getattr(m, "lora_A", {})) > 0)
    import lora_diffusion as ld

    return sum(1 for m in unet.modules() if isinstance(m, ld.AdaptedLayer))


def _preimport() -> None:
    import peft  # noqa: F401
    import peft.tuners.lora  # noqa: F401

    import lora_diffusion  # noqa: F401


class Runner:
    """One case: a UNet with its adapter, an AdamW over the trainable parameters, and ``step(i)``."""

    def __init__(self, case: str, args: argparse.Namespace, unet=None) -> None:
        self.case, self.args = case, args
        self.unet = unet if unet is not None else build_unet(args)
        self.tuner = add_case_adapter(self.unet, case, args)
        self.adalora = self.tuner if case == "peft-adalora" else None
        self.unet.train()
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.hooks = None
        if case == "peft-lorafa":
            from peft.optimizers import create_lorafa_optimizer

            self.opt = create_lorafa_optimizer(self.tuner, r=args.rank, lora_alpha=args.rank, lr=1e-4)
            self.params = [p for p in self.unet.parameters() if p.requires_grad]  # A is frozen now
        elif case.startswith("ours-"):  # what training.loop.fit does: step counter, post-step hook, regularization
            import lora_diffusion as ld

            self.hooks = ld.TrainingHooks(self.unet)
            self.opt = ld.variant_optimizer([self.unet], ld.param_groups(self.unet, 1e-4), lr=1e-4) or \
                torch.optim.AdamW(self.params, lr=1e-4)
        else:
            self.opt = torch.optim.AdamW(self.params, lr=1e-4)
        self.n_modules = adapted_module_count(self.unet, case)
        self.n_trainable = sum(p.numel() for p in self.params)
        if case == "ours-tlora":
            import lora_diffusion as ld

            self._set_t = lambda t: ld.set_timestep(self.unet, t)
        else:
            self._set_t = None

    def step(self, inputs: dict[str, Any], i: int) -> None:
        t = inputs["timesteps"][i % len(inputs["timesteps"])]
        if self._set_t is not None:
            self._set_t(t)
        ts = torch.full((self.args.batch,), t, device=self.args.device, dtype=torch.long)
        if self.hooks is not None:
            self.hooks.begin_step(i + 1)
        out = self.unet(inputs["sample"], ts, inputs["encoder_hidden_states"]).sample
        loss = F.mse_loss(out.float(), inputs["target"].float())
        reg = self.hooks.regularization() if self.hooks is not None else None
        if self.adalora is not None:
            reg = peft_orth_reg(self.unet, self.adalora.peft_config["default"].orth_reg_weight)
        (loss if reg is None else loss + reg).backward()
        self.opt.step()
        if self.hooks is not None:
            self.hooks.after_step(i + 1)
        if self.adalora is not None:  # after the optimizer step, before zero_grad (it reads the gradients)
            self.adalora.update_and_allocate(i + 1)
        self.opt.zero_grad(set_to_none=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- workers (subprocesses)
def worker_time(args: argparse.Namespace) -> dict[str, Any]:
    """Round-robin over the cases, one step each, rotating the order; returns per-step seconds."""
    cases = args.cases
    runners = {c: Runner(c, args) for c in cases}
    cross = runners[cases[0]].unet.config.cross_attention_dim
    inputs = make_inputs(args, cross, args.warmup + args.steps)
    times: dict[str, list[float]] = {c: [] for c in cases}
    cpu: dict[str, list[float]] = {c: [] for c in cases}
    start = time.perf_counter()
    i = 0
    while True:
        done = i - args.warmup
        if done >= args.steps and (len(quiet_rounds(times, args.quiet_slack)) >= min(args.min_quiet, done)
                                   or time.perf_counter() - start > args.max_seconds):
            break
        k = i % len(cases)
        for c in cases[k:] + cases[:k]:
            sync(args.device)
            t0, c0 = time.perf_counter(), time.process_time()
            runners[c].step(inputs, i)
            sync(args.device)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if i >= args.warmup:
                times[c].append(dt)
                cpu[c].append(dc)
        i += 1
    meta = {c: {"modules": r.n_modules, "trainable": r.n_trainable} for c, r in runners.items()}
    return {"times": times, "cpu_times": cpu, "meta": meta}


def _tensor_bytes(unet) -> int:
    seen, total = set(), 0
    for t in list(unet.parameters()) + list(unet.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _profiled_step_peak(runner: Runner, inputs: dict[str, Any], i: int) -> int:
    """Peak of live tensor bytes above the start of one step, from the profiler's allocator events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        runner.step(inputs, i)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type().name == "CPU"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def worker_mem(args: argparse.Namespace) -> dict[str, Any]:
    case = args.cases[0]
    cuda = args.device.startswith("cuda")
    _preimport()  # both libraries are imported before the baseline, whatever the case
    unet = build_unet(args)
    inputs = make_inputs(args, unet.config.cross_attention_dim, args.mem_steps + 1)
    model_bytes = _tensor_bytes(unet)
    trim()
    sync(args.device)
    rss0 = rss_kib("VmRSS")
    hwm_ok = reset_hwm()
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if cuda:
        alloc0 = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    runner = Runner(case, args, unet=unet)
    for i in range(args.mem_steps):
        runner.step(inputs, i)
    sync(args.device)

    out: dict[str, Any] = {"case": case, "modules": runner.n_modules, "trainable": runner.n_trainable}
    if hwm_ok and rss0 is not None:
        out["rss_peak_mib"] = (rss_kib("VmHWM") - rss0) / 1024
        out["rss_method"] = "VmHWM - VmRSS(baseline)"
    else:  # ru_maxrss only grows: right only if the run's peak exceeds the build's
        out["rss_peak_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss0) / 1024
        out["rss_method"] = "ru_maxrss increase"
    adapter_bytes = _tensor_bytes(unet) - model_bytes
    opt_bytes = sum(t.numel() * t.element_size() for st in runner.opt.state.values()
                    for t in st.values() if isinstance(t, torch.Tensor))
    # PEFT AdaLoRA keeps its importance scores in plain dicts (RankAllocator), ours in buffers: count both
    alloc = getattr(runner.adalora, "rankallocator", None)
    alloc_bytes = sum(t.numel() * t.element_size() for d in (alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc)
                      for t in d.values()) if alloc is not None else 0
    out["persistent_mib"] = (adapter_bytes + opt_bytes + alloc_bytes) / MiB
    if cuda:
        out["alloc_peak_mib"] = (torch.cuda.max_memory_allocated() - alloc0) / MiB
        out["alloc_method"] = "cuda max_memory_allocated - baseline"
    else:
        step_peak = _profiled_step_peak(runner, inputs, args.mem_steps)
        out["step_peak_mib"] = step_peak / MiB
        out["alloc_peak_mib"] = out["persistent_mib"] + step_peak / MiB
        out["alloc_method"] = "adapter params+buffers+AdamW state + profiled step peak"
    return out


def worker_profile(args: argparse.Namespace) -> dict[str, Any]:
    """torch.profiler over ``--profile-steps`` steady-state steps of one case; top ops by self time."""
    from torch.profiler import ProfilerActivity, profile

    case = args.cases[0]
    runner = Runner(case, args)
    n = args.profile_steps
    inputs = make_inputs(args, runner.unet.config.cross_attention_dim, args.warmup + n)
    for i in range(args.warmup):
        runner.step(inputs, i)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        for i in range(args.warmup, args.warmup + n):
            runner.step(inputs, i)
        sync(args.device)
    rows = []
    for e in prof.key_averages():
        rows.append({"name": e.key, "count": e.count / n, "self_cpu_ms": e.self_cpu_time_total / 1e3 / n,
                     "cpu_ms": e.cpu_time_total / 1e3 / n,
                     "self_device_ms": getattr(e, "self_device_time_total", 0) / 1e3 / n})
    key = "self_device_ms" if args.device.startswith("cuda") else "self_cpu_ms"
    rows.sort(key=lambda r: -r[key])
    return {"case": case, "ops": rows[: args.profile_top], "sort": key,
            "total_self_cpu_ms": sum(r["self_cpu_ms"] for r in rows),
            "total_self_device_ms": sum(r["self_device_ms"] for r in rows)}


# --------------------------------------------------------------------------- orchestration
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def common_argv(args: argparse.Namespace) -> list[str]:
    return ["--config", args.config, "--device", args.device, "--dtype", args.dtype, "--rank", str(args.rank),
            "--min-rank", str(args.min_rank or args.rank // 2), "--resolution", str(args.resolution),
            "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--mem-steps", str(args.mem_steps), "--seed", str(args.seed), "--threads", str(args.threads),
            "--profile-steps", str(args.profile_steps), "--profile-top", str(args.profile_top),
            "--quiet-slack", str(args.quiet_slack), "--min-quiet", str(args.min_quiet), "--max-seconds", str(args.max_seconds)]


def spawn(kind: str, cases: list[str], args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--cases", *cases, *common_argv(args)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"worker {kind} {cases} failed with exit code {proc.returncode}")
    line = next(ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith(RESULT_TAG))
    print(f"  worker {kind:7s} {' '.join(cases):32s} {time.perf_counter() - t0:6.1f} s", flush=True)
    return json.loads(line[len(RESULT_TAG):])


def _loadavg() -> float | None:
    with contextlib.suppress(OSError, AttributeError):
        return round(os.getloadavg()[0], 2)
    return None


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        m = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        if m:
            cpu = m.group(1).strip()
    return f"{cpu}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return machine()


def fmt_ratio(x: float, target: float) -> str:
    return f"{x:.3f}x ({'ok' if round(x, 3) <= target else 'OVER'} <= {target:g}x)"


def quiet_rounds(times: dict[str, list[float]], slack: float) -> list[int]:
    """Rounds whose total time (all cases) is within ``slack`` of the fastest round.

    Whole rounds are kept or dropped, so no case is favoured; on a shared machine this drops the rounds
    in which another job took the CPU (with 2 threads such a round can be 10-40x slower).
    """
    totals = [sum(v[i] for v in times.values()) for i in range(len(next(iter(times.values()))))]
    best = min(totals)
    return [i for i, t in enumerate(totals) if t <= best * slack]


def report(args: argparse.Namespace, timing: dict[str, Any], mems: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    import diffusers
    import peft

    times, cpu = timing["times"], timing["cpu_times"]
    cases = list(times)
    quiet = quiet_rounds(times, args.quiet_slack)
    q = {c: [times[c][i] for i in quiet] for c in cases}
    med_all = {c: statistics.median(times[c]) for c in cases}
    med = {c: statistics.median(q[c]) for c in cases}
    mn = {c: min(times[c]) for c in cases}
    cmed = {c: statistics.median(cpu[c][i] for i in quiet) for c in cases}
    mem = {c: {k: statistics.median(r[k] for r in runs) for k in ("rss_peak_mib", "alloc_peak_mib", "persistent_mib")}
           for c, runs in mems.items()}
    cuda = args.device.startswith("cuda")
    side = args.resolution // 8
    print()
    print(f"UNet2DConditionModel config={args.config}, latents {args.batch}x4x{side}x{side}, {args.dtype}, "
          f"device={args.device} ({device_name(args.device)})")
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}; "
          f"{len(times[cases[0]])} timed rounds after {args.warmup} warm-up, cases interleaved round-robin; "
          f"{len(quiet)} quiet rounds (round total <= {args.quiet_slack:g}x the fastest round)")
    print(f"tensor peak: {mems[cases[0]][0]['alloc_method']}"
          + ("" if cuda else f"; peak RSS: {mems[cases[0]][0]['rss_method']}")
          + f"; both above the baseline after the UNet is built; median of {args.mem_repeats} subprocess run(s) per case")
    print()
    cols = [("case", -10), ("modules", 7), ("trainable", 9), ("median ms, quiet", 16), ("median ms, all", 14),
            ("min ms", 7), ("CPU ms, quiet", 13), ("tensor peak MiB", 15), ("peak RSS MiB", 12)]
    print("| " + " | ".join(f"{n:<{-w}s}" if w < 0 else f"{n:>{w}s}" for n, w in cols) + " |")
    print("|" + "|".join("-" * (abs(w) + 2) for _, w in cols) + "|")
    for c in cases:
        vals = [c, timing["meta"][c]["modules"], timing["meta"][c]["trainable"], f"{med[c] * 1e3:.1f}",
                f"{med_all[c] * 1e3:.1f}", f"{mn[c] * 1e3:.1f}", f"{cmed[c] * 1e3:.1f}",
                f"{mem[c]['alloc_peak_mib']:.1f}", "n/a" if cuda else f"{mem[c]['rss_peak_mib']:.1f}"]
        print("| " + " | ".join(f"{v!s:<{-w}s}" if w < 0 else f"{v!s:>{w}s}" for v, (_, w) in zip(vals, cols)) + " |")
    print()

    def paired(a: str, b: str) -> float:
        return statistics.median(times[a][i] / times[b][i] for i in quiet)

    ratios: dict[str, dict[str, float]] = {}
    pairs = [("ours-lora", "peft-lora", 1.0), ("ours-tlora", "ours-lora", 1.05)]
    pairs += [(c, "ours-lora", 1.0) for c in cases if c.startswith("ours-") and c not in ("ours-lora", "ours-tlora")]
    pairs += [(ours, peft, 1.0) for peft, ours in PEFT_PEERS.items()]
    for a, b, tgt in pairs:
        if a not in cases or b not in cases:
            continue
        r = {"time_quiet_median": med[a] / med[b], "time_paired_quiet": paired(a, b), "time_min": mn[a] / mn[b],
             "time_all_median": med_all[a] / med_all[b], "cpu_time_quiet_median": cmed[a] / cmed[b],
             "tensor_peak": mem[a]["alloc_peak_mib"] / mem[b]["alloc_peak_mib"]}
        if not cuda:
            r["rss_peak"] = mem[a]["rss_peak_mib"] / mem[b]["rss_peak_mib"]
        ratios[f"{a}/{b}"] = r
        print(f"{a} / {b}: step time {fmt_ratio(r['time_quiet_median'], tgt)} [quiet median; paired "
              f"{r['time_paired_quiet']:.3f}x, min {r['time_min']:.3f}x, all-rounds median {r['time_all_median']:.3f}x, "
              f"CPU time {r['cpu_time_quiet_median']:.3f}x]; tensor peak {fmt_ratio(r['tensor_peak'], tgt)}"
              + ("" if cuda else f", peak RSS {r['rss_peak']:.3f}x"))
    return {"quiet_rounds": quiet, "median_quiet_s": med, "median_all_s": med_all, "min_s": mn,
            "cpu_median_quiet_s": cmed, "memory_mib": mem, "ratios": ratios, "meta": timing["meta"]}


def print_profiles(profiles: dict[str, dict[str, Any]]) -> None:
    for case, p in profiles.items():
        print(f"\n== torch.profiler, {case}: top ops by {p['sort']} per step (sums of all self times: "
              f"CPU {p['total_self_cpu_ms']:.1f} ms, device {p['total_self_device_ms']:.1f} ms)")
        print(f"{'op':48s} {'calls/step':>10s} {'self CPU ms':>11s} {'CPU total ms':>12s} {'self device ms':>14s}")
        for r in p["ops"]:
            print(f"{r['name'][:48]:48s} {r['count']:10.0f} {r['self_cpu_ms']:11.2f} {r['cpu_ms']:12.2f} "
                  f"{r['self_device_ms']:14.2f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small", choices=["small", "sd15"],
                   help="small: SD1.5 architecture scaled down (64/128/256 channels, cross-attn 256); "
                        "sd15: tests/fixtures/sd15-unet.json (use a GPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--min-rank", type=int, default=0, help="T-LoRA min_rank (default rank // 2)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels; latents are 1/8 "
                   "(default 256 -> 32x32 latents for small, 512 for sd15)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=21, help="timed steps per case (a multiple of the number of cases "
                   "gives each case each position in the round equally often)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per case first")
    p.add_argument("--mem-steps", type=int, default=3, help="steps run in each memory worker")
    p.add_argument("--mem-repeats", type=int, default=2, help="memory subprocesses per case")
    p.add_argument("--quiet-slack", type=float, default=1.25,
                   help="a round is quiet if its total time is within this factor of the fastest round")
    p.add_argument("--min-quiet", type=int, default=8,
                   help="after --steps rounds, add rounds until this many are quiet or --max-seconds have passed")
    p.add_argument("--max-seconds", type=float, default=600, help="time budget of the timing worker for extra rounds")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=all_cases(),
                   help="default: ours-lora peft-lora ours-tlora; any ours-<variant> (vs ours-lora)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--profile", action="store_true", help="also run torch.profiler per case and print top ops")
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    p.add_argument("--worker", choices=["time", "mem", "profile"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.resolution is None:
        args.resolution = 512 if args.config == "sd15" else 256
    if args.resolution % 8:
        p.error("--resolution must be a multiple of 8")
    if args.steps < 1 or args.warmup < 0 or args.mem_steps < 1 or args.mem_repeats < 1:
        p.error("--steps, --mem-steps and --mem-repeats must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        fn = {"time": worker_time, "mem": worker_mem, "profile": worker_profile}[args.worker]
        print(RESULT_TAG + json.dumps(fn(args)), flush=True)
        return

    started = datetime.datetime.now().astimezone()
    print(f"bench_core {started:%Y-%m-%d %H:%M %Z}: {' '.join(sys.argv)}", flush=True)
    load0 = _loadavg()
    timing = spawn("time", args.cases, args)
    mems: dict[str, list[dict[str, Any]]] = {c: [] for c in args.cases}
    for rep in range(args.mem_repeats):  # interleave the cases' memory runs too
        order = args.cases[rep % len(args.cases):] + args.cases[: rep % len(args.cases)]
        for c in order:
            mems[c].append(spawn("mem", [c], args))
    for c in args.cases:
        if mems[c][0]["trainable"] != timing["meta"][c]["trainable"]:
            raise SystemExit(f"{c}: trainable parameter counts differ between workers")
    results = report(args, timing, mems)
    results["loadavg"] = [load0, _loadavg()]
    print(f"1-minute load average at start / end: {load0} / {results['loadavg'][1]} "
          f"({os.cpu_count()} CPUs; a load above the CPU count means other jobs competed for the CPU)")
    if args.profile:
        print_profiles({c: spawn("profile", [c], args) for c in args.cases})
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "started": str(started),
                                         "machine": device_name(args.device), "timing": timing, "memory": mems,
                                         **results}, indent=1))


if __name__ == "__main__":
    main()
