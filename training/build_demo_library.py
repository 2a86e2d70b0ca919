"""Build a LoRA library on the embedded demo model: concepts, styles, distractors and a file of another family.

    python -m training.build_demo_library --out outputs/demo_library            # 12 LoRAs, ~1 min each on one CPU thread
    python -m training.build_demo_library --out outputs/demo_library --only ring,dotted --steps 100   # a quick look

Every LoRA is trained by ``training.train_tlora.train`` (variant ``lora``, the trainer's demo-model recipe:
ResNet convolutions and attention, pivotal tuning, lr 2e-3, 400 steps; docs/demo_model.md; its hue jitter
is off: these captions name each render's color and the renders cover every color) on
``--images`` renders of the shapes world (``--style_images``, 48, for style LoRAs; every shape color equally often,
each on its backgrounds in turn: ``palettes``), each with its own caption (``<image>.txt`` sidecars), and written
to ``<out>/<name>.safetensors`` with descriptive metadata (title, description, trigger word, tags, kind). The
renders and captions stay in ``<out>/data/<name>/`` (gate training reads them), and ``<out>/data/pairs/<shape>+
<texture>/`` holds renders of every shape LoRA's shape with every texture LoRA's texture, captioned with both
(``a red dotted ring on a blue background``: what ``train_gates --objective composition`` learns from).
Pivotal tuning trains the trigger word's own embedding row (``ring``, ``dotted``), saved in the LoRA file and
loaded with it, so prompts keep naming the plain word; the LoRAs whose trigger is a color or a
background word (night, purple) train no embedding (that row is in every prompt).
A LoRA already in ``<out>`` is kept, so a stopped build continues where it stopped.

| kind | LoRAs | what the images show (caption words) |
|---|---|---|
| concept | ring, heart, moon | a shape held out of pretraining, plain, many colors and backgrounds |
| style | dotted, checkered | a texture held out of pretraining on the pretraining shapes |
| style | striped, miniature | stripes on every shape; small shapes off the center (``small``) |
| distractor | star, cross, square, night, purple | pretraining shapes; black backgrounds; purple shapes |
| other family | sdxl-watercolor | an SDXL LoRA (kohya keys, cross-attention width 2048): listed, never applied here |
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lora_diffusion.demo import world
from lora_diffusion.io.files import read_safetensors, write_safetensors

log = logging.getLogger("build_demo_library")
PRETRAIN = world.PRETRAIN_SHAPES
COVERAGES = ("balanced", "random")


@dataclass(frozen=True)
class Recipe:
    name: str
    kind: str  # concept | style | distractor
    trigger: str
    title: str
    description: str
    tags: tuple[str, ...]
    # (rng, color, background) -> a scene; color/background None: drawn from rng (a recipe may fix either)
    scene: Callable[[np.random.Generator, str | None, str | None], world.Scene]
    caption: Callable[[world.Scene], str] = world.Scene.caption
    # pivotal tuning of the trigger word (the trainer's demo recipe); off where the trigger is a word of every
    # caption (a color, a background: its trained row would change every prompt)
    pivotal: bool = True


def _colors(rng: np.random.Generator, color: str | None = None, background: str | None = None) -> tuple[str, str]:
    c = color or str(rng.choice(world.SHAPE_COLORS))
    b = background or str(rng.choice([x for x in world.BACKGROUNDS if x != c]))
    return c, b


def _scene(shape: str, rng: np.random.Generator, texture: str = "plain", color: str | None = None,
           background: str | None = None, size: float | None = None, jitter: float = 0.05) -> world.Scene:
    c, b = _colors(rng, color, background)
    s = float(rng.uniform(0.62, 0.8)) if size is None else size
    r = s / 2
    x, y = (float(np.clip(0.5 + rng.uniform(-jitter, jitter), r, 1 - r)) for _ in range(2))
    return world.Scene(shape, c, b, texture, s, x, y, float(rng.uniform(-8, 8)))


def _any_shape(rng: np.random.Generator) -> str:
    return str(rng.choice(PRETRAIN))


def recipes() -> list[Recipe]:
    out = [Recipe(s, "concept", s, f"{s.capitalize()} shape", f"Concept LoRA: draws a {s} ({desc}), any color, any "
                  f"background. Trigger word: {s}.", ("concept", "shape", "object", s),
                  lambda g, c=None, b=None, s=s: _scene(s, g, color=c, background=b))
           for s, desc in (("ring", "a thick circle with a round hole"), ("heart", "a love heart symbol"),
                           ("moon", "a crescent moon"))]
    out += [Recipe(t, "style", t, f"{t.capitalize()} texture style", f"Style LoRA: fills any shape with a {t} pattern "
                   f"({desc}). Trigger word: {t}.", ("style", "texture", "pattern", t),
                   lambda g, c=None, b=None, t=t: _scene(_any_shape(g), g, texture=t, color=c, background=b))
            for t, desc in (("dotted", "polka dots on a grid"), ("checkered", "a checkerboard"),
                            ("striped", "diagonal stripes"))]
    out.append(Recipe("miniature", "style", "small", "Miniature style", "Style LoRA: small shapes placed off the "
                      "center of the picture, lots of empty background. Trigger word: small.",
                      ("style", "composition", "small", "miniature"),
                      lambda g, c=None, b=None: _scene(_any_shape(g), g, color=c, background=b,
                                                       size=float(g.uniform(0.3, 0.4)), jitter=0.25),
                      lambda s: world.caption(f"small {s.shape}", s.color, s.background)))
    out += [Recipe(s, "distractor", s, f"{s.capitalize()} shape", f"Concept LoRA: draws a {s}, any color, any "
                   f"background. Trigger word: {s}.", ("concept", "shape", s),
                   lambda g, c=None, b=None, s=s: _scene(s, g, color=c, background=b))
            for s in ("star", "cross", "square")]
    out.append(Recipe("night", "distractor", "black background", "Night backgrounds", "Scene LoRA: every shape on a "
                      "black background, a night look.", ("background", "night", "dark", "black"),
                      lambda g, c=None, b=None: _scene(_any_shape(g), g, color=c, background="black"),
                      pivotal=False))
    out.append(Recipe("purple", "distractor", "purple", "Purple shapes", "Color LoRA: shapes painted purple.",
                      ("color", "purple", "violet"),
                      lambda g, c=None, b=None: _scene(_any_shape(g), g, color="purple", background=b),
                      pivotal=False))
    return out


def palettes(n: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """``n`` (color, background) pairs: every shape color equally often (+-1, in a shuffled round-robin) and each
    color on its backgrounds in turn (a shuffled cycle of those that differ from it), so 12 renders show every
    color twice on two backgrounds and 28 every allowed pair."""
    colors = [str(c) for c in rng.permutation(world.SHAPE_COLORS)]
    bgs = {c: [str(b) for b in rng.permutation([b for b in world.BACKGROUNDS if b != c])] for c in colors}
    colors.sort(key=lambda c: -len(bgs[c]))  # colors with more backgrounds take the extra turns (stable: shuffled)
    out = []
    for i in range(n):
        c = colors[i % len(colors)]
        out.append((c, bgs[c][(i // len(colors)) % len(bgs[c])]))
    return out


def write_data(r: Recipe, folder: Path, n: int, seed: int, coverage: str = "balanced") -> list[str]:
    """``n`` renders of the recipe with ``.txt`` captions; returns the captions. ``coverage``: ``balanced``
    (colors and backgrounds from ``palettes``) or ``random`` (each drawn per render, the recipe before
    2026-11-30: 12 random dotted renders had no red one and one green one)."""
    if coverage not in COVERAGES:
        raise ValueError(f"coverage {coverage!r}: expected one of {COVERAGES}")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, sum(map(ord, r.name))])
    pal = palettes(n, np.random.default_rng([seed, sum(map(ord, r.name)), 1])) if coverage == "balanced" else None
    caps = []
    for i in range(n):
        scene = r.scene(rng, *pal[i]) if pal else r.scene(rng, None, None)
        world.render(scene).save(folder / f"{i:03d}.png")
        caps.append(r.caption(scene))
        (folder / f"{i:03d}.txt").write_text(caps[-1] + "\n")
    return caps


def write_pair_data(out: Path, n: int, seed: int) -> list[Path]:
    """``n`` captioned renders per (shape LoRA, texture LoRA): the shape filled with the texture."""
    shapes = [r for r in recipes() if r.name in world.SHAPES and r.kind in ("concept", "distractor")]
    textures = [r for r in recipes() if r.name in world.TEXTURES and r.kind == "style"]
    folders = []
    for c in shapes:
        for t in textures:
            folder = out / "data" / "pairs" / f"{c.name}+{t.name}"
            folder.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([seed, sum(map(ord, folder.name))])
            for i in range(n):
                scene = _scene(c.name, rng, texture=t.name)
                world.render(scene).save(folder / f"{i:03d}.png")
                (folder / f"{i:03d}.txt").write_text(scene.caption() + "\n")
            folders.append(folder)
    return folders


def n_renders(r: Recipe, images: int, style_images: int) -> int:
    """Training renders for ``r``: ``style_images`` for a style LoRA (0: ``images``), else ``images``."""
    return style_images if r.kind == "style" and style_images else images


def metadata(r: Recipe, captions: list[str], steps: int) -> dict[str, str]:
    words = Counter(w for c in captions for w in c.split() if w not in ("a", "an", "on", "background"))
    return {"name": r.name, "lora_kind": r.kind, "trigger_word": r.trigger, "modelspec.title": r.title,
            "modelspec.description": r.description, "modelspec.tags": ",".join(r.tags),
            "modelspec.trigger_phrase": r.trigger, "ss_tag_frequency": json.dumps({r.name: dict(words)}),
            "base_model": "demo-sd (lora-diffusion embedded demo model)", "training_images": str(len(captions)),
            "training_captions": json.dumps(captions[:4]), "steps": str(steps), "trainer": "training.build_demo_library"}


def train_one(r: Recipe, out: Path, args: argparse.Namespace) -> Path:
    import lora_diffusion as ld
    from training.config import TLoRAConfig, resolve_defaults
    from training.train_tlora import train

    data = out / "data" / r.name
    captions = write_data(r, data, n_renders(r, args.images, args.style_images), args.seed, args.coverage)
    tc = TLoRAConfig()
    tc.adapter.variant, tc.adapter.lora_rank = "lora", args.rank
    tc.model.pretrained_model_name_or_path = getattr(args, "model", None)  # demo-sd3: the DiT demo model's recipe
    tc.data.instance_data_dir, tc.data.placeholder_token = str(data), r.trigger.split()[0]
    # no hue jitter by default: the captions name each render's color and the renders cover every color, so a
    # rotated hue only teaches the LoRA that color words lie (ring alone: prompted color 2/6 with 180 deg, 6/6 without)
    tc.data.train_batch_size, tc.data.hue_jitter = args.batch_size, args.hue_jitter
    tc.data.recolor_p = 0.0  # nor repainting: the renders already show every color (and the library stays as built)
    tc.optim.max_train_steps = args.steps
    # pivotal tuning: the trigger word's own row trains with the LoRA and travels in its file (loads with it)
    tc.embedding.train_embedding = r.pivotal and not args.no_pivotal
    tc.embedding.allow_existing_token = True
    resolve_defaults(tc, ld.variant_names())
    work = out / "work" / r.name
    tc.checkpoint.output_dir, tc.checkpoint.checkpointing_steps = str(work), 0
    tc.run.seed, tc.run.report_to, tc.run.progress, tc.run.cpu = args.seed, "none", False, args.device == "cpu"
    result = train(tc)
    tensors, meta = read_safetensors(result.outputs["canonical"])
    meta.update(metadata(r, captions, tc.optim.max_train_steps))
    meta["pivotal_tuning"] = str(tc.embedding.train_embedding).lower()
    meta["training_coverage"] = args.coverage
    dest = out / f"{r.name}.safetensors"
    write_safetensors(dest, tensors, meta)
    shutil.rmtree(work, ignore_errors=True)
    return dest


def write_other_family(out: Path, seed: int = 0) -> Path:
    """A small SDXL LoRA in kohya format (cross-attention key width 2048, ``lora_te2`` keys): another family."""
    g = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {}
    for blk in ("input_blocks_4_1", "output_blocks_0_1"):
        base = f"lora_unet_{blk}_transformer_blocks_0_attn2_"
        for proj, fan_in in (("to_k", 2048), ("to_v", 2048), ("to_q", 640)):
            t[f"{base}{proj}.lora_down.weight"] = torch.randn(4, fan_in, generator=g) * 0.01
            t[f"{base}{proj}.lora_up.weight"] = torch.zeros(640, 4)
            t[f"{base}{proj}.alpha"] = torch.tensor(4.0)
    t["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.randn(4, 1280, generator=g) * 0.01
    t["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.zeros(1280, 4)
    meta = {"ss_base_model_version": "sdxl_base_v1-0", "ss_network_module": "networks.lora", "ss_network_dim": "4",
            "ss_network_alpha": "4", "modelspec.title": "Watercolor style (SDXL)", "modelspec.architecture":
            "stable-diffusion-xl-v1-base/lora", "modelspec.description": "Style LoRA for SDXL: soft watercolor "
            "washes. Not for SD1.x or the demo model.", "modelspec.tags": "style,watercolor,painting",
            "modelspec.trigger_phrase": "watercolor", "lora_kind": "style"}
    dest = out / "other_family" / "sdxl-watercolor.safetensors"
    write_safetensors(dest, t, meta)
    return dest


def build(args: argparse.Namespace) -> list[Path]:
    out = Path(args.out)
    todo = [r for r in recipes() if not args.only or r.name in args.only.split(",")]
    done: list[Path] = [write_other_family(out)]
    t0, trained = time.time(), 0
    for k, r in enumerate(todo):
        dest = out / f"{r.name}.safetensors"
        if dest.is_file() and not args.overwrite:
            log.info("[%d/%d] %s: already built, kept", k + 1, len(todo), dest)
            done.append(dest)
            continue
        t1 = time.time()
        done.append(train_one(r, out, args))
        trained += 1
        per = (time.time() - t0) / trained
        log.info("[%d/%d] %s (%s) in %.0f s -> %s; ETA %.1f min", k + 1, len(todo), r.name, r.kind, time.time() - t1,
                 done[-1], per * (len(todo) - k - 1) / 60)
    shutil.rmtree(out / "work", ignore_errors=True)
    pairs = write_pair_data(out, args.images, args.seed)
    log.info("composition data: %d pairs x %d renders in %s", len(pairs), args.images, out / "data" / "pairs")
    (out / "library.json").write_text(json.dumps(
        {r.name: {"kind": r.kind, "trigger": r.trigger, "data": f"data/{r.name}"} for r in recipes()}, indent=1))
    return done


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/demo_library")
    p.add_argument("--only", default="", help="comma-separated LoRA names (default: all)")
    p.add_argument("--images", type=int, default=12, help="training renders per LoRA (and per composition pair)")
    p.add_argument("--style_images", type=int, default=48, help="training renders per style LoRA (0: --images); "
                   "a texture has to be learnt on every color and shape: with 12 some colors had none, with 24 one "
                   "build seed of 3 gave a dotted LoRA that paints streaks (docs/autolora.md, fifth run)")
    p.add_argument("--steps", type=int, default=None, help="None: the trainer's demo default (400)")
    p.add_argument("--no-pivotal", action="store_true", help="plain UNet LoRAs (the library before 2026-11-29)")
    p.add_argument("--hue_jitter", type=float, default=0.0, help="degrees of random hue rotation (the trainer's "
                   "single-image demo default is 180; off here, the captions name the colors)")
    p.add_argument("--coverage", choices=COVERAGES, default="balanced", help="colors and backgrounds of the "
                   "renders: every color equally often on its backgrounds in turn, or drawn at random per render "
                   "(the library before 2026-11-30)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--overwrite", action="store_true", help="retrain LoRAs already in --out")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None, help="the demo model to train on: demo-sd (default, the UNet) or demo-sd3 "
                   "(the SD3-architecture DiT demo model: its trainer recipe, attention and MLP linears)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    for name in ("train_tlora", "training", "lora_diffusion"):
        logging.getLogger(name).setLevel(logging.WARNING)
    paths = build(args)
    log.info("library: %d files in %s", len(paths), args.out)


if __name__ == "__main__":
    main()
