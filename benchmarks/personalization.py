"""One-image personalization on the embedded demo model: concept fidelity vs prompt alignment, per variant,
caption regime and training length; T-LoRA vs LoRA at matched fidelity.

    python benchmarks/personalization.py --jobs 2        # the full table: 2 variants x 2 regimes x 5 concepts x 3 seeds
    python benchmarks/personalization.py --variants tlora:64,lora:64 --concepts ring --seeds 0 --regimes bare \\
        --sweep 100,400                                  # a quick look
    python benchmarks/personalization.py --jobs 6 --device cuda        # the same, runs in parallel on a GPU

Concepts the demo model never saw: the shapes ``ring``, ``heart``, ``moon`` and the textures ``dotted``,
``checkered`` (on a pretraining shape). For each (concept, seed) ONE image is rendered (a seeded color on a
seeded background) and each variant is trained on it by ``training.train_tlora.train`` with the trainer's
default recipe for the demo model (pivotal tuning: the placeholder's embedding and the adapter), captioned

- *described*: ``a red <sks> on a blue background`` (the image's color and background are named);
- *bare*: ``a photo of <sks>`` (the paper's setting: nothing but the subject is named, so a model that
  overfits to the one image repeats its color and background).

ONE training run per (variant, regime, concept, seed) is evaluated at every ``--sweep`` step (its checkpoints),
from under- to over-training. At each, ``--prompts`` combinations of another color AND another background
(``a green <sks> on a black background``) x ``--images`` seeds are drawn and read by the evaluator:

- fidelity: the evaluator sees the trained shape (texture) (the T-LoRA paper's image similarity);
- alignment: it sees the prompted color and the prompted background (its text similarity);
- both: one image that does both; copied: the training image's color or background repeated.

Variants are ``name[:rank]`` (or ``sensitivity:R``: a LoRA with Sensitivity-LoRA ranks calibrated on the run's
image, at a rank-R LoRA's parameter count; ``--variant-set VARIANT=key=value`` sets a trainer option for one entry,
e.g. LoRA-drop's ``lora_drop_match_params``); every variant gets the same learning rate (``--lr``, default: the trainer's
demo-model default), the same steps and modules. ``tlora:64`` is the paper's setting (rank 64, r_min 32).
Means over (concept, seed) runs with 95% confidence intervals (Student t); the paired comparison interpolates,
for each (concept, seed, regime), LoRA's alignment at each T-LoRA checkpoint's fidelity along LoRA's curve.
Writes ``results.json`` (per run, per checkpoint, per image), ``table.md``, ``curves.png`` and sample grids.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import logging
import math
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

from lora_diffusion.demo import world  # noqa: E402

log = logging.getLogger("personalization")
DEFAULT_VARIANTS = ("tlora:64", "lora:64")
DEFAULT_CONCEPTS = (*world.HELDOUT_SHAPES, *world.HELDOUT_TEXTURES)
REGIMES = ("described", "bare")
EXTRA_REGIMES = ("mixed",)  # a probe: each step picks the described or the bare caption
BARE_TEMPLATE = "a photo of {0}"
SENSITIVITY = "sensitivity"  # `sensitivity:R`: a LoRA with Sensitivity-LoRA ranks at a rank-R LoRA's parameter count
TOKEN = "sks"  # what the base model is prompted with (a word it knows; it draws it as a cross)
METRICS = ("fidelity", "alignment", "both", "copied")
# Student t 0.975 quantiles for 1..30 degrees of freedom (then ~normal)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


@dataclass
class BenchConfig:
    variants: tuple[str, ...] = DEFAULT_VARIANTS  # "name[:rank]"
    concepts: tuple[str, ...] = DEFAULT_CONCEPTS
    regimes: tuple[str, ...] = REGIMES
    seeds: tuple[int, ...] = (0, 1, 2)
    sweep: tuple[int, ...] = (50, 100, 200, 400, 800)  # checkpoints of one run that are evaluated
    lr: float | None = None  # one learning rate for every variant (None: the trainer's demo default)
    targets: str | None = None  # None: the trainer's default for the model and variant
    prompts: int = 8  # recontextualizing (color, background) prompts per checkpoint
    images: int = 4  # images per prompt
    sample_steps: int | None = None  # None: what the demo model's generation was measured with (demo-sd 20, else 20)
    guidance: float | None = None  # None: likewise (demo-sd 4.0; the DiT demo model its own; else 4.0)
    model: str | None = None  # None: the embedded demo model
    evaluator: str | None = None  # None: assets/evaluator
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    jobs: int = 1
    out: Path = field(default_factory=lambda: ROOT / "outputs" / "personalization")
    prior_images: int = 0  # prior preservation: class images the base model draws (pretraining shapes, varied prompts)
    overrides: tuple[str, ...] = ()  # trainer options "key=value" (training.config names), e.g. train_embedding=false
    variant_overrides: tuple[str, ...] = ()  # "VARIANT=key=value": a trainer option for one --variants entry only
    sensitivity_batches: int = 4  # sensitivity:R rows: calibration batches of training.rank_sensitivity
    paired_to: str | None = None  # a --variants entry: every other variant's difference to it, paired by run
    jitter_drops_color: bool = False  # described captions: hue-jittered views without the (wrong) color word
    recolor_holdout: bool = False  # described captions: repainting never paints the evaluation's (color, background)
    texture_as: str = "object"  # a texture concept: "object" (`a red sks`: the textured shape is the subject, as a
    # shape concept) or "word" (`a red sks circle`: the token is a texture word; prompts ask for it on other shapes)


@dataclass(frozen=True)
class Run:
    variant: str  # "name[:rank]", or "base" (no adapter)
    concept: str
    seed: int
    regime: str = "described"


def parse_variant(spec: str) -> tuple[str, int | None]:
    name, _, rank = spec.partition(":")
    return name, int(rank) if rank else None


def is_texture(concept: str) -> bool:
    return concept in world.TEXTURES


def training_scene(concept: str, seed: int) -> world.Scene:
    """The one image of ``concept`` for ``seed``: centered, a seeded color and background (a texture: on a
    seeded pretraining shape)."""
    rng = np.random.default_rng([seed, (world.TEXTURES if is_texture(concept) else world.SHAPES).index(concept)])
    color = str(rng.choice(world.SHAPE_COLORS))
    background = str(rng.choice([b for b in world.BACKGROUNDS if b != color]))
    if is_texture(concept):
        return world.Scene(str(rng.choice(["circle", "square"])), color, background, texture=concept, size=0.8)
    return world.Scene(concept, color, background, size=0.7)


def recontext_prompts(train: world.Scene, n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (color, background) pairs that differ from the training image in both color and background."""
    pairs = [(c, b) for c in world.SHAPE_COLORS for b in world.BACKGROUNDS
             if c != train.color and b != train.background and c != b]
    rng = np.random.default_rng([seed, 7919])
    return [pairs[i] for i in rng.permutation(len(pairs))[:n]]


def recontext_shapes(train: world.Scene, n: int) -> list[str]:
    """A texture used as a word: the shapes of the ``n`` prompts, the pretraining shapes in turn, the training
    image's last (so most prompts ask for the texture on another shape)."""
    order = [s for s in world.PRETRAIN_SHAPES if s != train.shape] + [train.shape]
    return [order[i % len(order)] for i in range(n)]


def as_word(run: Run, cfg: BenchConfig) -> bool:
    """The run's token is a texture word (`a red sks circle`), not an object (`a red sks`)."""
    return is_texture(run.concept) and cfg.texture_as == "word"


def class_prompts(n: int, seed: int) -> list[str]:
    """Prompts of pretraining shapes in varied colors and backgrounds: what the base model can draw."""
    rng = np.random.default_rng([seed, 104729])
    out = []
    while len(out) < n:
        shape, color, bg = (str(rng.choice(world.PRETRAIN_SHAPES)), str(rng.choice(world.SHAPE_COLORS)),
                            str(rng.choice(world.BACKGROUNDS)))
        if color != bg:
            out.append(world.caption(shape, color, bg))
    return out


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


def train_config(run: Run, cfg: BenchConfig, work: Path) -> Any:
    """The trainer's configuration of ``run`` (the demo defaults, the benchmark's shared settings, ``--set``)."""
    import lora_diffusion as ld
    from training.config import TLoRAConfig, resolve_defaults

    scene = training_scene(run.concept, run.seed)
    variant, rank = parse_variant(run.variant)
    tc = TLoRAConfig()
    tc.model.pretrained_model_name_or_path = cfg.model
    tc.adapter.variant, tc.adapter.lora_rank, tc.adapter.targets = variant, rank, cfg.targets
    if variant == SENSITIVITY:  # a LoRA; its ranks come from the calibration in _train
        tc.adapter.variant = "lora"
    tc.data.instance_data_dir = str(work / "data")
    if as_word(run, cfg):  # `sks circle`, the token's vectors start from the texture word the model knows
        tc.data.class_name, tc.embedding.initializer_token = scene.shape, "striped"
    described = world.caption("{0}", scene.color, scene.background)
    tc.data.prompt_template = {"described": described, "bare": BARE_TEMPLATE,
                               "mixed": f"{described}#{BARE_TEMPLATE}"}[run.regime]
    if cfg.recolor_holdout and run.regime == "described":  # the prompts' pairs are never shown in training
        pairs = recontext_prompts(scene, cfg.prompts, run.seed)
        tc.data.recolor_exclude = "#".join(f"{c}/{b}" for c, b in pairs)
    if cfg.jitter_drops_color and run.regime == "described":  # `a sks on a white background`
        tc.data.jitter_prompt_template = f"a {{0}} on a {scene.background} background"
    tc.optim.max_train_steps, tc.optim.learning_rate = max(cfg.sweep), cfg.lr
    if cfg.prior_images:
        tc.data.with_prior_preservation = True
        tc.data.class_data_dir = str(work / "class")
        tc.data.num_class_images = cfg.prior_images
        tc.data.class_prompt = "#".join(class_prompts(cfg.prior_images, run.seed))
    set_options(tc, cfg.overrides)
    set_options(tc, variant_options(cfg.variant_overrides, run.variant))
    resolve_defaults(tc, ld.variant_names())
    tc.optim.max_train_steps = max(cfg.sweep)
    tc.checkpoint.output_dir = str(work / "train")
    tc.checkpoint.checkpointing_steps = math.gcd(*cfg.sweep)
    tc.checkpoint.checkpoints_total_limit = None
    tc.run.seed, tc.run.report_to, tc.run.progress, tc.run.cpu = run.seed, "none", False, cfg.device == "cpu"
    return tc


def variant_options(items: tuple[str, ...], variant: str) -> tuple[str, ...]:
    """The ``key=value`` options of ``--variant-set VARIANT=key=value`` items for one --variants entry."""
    out = []
    for item in items:
        label, sep, option = item.partition("=")
        if not sep or "=" not in option:
            raise SystemExit(f"--variant-set {item!r}: expected VARIANT=key=value, e.g. "
                             "'loradrop:16=lora_drop_match_params=true'")
        if label == variant:
            out.append(option)
    return tuple(out)


def calibrate(tc: Any, rank: int, work: Path, batches: int) -> Path:
    """Sensitivity-LoRA ranks for this run (its image, caption, seed, targets): ``training.rank_sensitivity tlora
    --match_rank rank`` (the parameter count of a uniform rank-``rank`` LoRA on the same modules)."""
    import yaml

    from training import rank_sensitivity
    from training.config import to_dict

    config = work / "sensitivity-config.yaml"
    config.write_text(yaml.safe_dump(to_dict(tc)))
    out = rank_sensitivity.run(["tlora", "--match_rank", str(rank), "--output", str(work / "ranks.json"),
                                "--batches", str(batches), "--no-plot", "--config", str(config)])
    return Path(out["spec"])


def trainable_count(tc: Any) -> int:
    """The adapter's trainable parameters in run ``tc`` (the placeholder embedding not counted): its spec (a LoRA-drop
    run: the plan it wrote) rebuilt on a fresh UNet, shared storage counted once."""
    import json

    import lora_diffusion as ld
    from lora_diffusion.families import denoiser
    from lora_diffusion.variants.loradrop import DropPlan
    from training.diffusion import adapter_spec, load_base

    spec = adapter_spec(tc)
    plan = Path(tc.checkpoint.output_dir) / "lora_drop.json"
    if spec.variant == "loradrop" and plan.is_file():
        spec = DropPlan.from_dict(json.loads(plan.read_text())).spec(spec)
    unet = denoiser(load_base(tc))
    ld.add_adapter(unet, spec)
    return sum({p.data_ptr(): p.numel() for p in unet.parameters() if p.requires_grad}.values())


def _train(run: Run, cfg: BenchConfig, work: Path) -> tuple[dict[int, Path], dict[str, Any]]:
    """Train ``run`` on its one image; {sweep step: adapter file} and the settings used."""
    from training.train_tlora import train

    (work / "data").mkdir(parents=True, exist_ok=True)
    world.render(training_scene(run.concept, run.seed)).save(work / "data" / f"{run.concept}.png")
    tc = train_config(run, cfg, work)
    if parse_variant(run.variant)[0] == SENSITIVITY:
        tc.adapter.rank_spec = str(calibrate(tc, parse_variant(run.variant)[1] or tc.adapter.lora_rank, work,
                                             cfg.sensitivity_batches))
    train(tc)
    ckpts = work / "train" / "checkpoints"
    files = {s: ckpts / f"checkpoint-{s}" / "adapter.safetensors" for s in cfg.sweep}
    used = {"trainable": trainable_count(tc),
            "rank": tc.adapter.lora_rank, "lr": tc.optim.learning_rate, "targets": tc.adapter.targets,
            "token": tc.data.placeholder_token, "embedding": bool(tc.embedding.train_embedding),
            "caption": tc.data.prompt_template, "class_name": tc.data.class_name,
            "jitter_caption": tc.data.jitter_prompt_template}
    return files, used


@torch.no_grad()
def _draw(pipe: Any, run: Run, cfg: BenchConfig, adapter: Path | None,
          token: str) -> tuple[np.ndarray, list[dict[str, str]]]:
    """Images (N, H, W, 3) uint8 for the run's recontextualizing prompts, and what each prompt asked for."""
    import lora_diffusion as ld
    from lora_diffusion.embeddings import expand_prompt
    from lora_diffusion.families import denoiser
    from lora_diffusion.generate import apply_adapters, remove_timestep_hook

    if adapter is not None:
        apply_adapters(pipe, [adapter], names=["bench"])  # the tokens too; T-LoRA's timestep hook
    train = training_scene(run.concept, run.seed)
    pairs = recontext_prompts(train, cfg.prompts, run.seed)
    kind = "texture" if is_texture(run.concept) else "shape"
    asked = [{kind: run.concept, "color": c, "background": b} for c, b in pairs for _ in range(cfg.images)]
    prompts = [world.caption(token, c, b) for c, b in pairs for _ in range(cfg.images)]
    if as_word(run, cfg):  # `a green sks star on a black background`: the shape is asked for too
        shapes = recontext_shapes(train, len(pairs))
        asked = [{**a, "shape": shapes[i // cfg.images]} for i, a in enumerate(asked)]
        prompts = [world.caption(f"{token} {shapes[i // cfg.images]}", a["color"], a["background"])
                   for i, a in enumerate(asked)]
    g = torch.Generator().manual_seed(1000 + run.seed)
    try:
        prompts = [expand_prompt(pipe, q) for q in prompts]  # SD3: a multi-vector token written out
        images = [pipe(prompts[i:i + 32], num_inference_steps=cfg.sample_steps, guidance_scale=cfg.guidance,
                       generator=g, output_type="np").images for i in range(0, len(prompts), 32)]
    finally:
        if adapter is not None:
            ld.remove_adapters(pipe, ["bench"])
            remove_timestep_hook(denoiser(pipe))
    return (np.clip(np.concatenate(images), 0, 1) * 255).round().astype(np.uint8), asked


def score(preds: list[dict[str, str]], asked: list[dict[str, str]], train: world.Scene) -> dict[str, float]:
    """Fractions over the images: fidelity (the concept's shape or texture), alignment (color and background; a
    texture asked on a named shape: that shape too), both, copied."""
    kind = "texture" if "texture" in asked[0] else "shape"
    prompted = ("color", "background") + (("shape",) if kind == "texture" and "shape" in asked[0] else ())
    right = {k: np.array([p[k] == a[k] for p, a in zip(preds, asked)]) for k in (kind, *prompted)}
    aligned = np.logical_and.reduce([right[k] for k in prompted])
    copied = np.array([p["color"] == train.color or p["background"] == train.background for p in preds])
    return {"fidelity": float(right[kind].mean()), "alignment": float(aligned.mean()),
            "color": float(right["color"].mean()), "background": float(right["background"].mean()),
            "both": float((right[kind] & aligned).mean()), "copied": float(copied.mean())}


def run_one(run: Run, cfg: BenchConfig, threads: int | None = None) -> list[dict[str, Any]]:
    """Train (unless ``base``), then draw and score at every sweep step. One record per step (base: step 0)."""
    from lora_diffusion.demo.evaluator import load_evaluator
    from lora_diffusion.families import denoiser
    from lora_diffusion.generate import load_pipeline
    from lora_diffusion.zero_context import collapse_zero_context

    if threads:  # a worker process
        torch.set_num_threads(threads)
        _quiet()
    t0 = time.time()
    evaluator = load_evaluator(cfg.evaluator)
    pipe = load_pipeline(cfg.model).to(cfg.device)
    pipe.set_progress_bar_config(disable=True)
    collapse_zero_context(denoiser(pipe))  # SD3 without T5 (the DiT demo model): exact, several times faster
    train = training_scene(run.concept, run.seed)
    out = []
    with tempfile.TemporaryDirectory(prefix="pers-") as tmp:
        files, used = ({0: None}, {}) if run.variant == "base" else _train(run, cfg, Path(tmp))
        t_train = time.time() - t0
        for step, adapter in files.items():
            images, asked = _draw(pipe, run, cfg, adapter, used.get("token", TOKEN))
            preds = evaluator.predict(images)
            figures = score(preds, asked, train)
            per_image = [[a["color"], a["background"], p["shape"], p["texture"], p["color"], p["background"]]
                         for a, p in zip(asked, preds)]
            out.append({**asdict(run), **used, "step": step, **{k: round(v, 4) for k, v in figures.items()},
                        "train_s": round(t_train, 1), "per_image": per_image, "images": images})
    for r in out:
        r["total_s"] = round(time.time() - t0, 1)
    return out


def _runs(cfg: BenchConfig) -> list[Run]:
    base = [Run("base", c, s, "any") for s in cfg.seeds for c in cfg.concepts]
    return base + [Run(v, c, s, g) for s in cfg.seeds for g in cfg.regimes for c in cfg.concepts for v in cfg.variants]


def run_all(cfg: BenchConfig) -> list[dict[str, Any]]:
    """Every run, ``cfg.jobs`` at a time, with a progress bar and ETA."""
    from tqdm import tqdm

    runs, results = _runs(cfg), []
    bar = tqdm(total=len(runs), desc="personalization runs", dynamic_ncols=True)
    if cfg.jobs <= 1:
        for r in runs:
            results.extend(run_one(r, cfg))
            _save_partial(results, cfg.out)
            bar.update()
    else:
        threads = max(1, (os.cpu_count() or 1) // cfg.jobs)
        with cf.ProcessPoolExecutor(cfg.jobs, mp_context=mp.get_context("spawn")) as ex:
            futures = [ex.submit(run_one, r, cfg, threads) for r in runs]
            for f in cf.as_completed(futures):
                results.extend(f.result())
                _save_partial(results, cfg.out)
                bar.update()
    bar.close()
    return results


def _save_partial(results: list[dict[str, Any]], out: Path) -> None:
    """What is done so far (``--merge`` reads it if the command is stopped before its report)."""
    np.savez(out / "partial-images.npz", *[r["images"] for r in results])
    (out / "partial.json").write_text(json.dumps({"runs": [{k: v for k, v in r.items() if k != "images"}
                                                           for r in results]}))


# --- statistics ---
def mean_ci(values: list[float] | np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student t; 0 for one value)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float(v.mean()) if len(v) else float("nan"), 0.0
    t = T975[min(len(v) - 1, len(T975)) - 1] if len(v) - 1 <= len(T975) else 1.96
    return float(v.mean()), float(t * v.std(ddof=1) / math.sqrt(len(v)))


def summarize(results: list[dict[str, Any]], cfg: BenchConfig) -> list[dict[str, Any]]:
    """One row per (regime, variant, step): means and 95% CIs over the (concept, seed) runs."""
    rows = []
    base = [r for r in results if r["variant"] == "base"]
    if base:
        rows.append(_row("any", "base", 0, base))
    for g in cfg.regimes:
        for v in cfg.variants:
            for s in cfg.sweep:
                rs = [r for r in results if r["variant"] == v and r["regime"] == g and r["step"] == s]
                if rs:
                    rows.append(_row(g, v, s, rs))
    return rows


def _row(regime: str, variant: str, step: int, rs: list[dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {"regime": regime, "variant": variant, "step": step, "runs": len(rs)}
    for k in (*METRICS, "train_s"):
        row[k], row[k + "_ci"] = mean_ci([r[k] for r in rs])
    row["trainable"] = sorted({r["trainable"] for r in rs if "trainable" in r})
    return row


def paired(results: list[dict[str, Any]], a: str, b: str, regime: str) -> dict[str, Any] | None:
    """Variant ``a`` vs ``b`` at matched fidelity: per (concept, seed), b's alignment interpolated along b's
    fidelity-alignment curve at each of a's checkpoints whose fidelity b's curve spans; the mean difference
    per pair, then its mean and 95% CI over pairs."""
    diffs, points = [], 0
    keys = sorted({(r["concept"], r["seed"]) for r in results if r["regime"] == regime})
    for c, s in keys:
        ca = sorted((r["fidelity"], r["alignment"]) for r in results
                    if (r["variant"], r["regime"], r["concept"], r["seed"]) == (a, regime, c, s))
        cb = sorted((r["fidelity"], r["alignment"]) for r in results
                    if (r["variant"], r["regime"], r["concept"], r["seed"]) == (b, regime, c, s))
        if not ca or not cb:
            continue
        fb = np.array([f for f, _ in cb])
        ab = np.array([al for _, al in cb])
        uf, idx = np.unique(fb, return_inverse=True)
        ub = np.array([ab[idx == i].mean() for i in range(len(uf))])  # several checkpoints at one fidelity: mean
        d = [al - float(np.interp(f, uf, ub)) for f, al in ca if uf[0] <= f <= uf[-1]]
        if d:
            diffs.append(float(np.mean(d)))
            points += len(d)
    if not diffs:
        return None
    m, ci = mean_ci(diffs)
    return {"a": a, "b": b, "regime": regime, "pairs": len(diffs), "points": points, "diff": m, "ci": ci}


def by_concept(results: list[dict[str, Any]], cfg: BenchConfig, step: int) -> list[dict[str, Any]]:
    """Per (regime, variant, concept) at ``step``: means over seeds."""
    out = []
    for g in cfg.regimes:
        for v in cfg.variants:
            for c in cfg.concepts:
                rs = [r for r in results if (r["regime"], r["variant"], r["concept"], r["step"]) == (g, v, c, step)]
                if rs:
                    out.append({"regime": g, "variant": v, "concept": c, "step": step,
                                **{k: float(np.mean([r[k] for r in rs])) for k in METRICS}})
    return out


def markdown(rows: list[dict[str, Any]], comparisons: list[dict[str, Any]], cfg: BenchConfig,
             per_concept: list[dict[str, Any]] = ()) -> str:
    sized = any(r.get("trainable") for r in rows)  # the trainable-parameter column when the runs measured it
    head = ("| regime | variant | step | fidelity | alignment | both | copied | runs |" + (" trainable params |" if sized
            else "") + "\n|---|---|---|---|---|---|---|---|" + ("---|" if sized else ""))
    lines = [head]
    for r in rows:
        cells = [f"{100 * r[k]:.1f} ± {100 * r[k + '_ci']:.1f}" for k in METRICS]
        n = r.get("trainable", [])
        size = (f" {n[0]:,}-{n[-1]:,} |" if len(n) > 2 else f" {', '.join(f'{x:,}' for x in n) or '-'} |") if sized else ""
        lines.append(f"| {r['regime']} | {r['variant']} | {r['step']} | {' | '.join(cells)} | {r['runs']} |{size}")
    lines.append("\nPercent, mean ± 95% CI over (concept, seed) runs.")
    if per_concept:
        lines.append(f"\nPer concept at {per_concept[0]['step']} steps (mean over seeds; fidelity / alignment / "
                     "both):\n")
        concepts = list(dict.fromkeys(r["concept"] for r in per_concept))
        lines.append("| regime | variant | " + " | ".join(concepts) + " |")
        lines.append("|---|---|" + "---|" * len(concepts))
        for g, v in dict.fromkeys((r["regime"], r["variant"]) for r in per_concept):
            cells = []
            for c in concepts:
                r = next((r for r in per_concept if (r["regime"], r["variant"], r["concept"]) == (g, v, c)), None)
                cells.append("" if r is None else f"{100 * r['fidelity']:.0f} / {100 * r['alignment']:.0f} / "
                             f"{100 * r['both']:.0f}")
            lines.append(f"| {g} | {v} | " + " | ".join(cells) + " |")
    for c in comparisons:
        lines.append(f"\n**{c['a']} vs {c['b']}, {c['regime']} captions, at matched fidelity**: alignment "
                     f"{100 * c['diff']:+.1f} ± {100 * c['ci']:.1f} points ({c['pairs']} paired runs, {c['points']} "
                     f"matched checkpoints).")
    lines.append(f"\n{len(cfg.concepts)} concepts ({', '.join(cfg.concepts)}) x seeds {list(cfg.seeds)}; sweep "
                 f"{list(cfg.sweep)} steps (checkpoints of one run); {cfg.prompts * cfg.images} images per checkpoint "
                 f"({cfg.prompts} prompts x {cfg.images}), {cfg.sample_steps} sampling steps, guidance {cfg.guidance}; "
                 f"lr {cfg.lr or 'trainer default'}; targets {cfg.targets or 'trainer default'}; prior images "
                 f"{cfg.prior_images}; trainer options {list(cfg.overrides) or 'defaults'}"
                 f"{'; per variant ' + str(list(cfg.variant_overrides)) if cfg.variant_overrides else ''}; "
                 f"textures as {cfg.texture_as}s; "
                 f"{'hue-jittered views captioned without the color; ' if cfg.jitter_drops_color else ''}"
                 f"{'repainting holds out the evaluation pairs; ' if cfg.recolor_holdout else ''}"
                 f"device {cfg.device}.")
    return "\n".join(lines) + "\n"


# --- figures ---
def plot_curves(rows: list[dict[str, Any]], cfg: BenchConfig, path: Path) -> None:
    """Per regime: alignment vs fidelity along the sweep (top), fidelity, alignment and 'both' vs steps (bottom;
    with more than 3 variants only 'both', so the lines stay readable). Legends outside the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    many = len(cfg.variants) > 3
    fig, axes = plt.subplots(2, len(cfg.regimes), figsize=(5.5 * len(cfg.regimes) + (2.5 if many else 0), 9),
                             squeeze=False)
    colors = plt.get_cmap("tab20" if len(cfg.variants) > 10 else "tab10").colors
    base = next((r for r in rows if r["variant"] == "base"), None)
    for j, g in enumerate(cfg.regimes):
        top, bottom = axes[0][j], axes[1][j]
        for k, v in enumerate(cfg.variants):
            rs = [r for r in rows if r["regime"] == g and r["variant"] == v]
            if not rs:
                continue
            color = colors[(2 * k) % 20 + (2 * k) // 20] if len(colors) == 20 else colors[k % len(colors)]  # dark first
            f = [100 * r["fidelity"] for r in rs]
            a = [100 * r["alignment"] for r in rs]
            top.errorbar(f, a, xerr=[100 * r["fidelity_ci"] for r in rs], yerr=[100 * r["alignment_ci"] for r in rs],
                         marker="o", capsize=3, label=v, color=color, alpha=0.5 if many else 1.0)
            for r, x, y in zip(rs, f, a):
                top.annotate(str(r["step"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            steps = [r["step"] for r in rs]
            if not many:
                bottom.plot(steps, f, marker="o", color=color, label=f"{v} fidelity")
                bottom.plot(steps, a, marker="^", ls=":", color=color, label=f"{v} alignment")
            bottom.plot(steps, [100 * r["both"] for r in rs], marker="s", ls="--" if not many else "-", color=color,
                        label=v if many else f"{v} both")
        if base:
            top.scatter([100 * base["fidelity"]], [100 * base["alignment"]], marker="x", color="k", label="base")
        top.set(title=f"{g} captions", xlabel="concept fidelity (%)", ylabel="prompt alignment (%)",
                xlim=(-3, 103), ylim=(-3, 103))
        bottom.set(xlabel="training steps", ylabel="both (%)" if many else "%", xscale="log", ylim=(-3, 103))
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
            if many:
                ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
            else:
                ax.legend(fontsize=8 if ax is top else 7)
    fig.suptitle(f"One-image personalization on {Path(cfg.model).name if cfg.model else 'the demo model'} "
                 "(mean ± 95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_grids(results: list[dict[str, Any]], cfg: BenchConfig, out: Path, per_concept: int = 4) -> list[Path]:
    """Per (variant, regime): a row per sweep step, ``per_concept`` images (one per prompt) of each concept's first
    seed; the base model's row alone. 2x nearest upscaled."""
    from PIL import Image

    seed = cfg.seeds[0]
    written = []
    groups = [("base", "any")] + [(v, g) for v in cfg.variants for g in cfg.regimes]
    for v, g in groups:
        steps = [0] if v == "base" else list(cfg.sweep)
        rows = []
        for s in steps:
            cells = []
            for c in cfg.concepts:
                r = next((r for r in results if (r["variant"], r["regime"], r["concept"], r["seed"], r["step"])
                          == (v, g, c, seed, s)), None)
                if r is not None:
                    cells.extend(r["images"][::max(1, cfg.images)][:per_concept])
            if cells:
                rows.append(np.concatenate(cells, axis=1))
        if not rows:
            continue
        grid = np.concatenate(rows, axis=0)
        path = out / f"samples-{v.replace(':', '-r')}{'' if v == 'base' else '-' + g}.png"
        Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)
        written.append(path)
    return written


def comparisons(results: list[dict[str, Any]], cfg: BenchConfig) -> list[dict[str, Any]]:
    """T-LoRA vs LoRA (the first variant of each) per regime."""
    t = next((v for v in cfg.variants if parse_variant(v)[0] == "tlora"), None)
    lo = next((v for v in cfg.variants if parse_variant(v)[0] == "lora"), None)
    if t is None or lo is None:
        return []
    return [c for g in cfg.regimes if (c := paired(results, t, lo, g)) is not None]


def build_parser() -> argparse.ArgumentParser:
    """The command line; defaults from ``BenchConfig``."""
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(d.variants), help="comma-separated name[:rank], e.g. tlora:64,lora:64")
    p.add_argument("--concepts", default=",".join(d.concepts), help="held-out shapes and textures to personalize")
    p.add_argument("--regimes", default=",".join(d.regimes), help="caption regimes: described, bare")
    p.add_argument("--seeds", default=",".join(map(str, d.seeds)))
    p.add_argument("--sweep", default=",".join(map(str, d.sweep)), help="training steps evaluated (checkpoints of one run)")
    p.add_argument("--lr", type=float, default=None, help="one learning rate for every variant (default: trainer's)")
    p.add_argument("--targets", default=d.targets, help="target preset or patterns (default: the trainer's)")
    p.add_argument("--prompts", type=int, default=d.prompts)
    p.add_argument("--images", type=int, default=d.images)
    p.add_argument("--sample-steps", type=int, default=d.sample_steps,
                   help="denoising steps per image (default: the model's demo_model.json generation steps, else 20)")
    p.add_argument("--guidance", type=float, default=d.guidance,
                   help="classifier-free guidance (default: the model's demo_model.json generation guidance, else 4)")
    p.add_argument("--model", default=None, help="base model (default: the embedded demo model; demo-sd3: the "
                   "embedded DiT demo model, an SD3-architecture pipeline)")
    p.add_argument("--evaluator", default=None, help="evaluator folder (default: assets/evaluator)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (GPU: 4-8)")
    p.add_argument("--out", type=Path, default=d.out)
    p.add_argument("--prior", type=int, default=d.prior_images,
                   help="prior preservation with this many class images the base model draws (0: off)")
    p.add_argument("--merge", nargs="+", type=Path, default=None, metavar="DIR",
                   help="no runs: merge the results of earlier invocations (e.g. one per regime, in parallel) "
                        "into --out; give the same flags as those runs, with every regime")
    p.add_argument("--jitter-drops-color", action="store_true",
                   help="described captions: hue-jittered views are captioned without the color word "
                        "(`a sks on a white background`; the trainer's --jitter_prompt_template)")
    p.add_argument("--recolor-holdout", action="store_true",
                   help="described captions: repainted views (--recolor_p) never show the evaluation prompts' "
                        "(color, background) pairs (the trainer's --recolor_exclude), so alignment is measured on "
                        "combinations the subject was never painted in")
    p.add_argument("--texture-as", choices=("object", "word"), default=d.texture_as,
                   help="a texture concept: 'object' (`a red sks`: the textured shape is the subject, as a shape "
                        "concept) or 'word' (`a red sks circle`, vectors from `striped`; prompts ask for it on the "
                        "other shapes and alignment counts the shape)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a trainer option for every run (repeat), e.g. --set train_embedding=false")
    p.add_argument("--variant-set", action="append", default=[], metavar="VARIANT=KEY=VALUE",
                   help="a trainer option for one --variants entry (repeat), e.g. "
                        "'loradrop:16=lora_drop_match_params=true', 'adalora:24=adapter_options={\"target_rank\": 16}'")
    p.add_argument("--paired-to", default=None, metavar="VARIANT",
                   help="add a table of every variant minus this --variants entry, paired by (concept, seed)")
    p.add_argument("--sensitivity-batches", type=int, default=d.sensitivity_batches,
                   help="calibration batches for sensitivity:R variants (a LoRA with Sensitivity-LoRA ranks at a "
                        "rank-R LoRA's parameter count, from training.rank_sensitivity tlora --match_rank R)")
    return p


def config_from_args(a: argparse.Namespace) -> BenchConfig:
    """The ``BenchConfig`` the parsed flags describe (comma lists split, the sweep sorted)."""
    return BenchConfig(variants=tuple(a.variants.split(",")), concepts=tuple(a.concepts.split(",")),
                       regimes=tuple(a.regimes.split(",")), seeds=tuple(int(s) for s in a.seeds.split(",")),
                       sweep=tuple(sorted(int(s) for s in a.sweep.split(","))), lr=a.lr, targets=a.targets,
                       prompts=a.prompts, images=a.images, sample_steps=a.sample_steps, guidance=a.guidance,
                       model=a.model, evaluator=a.evaluator, device=a.device, jobs=a.jobs, out=a.out,
                       prior_images=a.prior, overrides=tuple(a.set), texture_as=a.texture_as,
                       variant_overrides=tuple(a.variant_set), sensitivity_batches=a.sensitivity_batches,
                       paired_to=a.paired_to,
                       jitter_drops_color=a.jitter_drops_color, recolor_holdout=a.recolor_holdout)


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    _quiet()
    cfg = config_from_args(a)
    _check(cfg)
    cfg.sample_steps, cfg.guidance = generation_settings(cfg.model, cfg.sample_steps, cfg.guidance)
    cfg.out.mkdir(parents=True, exist_ok=True)
    if a.merge:
        results, seconds = merge(a.merge, cfg)
        report(results, cfg, seconds)
        return
    t0 = time.time()
    results = run_all(cfg)
    report(results, cfg, time.time() - t0)


def merge(folders: list[Path], cfg: BenchConfig) -> tuple[list[dict[str, Any]], float]:
    """Runs of several earlier invocations (results.json + images.npz); the base model's duplicates dropped."""
    results, seen, seconds = [], set(), 0.0
    for folder in folders:
        done = (folder / "results.json").is_file()
        data = json.loads((folder / ("results.json" if done else "partial.json")).read_text())
        with np.load(folder / ("images.npz" if done else "partial-images.npz")) as z:
            images = [z[f"arr_{i}"] for i in range(len(z.files))]
        seconds += data.get("seconds", 0)
        for r, im in zip(data["runs"], images):
            key = (r["variant"], r["regime"], r["concept"], r["seed"], r["step"])
            if key not in seen:
                seen.add(key)
                results.append({**r, "images": im})
    return complete(results, cfg), seconds


def complete(results: list[dict[str, Any]], cfg: BenchConfig) -> list[dict[str, Any]]:
    """Only (regime, concept, seed) groups that every variant finished, at every sweep step (a stopped command's
    partial results stay paired); the base model's runs for those (concept, seed)."""
    want = {(v, s) for v in cfg.variants for s in cfg.sweep}
    have: dict[tuple, set] = {}
    for r in results:
        have.setdefault((r["regime"], r["concept"], r["seed"]), set()).add((r["variant"], r["step"]))
    done = {k for k, v in have.items() if k[0] != "any" and want <= v}
    keep = {(c, s) for _, c, s in done}
    return [r for r in results if (r["regime"], r["concept"], r["seed"]) in done
            or (r["variant"] == "base" and (r["concept"], r["seed"]) in keep)]


def paired_diffs(results: list[dict[str, Any]], a: str, b: str, regime: str, step: int, metric: str) -> list[float]:
    """``metric`` of ``a`` minus ``b`` at ``step``, one difference per (concept, seed) both finished."""
    key = {(r["variant"], r["concept"], r["seed"]): r[metric] for r in results
           if r["regime"] == regime and r["step"] == step}
    return [v - key[(b, c, s)] for (v_, c, s), v in key.items() if v_ == a and (b, c, s) in key]


def paired_table(results: list[dict[str, Any]], cfg: BenchConfig) -> str:
    """Each variant minus ``--paired-to`` at each sweep step, paired by (concept, seed): mean ± 95% CI in points."""
    ref = cfg.paired_to
    lines = [f"Minus {ref}, paired by (concept, seed), percentage points, mean ± 95% CI:\n",
             "| regime | variant | step | fidelity | alignment | both | pairs |", "|---|---|---|---|---|---|---|"]
    for g in cfg.regimes:
        for v in (v for v in cfg.variants if v != ref):
            for step in cfg.sweep:
                d = {m: paired_diffs(results, v, ref, g, step, m) for m in ("fidelity", "alignment", "both")}
                if d["fidelity"]:
                    cells = [f"{100 * mean_ci(x)[0]:+.1f} ± {100 * mean_ci(x)[1]:.1f}" for x in d.values()]
                    lines.append(f"| {g} | {v} | {step} | {' | '.join(cells)} | {len(d['fidelity'])} |")
    return "\n".join(lines)


def report(results: list[dict[str, Any]], cfg: BenchConfig, seconds: float) -> str:
    """Table, JSON, curves and grids into ``cfg.out``; returns the table."""
    rows = summarize(results, cfg)
    comps = comparisons(results, cfg)
    default_steps = _default_steps(cfg.model)
    step = min(cfg.sweep, key=lambda s: abs(s - default_steps))  # the sweep point nearest the trainer's default
    table = markdown(rows, comps, cfg, by_concept(results, cfg, step))
    if cfg.paired_to:
        table += "\n" + paired_table(results, cfg) + "\n"
    done = {g: sorted({(r["concept"], r["seed"]) for r in results if r["regime"] == g}) for g in cfg.regimes}
    table += "".join(f"\n{g}: {len(v)} of {len(cfg.concepts) * len(cfg.seeds)} (concept, seed) runs per variant "
                     f"completed: {', '.join(f'{c}/{s}' for c, s in v)}.\n" for g, v in done.items())
    save_grids(results, cfg, cfg.out)
    plot_curves(rows, cfg, cfg.out / "curves.png")
    np.savez_compressed(cfg.out / "images.npz", *[r["images"] for r in results])  # for --merge
    plain = [{k: v for k, v in r.items() if k != "images"} for r in results]
    (cfg.out / "results.json").write_text(json.dumps({"config": {**asdict(cfg), "out": str(cfg.out)}, "runs": plain,
                                                      "summary": rows, "paired": comps, "seconds": round(seconds)},
                                                     indent=1))
    (cfg.out / "table.md").write_text(table)
    sys.stdout.write(table)
    sys.stdout.write(f"{len(results)} evaluated checkpoints in {seconds / 60:.1f} min; per-run figures in "
                     f"{cfg.out / 'results.json'}\n")
    return table


def generation_settings(model: str | None, steps: int | None, guidance: float | None) -> tuple[int, float]:
    """(sampling steps, guidance): the given ones, else those the demo model's generation was measured with (its
    demo_model.json), else 20 and 4.0."""
    from lora_diffusion.demo.model import demo_model_info, is_demo_model, resolve_demo_name

    source = resolve_demo_name(model)
    measured = demo_model_info(source).get("metrics", {}).get("generation", {}) if is_demo_model(source) else {}
    return (int(steps or measured.get("steps", 20)),
            float(guidance if guidance is not None else measured.get("guidance", 4.0)))


def _default_steps(model: str | None) -> int:
    from lora_diffusion.demo.model import TRAIN_DEFAULTS, train_defaults

    return int((train_defaults(model) or TRAIN_DEFAULTS).get("max_train_steps", 500))


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

    unknown = [v for v in cfg.variants if parse_variant(v)[0] not in (*ld.variant_names(), SENSITIVITY)]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; registered: {ld.variant_names()} (name[:rank]), or "
                         f"{SENSITIVITY}:R")
    if cfg.paired_to is not None and cfg.paired_to not in cfg.variants:
        raise SystemExit(f"--paired-to {cfg.paired_to!r}: expected one of --variants {list(cfg.variants)}")
    stray = [o for o in cfg.variant_overrides if o.partition("=")[0] not in cfg.variants]
    if stray:
        raise SystemExit(f"--variant-set: {stray} name no entry of --variants {list(cfg.variants)}")
    for v in cfg.variants:
        variant_options(cfg.variant_overrides, v)
    bad = [c for c in cfg.concepts if c not in world.SHAPES and c not in world.TEXTURES]
    if bad:
        raise SystemExit(f"--concepts: unknown shapes/textures {bad}; held out: {list(DEFAULT_CONCEPTS)}")
    if [g for g in cfg.regimes if g not in REGIMES + EXTRA_REGIMES]:
        raise SystemExit(f"--regimes: expected some of {list(REGIMES + EXTRA_REGIMES)}, found {list(cfg.regimes)}")
    if cfg.prompts < 1 or cfg.images < 1 or cfg.jobs < 1 or min(cfg.sweep) < 1:
        raise SystemExit("--prompts, --images, --jobs and every --sweep step must be >= 1")


if __name__ == "__main__":
    main()
