"""LAG on a library of small "knowledge" LoRAs: held-out score as a fraction of the oracle's choice.

A seeded synthetic fact set: N made-up countries per LoRA, each with a made-up capital. LoRA i (rank 8 on the 7
linears of SmolLM2-135M-Instruct by default) is trained on its own F facts, written in two statement templates.
Scoring: for every fact, an M-way multiple choice over capitals (the true one + M-1 others of the fact set), by the
summed log-probability of the capital's tokens after the prompt; accuracy in

* ``train`` -- the two templates the LoRAs were trained on
* ``held-out`` -- a third template no LoRA saw

for: ``base`` (no adapter), ``oracle`` (the LoRA that holds the fact), ``lag`` (all N LoRAs, top-k then SpectR,
one per token and layer), ``arrow`` (PEFT's Arrow: softmax over the top 3), ``merge`` (all N at weight 1/N).
Reported: each accuracy and LAG's (and Arrow's) as a fraction of the oracle's.

    python benchmarks/lag_knowledge.py                          # 16 LoRAs x 4 facts, 60 steps each, 1 thread
    python benchmarks/lag_knowledge.py --loras 8 --steps 30     # reduced
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import lora_diffusion as ld  # noqa: E402
from lora_diffusion import llm  # noqa: E402
from lora_diffusion.fusion import fuse, unfuse  # noqa: E402

log = logging.getLogger("lag_knowledge")
TRAIN_TEMPLATES = ["The capital of {c} is {v}.", "{c} has its capital at {v}."]
HELD_OUT = "Travellers to {c} arrive in its capital, {v}."
SYL = ["zor", "ba", "qui", "lix", "mon", "tra", "vel", "nu", "kas", "dri", "po", "len", "sha", "ri", "go", "wem"]


def make_facts(n: int, seed: int) -> list[tuple[str, str]]:
    """n (country, capital) pairs of made-up, distinct words."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        c = "".join(rng.choice(SYL) for _ in range(3)).capitalize() + rng.choice(["ia", "land", "stan"])
        v = "".join(rng.choice(SYL) for _ in range(3)).capitalize()
        if c not in seen and v not in seen:
            seen |= {c, v}
            out.append((c, v))
    return out


def lm_batch(tok: Any, texts: list[str]) -> dict[str, torch.Tensor]:
    enc = tok(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def train_lm(model: torch.nn.Module, params: list[torch.nn.Parameter], batch: dict[str, torch.Tensor], steps: int,
             lr: float) -> list[float]:
    """``steps`` AdamW steps (PyTorch's default weight decay) on one fixed causal-LM ``batch``; returns the losses.
    The knowledge LoRAs of this script and of ``llm_mixtures.py`` train through it."""
    opt, losses = torch.optim.AdamW(params, lr=lr), []
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def train_library(model: torch.nn.Module, tok: Any, facts: list[tuple[str, str]], a: argparse.Namespace) -> list[str]:
    names, t0 = [], time.perf_counter()
    for i in range(a.loras):
        name = f"k{i:02d}"
        mine = facts[i * a.facts : (i + 1) * a.facts]
        ld.add_adapter(model, ld.AdapterSpec(rank=a.rank, alpha=2 * a.rank, targets="llm", seed=a.seed + i), name)
        ld.set_adapters(model, [name])
        batch = lm_batch(tok, [t.format(c=c, v=v) for c, v in mine for t in TRAIN_TEMPLATES])
        losses = train_lm(model, [p for _, p in ld.adapter_parameters(model, name)], batch, a.steps, a.lr)
        for _, p in ld.adapter_parameters(model, name):
            p.requires_grad_(False)
        names.append(name)
        el = time.perf_counter() - t0
        log.info("LoRA %d/%d trained (final loss %.3f; %.0fs, ETA %.0fs)", i + 1, a.loras, losses[-1], el,
                 el / (i + 1) * (a.loras - i - 1))
    return names


@torch.no_grad()
def choice_correct(model: torch.nn.Module, tok: Any, template: str, country: str, answer: str,
                   candidates: list[str]) -> bool:
    """Is ``answer`` the candidate with the highest summed log-probability after the template's prefix?"""
    prefix = template.split("{v}")[0].format(c=country)
    suffix = template.split("{v}")[1]
    texts = [prefix + v + suffix for v in candidates]
    n_pre = len(tok(prefix)["input_ids"])
    enc = tok(texts, return_tensors="pt", padding=True)
    logp = torch.log_softmax(model(**enc).logits[:, :-1].float(), -1)
    tgt = enc["input_ids"][:, 1:]
    tok_lp = logp.gather(-1, tgt[..., None])[..., 0] * enc["attention_mask"][:, 1:]
    scores = tok_lp[:, n_pre - 1 :].sum(1)  # the capital's tokens and the rest of the sentence
    return candidates[int(scores.argmax())] == answer


def evaluate(model: torch.nn.Module, tok: Any, facts: list[tuple[str, str]], a: argparse.Namespace,
             owner: dict[int, str] | None = None) -> dict[str, float]:
    rng = random.Random(a.seed + 1)
    out = {}
    for split, templates in (("train", TRAIN_TEMPLATES), ("held-out", [HELD_OUT])):
        hits, total = 0, 0
        for j, (c, v) in enumerate(facts):
            if owner is not None:
                ld.set_adapters(model, [owner[j]], [1.0])
            others = rng.sample([w for _, w in facts if w != v], a.choices - 1)
            cands = sorted([v, *others])
            for t in templates:
                hits += choice_correct(model, tok, t, c, v, cands)
                total += 1
        out[split] = hits / total
    return out


def run(a: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    model, tok = llm.load_causal_lm(a.model)
    tok.padding_side = "right"
    facts = make_facts(a.loras * a.facts, a.seed)
    res: dict[str, dict[str, float]] = {"base": evaluate(model, tok, facts, a)}
    log.info("base: %s", res["base"])
    names = train_library(model, tok, facts, a)
    owner = {j: names[j // a.facts] for j in range(len(facts))}
    res["oracle"] = evaluate(model, tok, facts, a, owner)
    log.info("oracle: %s", res["oracle"])
    for label, kw in (("lag", {"mode": "lag", "top_k": min(a.top_k, a.loras)}),
                      ("arrow", {"mode": "arrow", "top_k": min(3, a.loras)})):
        fuse(model, names, method="lag", **kw)
        res[label] = evaluate(model, tok, facts, a)
        log.info("%s: %s", label, res[label])
    unfuse(model)
    ld.set_adapters(model, names, [1.0 / len(names)] * len(names))
    res["merge"] = evaluate(model, tok, facts, a)
    frac = {m: {s: (res[m][s] / res["oracle"][s] if res["oracle"][s] else float("nan")) for s in res[m]}
            for m in ("lag", "arrow", "merge")}
    return {"args": vars(a), "accuracy": res, "fraction_of_oracle": frac, "chance": 1 / a.choices}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="hub id, folder or .gguf (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--loras", type=int, default=16)
    p.add_argument("--facts", type=int, default=4, help="facts per LoRA")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--top_k", type=int, default=4, help="LAG's Arrow candidates")
    p.add_argument("--choices", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = run(a)
    acc, frac = out["accuracy"], out["fraction_of_oracle"]
    lines = ["| condition | train templates | held-out template | held-out / oracle |", "|---|---|---|---|"]
    for m, r in acc.items():
        f = frac.get(m, {}).get("held-out")
        lines.append(f"| {m} | {r['train']:.3f} | {r['held-out']:.3f} | {'' if f is None else f'{f:.2f}'} |")
    print("\n".join(lines))  # noqa: T201 (the report)
    if a.json:
        a.json.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
