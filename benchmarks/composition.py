"""Concept + style composition on the embedded demo model, scored by the evaluator: which fusion keeps both?

    python -m training.build_demo_library --out outputs/demo_library                  # the LoRAs (once)
    python -m training.train_gates --loras <the concept and style LoRAs> --output_dir outputs/gates
    python benchmarks/composition.py --library outputs/demo_library --gates outputs/gates/gates.safetensors

For every (concept LoRA, style LoRA) pair, e.g. ring + dotted, ``--prompts`` prompts that also name a color and a
background (``a red dotted ring on a blue background``), ``--seeds`` images each, drawn with each method:

- base / concept only / style only: references;
- static: the sum at weight 1 (diffusers ``set_adapters([c, s], [1, 1])``);
- static-tuned: the best (w_c, w_s) of a grid, picked on separate tuning prompts and seeds (ties go to (1, 1));
- klora (K-LoRA), scheduled (subject early, style late), gated (AutoLoRA gates from ``train_gates``),
  mole (MoLE gates from ``train_gates --method mole``, trained over a set of LoRAs; the pair active, the rest off).

The evaluator reads shape, texture, color and background of every image. ``both`` = the concept's shape AND
the style's texture; ``all`` = both and the prompted color and background. 95% Wilson intervals over images;
methods compared on the same images with an exact McNemar test (``--paired``).
Writes ``results.json``, ``table.md`` and ``grid.png`` (one row per method) to ``--out``; ``--merge DIR[:LABEL] ...``
joins the results of several runs (e.g. gates trained later) into one table and grid; ``--pool LABEL=DIR[+DIR] ...``
tabulates runs on different library builds side by side and pooled (``--pool_over``), with paired tests per build and
pooled (``pooled.md``, ``pooled.json``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lora_diffusion as ld  # noqa: E402
from lora_diffusion.demo import world  # noqa: E402
from lora_diffusion.fusion import fuse, load_gates, load_mixture_weights, unfuse  # noqa: E402
from lora_diffusion.io.library import sha256  # noqa: E402

log = logging.getLogger("composition")
METHODS = ("base", "concept", "style", "static", "static-tuned", "klora", "scheduled", "scheduled-tuned", "gated", "mole")
GRID = (0.5, 0.75, 1.0, 1.25)
SWITCHES = (0.5, 0.65, 0.8, 0.9)  # scheduled-tuned: progress at which the style takes over
TUNE_DEFAULT = {"static-tuned": (1.0, 1.0), "scheduled-tuned": 0.5}  # the untuned setting ties go to
TUNE_PROMPTS, TUNE_SEEDS = 3, (10_000, 10_001)  # tuning images per setting: prompts x seeds


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def prompts_for(concept: str, style: str, n: int, seed: int, skip: int = 0) -> list[tuple[str, str, str]]:
    """``n`` (prompt, color, background) with a seeded color and background: entries ``skip:skip + n`` of a seeded
    order of the (color, background) pairs, so ``skip=k`` never repeats the first ``k`` (the test prompts)."""
    rng = np.random.default_rng([seed, world.SHAPES.index(concept), world.TEXTURES.index(style)])
    pairs = [(c, b) for c in world.SHAPE_COLORS for b in world.BACKGROUNDS if c != b]
    if skip + n > len(pairs):
        raise ValueError(f"{skip} + {n} prompts asked for {concept}+{style}; only {len(pairs)} (color, background) "
                         "pairs exist")
    order = rng.permutation(len(pairs))[skip:skip + n]
    return [(world.caption(concept, c, b, style), c, b) for c, b in (pairs[i] for i in order)]


@torch.no_grad()
def draw(pipe: Any, prompts: list[str], seeds: list[int], steps: int, guidance: float, batch: int = 48) -> np.ndarray:
    out = []
    for k in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[k:k + batch]]
        im = pipe(prompts[k:k + batch], num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                  output_type="np").images
        out.append(im)
    return (np.clip(np.concatenate(out), 0, 1) * 255).round().astype(np.uint8)


def setup(pipe: Any, method: str, c: str, s: str, args: argparse.Namespace, tuned: dict[tuple[str, str], tuple]) -> None:
    unfuse(pipe)
    roles = {c: "subject", s: "style"}
    if method == "base":
        ld.disable_adapters(pipe)
    elif method in ("concept", "style"):
        fuse(pipe, [c if method == "concept" else s], "static")
    elif method == "static":
        fuse(pipe, [c, s], "static", weights=[1.0, 1.0])
    elif method == "static-tuned":
        fuse(pipe, [c, s], "static", weights=list(tuned[(c, s)]))
    elif method == "scheduled-tuned":
        fuse(pipe, [c, s], "scheduled", roles=roles, switch=tuned[("scheduled", c, s)], width=0.2)
    elif method.startswith("gated"):
        f = fuse(pipe, [c, s], "gated", roles=roles)
        load_gates(f, args.gate_files[method], {c: sha256(args.files[c]), s: sha256(args.files[s])},
                   allow_unseen=args.allow_unseen)
    elif method == "mole":  # gates trained over the whole set; the pair is active, the others off (as in training)
        f = fuse(pipe, args.mole_names, "mole")
        load_mixture_weights(f, pipe, args.mole)
        ld.set_adapters(pipe, [c, s])
    else:
        fuse(pipe, [c, s], method, roles=roles)


def score(preds: list[dict[str, str]], asked: list[dict[str, str]]) -> dict[str, np.ndarray]:
    r = {k: np.array([p[k] == a[k] for p, a in zip(preds, asked)]) for k in ("shape", "texture", "color", "background")}
    r["both"] = r["shape"] & r["texture"]
    r["all"] = r["both"] & r["color"] & r["background"]
    return r


def run_set(pipe: Any, ev: Any, method: str, pairs: list[tuple[str, str]], n_prompts: int, seeds: list[int],
            args: argparse.Namespace, tuned: dict, prompt_seed: int, skip: int = 0) -> dict[str, Any]:
    per_pair, images = {}, {}
    for c, s in pairs:
        setup(pipe, method, c, s, args, tuned)
        ps = prompts_for(c, s, n_prompts, prompt_seed, skip)
        prompts = [p for p, _, _ in ps for _ in seeds]
        asked = [{"shape": c, "texture": s, "color": col, "background": bg} for _, col, bg in ps for _ in seeds]
        ims = draw(pipe, prompts, [sd for _ in ps for sd in seeds], args.steps, args.guidance)
        per_pair[f"{c}+{s}"] = score(ev.predict(ims), asked)
        images[f"{c}+{s}"] = ims
    unfuse(pipe)
    return {"per_pair": per_pair, "images": images}


def closest_best(scores: dict[Any, tuple], default: Any) -> Any:
    """The setting with the best score (tuples compare in order: 'both', then 'all'); among tied settings the one
    nearest ``default`` (the untuned method: weights (1, 1), switch 0.5), then the first in ``scores``' order.
    So tuning never leaves the untuned setting for one that only ties with it on the tuning images."""
    def dist(v: Any) -> float:
        return float(np.linalg.norm(np.subtract(v, default)))

    top = max(scores.values())
    return min((v for v in scores if scores[v] == top), key=dist)


def tune(pipe: Any, ev: Any, pairs: list[tuple[str, str]], args: argparse.Namespace, method: str) -> dict[tuple, Any]:
    """Per pair, the best setting of ``method`` (static-tuned: (w_c, w_s) on a grid; scheduled-tuned: the switch)
    by 'both', then 'all', ties to the untuned default (``closest_best``), on ``TUNE_PROMPTS`` prompts x
    ``TUNE_SEEDS``: prompts that follow the test prompts in the same seeded order (disjoint from them), seeds that
    the test (seeds 0..n-1) does not use."""
    best: dict[tuple, Any] = {}
    grid = list(itertools.product(GRID, GRID)) if method == "static-tuned" else list(SWITCHES)
    for c, s in pairs:
        key = (c, s) if method == "static-tuned" else ("scheduled", c, s)
        scores = {}
        for v in grid:
            res = run_set(pipe, ev, method, [(c, s)], TUNE_PROMPTS, list(TUNE_SEEDS), args, {key: v}, prompt_seed=0,
                          skip=args.prompts)
            r = res["per_pair"][f"{c}+{s}"]
            scores[v] = (float(r["both"].mean()), float(r["all"].mean()))
        best[key] = closest_best(scores, TUNE_DEFAULT[method])
        ties = sum(x == scores[best[key]] for x in scores.values())
        log.info("%s %s+%s: %s (tuning both %.2f, all %.2f; %d settings tied)", method, c, s, best[key],
                 *scores[best[key]], ties)
    return best


def summarize(results: dict[str, dict]) -> list[dict[str, Any]]:
    rows = []
    for m, res in results.items():
        row: dict[str, Any] = {"method": m}
        for k in ("both", "all", "shape", "texture", "color", "background"):
            v = np.concatenate([r[k] for r in res["per_pair"].values()])
            row[k], row[k + "_n"], row[k + "_ci"] = float(v.mean()), int(v.size), wilson(int(v.sum()), int(v.size))
        row["per_pair_both"] = {p: float(r["both"].mean()) for p, r in res["per_pair"].items()}
        for k in ("both", "all", "shape", "texture", "color", "background"):  # per image, in run order (the
            # same in every run): paired comparisons, and which prompts a method misses
            row[f"per_image_{k}"] = np.concatenate([r[k] for r in res["per_pair"].values()]).astype(int).tolist()
        row["seconds"] = res.get("seconds")
        rows.append(row)
    return rows


def mcnemar(a: np.ndarray, b: np.ndarray) -> tuple[int, int, float]:
    """Paired outcomes on the same images: (a only, b only, exact two-sided McNemar p)."""
    n10, n01 = int((a & ~b).sum()), int((~a & b).sum())
    n, k = n10 + n01, min(n10, n01)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    return n10, n01, p


def paired_lines(rows: list[dict[str, Any]], spec: str | None) -> list[str]:
    """``A:B,...`` (default: every gated method against static-tuned, where both have per-image outcomes)."""
    by = {r["method"]: np.array(r["per_image_both"], bool) for r in rows if "per_image_both" in r}
    pairs = ([tuple(x.split(":", 1)) for x in spec.split(",")] if spec else
             [(m, "static-tuned") for m in by if m.startswith("gated") and "static-tuned" in by])
    out = []
    for a, b in pairs:
        if a in by and b in by and len(by[a]) == len(by[b]):
            n10, n01, p = mcnemar(by[a], by[b])
            out.append(f"- {a} vs {b}, same images: both kept by {a} only {n10}, by {b} only {n01}, "
                       f"exact McNemar p = {p:.3g}")
    return ["", "paired (same prompts and seeds):", *out] if out else []


def within_style_reach(rows: list[dict[str, Any]]) -> list[str]:
    """'both kept' on the images whose prompt and seed the style LoRA alone draws with a readable texture (needs a
    'style' row with per-image outcomes): the part of the goal a fusion can reach with this style LoRA."""
    style = next((r for r in rows if r["method"] == "style" and "per_image_texture" in r), None)
    if style is None:
        return []
    mask = np.array(style["per_image_texture"], bool)
    out = ["", f"both kept where the style alone keeps its texture ({int(mask.sum())} of {mask.size} images):"]
    seen = {"base", "concept", "style"}
    for r in rows:
        if r["method"] not in seen and len(r.get("per_image_both", ())) == mask.size:
            seen.add(r["method"])
            b = np.array(r["per_image_both"], bool)
            k, n = int(b[mask].sum()), int(mask.sum())
            lo, hi = wilson(k, n)
            out.append(f"- {r['method']}: {k}/{n} = {100 * k / n:.1f}% [{100 * lo:.0f}, {100 * hi:.0f}]; elsewhere "
                       f"{int(b[~mask].sum())}/{int((~mask).sum())}")
    return out


def markdown(rows: list[dict[str, Any]], tuned: dict, paired: str | None = None) -> str:
    def f(r: dict, k: str) -> str:
        lo, hi = r[k + "_ci"]
        return f"{100 * r[k]:.1f}% [{100 * lo:.0f}, {100 * hi:.0f}]"

    lines = ["| method | both kept (shape AND texture) | all (both + color + background) | shape | texture | color | "
             "background |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {f(r, 'both')} | {f(r, 'all')} | {100 * r['shape']:.0f}% | "
                     f"{100 * r['texture']:.0f}% | {100 * r['color']:.0f}% | {100 * r['background']:.0f}% |")
    pairs = list(rows[0]["per_pair_both"])
    lines += ["", "| both kept, per pair | " + " | ".join(pairs) + " |", "|---|" + "---|" * len(pairs)]
    for r in rows:
        lines.append(f"| {r['method']} | " + " | ".join(f"{100 * r['per_pair_both'][p]:.0f}%" for p in pairs) + " |")
    if tuned:
        lines += ["", "tuned settings: " + ", ".join(f"{'+'.join(k)} {v}" for k, v in tuned.items())]
    return "\n".join(lines + paired_lines(rows, paired) + within_style_reach(rows))


def grid(results: dict[str, dict], path: Path, per_pair: int = 2, scale: int = 3) -> None:
    from PIL import Image, ImageDraw

    methods = list(results)
    pairs = list(results[methods[0]]["images"])
    cell, label_w, head = 32 * scale, 110, 16
    W = label_w + len(pairs) * per_pair * (cell + 2)
    img = Image.new("RGB", (W, head + len(methods) * (cell + 2)), "white")
    d = ImageDraw.Draw(img)
    for j, p in enumerate(pairs):
        d.text((label_w + j * per_pair * (cell + 2) + 2, 2), p, fill="black")
    for i, m in enumerate(methods):
        y = head + i * (cell + 2)
        d.text((4, y + cell // 2 - 6), m, fill="black")
        for j, p in enumerate(pairs):
            ims = results[m]["images"][p]
            for k in range(per_pair):
                idx = k * (len(ims) // per_pair)  # different prompts
                im = Image.fromarray(ims[idx]).resize((cell, cell), Image.NEAREST)
                img.paste(im, (label_w + (j * per_pair + k) * (cell + 2), y))
    img.save(path)


def merge(parts: list[str], out: Path, paired: str | None = None) -> str:
    """One table and grid from several runs' ``--out`` folders (same pairs, prompts and seeds); ``DIR:LABEL``
    renames that run's gated methods ``gated-LABEL``. Writes ``table.md`` and ``grid.png`` to ``out``."""
    from PIL import Image

    rows, tuned, grids = [], {}, []
    for part in parts:
        folder, _, label = part.partition(":")
        res = json.loads((Path(folder) / "results.json").read_text())
        for r in res["rows"]:
            if label and r["method"].startswith("gated"):
                r["method"] = r["method"].replace("gated", f"gated-{label}", 1)
            rows.append(r)
        tuned.update({tuple(k.split("+")): v for k, v in res["tuned"].items()})
        grids.append(Image.open(Path(folder) / "grid.png"))
    out.mkdir(parents=True, exist_ok=True)
    head = 16  # every grid after the first loses its header row (the pair names)
    canvas = Image.new("RGB", (max(g.width for g in grids), sum(g.height for g in grids) - head * (len(grids) - 1)),
                       "white")
    y = 0
    for i, g in enumerate(grids):
        crop = g if i == 0 else g.crop((0, head, g.width, g.height))
        canvas.paste(crop, (0, y))
        y += crop.height
    canvas.save(out / "grid.png")
    table = markdown(rows, tuned, paired)
    (out / "table.md").write_text(table + "\n")
    return table


def load_run(spec: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """``LABEL=DIR[+DIR...]`` -> (label, {method: row}) from those ``--out`` folders' ``results.json`` (runs on one
    library with the same pairs, prompts and seeds, e.g. a K-LoRA run made after the others)."""
    label, sep, dirs = spec.partition("=")
    if not sep or not label or not dirs:
        raise ValueError(f"--pool {spec!r}: expected LABEL=DIR[+DIR...]")
    rows: dict[str, dict[str, Any]] = {}
    for d in dirs.split("+"):
        f = Path(d) / "results.json"
        if not f.is_file():
            raise ValueError(f"--pool {label}: {f} not found (expected a composition.py --out folder)")
        for r in json.loads(f.read_text())["rows"]:
            rows[r["method"]] = r
    return label, rows


def counts(row: dict[str, Any], key: str) -> tuple[int, int]:
    """(images where ``key`` held, images) of one method's row; from per-image outcomes when the run stored them."""
    per = row.get(f"per_image_{key}")
    if per is not None:
        return int(sum(per)), len(per)
    return round(row[key] * row[f"{key}_n"]), int(row[f"{key}_n"])


def pool_table(runs: dict[str, dict[str, dict]], over: list[str], key: str) -> list[str]:
    """Markdown: per method, ``key`` ('both' or 'all') in each run, and pooled over the runs ``over`` (every image of
    those runs counted once, 95% Wilson interval); a method missing from a run is pooled over the others."""
    methods = list(dict.fromkeys(m for rows in runs.values() for m in rows))
    lines = [f"| {key} | " + " | ".join(runs) + f" | pooled over {', '.join(over)} |", "|---|" + "---|" * (len(runs) + 1)]
    for m in methods:
        cells = []
        for rows in runs.values():
            k, n = counts(rows[m], key) if m in rows else (0, 0)
            cells.append(f"{100 * k / n:.1f}%" if n else "-")
        got = [counts(runs[r][m], key) for r in over if m in runs[r]]
        k, n = sum(c[0] for c in got), sum(c[1] for c in got)
        lo, hi = wilson(k, n)
        missing = [r for r in over if m not in runs[r]]
        pooled = f"{100 * k / n:.1f}% [{100 * lo:.0f}, {100 * hi:.0f}] ({k}/{n})" if n else "-"
        if missing and n:
            pooled += f", without {', '.join(missing)}"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {pooled} |")
    return lines


def pool_paired(runs: dict[str, dict[str, dict]], over: list[str], spec: str) -> list[str]:
    """Exact McNemar on 'both kept' for each ``A:B`` of ``spec``, per run and pooled over ``over`` (pairs of images
    of one prompt, seed and library; runs without both methods' per-image outcomes are left out)."""
    out = ["", "paired, both kept (A only vs B only, exact McNemar p):"]
    for a, _, b in (x.partition(":") for x in spec.split(",")):
        cells, pa, pb, used = [], [], [], []
        for label, rows in runs.items():
            ya, yb = rows.get(a, {}).get("per_image_both"), rows.get(b, {}).get("per_image_both")
            if ya is None or yb is None or len(ya) != len(yb):
                continue
            n10, n01, p = mcnemar(np.array(ya, bool), np.array(yb, bool))
            cells.append(f"{label} {n10} vs {n01} (p = {p:.2g})")
            if label in over:
                pa, pb, used = pa + ya, pb + yb, used + [label]
        if pa:
            n10, n01, p = mcnemar(np.array(pa, bool), np.array(pb, bool))
            cells.append(f"**pooled over {', '.join(used)}: {n10} vs {n01} (p = {p:.2g})**")
        out.append(f"- {a} vs {b}: " + ("; ".join(cells) if cells else "no run has both"))
    return out


def pool(specs: list[str], over: str | None, out: Path, paired: str | None = None) -> str:
    """One table across library builds: ``specs`` are ``LABEL=DIR[+DIR...]`` (one build each), ``over`` the labels
    to pool (default: all). Different builds draw different images, so only counts pool; pairs stay within a run.
    Writes ``pooled.md`` and ``pooled.json`` to ``out``."""
    runs = dict(load_run(s) for s in specs)
    labels = over.split(",") if over else list(runs)
    if unknown := [x for x in labels if x not in runs]:
        raise ValueError(f"--pool_over {', '.join(unknown)}: not among the --pool labels {', '.join(runs)}")
    lines = [*pool_table(runs, labels, "both"), "", *pool_table(runs, labels, "all")]
    if paired:
        lines += pool_paired(runs, labels, paired)
    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines)
    (out / "pooled.md").write_text(text + "\n")
    summary = {label: {m: {k: counts(r, k) for k in ("both", "all")} for m, r in rows.items()}
               for label, rows in runs.items()}
    (out / "pooled.json").write_text(json.dumps({"runs": specs, "pooled_over": labels, "counts": summary}, indent=1))
    return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--library", default="outputs/demo_library")
    p.add_argument("--concepts", default="ring,heart,moon")
    p.add_argument("--styles", default="dotted,checkered")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--gates", default="outputs/gates/gates.safetensors",
                   help="gates file(s): PATH or LABEL=PATH,...; each gives a row (gated, gated-LABEL)")
    p.add_argument("--mole", default="outputs/mole/mole.safetensors",
                   help="MoLE gates from train_gates --method mole (method 'mole')")
    p.add_argument("--allow-unseen", action="store_true", help="apply the gates to LoRAs they were not trained with")
    p.add_argument("--prompts", type=int, default=4, help="prompts (color, background) per pair")
    p.add_argument("--seeds", type=int, default=4, help="images per prompt")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--model", default=None, help="demo-sd (default: the UNet demo model) or demo-sd3 (the DiT one; "
                   "its library from build_demo_library --model demo-sd3; sample it at --steps 28 --guidance 7)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "composition")
    p.add_argument("--merge", nargs="+", default=None, metavar="DIR[:LABEL]",
                   help="only merge earlier runs' results into one table and grid in --out (no sampling)")
    p.add_argument("--pool", nargs="+", default=None, metavar="LABEL=DIR[+DIR...]",
                   help="only pool earlier runs across library builds (one LABEL per build; DIR+DIR joins runs on one "
                        "build) into pooled.md/pooled.json in --out (no sampling)")
    p.add_argument("--pool_over", default=None, metavar="LABEL,...", help="the --pool labels to pool (default: all)")
    p.add_argument("--paired", default=None, metavar="A:B,...",
                   help="paired comparisons of 'both kept' on the same images (exact McNemar); default: every gated "
                        "method vs static-tuned")
    return p


def load(args: argparse.Namespace) -> tuple[Any, Any]:
    """The demo pipeline with the pairs' LoRAs (and MoLE's set) loaded, the timestep hook, and the evaluator."""
    from lora_diffusion.demo.evaluator import load_evaluator
    from lora_diffusion.families import denoiser
    from lora_diffusion.generate import install_timestep_hook, load_pipeline

    pipe = load_pipeline(args.model).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    names = args.concepts.split(",") + args.styles.split(",")
    args.files = {n: Path(args.library) / f"{n}.safetensors" for n in names}
    for n, f in args.files.items():
        ld.load_adapter(pipe, f, name=n)
    install_timestep_hook(denoiser(pipe), pipe.scheduler.config.num_train_timesteps)
    if "mole" in args.methods.split(","):
        from lora_diffusion.fusion.mixture import read_info
        from lora_diffusion.io.files import read_header

        args.mole_names = read_info(read_header(args.mole)[1], args.mole)["names"]
        for n in args.mole_names:
            if n not in args.files:
                args.files[n] = Path(args.library) / f"{n}.safetensors"
                ld.load_adapter(pipe, args.files[n], name=n)
    return pipe, load_evaluator()


def method_list(args: argparse.Namespace) -> list[str]:
    """``--methods`` with 'gated' expanded to one row per gates file ('gated' for the first unlabelled one,
    'gated-LABEL'); fills ``args.gate_files``."""
    methods = args.methods.split(",")
    files = [g.partition("=") for g in args.gates.split(",")]
    args.gate_files = {(f"gated-{lab}" if sep else "gated" if not i else f"gated-{i}"): (path if sep else lab)
                       for i, (lab, sep, path) in enumerate(files)}
    if "gated" in methods:
        at = methods.index("gated")
        methods[at:at + 1] = list(args.gate_files)
    return methods


def measure(pipe: Any, ev: Any, args: argparse.Namespace) -> tuple[dict[str, dict], dict]:
    """Every method on every pair's test prompts and seeds (after tuning the tuned methods): (results, tuned)."""
    pairs = [(c, s) for c in args.concepts.split(",") for s in args.styles.split(",")]
    methods = method_list(args)
    tuned: dict = {}
    for m in ("static-tuned", "scheduled-tuned"):
        if m in methods:
            tuned.update(tune(pipe, ev, pairs, args, m))
    seeds = list(range(args.seeds))
    results = {}
    for m in methods:
        t0 = time.time()
        results[m] = run_set(pipe, ev, m, pairs, args.prompts, seeds, args, tuned, prompt_seed=0)
        results[m]["seconds"] = round(time.time() - t0, 1)
        both = np.concatenate([r["both"] for r in results[m]["per_pair"].values()])
        log.info("%-13s both kept %.1f%% (%d images, %.0f s)", m, 100 * both.mean(), both.size, results[m]["seconds"])
    return results, tuned


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.merge:
        print(merge(args.merge, args.out, args.paired))
        return
    if args.pool:
        try:
            print(pool(args.pool, args.pool_over, args.out, args.paired))
        except ValueError as e:
            p.error(str(e))
        return
    logging.getLogger("lora_diffusion").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    pipe, ev = load(args)
    results, tuned = measure(pipe, ev, args)
    rows = summarize(results)
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, tuned, args.paired)
    (args.out / "table.md").write_text(table + "\n")
    tuning = {"prompts": TUNE_PROMPTS, "seeds": list(TUNE_SEEDS), "prompts_after_the_test_ones": args.prompts,
              "ties_to": {m: TUNE_DEFAULT[m] for m in TUNE_DEFAULT if tuned and m in args.methods.split(",")}}
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "tuned": {"+".join(k): v for k, v in tuned.items()},
                                                       "tuning": tuning,
                                                       "config": {k: str(v) for k, v in vars(args).items()}}, indent=1))
    grid(results, args.out / "grid.png")
    print(table)


if __name__ == "__main__":
    main()
