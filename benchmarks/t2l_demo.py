"""Text-to-LoRA for the demo world: how far a UNet hypernetwork trained by reconstruction gets on held-out concepts.

    python -m training.train_t2l --mode recon --component unet --library outputs/t2l_demo_library \\
        --holdout ring,heart,dotted --out outputs/t2l_unet --steps 1000
    python benchmarks/t2l_demo.py --hyper outputs/t2l_unet/t2l.safetensors --library outputs/t2l_demo_library \\
        --concepts ring,heart,dotted,moon,checkered --out outputs/t2l_demo_bench

For every library LoRA (held out or trained on): the reconstruction error of the generated LoRA,
``sum_m ||ΔW_gen - ΔW_file||² / sum_m ||ΔW_file||²`` over the UNet modules (ΔW = s·B·A, conv A flattened), next to
the same error of the mean ΔW of the training LoRAs (what a hypernetwork that ignores the text would give), the
cosine of the generated ΔW to the file's, the training LoRA it is nearest to, and the error of the best
least-squares blend of the (other) training LoRAs: how much of a LoRA any blend of the library could give. For each
``--concepts`` entry, images drawn as the personalization benchmark draws them (``a green ring on a black
background``; a texture as a word on other shapes: ``a green dotted star on ...``), read by the evaluator, under:

- base: no adapter;
- generated: the hypernetwork's UNet LoRA for ``a <shape> shape`` / ``<texture> texture``;
- oracle-unet: the library file's UNet LoRA alone (the ceiling for a UNet-only generator);
- oracle: the whole library file (its UNet LoRA and its pivotal-tuned token embedding, as users load it).

fidelity: the evaluator sees the concept's shape (texture); alignment: the prompted color and background (and
shape, for a texture); both: one image that does both. Means over images with 95% intervals (Student t).
Writes ``results.json``, ``table.md`` and ``grid.png`` (one row per condition) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.personalization import is_texture, recontext_prompts, recontext_shapes, score, training_scene  # noqa: E402
from lora_diffusion.demo import world  # noqa: E402

log = logging.getLogger("t2l_demo")
CONDITIONS = ("base", "generated", "oracle-unet", "oracle")


def description(concept: str) -> str:
    return f"{concept} texture" if is_texture(concept) else f"a {concept} shape"


def delta(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], s: float) -> dict[str, torch.Tensor]:
    """{module: ΔW (out, in·k)} of flattened (A (r, in·k), B (out, r)) factors."""
    return {n: s * b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1) for n, (a, b) in factors.items()}


def rel_error(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    num = sum(float((got[n] - ref[n]).square().sum()) for n in ref)
    return num / sum(float(r.square().sum()) for r in ref.values())


def cosine(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Cosine of two LoRAs' ΔW, all modules concatenated."""
    x, y = (torch.cat([d[n].flatten() for n in sorted(b)]) for d in (a, b))
    return float(x @ y / (x.norm() * y.norm()).clamp_min(1e-12))


def span_error(deltas: dict[str, dict[str, torch.Tensor]], others: list[str], concept: str) -> float:
    """Relative error of the best least-squares combination of the ``others``' ΔW for ``concept``'s: how much of
    it any blend of those LoRAs could reproduce."""
    flat = {k: torch.cat([d[n].flatten().double() for n in sorted(d)]) for k, d in deltas.items()}
    basis, y = torch.stack([flat[k] for k in others], 1), flat[concept]
    coef = torch.linalg.lstsq(basis, y[:, None]).solution
    return float((basis @ coef - y[:, None]).square().sum() / y.square().sum())


def unflatten(hyper: Any, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, tuple[torch.Tensor, ...]]:
    """Flattened file factors back to the core's conv layout (A (r, in, *k), B (out, r, 1, 1))."""
    out = {}
    for s in hyper.slots:
        a, b = factors[s.name]
        out[s.name] = (a.reshape(a.shape[0], s.in_features, *s.kernel), b.reshape(*b.shape, *(1,) * len(s.kernel)))
    return out


def recon_table(hyper: Any, emb: Any, library: Path, trained: set[str]) -> list[dict[str, Any]]:
    from lora_diffusion.hyper.recon import describe_file, read_lora_factors
    from lora_diffusion.hyper.t2l import embed_description

    rows, files = [], sorted(library.glob("*.safetensors"))
    deltas = {p.stem: delta(read_lora_factors(p, hyper), hyper.scaling) for p in files}
    mean = {n: torch.stack([deltas[k][n] for k in trained]).mean(0) for n in next(iter(deltas.values()))}
    for p in files:
        concept = p.stem
        text = description(concept) if concept in world.SHAPES + world.TEXTURES else describe_file(p)[0]
        t0 = time.perf_counter()
        gen = hyper.generate(embed_description(emb, text))
        ms = 1e3 * (time.perf_counter() - t0)
        got = delta({n: (a.flatten(1), b.flatten(1)) for n, (a, b) in gen.items()}, hyper.scaling)
        span = span_error(deltas, sorted(trained - {concept}), concept)
        cos = {k: cosine(got, deltas[k]) for k in trained}
        near = max(cos, key=cos.get)
        rows.append({"lora": concept, "split": "train" if concept in trained else "held-out", "description": text,
                     "rel_error": round(rel_error(got, deltas[concept]), 4),
                     "mean_lora_rel_error": round(rel_error(mean, deltas[concept]), 4), "generate_ms": round(ms, 1),
                     "cos_own": round(cosine(got, deltas[concept]), 3), "nearest_train": near,
                     "cos_nearest": round(cos[near], 3), "span_rel_error": round(span, 4)})
        log.info("%s", rows[-1])
    return rows


def draw(pipe: Any, concept: str, seed: int, prompts: int, images: int, steps: int, guidance: float
         ) -> tuple[np.ndarray, list[dict[str, str]], world.Scene]:
    train = training_scene(concept, seed)
    pairs = recontext_prompts(train, prompts, seed)
    kind = "texture" if is_texture(concept) else "shape"
    asked = [{kind: concept, "color": c, "background": b} for c, b in pairs for _ in range(images)]
    texts = [world.caption(concept, c, b) for c, b in pairs for _ in range(images)]
    if kind == "texture":  # the texture LoRAs' trigger is a texture word: ask for it on other shapes
        shapes = recontext_shapes(train, len(pairs))
        asked = [{**a, "shape": shapes[i // images]} for i, a in enumerate(asked)]
        texts = [world.caption(f"{concept} {shapes[i // images]}", a["color"], a["background"])
                 for i, a in enumerate(asked)]
    g = torch.Generator().manual_seed(1000 + seed)
    out = pipe(texts, num_inference_steps=steps, guidance_scale=guidance, generator=g, output_type="np").images
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8), asked, train


def apply_condition(pipe: Any, hyper: Any, emb: Any, cond: str, concept: str, library: Path) -> None:
    import lora_diffusion as ld
    from lora_diffusion.hyper.recon import read_lora_factors
    from lora_diffusion.hyper.t2l import apply_generated, text_to_lora

    if cond == "generated":
        text_to_lora(pipe.unet, hyper, description(concept), emb, name="bench")
    elif cond == "oracle-unet":
        apply_generated(pipe.unet, hyper, unflatten(hyper, read_lora_factors(library / f"{concept}.safetensors",
                                                                             hyper)), name="bench")
    elif cond == "oracle":
        ld.load_adapter(pipe, library / f"{concept}.safetensors", name="bench")


def mean_ci(x: list[float]) -> tuple[float, float]:
    from scipy import stats

    a = np.asarray(x, dtype=float)
    if len(a) < 2:
        return float(a.mean()), float("nan")
    return float(a.mean()), float(stats.t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / np.sqrt(len(a)))


def evaluate(pipe: Any, evaluator: Any, hyper: Any, emb: Any, args: argparse.Namespace, library: Path,
             trained: set[str]) -> tuple[list[dict[str, Any]], dict[tuple[str, str], np.ndarray]]:
    import lora_diffusion as ld

    rows, grid = [], {}
    for concept in args.concepts.split(","):
        for cond in CONDITIONS:
            per: dict[str, list[float]] = {}
            apply_condition(pipe, hyper, emb, cond, concept, library)
            try:
                for seed in range(args.seeds):
                    imgs, asked, train = draw(pipe, concept, seed, args.prompts, args.images, args.steps, args.guidance)
                    preds = evaluator.predict(imgs)
                    kind = "texture" if is_texture(concept) else "shape"
                    prompted = ("color", "background") + (("shape",) if kind == "texture" else ())
                    for p, a in zip(preds, asked):
                        fid = float(p[kind] == a[kind])
                        ali = float(all(p[k] == a[k] for k in prompted))
                        for k, v in (("fidelity", fid), ("alignment", ali), ("both", fid * ali)):
                            per.setdefault(k, []).append(v)
                    score(preds, asked, train)  # the personalization benchmark's reading (same definitions)
                    grid.setdefault((concept, cond), imgs[:: args.images][:8])
            finally:
                if "bench" in ld.list_adapters(pipe):
                    ld.remove_adapters(pipe, ["bench"])
            row = {"concept": concept, "split": "train" if concept in trained else "held-out", "condition": cond,
                   "n": len(per["fidelity"])}
            for k, v in per.items():
                m, ci = mean_ci(v)
                row[k], row[f"{k}_ci"] = round(m, 3), round(ci, 3)
            rows.append(row)
            log.info("%s", row)
    return rows, grid


def save_grid(grid: dict[tuple[str, str], np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(grid)
    cols = max(len(v) for v in grid.values())
    fig, axes = plt.subplots(len(keys), cols, figsize=(cols * 0.9, len(keys) * 0.9), squeeze=False)
    for i, k in enumerate(keys):
        for j in range(cols):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(grid[k]):
                ax.imshow(grid[k][j])
        axes[i][0].text(-0.1, 0.5, f"{k[0]}\n{k[1]}", transform=axes[i][0].transAxes, ha="right", va="center",
                        fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(recon: list[dict[str, Any]], evals: list[dict[str, Any]]) -> str:
    lines = ["| LoRA | split | description | rel. ΔW error (generated) | rel. ΔW error (mean of training LoRAs) | "
             "cos(generated, file) | nearest training LoRA (cos) | best blend of the other training LoRAs |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['lora']} | {r['split']} | {r['description'][:40]} | {r['rel_error']:.3f} | "
              f"{r['mean_lora_rel_error']:.3f} | {r['cos_own']:.2f} | {r['nearest_train']} ({r['cos_nearest']:.2f}) | "
              f"{r['span_rel_error']:.3f} |"
              for r in recon]
    lines += ["", "| concept | split | condition | fidelity | alignment | both | n |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['concept']} | {r['split']} | {r['condition']} | {r['fidelity']:.2f} ± {r['fidelity_ci']:.2f} | "
              f"{r['alignment']:.2f} ± {r['alignment_ci']:.2f} | {r['both']:.2f} ± {r['both_ci']:.2f} | {r['n']} |"
              for r in evals]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hyper", required=True)
    p.add_argument("--library", required=True)
    p.add_argument("--concepts", default="ring,heart,dotted,moon,checkered")
    p.add_argument("--seeds", type=int, default=2, help="prompt sets per concept (each: --prompts x --images)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="outputs/t2l_demo_bench")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    from lora_diffusion.demo.evaluator import load_evaluator
    from lora_diffusion.generate import load_pipeline
    from lora_diffusion.hyper.t2l import T2L, make_embedder

    out, library = Path(args.out), Path(args.library)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(None)
    pipe.set_progress_bar_config(disable=True)
    hyper, emb = T2L.load(args.hyper, pipe.unet), make_embedder()
    trained = {Path(f).stem for _, f in json.loads((Path(args.hyper).parent / "log.json").read_text())["pairs"]}
    t0 = time.time()
    recon = recon_table(hyper, emb, library, trained)
    evals, grid = evaluate(pipe, load_evaluator(None), hyper, emb, args, library, trained)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "recon": recon, "eval": evals,
                                                  "seconds": round(time.time() - t0, 1)}, indent=1))
    (out / "table.md").write_text(markdown(recon, evals))
    save_grid(grid, out / "grid.png")
    print(markdown(recon, evals))


if __name__ == "__main__":
    main()
