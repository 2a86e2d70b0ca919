"""Personalization before and after LoRA-Squeeze: one T-LoRA trained on the demo world, squeezed to several ranks,
each scored by the personalization benchmark's own evaluation (``benchmarks/personalization.py``: same prompts,
same seeds, same evaluator: fidelity = the trained shape is drawn, alignment = the prompted color and background).

    python benchmarks/squeeze_personalization.py [--concept ring] [--seed 0] [--ranks 64,32,16,8,4,2] [--energy 0.9]

Training: the trainer's demo-model recipe (the README main job: T-LoRA + pivotal tuning, its default rank and steps)
on the benchmark's one image of ``--concept``, with the described caption. Rows: the base model; the T-LoRA as
trained (timestep mask at inference); the same as an exact plain LoRA at full rank (no mask: what kohya/diffusers
exports and every squeeze start from); squeezed to each rank and to the energy fractions.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import personalization as pz  # noqa: E402


def evaluate(pipe, evaluator, run: pz.Run, cfg: pz.BenchConfig, adapter: Path | None, token: str) -> dict[str, float]:
    images, asked = pz._draw(pipe, run, cfg, adapter, token)
    return pz.score(evaluator.predict(images), asked, pz.training_scene(run.concept, run.seed))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concept", default="ring")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ranks", default="64,32,16,8,4,2")
    p.add_argument("--energy", default="0.9,0.5")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--steps", type=int, help="training steps (default: the demo recipe's)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    pz._quiet()
    from lora_diffusion import squeeze_file
    from lora_diffusion.demo.evaluator import load_evaluator
    from lora_diffusion.generate import load_pipeline

    cfg = pz.BenchConfig(variants=("tlora",), concepts=(a.concept,), seeds=(a.seed,), regimes=("described",),
                         sweep=(a.steps or pz._default_steps(),), prompts=a.prompts, images=a.images, device="cpu")
    run = pz.Run("tlora", a.concept, a.seed, "described")
    evaluator, pipe = load_evaluator(cfg.evaluator), load_pipeline(cfg.model)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="squeeze-pz-") as tmp:
        t0 = time.time()
        files, used = pz._train(run, cfg, Path(tmp))
        src = files[max(files)]
        print(f"trained {used} in {time.time() - t0:.0f} s", flush=True)
        rows.append(("base model", "-", "-", evaluate(pipe, evaluator, run, cfg, None, pz.TOKEN), None))
        rows.append(("T-LoRA as trained (timestep mask)", "-", 0.0, evaluate(pipe, evaluator, run, cfg, src,
                                                                               used["token"]), src.stat().st_size))
        targets = [("full", {"energy": 1.0})] + [(f"rank {k}", {"rank": int(k)}) for k in a.ranks.split(",") if k] + \
                  [(f"energy {e}", {"energy": float(e)}) for e in a.energy.split(",") if e]
        for label, kw in targets:
            out = Path(tmp) / f"{label.replace(' ', '-')}.safetensors"
            rep = squeeze_file(src, out, model=pipe, **kw)
            ranks = [m.rank for m in rep.modules]
            rank_s = f"{min(ranks)}-{max(ranks)}" if min(ranks) != max(ranks) else str(ranks[0])
            name = "plain LoRA, all energy (exact, no mask)" if label == "full" else f"squeezed, {label}"
            rows.append((name, rank_s, rep.total_error, evaluate(pipe, evaluator, run, cfg, out, used["token"]),
                         rep.bytes_after))
            print(f"{name}: {rep.summary()}", flush=True)
    n = a.prompts * a.images
    print(f"\n{a.concept}, seed {a.seed}, {n} images per row ({a.prompts} prompts x {a.images}); "
          f"total {time.time() - t0:.0f} s\n")
    print("| adapter | rank | ΔW rel. error | fidelity | alignment | both | copied | file KiB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rank, err, s, size in rows:
        e = err if isinstance(err, str) else f"{err:.3f}"
        print(f"| {name} | {rank} | {e} | {s['fidelity']:.2f} | {s['alignment']:.2f} | {s['both']:.2f} | "
              f"{s['copied']:.2f} | {'-' if size is None else f'{size / 1024:.0f}'} |")


if __name__ == "__main__":
    main()
