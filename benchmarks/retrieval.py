"""Retrieval quality on a LoRA library whose kinds are known (``library.json`` from training.build_demo_library).

    python -m training.build_demo_library --out outputs/demo_library       # once (5-8 min on CPU, one thread)
    python -m benchmarks.retrieval --library outputs/demo_library --family demo

For every concept x style pair of the library and 5 wordings (``TEMPLATES``: 3 concepts x 4 styles x 5 = 60 fixed
prompts on the default library), is each right LoRA in the top 3? Printed for
phrase-level text scores, whole-prompt text scores, and (when ``<library>/.lora_retriever.safetensors`` exists,
from ``python -m training.train_retriever``) text mixed with weight scores; plus the weight retriever's
same-kind vs cross-kind cosine.

``--heldout DIR`` (LoRAs of the same names trained from another seed: ``build_demo_library --seed 1 --out DIR``;
``--heldout_only NAMES`` takes only those of a full build) copies the library, adds those LoRAs as metadata-less
diffusers files named ``lora_0001`` ..., and reports
whether each is found in the top 4 (2 seeds x concept and style) by the prompts naming its
concept/style (text alone cannot: its description
is its file name), and the cosine between its weight embedding and the seed-0 LoRA of the same name vs the others.

    python -m training.train_retriever --library outputs/demo_library --family demo
    python -m training.build_demo_library --out outputs/demo_library_seed1 --seed 1 \
        --only ring,heart,moon,dotted,checkered,striped
    python -m benchmarks.retrieval --library outputs/demo_library --heldout outputs/demo_library_seed1
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from lora_diffusion.io.files import read_safetensors, write_safetensors
from lora_diffusion.retrieval import LoraLibrary
from lora_diffusion.retrieval.weights import theme_cosines

WORDS = {"ring": ("ring", "rings"), "heart": ("heart", "hearts"), "moon": ("crescent moon", "moon"),
         "dotted": ("dotted", "polka-dot"), "checkered": ("checkered", "checkerboard"), "striped": ("striped", "stripy"),
         "miniature": ("miniature", "tiny")}
TEMPLATES = ("a red {s} {c} on a blue background", "{c1} drawn in {s1} style, yellow background", "{s} {c}, green on white",
             "an orange {c} with a {s1} look, gray backdrop", "{s1} {c1} in purple")


def cases(kinds: dict[str, str]) -> list[tuple[str, str, str]]:
    """(prompt, concept, style) for every concept x style of the library that WORDS can phrase."""
    concepts = [n for n, k in kinds.items() if k == "concept" and n in WORDS]
    styles = [n for n, k in kinds.items() if k == "style" and n in WORDS]
    out = []
    for c in concepts:
        for s in styles:
            for t in TEMPLATES:
                out.append((t.format(c=WORDS[c][0], c1=WORDS[c][1], s=WORDS[s][0], s1=WORDS[s][1]), c, s))
    return out


def top3_rate(lib: LoraLibrary, family: str | None, items: list[tuple[str, str, str]], **kw) -> tuple[float, list[str]]:
    misses = []
    for prompt, c, s in items:
        got = [Path(m.entry.file).stem for m in lib.retrieve(prompt, k=3, family=family, **kw)]
        if c not in got or s not in got:
            misses.append(f"{prompt!r} -> {got}")
    return 1 - len(misses) / len(items), misses


def with_heldout(library: Path, heldout: Path, work: Path, only: list[str] | None = None) -> dict[str, str]:
    """Copy ``library`` to ``work`` (its trained retriever too) and add the LoRAs of ``heldout`` (those named in
    ``only``, if given) as metadata-less diffusers files; returns {new file: the name it was trained as}."""
    shutil.copytree(library, work, ignore=shutil.ignore_patterns(".lora_embeddings", ".lora_library.json", "data"))
    files = sorted(heldout.glob("*.safetensors"))
    if only is not None:
        if missing := sorted(set(only) - {f.stem for f in files}):
            raise FileNotFoundError(f"--heldout {heldout}: no {', '.join(m + '.safetensors' for m in missing)}")
        files = [f for f in files if f.stem in only]
    names = {}
    for i, f in enumerate(files, 1):
        tensors, _ = read_safetensors(f)
        # diffusers names: a bare UNet's keys get the 'unet.' prefix, files that carry it already (pivotal) keep theirs
        anon = {(k if k.startswith(("unet.", "text_encoder")) else f"unet.{k}") + ".weight": v
                for k, v in tensors.items() if k.endswith((".lora_A", ".lora_B"))}
        rel = f"anon/lora_{i:04d}.safetensors"
        write_safetensors(work / rel, anon, {})
        names[rel] = f.stem
    return names


def heldout_report(lib: LoraLibrary, names: dict[str, str], kinds: dict[str, str], family: str | None,
                   where: tuple[str, str] = ("held-out", "library")) -> None:
    r = lib.weight_retriever()
    emb = r.embeddings(lib, lib.usable(family))
    same, cross, twin = [], [], {}
    for rel, name in names.items():
        for f, v in emb.items():
            if f in names:
                continue
            (same if Path(f).stem == name else cross).append(float(emb[rel] @ v))
            if Path(f).stem == name:
                twin[name] = f"{same[-1]:.2f}"
    print(f"held-out ({where[0]}, no metadata) vs library ({where[1]}): same name {sum(same) / max(len(same), 1):.3f}, "
          f"other names {sum(cross) / max(len(cross), 1):.3f} over {len(names)} LoRAs ({twin})")
    for name, kw in (("text only", {"weights": None}), ("text + weights (mix 0.5)", {}),
                     ("weights only (mix 1.0)", {"weight_mix": 1.0})):
        per: dict[str, list[int]] = {n: [0, 0] for n in names.values()}
        for prompt, c, s in cases(kinds):
            got = [m.entry.file for m in lib.retrieve(prompt, k=4, family=family, **kw)]  # 4 right: 2 per seed
            for rel, n in names.items():
                if n in (c, s):
                    per[n][0] += rel in got
                    per[n][1] += 1
        found, total = sum(v[0] for v in per.values()), sum(v[1] for v in per.values())
        detail = ", ".join(f"{n} {f}/{t}" for n, (f, t) in per.items())
        print(f"| held-out LoRA in the top 4 of its prompts, {name} | {found}/{total} | {detail} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--library", required=True)
    p.add_argument("--family", default="demo")
    p.add_argument("--heldout", type=Path, default=None, help="LoRAs of the same names from another seed")
    p.add_argument("--heldout_only", default=None, metavar="NAMES", help="comma-separated: only these LoRAs of "
                   "--heldout (e.g. ring,heart,moon,dotted,checkered,striped of a full build); default all")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    lib = LoraLibrary(a.library)
    kinds = {n: v["kind"] for n, v in json.loads((lib.folder / "library.json").read_text()).items()}
    items = cases(kinds)
    print(f"{len(lib.entries)} files, {len(lib.usable(a.family))} usable for {a.family}; {len(items)} prompts")
    rows = [("phrase-level text", {"weights": None}), ("whole-prompt text", {"weights": None, "phrase_words": 0})]
    if lib.weight_retriever() is not None:
        rows += [("text + weights (mix 0.5)", {}), ("weights only (mix 1.0)", {"weight_mix": 1.0})]
    for name, kw in rows:
        rate, misses = top3_rate(lib, a.family, items, **kw)
        print(f"| {name} | {rate:.3f} ({round(rate * len(items))}/{len(items)}) |")
        for m in misses[:6]:
            print(f"    miss: {m}")
    if (r := lib.weight_retriever()) is not None:
        emb = r.embeddings(lib, lib.usable(a.family))
        files = [f for f in emb if Path(f).stem in kinds]
        same, cross = theme_cosines(torch.stack([emb[f] for f in files]), [kinds[Path(f).stem] for f in files])
        print(f"weight embeddings of {len(files)} LoRAs: same kind {same:.3f}, cross kind {cross:.3f} "
              f"(trained on {len(r.info.get('trained_on', []))} of them)")
    if a.heldout is not None and lib.weight_retriever() is not None:
        with tempfile.TemporaryDirectory() as tmp:
            only = a.heldout_only.split(",") if a.heldout_only else None
            names = with_heldout(lib.folder, a.heldout, Path(tmp) / "lib", only)
            heldout_report(LoraLibrary(Path(tmp) / "lib"), names, kinds, a.family, (str(a.heldout), str(lib.folder)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
