"""Train the shapes-world evaluator and save it to ``assets/evaluator`` when it is accurate enough.

    python -m training.train_evaluator                      # 2000 steps: ~10 min on a busy 2-core CPU
    python -m training.train_evaluator --steps 500 --out /tmp/ev --min-accuracy 0

Accuracy is measured on held-out renders (a seed never used in training) and on softened copies of
them (blur + noise, like VAE reconstructions); the figures go into the saved ``config.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from lora_diffusion.demo import world
from lora_diffusion.demo.evaluator import (
    default_evaluator_path,
    images_to_tensor,
    sample_training_scenes,
    save_evaluator,
    soften,
    train_evaluator,
)

log = logging.getLogger("train_evaluator")


def measure(model, n: int = 2000, seed: int = 12345) -> dict[str, dict[str, float]]:
    """Accuracy on ``n`` held-out renders (all concepts), on softened copies, and per world split."""
    scenes = sample_training_scenes(n, seed)
    x = images_to_tensor(world.render_batch(scenes, 32))
    out = {"heldout_renders": model.accuracy(x, scenes),
           "heldout_renders_softened": model.accuracy(soften(x, torch.Generator().manual_seed(seed)), scenes)}
    pre = world.sample_scenes(n // 2, seed + 1, "pretrain")  # the demo model's own distribution
    out["pretrain_distribution"] = model.accuracy(images_to_tensor(world.render_batch(pre, 32)), pre)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--n-train", type=int, default=12000)
    p.add_argument("--width", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--out", type=Path, default=None, help="output folder (default assets/evaluator)")
    p.add_argument("--min-accuracy", type=float, default=0.95, help="save only if every attribute reaches this")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy machine)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    model = train_evaluator(a.steps, a.batch_size, a.lr, a.n_train, a.seed, a.width, max_minutes=a.max_minutes)
    metrics = measure(model)
    metrics_flat = {k: {kk: round(vv, 4) for kk, vv in v.items()} for k, v in metrics.items()}
    log.info("trained in %.1f min; accuracy: %s", (time.time() - t0) / 60, json.dumps(metrics_flat))
    worst = min(v for k, d in metrics.items() for kk, v in d.items() if kk != "all")
    out = a.out or default_evaluator_path()
    if worst < a.min_accuracy:
        log.error("not saved: worst attribute accuracy %.3f < --min-accuracy %.3f", worst, a.min_accuracy)
        return 1
    info = {"steps": a.steps, "batch_size": a.batch_size, "n_train": a.n_train, "seed": a.seed,
            "train_minutes": round((time.time() - t0) / 60, 2), "accuracy": metrics_flat}
    save_evaluator(model, out, info)
    log.info("saved to %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
