"""Train a Text-to-LoRA hypernetwork on the task suite (training/t2l_tasks.py) for a frozen causal LM.

    python -m training.train_t2l --mode sft --out runs/t2l                       # end-to-end through the LLM
    python -m training.train_t2l --mode library --out runs/lib                   # one LoRA per training task
    python -m training.train_t2l --mode recon --library runs/lib --out runs/t2l-recon   # fit those LoRAs
    python -m training.train_t2l --mode sft --out runs/t2l --resume latest       # continue a stopped run
    python -m training.train_t2l --mode recon --component unet --library outputs/demo_library \
        --holdout ring,dotted --out runs/t2l-unet                                 # the demo UNet's LoRAs (docs/hyper.md)

``--model`` defaults to the offline SmolLM2-135M-Instruct; ``--layers 20:30`` adapts only those layers (the CPU
reduction: backward stops at the first adapted layer). The hypernetwork goes to ``OUT/t2l.safetensors`` (load it with
``T2L.load`` or ``python -m lora_diffusion.generate_lora --hyper``), losses to ``OUT/log.json`` and ``OUT/loss.png``;
SFT writes checkpoints to ``OUT/checkpoints`` every ``--checkpoint_every`` steps. Nothing in ``OUT`` is replaced
without ``--overwrite`` (a resumed run may replace its own final files).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_diffusion.hyper.recon import ReconConfig, train_reconstruction
from lora_diffusion.hyper.sft import SFTConfig, StaticLoRA, answer_exact, lm_loss, lora_hooks, sft_loss
from lora_diffusion.hyper.t2l import T2L, T2LConfig, check_embedder, embed_description, make_embedder
from training import llm_data, t2l_tasks
from training.checkpoint import CheckpointManager

log = logging.getLogger("train_t2l")
MODES = ("sft", "recon", "library")
HYPER_FILE = "t2l.safetensors"


@dataclass
class RunConfig:
    mode: str = "sft"
    out: str = "runs/t2l"
    model: str | None = None  # None: offline SmolLM2-135M-Instruct
    embedder: str | None = None  # None: MiniLM
    size: str = "L"
    rank: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    layers: str | None = None  # "START:END": adapt only these layers
    n_train: int = 64  # records per training task
    suite_seed: int = 0
    library: str | None = None  # recon: folder of <task>.safetensors
    component: str | None = None  # recon of a diffusion pipeline component's LoRAs ("unet"); --model: the pipeline
    holdout: str = ""  # recon with --component: comma-separated library names left out of training
    max_length: int = 96
    checkpoint_every: int = 50
    resume: str | None = None
    overwrite: bool = False
    threads: int | None = None
    sft: SFTConfig = field(default_factory=SFTConfig)


# --- pieces the benchmark reuses ---
def layer_targets(targets: Sequence[str], layers: str | None) -> list[str]:
    """Module patterns; with ``layers`` "a:b", one ``re:`` pattern keeping layers a..b-1 of those targets."""
    if not layers:
        return list(targets)
    try:
        a, b = (int(x) for x in layers.split(":"))
    except ValueError:
        raise ValueError(f"--layers {layers!r}: expected START:END, e.g. 20:30") from None
    idx = "|".join(str(i) for i in range(a, b))
    names = "|".join(t.replace(".", r"\.") for t in targets)
    return [rf"re:.*\.({idx})\..*({names})"]


def tokenize_records(tok: Any, recs: Sequence[dict[str, str]], max_length: int,
                     prefix: dict[str, str] | None = None) -> dict[str, list[llm_data.Example]]:
    """{task: examples}; ``prefix`` (task -> text) prepends the task description to the prompt (in-context)."""
    out: dict[str, list[llm_data.Example]] = {}
    for i, r in enumerate(recs):
        prompt = f"{prefix[r['task']]}\n{r['prompt']}" if prefix else r["prompt"]
        ex = llm_data.tokenize_record(tok, {"prompt": prompt, "response": r["response"]}, f"{r['task']}:{i}")
        if len(ex) > max_length:
            raise llm_data.DatasetError(f"{ex.where}: {len(ex)} tokens > --max_length {max_length}")
        out.setdefault(r["task"], []).append(ex)
    return out


def embed_tasks(embedder: Any, descriptions: dict[str, Sequence[str]]) -> dict[str, torch.Tensor]:
    """{task: (P, d)} embeddings of each task's phrasings (frozen)."""
    return {t: torch.stack([embed_description(embedder, d) for d in ds]).float() for t, ds in descriptions.items()}


class TorchRNG:
    """A ``torch.Generator`` as a checkpoint stateful."""

    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.g.get_state()}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.g.set_state(st["state"])


def sample_batch(examples: dict[str, list[llm_data.Example]], emb: dict[str, torch.Tensor], cfg: SFTConfig,
                 g: torch.Generator, pad_id: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``batch_tasks`` tasks x ``per_task`` records, each row with a random phrasing of its task: (batch, emb (N, d))."""
    tasks = sorted(examples)
    pick = torch.randperm(len(tasks), generator=g)[: cfg.batch_tasks].tolist()
    exs, rows = [], []
    for i in pick:
        t = tasks[i]
        for j in torch.randint(len(examples[t]), (cfg.per_task,), generator=g).tolist():
            exs.append(examples[t][j])
            rows.append(emb[t][int(torch.randint(len(emb[t]), (1,), generator=g))])
    return llm_data.collate(exs, pad_id), torch.stack(rows)


def schedule(opt: torch.optim.Optimizer, steps: int, warmup_frac: float) -> torch.optim.lr_scheduler.LambdaLR:
    warm = max(1, int(warmup_frac * steps))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min((i + 1) / warm, 0.5 * (1 + math.cos(
        math.pi * max(0, i - warm) / max(1, steps - warm)))))


def train_sft(model: nn.Module, gen: nn.Module, examples: dict[str, list[llm_data.Example]],
              emb: dict[str, torch.Tensor], cfg: SFTConfig, pad_id: int, ckpt: CheckpointManager | None = None,
              resume: str | None = None, checkpoint_every: int = 0,
              on_log: Callable[[int, float, float], None] | None = None) -> list[float]:
    """Train ``gen`` (a ``T2L`` or ``StaticLoRA``) through the frozen ``model``; returns the CE per step (this run's
    steps only after a resume). Logs loss and ETA every ``cfg.log_every`` steps."""
    if not examples:
        raise ValueError("train_sft: no training records")
    model.eval().requires_grad_(False)
    opt = torch.optim.AdamW([p for p in gen.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched, rng = schedule(opt, cfg.steps, cfg.warmup_frac), TorchRNG(cfg.seed)
    shared, local = {"gen": gen, "opt": opt, "sched": sched}, {"rng": rng}
    start = ckpt.resume(resume, shared, local) if ckpt else 0
    gen.train()
    losses, t0 = [], time.monotonic()
    for step in range(start, cfg.steps):
        batch, e = sample_batch(examples, emb, cfg, rng.g, pad_id)
        loss, ce = sft_loss(model, gen, batch, e, cfg, rng.g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gen.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        losses.append(ce.item())
        done = step + 1
        if cfg.log_every and (done % cfg.log_every == 0 or done == cfg.steps):
            eta = (time.monotonic() - t0) / (done - start) * (cfg.steps - done)
            recent = sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:])
            log.info("step %d/%d  CE %.4f  lr %.2g  ETA %.0fs", done, cfg.steps, recent, sched.get_last_lr()[0], eta)
            if on_log:
                on_log(done, recent, eta)
        if ckpt and checkpoint_every and done % checkpoint_every == 0 and done < cfg.steps:
            ckpt.save(done, shared, local)
    gen.eval()
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, gen: nn.Module | None, examples: Sequence[llm_data.Example],
             task_emb: torch.Tensor | None, pad_id: int, batch_size: int = 8) -> tuple[list[bool], list[float]]:
    """(exact answer per record, mean answer-token CE per record); ``gen`` None: the bare model. ``task_emb`` (d,) is
    the one task's embedding the LoRA is generated from (once)."""
    model.eval()
    lora = None
    if gen is not None:
        lora = gen.generate(task_emb) if isinstance(gen, T2L) else gen.generate()
    acc, ce = [], []
    for k in range(0, len(examples), batch_size):
        batch = llm_data.collate(examples[k:k + batch_size], pad_id)
        with lora_hooks(model, lora or {}, gen.scaling if gen is not None else 1.0):
            loss, logits = lm_loss(model, batch, reduction="none")
        acc += answer_exact(logits, batch).tolist()
        ce += loss.tolist()
    return acc, ce


# --- the CLI's run ---
def check_out(out: Path, cfg: RunConfig, files: Sequence[str]) -> None:
    clash = [f for f in files if (out / f).exists()]
    if clash and not (cfg.overwrite or cfg.resume):
        raise FileExistsError(f"{out} already holds {clash}; pass --overwrite to replace them (or --resume latest)")


def build(cfg: RunConfig) -> tuple[nn.Module, Any, Any, T2LConfig]:
    from lora_diffusion.llm import load_causal_lm

    model, tok = load_causal_lm(cfg.model)
    llm_data.ensure_chat_template(tok)
    emb = make_embedder(cfg.embedder)
    hc = T2LConfig(size=cfg.size, rank=cfg.rank, alpha=cfg.alpha, targets=layer_targets(cfg.targets, cfg.layers),
                   emb_dim=emb.dim, embedder=emb.id, seed=cfg.sft.seed)
    return model.eval().requires_grad_(False), tok, emb, hc


def save_log(out: Path, cfg: RunConfig, losses: list[float], extra: dict[str, Any]) -> None:
    info = {"config": asdict(cfg), "losses": losses, **extra}
    tmp = out / ".log.json.tmp"
    tmp.write_text(json.dumps(info, indent=1, default=str))
    os.replace(tmp, out / "log.json")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(losses, lw=0.8)
        ax.set(xlabel="step", ylabel="loss", title=f"T2L {cfg.mode} ({cfg.size}, r={cfg.rank})")
        fig.tight_layout()
        fig.savefig(out / "loss.png", dpi=100)
        plt.close(fig)
    except ImportError:
        log.warning("matplotlib missing: no loss.png")


def run(cfg: RunConfig) -> Path:
    if cfg.mode not in MODES:
        raise ValueError(f"--mode {cfg.mode!r}: expected one of {list(MODES)}")
    out = Path(cfg.out)
    if cfg.component:
        return run_pipeline_recon(cfg)
    train_names = [t.name for t in t2l_tasks.split_tasks()[0]]
    check_out(out, cfg, [HYPER_FILE, "log.json"] if cfg.mode != "library"
              else ["library.json", *(f"{t}.safetensors" for t in train_names)])  # before any training
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tok, emb, hc = build(cfg)
    suite = t2l_tasks.build_suite(n_train=cfg.n_train, seed=cfg.suite_seed)
    descs = {t: ds for t, ds in t2l_tasks.descriptions().items() if t not in t2l_tasks.HELD_OUT}
    out.mkdir(parents=True, exist_ok=True)
    if cfg.mode == "library":
        return train_library(model, tok, hc, suite["train"], cfg, out)
    hyper = T2L.for_model(model, hc)
    check_embedder(hyper, emb)
    if cfg.mode == "recon":
        losses = run_recon(hyper, emb, descs, cfg)
    else:
        examples = tokenize_records(tok, suite["train"], cfg.max_length)
        ident = {"mode": "sft", "t2l": asdict(hc), "sft": asdict(cfg.sft), "model": str(cfg.model),
                 "n_train": cfg.n_train, "suite_seed": cfg.suite_seed}
        ckpt = CheckpointManager(out / "checkpoints", ident, keep_last=2)
        losses = train_sft(model, hyper, examples, embed_tasks(emb, descs), cfg.sft, tok.pad_token_id, ckpt,
                           cfg.resume, cfg.checkpoint_every)
    from lora_diffusion.llm import base_name

    hyper.save(out / HYPER_FILE, base_model=base_name(model))  # written atomically
    save_log(out, cfg, losses, {})
    log.info("hypernetwork written to %s", out / HYPER_FILE)
    return out / HYPER_FILE


def run_recon(hyper: T2L, emb: Any, descs: dict[str, list[str]], cfg: RunConfig) -> list[float]:
    if not cfg.library:
        raise ValueError("--mode recon needs --library DIR (one <task>.safetensors per training task; "
                         "make one with --mode library)")
    lib = Path(cfg.library)
    missing = [t for t in descs if not (lib / f"{t}.safetensors").is_file()]
    if missing:
        raise FileNotFoundError(f"{lib}: no LoRA for training tasks {missing} (expected <task>.safetensors)")
    pairs = [(d, lib / f"{t}.safetensors") for t, ds in descs.items() for d in ds]
    rc = ReconConfig(steps=cfg.sft.steps, lr=cfg.sft.lr, seed=cfg.sft.seed, log_every=cfg.sft.log_every)
    return train_reconstruction(hyper, pairs, emb, rc)


def run_pipeline_recon(cfg: RunConfig) -> Path:
    """Reconstruction for a diffusion pipeline's component (``--component unet``): fit the LoRA files of ``--library``
    (descriptions from its descriptions.json or the files' metadata; ``--holdout`` names left out). Rank, alpha and
    target modules are the library's (every file must have the same)."""
    from lora_diffusion.generate import load_pipeline
    from lora_diffusion.hyper.recon import library_pairs
    from lora_diffusion.io import canonical
    from lora_diffusion.io.files import read_header

    if cfg.mode != "recon":
        raise ValueError(f"--component {cfg.component}: only --mode recon trains a pipeline hypernetwork "
                         f"(found --mode {cfg.mode})")
    if not cfg.library:
        raise ValueError("--mode recon needs --library DIR (LoRA files, e.g. python -m training.build_demo_library)")
    out = Path(cfg.out)
    check_out(out, cfg, [HYPER_FILE, "log.json"])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    pairs = library_pairs(cfg.library, [h for h in cfg.holdout.split(",") if h])
    entries = canonical.decode_metadata(read_header(pairs[0][1])[1], str(pairs[0][1]))
    if cfg.component not in entries:
        raise ValueError(f"{pairs[0][1]}: no LoRA on the pipeline's '{cfg.component}' (it adapts {sorted(entries)})")
    spec = entries[cfg.component].spec
    pipe = load_pipeline(cfg.model)
    model = getattr(pipe, cfg.component)
    emb = make_embedder(cfg.embedder)
    targets = [spec.targets] if isinstance(spec.targets, str) else list(spec.targets)
    hc = T2LConfig(size=cfg.size, rank=spec.rank, alpha=float(spec.alpha if spec.alpha is not None else spec.rank),
                   targets=targets, emb_dim=emb.dim, embedder=emb.id, seed=cfg.sft.seed, component=cfg.component)
    hyper = T2L.for_model(model, hc)
    log.info("T2L for the %s: %d modules, %d module types, %d layers; %.1fM parameters; %d (description, LoRA) "
             "pairs from %d files", cfg.component, len(hyper.slots), len(hyper.types), hyper.n_layers,
             sum(p.numel() for p in hyper.parameters()) / 1e6, len(pairs), len({str(p) for _, p in pairs}))
    rc = ReconConfig(steps=cfg.sft.steps, lr=cfg.sft.lr, seed=cfg.sft.seed, log_every=cfg.sft.log_every,
                     batch_tasks=cfg.sft.batch_tasks, weight_decay=cfg.sft.weight_decay)
    losses = train_reconstruction(hyper, pairs, emb, rc)
    out.mkdir(parents=True, exist_ok=True)
    hyper.save(out / HYPER_FILE, base_model=str(cfg.model or "demo-sd"))
    save_log(out, cfg, losses, {"pairs": [[d, str(p)] for d, p in pairs]})
    log.info("hypernetwork written to %s", out / HYPER_FILE)
    return out / HYPER_FILE


def train_library(model: nn.Module, tok: Any, hc: T2LConfig, recs: list[dict[str, str]], cfg: RunConfig,
                  out: Path) -> Path:
    """One ``StaticLoRA`` per training task, saved as canonical ``<task>.safetensors`` (the recon library)."""
    from lora_diffusion import api
    from lora_diffusion.hyper.t2l import apply_generated
    from lora_diffusion.llm import save_llm_adapter

    examples = tokenize_records(tok, recs, cfg.max_length)
    zero = {t: torch.zeros(1, hc.emb_dim) for t in examples}
    for t, exs in examples.items():
        lora = StaticLoRA.for_model(model, hc)
        train_sft(model, lora, {t: exs}, zero, SFTConfig(**{**asdict(cfg.sft), "batch_tasks": 1}), tok.pad_token_id)
        apply_generated(model, lora, lora.generate(), name=t)
        save_llm_adapter(model, out / f"{t}.safetensors", name=t, overwrite=cfg.overwrite)
        api.remove_adapters(model, [t])
        log.info("task LoRA %s written", out / f"{t}.safetensors")
    (out / "library.json").write_text(json.dumps(sorted(examples)))
    return out


def parse(argv: list[str] | None = None) -> RunConfig:
    d, s = RunConfig(), SFTConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=MODES, default=d.mode, help="sft: end-to-end; recon: fit --library; library: "
                   "train one LoRA per training task")
    p.add_argument("--out", default=d.out)
    p.add_argument("--model", default=None, help="hub id, folder or .gguf (default: offline SmolLM2-135M-Instruct)")
    p.add_argument("--embedder", default=None, help="sentence-transformers folder (default: offline MiniLM)")
    p.add_argument("--size", choices=("L", "M", "S"), default=d.size)
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--targets", nargs="+", default=d.targets)
    p.add_argument("--layers", default=None, help="START:END, adapt only these layers (e.g. 20:30)")
    p.add_argument("--n_train", type=int, default=d.n_train, help="records per training task")
    p.add_argument("--suite_seed", type=int, default=0)
    p.add_argument("--library", default=None, help="recon: folder of LoRA files (LLM: <task>.safetensors per training "
                   "task; --component: any LoRA files, described by descriptions.json or their metadata)")
    p.add_argument("--component", default=None, help="recon for a diffusion pipeline's component, e.g. 'unet' "
                   "(--model: the pipeline; default: the embedded demo model)")
    p.add_argument("--holdout", default="", help="with --component: comma-separated library names not trained on")
    p.add_argument("--max_length", type=int, default=d.max_length)
    p.add_argument("--checkpoint_every", type=int, default=d.checkpoint_every)
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    for k in ("steps", "lr", "batch_tasks", "per_task", "label_smoothing", "l2", "neftune_alpha", "seed",
              "log_every", "weight_decay"):
        p.add_argument(f"--{k}", type=type(getattr(s, k)), default=getattr(s, k))
    a = vars(p.parse_args(argv))
    sft = SFTConfig(**{k: a.pop(k) for k in list(a) if k in SFTConfig.__dataclass_fields__})
    return RunConfig(**a, sft=sft)


def main(argv: list[str] | None = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    return run(parse(argv))


if __name__ == "__main__":
    main()
