"""Text-to-LoRA on held-out tasks (issue 17): the generated LoRA vs the base model vs the description in the prompt
vs a LoRA trained on the task (oracle) vs a multi-task LoRA, on SmolLM2-135M-Instruct (offline), several seeds.

    for s in 0 1; do for p in t2l multi task; do                       # six jobs of < 10 min each
      /work/bin/heavy python -m benchmarks.t2l --seeds $s --parts $p --out runs/bench_t2l/$p-$s.json; done; done
    python -m benchmarks.t2l --report runs/bench_t2l/*.json            # table with 95% CIs

Per seed: T2L (SFT through the frozen LLM on the training tasks of training/t2l_tasks.py), a multi-task LoRA on the
same records and steps, and one LoRA per held-out task on that task's own records (what T2L replaces). Scored on
held-out records by exact answer (greedy decoding reproduces the answer; teacher-forced, so one forward per record)
and mean answer-token CE. T2L is scored with each of the task's phrasings (none seen in training). Timing: one LoRA
generation (embed + hypernetwork forward) vs training one task LoRA, in the same process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lora_diffusion.hyper.sft import SFTConfig, StaticLoRA
from lora_diffusion.hyper.t2l import T2L, T2LConfig, embed_description, make_embedder
from training import t2l_tasks
from training.train_t2l import embed_tasks, evaluate, layer_targets, tokenize_records, train_sft

log = logging.getLogger("bench_t2l")
ORDER = ["base", "base + description in prompt", "T2L (generated)", "multi-task LoRA", "task LoRA (oracle)"]


@dataclass
class BenchConfig:
    layers: str | None = "16:30"  # CPU reduction: adapt q_proj, v_proj of these SmolLM2 layers only
    size: str = "L"
    rank: int = 8
    alpha: float = 16.0
    t2l_steps: int = 120
    multi_steps: int = 120
    task_steps: int = 40
    lr: float = 2e-3
    task_lr: float = 3e-3
    batch_tasks: int = 4
    per_task: int = 2
    n_train: int = 48  # records per task
    n_eval: int = 12  # held-out records per held-out task
    n_seen_eval: int = 6  # eval records per training task (T2L on tasks it was trained on)
    max_length: int = 128


def heldout_train_records(task: t2l_tasks.Task, n: int, avoid: set[str]) -> list[dict[str, str]]:
    """The oracle LoRA's training records for a held-out task, disjoint from its evaluation inputs."""
    return [r for r in t2l_tasks.records(task, n + len(avoid), seed=7) if r["prompt"] not in avoid][:n]


def scores(model: Any, gen: Any, examples: dict[str, list], emb: dict[str, torch.Tensor] | None, pad: int,
           phrasings: int = 1) -> dict[str, dict[str, list]]:
    """{task: {"acc": [...], "ce": [...]}} over ``phrasings`` generated LoRAs per task (T2L) or one (others)."""
    out = {}
    for t, exs in examples.items():
        acc, ce = [], []
        for p in range(phrasings):
            g = gen[t] if isinstance(gen, dict) else gen
            a, c = evaluate(model, g, exs, emb[t][p] if emb is not None else None, pad)
            acc += a
            ce += c
        out[t] = {"acc": acc, "ce": ce}
    return out


@dataclass
class Data:
    pad: int
    descs: dict[str, list[str]]
    emb: dict[str, torch.Tensor]
    train: dict[str, list]
    seen: dict[str, list]
    held: dict[str, list]
    icl: dict[str, list]
    heldout_records: list[dict[str, str]]


def prepare(cfg: BenchConfig, tok: Any, embedder: Any) -> Data:
    suite = t2l_tasks.build_suite(n_train=cfg.n_train, n_eval=cfg.n_eval, seed=0)
    descs = t2l_tasks.descriptions()
    seen = {t: v[: cfg.n_seen_eval] for t, v in tokenize_records(tok, suite["eval"], cfg.max_length).items()}
    return Data(tok.pad_token_id, descs, embed_tasks(embedder, descs),
                tokenize_records(tok, suite["train"], cfg.max_length), seen,
                tokenize_records(tok, suite["heldout"], cfg.max_length),
                tokenize_records(tok, suite["heldout"], cfg.max_length, prefix={t: d[0] for t, d in descs.items()}),
                suite["heldout"])


def sft_cfg(cfg: BenchConfig, seed: int, steps: int, lr: float, **kw: Any) -> SFTConfig:
    return SFTConfig(steps=steps, lr=lr, batch_tasks=cfg.batch_tasks, per_task=cfg.per_task, seed=seed, log_every=20,
                     **kw)


def run_t2l(res: dict[str, Any], cfg: BenchConfig, model: Any, d: Data, hc: T2LConfig, embedder: Any) -> None:
    """Train T2L on the training tasks; score it (every phrasing) on held-out and seen tasks, and the base model."""
    t0 = time.monotonic()
    hyper = T2L.for_model(model, hc)
    res["losses"]["t2l"] = train_sft(model, hyper, d.train, {t: d.emb[t] for t in d.train},
                                     sft_cfg(cfg, hc.seed, cfg.t2l_steps, cfg.lr), d.pad)
    res["time"]["t2l_train_s"] = time.monotonic() - t0
    held_names = sorted(d.held)
    res["time"]["generate_s"] = time_generation(hyper, embedder, [x for t in held_names for x in d.descs[t]])
    n_phr = min(len(d.descs[t]) for t in held_names)
    res["heldout"]["base"] = scores(model, None, d.held, None, d.pad)
    res["heldout"]["base + description in prompt"] = scores(model, None, d.icl, None, d.pad)
    res["heldout"]["T2L (generated)"] = scores(model, hyper, d.held, d.emb, d.pad, phrasings=n_phr)
    res["seen"]["base"] = scores(model, None, d.seen, None, d.pad)
    res["seen"]["T2L (generated)"] = scores(model, hyper, d.seen, d.emb, d.pad)
    res["_hyper"] = hyper  # main saves it beside the results (not JSON)


def run_multi(res: dict[str, Any], cfg: BenchConfig, model: Any, d: Data, hc: T2LConfig) -> None:
    """The multi-task LoRA: the training tasks' records, T2L's batches and steps, no description."""
    t0 = time.monotonic()
    multi = StaticLoRA.for_model(model, hc)
    res["losses"]["multi"] = train_sft(model, multi, d.train, {t: d.emb[t] for t in d.train},
                                       sft_cfg(cfg, hc.seed, cfg.multi_steps, cfg.lr), d.pad)
    res["time"]["multi_train_s"] = time.monotonic() - t0
    res["heldout"]["multi-task LoRA"] = scores(model, multi, d.held, None, d.pad)
    res["seen"]["multi-task LoRA"] = scores(model, multi, d.seen, None, d.pad)


def run_task(res: dict[str, Any], cfg: BenchConfig, model: Any, tok: Any, d: Data, hc: T2LConfig,
             embedder: Any) -> None:
    """One oracle LoRA per held-out task, trained on that task's own records (disjoint from its eval records)."""
    oracle, times = {}, []
    for name in sorted(d.held):
        avoid = {r["prompt"] for r in d.heldout_records if r["task"] == name}
        ex = tokenize_records(tok, heldout_train_records(t2l_tasks.task_by_name(name), cfg.n_train, avoid),
                              cfg.max_length)
        t0 = time.monotonic()
        oracle[name] = StaticLoRA.for_model(model, hc)
        tcfg = sft_cfg(cfg, hc.seed, cfg.task_steps, cfg.task_lr)
        tcfg.batch_tasks, tcfg.per_task = 1, cfg.batch_tasks * cfg.per_task
        res["losses"][f"task:{name}"] = train_sft(model, oracle[name], ex, {name: d.emb[name]}, tcfg, d.pad)
        times.append(time.monotonic() - t0)
    res["time"]["task_lora_train_s"] = times
    # the same-process timing: a T2L of the same shape (cost does not depend on its weights) beside the LoRA training
    fresh = T2L.for_model(model, hc).eval()
    res["time"]["generate_same_process_s"] = time_generation(fresh, embedder, [x for t in sorted(d.held)
                                                                              for x in d.descs[t]])
    res["heldout"]["task LoRA (oracle)"] = scores(model, oracle, d.held, None, d.pad)


def run_seed(seed: int, cfg: BenchConfig, parts: list[str], model: Any, tok: Any, embedder: Any) -> dict[str, Any]:
    d = prepare(cfg, tok, embedder)
    hc = T2LConfig(size=cfg.size, rank=cfg.rank, alpha=cfg.alpha, targets=layer_targets(["q_proj", "v_proj"], cfg.layers),
                   emb_dim=embedder.dim, embedder=embedder.id, seed=seed)
    res: dict[str, Any] = {"seed": seed, "parts": parts, "config": asdict(cfg), "train_tasks": sorted(d.train),
                           "heldout_tasks": sorted(d.held), "time": {}, "heldout": {}, "seen": {}, "losses": {}}
    if "t2l" in parts:
        run_t2l(res, cfg, model, d, hc, embedder)
    if "multi" in parts:
        run_multi(res, cfg, model, d, hc)
    if "task" in parts:
        run_task(res, cfg, model, tok, d, hc, embedder)
    return res


def merge(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One result per seed: the parts run as separate jobs (t2l, lora) joined."""
    by: dict[int, dict[str, Any]] = {}
    for r in results:
        m = by.setdefault(r["seed"], {"seed": r["seed"], "time": {}, "heldout": {}, "seen": {}, "losses": {}})
        for k in ("time", "heldout", "seen", "losses"):
            m[k].update(r[k])
    return [by[s] for s in sorted(by)]


def time_generation(hyper: T2L, embedder: Any, descriptions: list[str]) -> list[float]:
    """Seconds per LoRA: embed the description + one hypernetwork forward (the file write is not counted)."""
    out = []
    for d in descriptions:
        t0 = time.monotonic()
        hyper.generate(embed_description(embedder, d))
        out.append(time.monotonic() - t0)
    return out


# --- report ---
def ci95(per_seed: list[list[float]], n_boot: int = 2000, rng_seed: int = 0) -> tuple[float, float, float]:
    """(mean, lo, hi): hierarchical bootstrap (resample seeds, then records within each seed)."""
    rng = random.Random(rng_seed)
    mean = sum(sum(v) / len(v) for v in per_seed) / len(per_seed)
    boots = []
    for _ in range(n_boot):
        seeds = [per_seed[rng.randrange(len(per_seed))] for _ in per_seed]
        boots.append(sum(sum(rng.choice(v) for _ in v) / len(v) for v in seeds) / len(seeds))
    boots.sort()
    return mean, boots[int(0.025 * n_boot)], boots[int(0.975 * n_boot) - 1]


def table(results: list[dict[str, Any]], split: str) -> list[str]:
    conds = [c for c in ORDER if all(c in r[split] for r in results)]
    if not conds:
        return []
    tasks = sorted(results[0][split][conds[0]])
    lines = [f"| {split} ({len(tasks)} tasks, {len(results)} seeds) | exact answer % [95% CI] | answer CE | "
             + " | ".join(tasks) + " |", "|" + "---|" * (3 + len(tasks))]
    for c in conds:
        acc = [[x for t in tasks for x in r[split][c][t]["acc"]] for r in results]
        ce = [[x for t in tasks for x in r[split][c][t]["ce"]] for r in results]
        m, lo, hi = ci95([[float(x) for x in a] for a in acc])
        cm, clo, chi = ci95(ce)
        per = [100 * sum(x for r in results for x in r[split][c][t]["acc"])
               / sum(len(r[split][c][t]["acc"]) for r in results) for t in tasks]
        lines.append(f"| {c} | {100 * m:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] | {cm:.2f} [{clo:.2f}, {chi:.2f}] | "
                     + " | ".join(f"{p:.0f}" for p in per) + " |")
    return lines


def plot(results: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Answer CE per held-out task and condition (mean over seeds and records), one bar group per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = merge(results)
    conds = [c for c in ORDER if all(c in r["heldout"] for r in results)]
    tasks = sorted(results[0]["heldout"][conds[0]])
    fig, ax = plt.subplots(figsize=(8, 3.6))
    w = 0.8 / len(conds)
    for i, c in enumerate(conds):
        ys = [sum(x for r in results for x in r["heldout"][c][t]["ce"])
              / sum(len(r["heldout"][c][t]["ce"]) for r in results) for t in tasks]
        ax.bar([k + i * w for k in range(len(tasks))], ys, w, label=c)
    ax.set_xticks([k + 0.4 - w / 2 for k in range(len(tasks))], tasks)
    ax.set(ylabel="answer CE (lower is better)",
           title=f"T2L on held-out tasks, SmolLM2-135M ({len(results)} seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def recovered(results: list[dict[str, Any]]) -> list[str]:
    """The paper's reading: the share of the oracle task LoRA's gain over the base that each method recovers,
    (base - method) / (base - oracle), on held-out answer CE and exact answers, per seed."""
    need = ("base", "task LoRA (oracle)")
    if not all(c in r["heldout"] for r in results for c in need):
        return []

    def mean(r: dict[str, Any], c: str, k: str) -> float:
        v = [float(x) for t in r["heldout"][c] for x in r["heldout"][c][t][k]]
        return sum(v) / len(v)

    out = []
    for c in ("T2L (generated)", "multi-task LoRA", "base + description in prompt"):
        if not all(c in r["heldout"] for r in results):
            continue
        parts = []
        for k in ("ce", "acc"):
            f = []
            for r in results:
                gain = mean(r, "task LoRA (oracle)", k) - mean(r, "base", k)
                f.append((mean(r, c, k) - mean(r, "base", k)) / gain if abs(gain) > 1e-9 else float("nan"))
            parts.append(f"{'CE' if k == 'ce' else 'exact'} " + ", ".join(f"{x:.0%}" for x in f))
        out.append(f"{c}: share of the oracle's gain over base (per seed): " + "; ".join(parts))
    return out + [""]


def report(results: list[dict[str, Any]]) -> str:
    results = merge(results)
    lines = table(results, "heldout") + [""] + table(results, "seen") + [""] + recovered(results)
    key = "generate_same_process_s" if all("generate_same_process_s" in r["time"] for r in results) else "generate_s"
    gen = [x for r in results for x in r["time"].get(key, [])]
    tl = [x for r in results for x in r["time"].get("task_lora_train_s", [])]
    if gen and tl:
        g, t = sum(gen) / len(gen), sum(tl) / len(tl)
        lines.append(f"generation per LoRA: {1e3 * g:.1f} ms (embed + one forward, n={len(gen)}); training one task "
                     f"LoRA: {t:.1f} s (n={len(tl)}); ratio {t / g:.0f}x (same process)")
    for k in ("t2l_train_s", "multi_train_s"):
        lines.append(f"{k}: " + ", ".join(f"{r['time'][k]:.0f}" for r in results if k in r["time"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--parts", nargs="+", choices=["t2l", "multi", "task"], default=["t2l", "multi", "task"],
                   help="t2l: T2L + base; multi: multi-task LoRA; task: one LoRA per held-out task (run as separate "
                        "jobs on a loaded CPU, merged by --report)")
    p.add_argument("--out", default=None, help="JSON results file (one per job; --report merges them)")
    p.add_argument("--report", nargs="+", default=None, help="result files to tabulate (no training)")
    p.add_argument("--plot", default=None, help="with --report: write a PNG of answer CE per held-out task")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--overwrite", action="store_true")
    for k, v in asdict(BenchConfig()).items():
        p.add_argument(f"--{k}", type=type(v) if v is not None else str, default=v)
    a = vars(p.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    if a["report"]:
        loaded = [json.loads(Path(f).read_text()) for f in a["report"]]
        flat = [r for x in loaded for r in (x if isinstance(x, list) else [x])]
        print(report(flat))
        if a["plot"]:
            plot(flat, a["plot"])
        return
    if a["out"] and Path(a["out"]).exists() and not a["overwrite"]:
        raise FileExistsError(f"{a['out']} exists; pass --overwrite to replace it")
    torch.set_num_threads(a["threads"])
    cfg = BenchConfig(**{k: a[k] for k in asdict(BenchConfig())})
    from lora_diffusion.llm import load_causal_lm
    from training.llm_data import ensure_chat_template

    model, tok = load_causal_lm()
    ensure_chat_template(tok)
    model.eval().requires_grad_(False)
    embedder = make_embedder()
    results = [run_seed(s, cfg, a["parts"], model, tok, embedder) for s in a["seeds"]]
    results_json = [{k: v for k, v in r.items() if k != "_hyper"} for r in results]
    if a["out"]:
        Path(a["out"]).parent.mkdir(parents=True, exist_ok=True)
        from lora_diffusion.llm import base_name

        for r in results:  # the trained hypernetwork, for python -m lora_diffusion.generate_lora --hyper
            if "_hyper" in r:
                r.pop("_hyper").save(Path(a["out"]).with_suffix(f".seed{r['seed']}.t2l.safetensors"),
                                     base_model=base_name(model))
        tmp = Path(a["out"]).with_suffix(".tmp")
        tmp.write_text(json.dumps(results_json[0] if len(results_json) == 1 else results_json))
        os.replace(tmp, a["out"])
    print(report(results_json))


if __name__ == "__main__":
    main()
