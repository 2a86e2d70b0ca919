"""Train AutoLoRA's weight-based retriever on a LoRA library, so LoRAs without useful metadata are found too.

    python -m training.train_retriever --library loras/               # -> loras/.lora_retriever.safetensors
    python -m training.train_retriever --library loras/ --family demo --themes ring,heart,moon,dotted,checkered

The LoRAs whose description says more than their file name are the training pairs (weights, description
embedding); the encoder then scores every readable LoRA of the library from its weights. Progress with ETA;
the file is written atomically every ``--save-every`` steps and at the end. With ``--themes``, each LoRA's
theme is the first of those words its description names, and the mean cosine between weight embeddings of
the same theme vs different themes is reported (AutoLoRA's Fig. 4: 0.471 vs -0.023).
``python -m lora_diffusion.retrieval --library loras/ --prompt ...`` then mixes in the weight scores by itself.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lora_diffusion.core.errors import AdapterError
from lora_diffusion.retrieval import LoraLibrary, default_embedder
from lora_diffusion.retrieval.weights import (
    DEFAULT_NAME,
    EncoderConfig,
    TrainConfig,
    WeightRetriever,
    read_deltas,
    theme_cosines,
    theme_of,
    train_encoder,
)

log = logging.getLogger("train_retriever")


@dataclass
class Report:
    trained_on: list[str]
    skipped: dict[str, str] = field(default_factory=dict)  # file -> why it was not a training pair
    final_loss: float = float("nan")
    top1_train: float = float("nan")  # description -> its own LoRA among the training LoRAs, by weights alone
    themes: dict[str, str] = field(default_factory=dict)  # file -> theme
    same_theme: float = float("nan")
    cross_theme: float = float("nan")
    seconds: float = 0.0

    def lines(self) -> list[str]:
        out = [f"trained on {len(self.trained_on)} LoRAs in {self.seconds:.0f} s, final loss {self.final_loss:.3f}, "
               f"description -> own LoRA top-1 (training set, weights only): {self.top1_train:.2f}"]
        out += [f"not a training pair: {f}: {why}" for f, why in self.skipped.items()]
        if self.themes:
            out.append(f"weight-embedding cosine over {len(self.themes)} LoRAs: same theme {self.same_theme:.3f}, "
                       f"cross theme {self.cross_theme:.3f} (AutoLoRA Fig. 4: 0.471 vs -0.023)")
        return out


def training_pairs(lib: LoraLibrary, family: str | None) -> tuple[list[Any], list[dict], dict[str, str]]:
    """(entries, their ΔWs, {file: why skipped}): readable LoRAs whose description says more than their name."""
    entries, deltas, skipped = [], [], {}
    for e in lib.usable(family):
        if e.description.strip().lower() == e.name.strip().lower():
            skipped[e.file] = "its description is only its file name"
            continue
        try:
            deltas.append(read_deltas(e.path))
            entries.append(e)
        except AdapterError as err:
            skipped[e.file] = str(err)
    for e, why in lib.skipped(family):
        skipped[e.file] = why
    return entries, deltas, skipped


def train_on_library(lib: LoraLibrary, out: Path | None, enc_cfg: EncoderConfig, cfg: TrainConfig,
                     family: str | None = None, themes: list[str] | None = None, embedder: Any = None,
                     save_every: int = 100, progress: bool = True) -> tuple[WeightRetriever, Report]:
    """Train, save (atomically, every ``save_every`` steps and at the end) and measure a weight retriever."""
    t0 = time.time()
    embedder = embedder or default_embedder()
    entries, deltas, skipped = training_pairs(lib, family)
    texts = lib.embedding_cache(embedder).embed([e.description for e in entries])  # (N, dim)
    bar = tqdm(total=cfg.steps, desc="weight retriever", disable=not progress, dynamic_ncols=True)
    info = {"library": str(lib.folder), "trained_on": [e.sha256 for e in entries]}

    def on_step(step: int, loss: float, enc: Any) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        report.final_loss = loss
        if out is not None and (step % save_every == 0 or step == cfg.steps):
            WeightRetriever(enc, embedder.id, {**info, "steps": step}).save(out)
            enc.train()

    report = Report([e.file for e in entries], skipped)
    enc = train_encoder(deltas, texts, enc_cfg, cfg, on_step)
    bar.close()
    retriever = WeightRetriever(enc, embedder.id, {**info, "steps": cfg.steps})
    with torch.no_grad():
        z = enc(deltas)  # (N, dim)
        report.top1_train = float(((texts @ z.T).argmax(1) == torch.arange(len(entries))).float().mean())
    if themes:
        measure_themes(retriever, lib, family, themes, report)
    report.seconds = time.time() - t0
    return retriever, report


def measure_themes(retriever: WeightRetriever, lib: LoraLibrary, family: str | None, themes: list[str],
                   report: Report) -> None:
    """Same- vs cross-theme cosine of the weight embeddings of every readable LoRA that names a theme."""
    emb = retriever.embeddings(lib, lib.usable(family))
    tagged = {e.file: t for e in lib.usable(family) if e.file in emb and (t := theme_of(e.description, themes))}
    if len(tagged) >= 2:
        files = list(tagged)
        report.same_theme, report.cross_theme = theme_cosines(torch.stack([emb[f] for f in files]),
                                                              [tagged[f] for f in files])
    report.themes = tagged


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.train_retriever", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--library", required=True, help="folder of LoRA files")
    p.add_argument("--out", type=Path, default=None,
                   help=f"retriever file (default <library>/{DEFAULT_NAME}, which retrieval then uses by itself)")
    p.add_argument("--family", default=None, help="train on the LoRAs of this base family only (e.g. sd1, sdxl, "
                   "sd3, flux, demo; default: every family the library holds)")
    p.add_argument("--themes", default="", help="comma-separated theme words to report same/cross-theme cosine "
                   "(default: none, no theme report)")
    p.add_argument("--steps", type=int, default=TrainConfig.steps, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size,
                   help="LoRAs per step, at most the training pairs (default: %(default)s, as the paper)")
    p.add_argument("--lr", type=float, default=TrainConfig.lr,
                   help="AdamW peak learning rate (one-cycle schedule; default: %(default)s)")
    p.add_argument("--width", type=int, default=EncoderConfig.width,
                   help="weight encoder's token width (default: %(default)s; the paper: 768)")
    p.add_argument("--depth", type=int, default=EncoderConfig.depth,
                   help="weight encoder's transformer layers (default: %(default)s)")
    p.add_argument("--probes", type=int, default=EncoderConfig.probes,
                   help="probe vectors per LoRA layer (default: %(default)s; the paper: 1)")
    p.add_argument("--layer-dropout", type=float, default=TrainConfig.layer_dropout,
                   help="drop each layer's token with this probability in training (robustness to partial LoRAs; "
                        "default: %(default)s)")
    p.add_argument("--target-temperature", type=float, default=TrainConfig.target_temperature,
                   help="soft InfoNCE targets from description similarity; 0 = one-hot (the paper; "
                        "default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--save-every", type=int, default=100,
                   help="write the retriever file every N steps, and at the end (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy machine; "
                   "default: torch's)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        lib = LoraLibrary(a.library)
        out = a.out or lib.folder / DEFAULT_NAME
        enc_cfg = EncoderConfig(width=a.width, depth=a.depth, probes=a.probes)
        cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, layer_dropout=a.layer_dropout,
                          target_temperature=a.target_temperature)
        themes = [t.strip() for t in a.themes.split(",") if t.strip()]
        _, report = train_on_library(lib, out, enc_cfg, cfg, a.family, themes, save_every=a.save_every)
    except AdapterError as e:  # one line naming the library/file and what was expected, exit status 1
        raise SystemExit(f"error: {e}") from None
    for line in report.lines():
        log.info("%s", line)
    log.info("saved %s", out)


if __name__ == "__main__":
    main()
