"""Personalization quality per variant on the embedded demo model: concept fidelity vs prompt alignment.

    python benchmarks/personalization.py                                   # 6 variants x 3 held-out shapes x 3 seeds
    python benchmarks/personalization.py --variants tlora,lora --seeds 0 --concepts ring --steps 200   # a quick look
    python benchmarks/personalization.py --jobs 6 --device cuda            # the same, runs in parallel on a GPU

The shapes ``ring``, ``heart`` and ``moon`` were held out of the demo model's pretraining: it cannot draw
them. For each (concept, seed) one image of the concept is rendered (a color and background picked by
the seed) and each variant is trained on that ONE image with ``training.train_tlora.train`` and the
variant's default rank / learning rate / steps, captioned ``a <color> sks on a <background> background``.
Then it draws the concept in new contexts: ``--prompts`` combinations of another color AND another
background (``a green sks on a black background``), ``--images`` seeds each, and the evaluator
(``assets/evaluator``) reads every image. Per run:

- concept fidelity: the evaluator sees the trained shape (the T-LoRA paper's image similarity);
- prompt alignment: it sees the prompted color and the prompted background (its text similarity);
- both: one image that does both; copied: the image repeats the training image's color or background
  (the overfitting the paper's timestep-dependent rank is meant to prevent).

``results.json`` also keeps, per image, the prompted color and background and what the evaluator read.

The ``base`` row is the model without an adapter on the same prompts (``sks`` means nothing to it).
Rows are means over (concept, seed) runs with their standard deviation; per-run figures go to
``<out>/results.json``, the table to ``<out>/table.md`` and one sample grid per variant to ``<out>``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import logging
import multiprocessing as mp
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lora_diffusion import world  # noqa: E402

log = logging.getLogger("personalization")
DEFAULT_VARIANTS = ("tlora", "lora", "dora", "loha", "lokr", "vera")
TOKEN = "sks"


@dataclass
class BenchConfig:
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    concepts: tuple[str, ...] = world.HELDOUT_SHAPES
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int | None = None  # None: each variant's default (T-LoRA 800, the others 500)
    lr_scale: float = 1.0  # multiplies the trainer's default learning rate of each variant
    targets: str | None = None  # None: the trainer's default for the model and variant
    prompts: int = 8  # recontextualizing (color, background) prompts per run
    images: int = 4  # images per prompt
    sample_steps: int = 20
    guidance: float = 4.0
    model: str | None = None  # None: the embedded demo model
    evaluator: str | None = None  # None: assets/evaluator
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    jobs: int = 1
    out: Path = field(default_factory=lambda: ROOT / "outputs" / "personalization")
    overrides: tuple[str, ...] = ()  # trainer options "key=value" (training.config names), e.g. train_embedding=false


@dataclass(frozen=True)
class Run:
    variant: str  # a registered variant, or "base" (no adapter)
    concept: str
    seed: int


def training_scene(concept: str, seed: int) -> world.Scene:
    """The one image of ``concept`` for ``seed``: plain, centered, a seeded color and background."""
    rng = np.random.default_rng([seed, world.SHAPES.index(concept)])
    color = str(rng.choice(world.SHAPE_COLORS))
    background = str(rng.choice([b for b in world.BACKGROUNDS if b != color]))
    return world.Scene(concept, color, background, size=0.7)


def recontext_prompts(train: world.Scene, n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (color, background) pairs that differ from the training image in both color and background."""
    pairs = [(c, b) for c in world.SHAPE_COLORS for b in world.BACKGROUNDS
             if c != train.color and b != train.background and c != b]
    rng = np.random.default_rng([seed, 7919])
    return [pairs[i] for i in rng.permutation(len(pairs))[:n]]


def set_options(tc: Any, options: tuple[str, ...]) -> None:
    """``key=value`` trainer options (the flag names of training.config) onto a TLoRAConfig."""
    from training.config import TLoRAConfig, _convert, _hints, leaf_index

    index = leaf_index(TLoRAConfig)
    for item in options:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or key not in index:
            raise SystemExit(f"--set {item!r}: expected key=value with a trainer option; valid: {sorted(index)}")
        sec, name = index[key]
        section = getattr(tc, sec)
        setattr(section, name, _convert(None if value == "None" else value, _hints(type(section))[name], f"--{key}"))


def _train(run: Run, cfg: BenchConfig, work: Path) -> tuple[Path, dict[str, Any]]:
    """Train ``run.variant`` on the run's one image; the canonical adapter file and the settings used."""
    import lora_diffusion as ld
    from training.config import TLoRAConfig, resolve_defaults
    from training.train_tlora import train

    scene = training_scene(run.concept, run.seed)
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    world.render(scene).save(data / f"{run.concept}.png")
    tc = TLoRAConfig()
    tc.model.pretrained_model_name_or_path = cfg.model
    tc.adapter.variant = run.variant
    tc.data.instance_data_dir = str(data)
    tc.data.prompt_template = world.caption("{0}", scene.color, scene.background)
    tc.optim.max_train_steps = cfg.steps
    tc.adapter.targets = cfg.targets
    set_options(tc, cfg.overrides)
    resolve_defaults(tc, ld.variant_names())
    tc.optim.learning_rate *= cfg.lr_scale
    tc.checkpoint.output_dir = str(work / "train")
    tc.checkpoint.checkpointing_steps = 0
    tc.run.seed = run.seed
    tc.run.report_to = "none"
    tc.run.progress = False
    tc.run.cpu = cfg.device == "cpu"
    result = train(tc)
    used = {"rank": tc.adapter.lora_rank, "lr": tc.optim.learning_rate, "steps": tc.optim.max_train_steps,
            "targets": tc.adapter.targets, "token": tc.data.placeholder_token,
            "embedding": bool(tc.embedding.train_embedding)}
    return result.outputs["canonical"], used


@torch.no_grad()
def _draw(run: Run, cfg: BenchConfig, adapter: Path | None, token: str = TOKEN) -> tuple[np.ndarray, list[dict[str, str]]]:
    """Images (N, H, W, 3) uint8 for the run's recontextualizing prompts, and what each prompt asked for."""
    from lora_diffusion.generate import apply_adapters, load_pipeline

    pipe = load_pipeline(cfg.model).to(cfg.device)
    pipe.set_progress_bar_config(disable=True)
    if adapter is not None:
        apply_adapters(pipe, [adapter])  # also installs the hook that gives T-LoRA the timestep of each step
    pairs = recontext_prompts(training_scene(run.concept, run.seed), cfg.prompts, run.seed)
    asked = [{"shape": run.concept, "color": c, "background": b} for c, b in pairs for _ in range(cfg.images)]
    prompts = [world.caption(token, c, b) for c, b in pairs for _ in range(cfg.images)]
    g = torch.Generator().manual_seed(1000 + run.seed)
    images = [pipe(prompts[i:i + 32], num_inference_steps=cfg.sample_steps, guidance_scale=cfg.guidance, generator=g,
                   output_type="np").images for i in range(0, len(prompts), 32)]
    return (np.clip(np.concatenate(images), 0, 1) * 255).round().astype(np.uint8), asked


def score(preds: list[dict[str, str]], asked: list[dict[str, str]], train: world.Scene) -> dict[str, float]:
    """Fractions over the images: fidelity, alignment (color and background), both, copied."""
    right = {k: np.array([p[k] == a[k] for p, a in zip(preds, asked)]) for k in ("shape", "color", "background")}
    aligned = right["color"] & right["background"]
    copied = np.array([p["color"] == train.color or p["background"] == train.background for p in preds])
    return {"fidelity": float(right["shape"].mean()), "alignment": float(aligned.mean()),
            "color": float(right["color"].mean()), "background": float(right["background"].mean()),
            "both": float((right["shape"] & aligned).mean()), "copied": float(copied.mean())}


def run_one(run: Run, cfg: BenchConfig, threads: int | None = None) -> dict[str, Any]:
    """Train (unless ``base``), draw, score. Returns the run's figures and its images."""
    from lora_diffusion.evaluator import load_evaluator

    if threads:  # a worker process
        torch.set_num_threads(threads)
        _quiet()
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix=f"pers-{run.variant}-") as tmp:
        adapter, used = (None, {}) if run.variant == "base" else _train(run, cfg, Path(tmp))
        t_train = time.time() - t0
        images, asked = _draw(run, cfg, adapter, used.get("token", TOKEN))
    preds = load_evaluator(cfg.evaluator).predict(images)
    figures = score(preds, asked, training_scene(run.concept, run.seed))
    per_image = [[a["color"], a["background"], p["shape"], p["color"], p["background"]] for a, p in zip(asked, preds)]
    return {**asdict(run), **used, **{k: round(v, 4) for k, v in figures.items()}, "train_s": round(t_train, 1),
            "total_s": round(time.time() - t0, 1), "per_image": per_image, "images": images}


def _runs(cfg: BenchConfig) -> list[Run]:
    return [Run(v, c, s) for s in cfg.seeds for c in cfg.concepts for v in ("base", *cfg.variants)]


def run_all(cfg: BenchConfig) -> list[dict[str, Any]]:
    """Every run, ``cfg.jobs`` at a time, with a progress bar (runs of one seed first: early rows are complete)."""
    from tqdm import tqdm

    runs, results = _runs(cfg), []
    bar = tqdm(total=len(runs), desc="personalization runs", dynamic_ncols=True)
    if cfg.jobs <= 1:
        for r in runs:
            results.append(run_one(r, cfg))
            bar.update()
    else:
        threads = max(1, (os.cpu_count() or 1) // cfg.jobs)
        with cf.ProcessPoolExecutor(cfg.jobs, mp_context=mp.get_context("spawn")) as ex:
            futures = [ex.submit(run_one, r, cfg, threads) for r in runs]
            for f in cf.as_completed(futures):
                results.append(f.result())
                bar.update()
    bar.close()
    return results


def summarize(results: list[dict[str, Any]], order: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per variant: mean and std over its runs of each figure."""
    rows = []
    for v in ("base", *order):
        rs = [r for r in results if r["variant"] == v]
        if not rs:
            continue
        row: dict[str, Any] = {"variant": v, "runs": len(rs),
                               "settings": "" if v == "base" else f"r {rs[0]['rank']}, lr {rs[0]['lr']:g}, "
                               f"{rs[0]['steps']} steps, {rs[0]['targets']}"}
        for k in ("fidelity", "alignment", "both", "copied", "train_s"):
            vals = np.array([r[k] for r in rs], dtype=np.float64)
            row[k], row[k + "_std"] = float(vals.mean()), float(vals.std())
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], cfg: BenchConfig, n_images: int) -> str:
    head = ("| variant | concept fidelity | prompt alignment | both | copied train color/bg | train s/run | runs | settings |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        cells = [f"{100 * r[k]:.1f} ± {100 * r[k + '_std']:.1f}%" for k in ("fidelity", "alignment", "both", "copied")]
        lines.append(f"| {r['variant']} | {' | '.join(cells)} | {r['train_s']:.0f} | {r['runs']} | {r['settings']} |")
    lines.append(f"\n{len(cfg.concepts)} concepts ({', '.join(cfg.concepts)}) x seeds {list(cfg.seeds)}; "
                 f"{n_images} images per run ({cfg.prompts} prompts x {cfg.images}), {cfg.sample_steps} steps, "
                 f"guidance {cfg.guidance}; device {cfg.device}; steps {cfg.steps or 'variant defaults'}; learning rate "
                 f"{'trainer defaults' if cfg.lr_scale == 1 else f'{cfg.lr_scale}x trainer defaults'}; targets "
                 f"{cfg.targets or 'trainer defaults'}.")
    return "\n".join(lines) + "\n"


def save_grids(results: list[dict[str, Any]], out: Path, per_run: int = 8) -> None:
    """One PNG per variant: a row per run (concept, seed), its first ``per_run`` images, 2x nearest upscaled."""
    from PIL import Image

    for v in sorted({r["variant"] for r in results}):
        rs = sorted((r for r in results if r["variant"] == v), key=lambda r: (r["concept"], r["seed"]))
        rows = [np.concatenate(list(r["images"][::max(1, len(r["images"]) // per_run)][:per_run]), axis=1) for r in rs]
        grid = np.concatenate(rows, axis=0)
        Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(out / f"samples-{v}.png")


def main(argv: list[str] | None = None) -> None:
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(d.variants), help="comma-separated registered variants")
    p.add_argument("--concepts", default=",".join(d.concepts), help="held-out shapes to personalize")
    p.add_argument("--seeds", default=",".join(map(str, d.seeds)))
    p.add_argument("--steps", type=int, default=None, help="training steps (default: each variant's default)")
    p.add_argument("--lr-scale", type=float, default=d.lr_scale, help="multiplies the trainer's default learning rate")
    p.add_argument("--targets", default=d.targets, help="target preset or patterns (default: the trainer's)")
    p.add_argument("--prompts", type=int, default=d.prompts)
    p.add_argument("--images", type=int, default=d.images)
    p.add_argument("--sample-steps", type=int, default=d.sample_steps)
    p.add_argument("--guidance", type=float, default=d.guidance)
    p.add_argument("--model", default=None, help="base model (default: the embedded demo model)")
    p.add_argument("--evaluator", default=None, help="evaluator folder (default: assets/evaluator)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (GPU: 4-8)")
    p.add_argument("--out", type=Path, default=d.out)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a trainer option for every run (repeat), e.g. --set train_embedding=false --set embedding_lr=0.01")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    _quiet()
    cfg = BenchConfig(variants=tuple(a.variants.split(",")), concepts=tuple(a.concepts.split(",")),
                      seeds=tuple(int(s) for s in a.seeds.split(",")), steps=a.steps, lr_scale=a.lr_scale,
                      targets=a.targets, prompts=a.prompts, images=a.images, sample_steps=a.sample_steps,
                      guidance=a.guidance, model=a.model, evaluator=a.evaluator, device=a.device, jobs=a.jobs, out=a.out,
                      overrides=tuple(a.set))
    _check(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results = run_all(cfg)
    rows = summarize(results, cfg.variants)
    table = markdown(rows, cfg, cfg.prompts * cfg.images)
    save_grids(results, cfg.out)
    plain = [{k: v for k, v in r.items() if k != "images"} for r in results]
    (cfg.out / "results.json").write_text(json.dumps({"config": {**asdict(cfg), "out": str(cfg.out)}, "runs": plain,
                                                      "summary": rows, "seconds": round(time.time() - t0)}, indent=1))
    (cfg.out / "table.md").write_text(table)
    sys.stdout.write(table)
    sys.stdout.write(f"{len(results)} runs in {(time.time() - t0) / 60:.1f} min; per-run figures in {cfg.out / 'results.json'}\n")


def _quiet() -> None:
    """Only this script's progress bar: no per-run pipeline-loading bars and cast notices."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _check(cfg: BenchConfig) -> None:
    """Bad flags fail before the first run, naming the flag and the valid choices."""
    import lora_diffusion as ld

    unknown = [v for v in cfg.variants if v not in ld.variant_names()]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; registered: {ld.variant_names()}")
    bad = [c for c in cfg.concepts if c not in world.SHAPES]
    if bad:
        raise SystemExit(f"--concepts: unknown shapes {bad}; held-out shapes: {list(world.HELDOUT_SHAPES)}")
    if cfg.prompts < 1 or cfg.images < 1 or cfg.jobs < 1:
        raise SystemExit("--prompts, --images and --jobs must be >= 1")


if __name__ == "__main__":
    main()
