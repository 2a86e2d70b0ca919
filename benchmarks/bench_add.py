"""Time to add one adapter to a model that already holds n adapters (n = 10, 100, 1000): is loading a library linear?

    python benchmarks/bench_add.py                          # tiny Llama with 8 layers, rank-8 LoRAs on q_proj, v_proj
    python benchmarks/bench_add.py --layers 30 --trainable  # SmolLM2's depth; add_adapter's default trainable=True

The base is a randomly initialised Llama with small widths (hidden 64): the cost measured is the bookkeeping around
an add (target walk, name checks, freezing), which depends on the number of modules and adapters, not on widths.
Adapters are added one by one up to the largest size; the figure for n is the mean wall time of the adds that
bring the library from n - ``--window`` to n (so it is the cost of adding at size ~n), and the total is the
time to build all n. A linear implementation keeps the per-add time flat; the quadratic one grows with n.
To compare two versions, run this file from each checkout at the same time (one process each).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lora_diffusion as ld  # noqa: E402

log = logging.getLogger("bench_add")


def tiny_llama(layers: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def run(a: argparse.Namespace) -> dict[str, dict[str, float]]:
    sizes = sorted(int(s) for s in a.sizes.split(","))
    model = tiny_llama(a.layers)
    targets = a.targets.split(",")
    times: list[float] = []
    t_start = time.perf_counter()
    for i in range(sizes[-1]):
        t0 = time.perf_counter()
        ld.add_adapter(model, ld.AdapterSpec(rank=a.rank, targets=targets, seed=i), f"k{i:04d}", trainable=a.trainable)
        times.append(time.perf_counter() - t0)
        if (i + 1) % max(1, sizes[-1] // 10) == 0:
            el = time.perf_counter() - t_start
            log.info("%d/%d adapters (%.0fs, ETA %.0fs)", i + 1, sizes[-1], el, el / (i + 1) * (sizes[-1] - i - 1))
    out = {}
    for n in sizes:
        win = times[max(0, n - a.window):n]
        out[str(n)] = {"ms_per_add": 1e3 * sum(win) / len(win), "total_s": sum(times[:n])}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10,100,1000")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--window", type=int, default=10, help="adds averaged per size")
    p.add_argument("--trainable", action="store_true", help="add_adapter(trainable=True): freeze all but the new one")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("lora_diffusion").setLevel(logging.WARNING)
    torch.set_num_threads(a.threads)
    out = run(a)
    print(f"| adapters on the model | ms per add | total s to build |  ({ROOT.name}, {a.layers} layers, "  # noqa: T201
          f"targets {a.targets}, trainable={a.trainable})\n|---|---|---|")
    for n, r in out.items():
        print(f"| {n} | {r['ms_per_add']:.1f} | {r['total_s']:.1f} |")  # noqa: T201
    if a.json:
        a.json.write_text(json.dumps({"args": vars(a) | {"json": str(a.json)}, "results": out}, indent=1))


if __name__ == "__main__":
    main()
