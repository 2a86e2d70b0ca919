"""DP-DyLoRA: held-out loss vs ε for federated DyLoRA at three noise levels, against non-private federated DyLoRA.

The task, all offline and CPU-sized (SmolLM2-135M would take hours for hundreds of simulated clients on CPU):

* base: a tiny Llama (2 layers, hidden 64, the character tokenizer of ``training.llm_data``) built from a config and
  fully pre-trained here for ``--pretrain_steps`` on an *echo* task ("Echo: ribbon" -> "ribbon", half of the words
  in capitals), so it can copy and knows both cases;
* adapter task: *shout* ("Shout: ribbon" -> "RIBBON!"), learned by a DyLoRA adapter (r_max 8, every linear) through
  ``training.federated_dylora`` over ``--num_clients`` clients (random lowercase words, ``--per_client`` records
  each, iid shards); held-out words never occur in training;
* runs: non-private (σ = 0, C = inf: plain FedAvg), with ``--clip_baseline`` clipped without noise (σ = 0,
  clipping bound C: what clipping alone does), and DP-FedAvg at each σ of ``--sigmas`` with clipping bound C, all
  with the same client rate q, seed, rounds and local training. ε at δ = 1e-5 from Opacus' RDP accountant.

Writes ``<out>/results.json``, the plot ``docs/img/dp-dylora-utility.png`` (held-out loss vs ε per round, each run
a curve, the non-private final loss as a line) and prints a Markdown table.

Usage::

    python benchmarks/dp_dylora.py                       # 1000 clients, q 0.05, 120 rounds, σ 0.5/1/2, C 1, 1 thread
    python benchmarks/dp_dylora.py --num_clients 200 --rounds 30 --sigmas 1   # a quick look
    python benchmarks/dp_dylora.py --clip_baseline --sigmas "" --out outputs/bench_dp_dylora_clip \
        --plot outputs/bench_dp_dylora_clip/plot.png            # non-private vs clipping alone
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import string
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("dp_dylora")
PLOT = ROOT / "docs" / "img" / "dp-dylora-utility.png"


def words(n: int, seed: int, exclude: set[str] = frozenset()) -> list[str]:
    rng = random.Random(seed)
    out: list[str] = []
    seen = set(exclude)
    while len(out) < n:
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def write_jsonl(path: Path, records: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_data(folder: Path, n_train: int, n_eval: int, seed: int) -> tuple[Path, Path, Path]:
    """(echo pre-training file, shout training file, shout held-out file)."""
    echo = [w.upper() if i % 2 else w for i, w in enumerate(words(4000, seed + 100))]  # the base knows both cases
    train = words(n_train, seed)
    held = words(n_eval, seed + 1, exclude=set(train))
    return (write_jsonl(folder / "echo.jsonl", [{"prompt": f"Echo: {w}", "response": w} for w in echo]),
            write_jsonl(folder / "shout_train.jsonl", [{"prompt": f"Shout: {w}", "response": w.upper() + "!"}
                                                       for w in train]),
            write_jsonl(folder / "shout_eval.jsonl", [{"prompt": f"Shout: {w}", "response": w.upper() + "!"}
                                                      for w in held]))


def pretrain_base(folder: Path, echo_file: Path, steps: int, seed: int) -> Path:
    """A tiny Llama trained in full on the echo task, saved with the character tokenizer (a local "hub" folder)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.llm_data import char_tokenizer, collate, load_examples

    torch.manual_seed(seed)
    tok = char_tokenizer()
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    model = LlamaForCausalLM(cfg)
    ex = load_examples(echo_file, tok, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(len(ex), (32,), generator=gen).tolist()
        loss = model(**collate([ex[i] for i in idx], tok.pad_token_id)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 200 == 0 or step == steps:
            log.info("pre-training the echo base: step %d/%d, loss %.3f (%.0f s)", step, steps, float(loss.detach()),
                     time.perf_counter() - t0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def run(base: Path, train_file: Path, eval_file: Path, out: Path, args: argparse.Namespace, sigma: float | None
        ) -> dict[str, Any]:
    """One federated run; sigma None: non-private (σ = 0, C = inf); sigma 0: clipping to C without noise."""
    from training import federated_dylora as fd

    argv = ["--model", str(base), "--train_file", str(train_file), "--eval_file", str(eval_file), "--output_dir",
            str(out), "--overwrite", "--num_clients", str(args.num_clients), "--client_rate", str(args.client_rate),
            "--rounds", str(args.rounds), "--local_steps", str(args.local_steps), "--local_batch_size",
            str(args.local_batch), "--client_lr", str(args.client_lr), "--rank", str(args.rank), "--max_length", "64",
            "--eval_rounds", str(args.eval_rounds), "--checkpoint_rounds", "0", "--seed", str(args.seed),
            "--no-progress" if not args.progress else "--progress"]
    argv += (["--dp_noise_multiplier", "0", "--dp_max_grad_norm", "inf"] if sigma is None else
             ["--dp_noise_multiplier", str(sigma), "--dp_max_grad_norm", str(args.clip)])
    t0 = time.perf_counter()
    m = fd.main(argv)
    m["wall_s"] = time.perf_counter() - t0
    return m


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    base = results["runs"].get("non-private")
    before = next(iter(results["runs"].values()))["eval_loss_before"]
    for i, (name, m) in enumerate(results["runs"].items()):
        pts = [(h["round"], h["epsilon"], h["eval_loss"]) for h in m["history"] if "eval_loss" in h]
        rounds, eps, loss = zip(*pts)
        color = f"C{i}"  # one colour per run in both panels
        bx.plot(rounds, loss, marker="o", ms=3, label=name, color=color)
        if eps[-1] is not None and math.isfinite(eps[-1]):
            ax.plot(eps, loss, marker="o", ms=3, label=name, color=color)
    if base is not None:
        ax.axhline(base["eval_loss"], color="k", ls="--", lw=1, label=f"non-private, final ({base['eval_loss']:.3f})")
    if "clipped, σ=0" in results["runs"]:
        c = results["runs"]["clipped, σ=0"]["eval_loss"]
        ax.axhline(c, color="grey", ls="-.", lw=1, label=f"clipped, σ=0, final ({c:.3f})")
    ax.set_xlabel("ε at δ = 1e-5 (Opacus RDP), growing with the rounds")
    ax.set_ylabel("held-out loss (shout task)")
    ax.set_title(f"DP-DyLoRA: utility vs privacy ({results['args']['num_clients']} clients, "
                 f"q={results['args']['client_rate']}, C={results['args']['clip']})", fontsize=10)
    bx.set_xlabel("round")
    bx.set_ylabel("held-out loss")
    bx.set_title(f"held-out loss by round (before training: {before:.2f})", fontsize=10)
    for a in (ax, bx):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: dict[str, Any]) -> str:
    rows = ["| run | σ | C | ε (δ = 1e-5) | held-out loss, r_max | at r/4, r/2 | mean clients/round | clipped | wall |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, m in results["runs"].items():
        by = m["eval_loss_by_rank"]
        ks = sorted(by, key=int)
        clipped = sum(h["clipped_fraction"] for h in m["history"]) / len(m["history"])
        cohort = sum(h["clients"] for h in m["history"]) / len(m["history"])
        eps = "∞ (no DP)" if m["epsilon"] is None or m["epsilon"] == float("inf") else f"{m['epsilon']:.2f}"
        rows.append(f"| {name} | {m['noise_multiplier']:g} | {m['clip_norm']:g} | {eps} | {m['eval_loss']:.4f} | "
                    f"{by[ks[0]]:.4f}, {by[ks[1]]:.4f} | {cohort:.1f} | {clipped:.0%} | {m['wall_s']:.0f} s |")
    b = next(iter(results["runs"].values()))
    rows.append(f"\nBefore training (base model, B = 0): held-out loss {b['eval_loss_before']:.4f}.")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_clients", type=int, default=1000)
    p.add_argument("--per_client", type=int, default=4, help="training records per client")
    p.add_argument("--client_rate", type=float, default=0.05)
    p.add_argument("--rounds", type=int, default=120)
    p.add_argument("--local_steps", type=int, default=2)
    p.add_argument("--local_batch", type=int, default=4)
    p.add_argument("--client_lr", type=float, default=2.0)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--clip", type=float, default=1.0, help="clipping bound C of the private runs")
    p.add_argument("--sigmas", default="0.5,1,2", help="noise multipliers of the private runs ('' for none)")
    p.add_argument("--clip_baseline", action="store_true", help="also run σ = 0 with clipping bound C (no noise)")
    p.add_argument("--skip_nonprivate", action="store_true", help="leave out the non-private run")
    p.add_argument("--eval_rounds", type=int, default=10)
    p.add_argument("--pretrain_steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_dp_dylora")
    p.add_argument("--plot", type=Path, default=PLOT)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--replot", action="store_true", help="redraw the plot and table from <out>/results.json, no training")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.replot:
        results = json.loads((args.out / "results.json").read_text())
        plot(results, args.plot)
        print(table(results))  # noqa: T201 (the report)
        return results
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    echo, train_file, eval_file = make_data(args.out, args.num_clients * args.per_client, 200, args.seed)
    base = pretrain_base(args.out / "echo-llama", echo, args.pretrain_steps, args.seed)
    results: dict[str, Any] = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                               "runs": {}}
    if not args.skip_nonprivate:
        results["runs"]["non-private"] = run(base, train_file, eval_file, args.out / "nonprivate", args, None)
    if args.clip_baseline:
        results["runs"]["clipped, σ=0"] = run(base, train_file, eval_file, args.out / "clipped", args, 0.0)
    for s in [float(x) for x in args.sigmas.split(",") if x.strip()]:
        results["runs"][f"σ={s:g}"] = run(base, train_file, eval_file, args.out / f"sigma{s:g}", args, s)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    plot(results, args.plot)
    print(table(results))  # noqa: T201 (the report)
    log.info("plot: %s; results: %s", args.plot, args.out / "results.json")
    return results


if __name__ == "__main__":
    main()
