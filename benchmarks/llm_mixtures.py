"""The shared LLM mixture benchmark (issue 16): a library of task LoRAs trained here on SmolLM2-135M-Instruct, mixed.

Part 1, **tasks**: one rank-8 LoRA per shipped task (``training.llm_data.TASKS``: shout, repeat, bracket, swap,
count; seeded records, the held-out words never trained on), ``--steps`` AdamW steps each. A mixed held-out test
set (``--n_test`` records per task) is scored for:

* ``base`` (no adapter); ``single:<task>`` (that one LoRA on every task); ``single best`` (the single LoRA with
  the best accuracy on a separate validation split, so the baseline is not picked on the test set);
* ``sum`` (all LoRAs at weight 1, the plain static sum) and ``mean`` (weight 1/N);
* ``oracle``: each record with its own task's LoRA;
* ``xlora`` (classifier trained ``--router_steps`` steps on the union of the tasks' training records),
  ``mole`` (gates trained the same way, balancing loss included), both over the frozen LoRAs;
* ``lag`` (training-free: Arrow top-k then SpectR, one LoRA per token and layer) and ``arrow`` (PEFT's Arrow);
* ``moa`` (part ``moa``): new heterogeneous experts + routers trained on the same union for N x ``--steps`` steps
  (the library's total), a multi-task reference rather than a mixture of the library.

Metrics per task, then averaged over tasks: held-out **loss** (token-weighted NLL of the response and its
end-of-turn token) and **accuracy** = exact match under teacher forcing (every answer token, end-of-turn
included, is the argmax given the right prefix: exactly the records greedy decoding answers exactly).

Part 2, **knowledge** (LAG): ``--knowledge_loras`` LoRAs, each trained on its own ``--facts`` made-up
"capital of" facts (``benchmarks/lag_knowledge.py``'s data and M-way multiple choice); base, oracle, LAG (k = 4
and k = N), Arrow, the 1/N merge, and LAG over the whole library (task + knowledge LoRAs). Diagnostics of the
routing: per layer, the fraction of tokens LAG routes to the record's own LoRA (chance 1/N), and how alike the
LoRAs' Arrow keys are (mean |cos| between the a*_{i,1} of different LoRAs; random directions: ~sqrt(2/(pi d))).

Seeds: one fresh process per seed (``--seeds 0,1,2``); a seed's result and its LoRAs are cached under
``--cache`` and reused. The report: mean over seeds with a 95% t-interval, and LAG's score as a fraction of the
oracle's.

    python benchmarks/llm_mixtures.py --seeds 0,1,2                        # everything, 1 thread per seed
    python benchmarks/llm_mixtures.py --seeds 0 --tasks shout,swap --steps 10 --knowledge_loras 4   # smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import lora_diffusion as ld  # noqa: E402
from benchmarks import lag_knowledge as lk  # noqa: E402
from lora_diffusion.fusion import fuse, unfuse  # noqa: E402
from training.llm_data import IGNORE, TASKS, Example, collate, task_records, tokenize_record  # noqa: E402

log = logging.getLogger("llm_mixtures")
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


@dataclass
class Config:
    tasks: str = "shout,bracket,swap,count"
    n_train: int = 48
    n_val: int = 12
    n_test: int = 24
    rank: int = 8
    steps: int = 30
    lr: float = 2e-3
    batch: int = 8
    router_steps: int = 30
    router_lr: float = 5e-3
    knowledge_loras: int = 10
    facts: int = 4
    knowledge_steps: int = 30
    knowledge_lr: float = 3e-3
    choices: int = 8
    top_k: int = 4
    seed: int = 0
    threads: int = 1
    model: str | None = None

    def key(self) -> str:
        """A short hash of everything that changes the trained LoRAs and the scores (not threads)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("threads",)}
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


# --- metrics (tested in tests/test_llm_mixtures.py) ---


@torch.no_grad()
def answer_scores(model: torch.nn.Module, examples: Sequence[Example], pad_id: int, eos_id: int | None,
                  batch: int = 16) -> list[tuple[float, int, bool]]:
    """Per example: (summed NLL of its labelled tokens, their count, exact match under teacher forcing).

    The labelled tokens are the response and its end-of-turn token; anything labelled after the first ``eos_id``
    (the template's trailing newline) is ignored, so exact match = greedy decoding gives exactly the answer."""
    out = []
    for lo in range(0, len(examples), batch):
        b = collate(examples[lo:lo + batch], pad_id)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        tgt = b["labels"][:, 1:]
        mask = tgt != IGNORE
        if eos_id is not None:  # keep up to and including the first eos target
            is_eos = (tgt == eos_id) & mask
            after = (is_eos.cumsum(1) - is_eos.long()) > 0
            mask &= ~after
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt.clamp(min=0), reduction="none")
        right = (logits.argmax(-1) == tgt) | ~mask
        for i in range(tgt.shape[0]):
            out.append((float(nll[i][mask[i]].sum()), int(mask[i].sum()), bool(right[i].all())))
    return out


def summarize(per_task: dict[str, list[tuple[float, int, bool]]]) -> dict[str, Any]:
    """{"loss", "acc"} averaged over tasks (each task: token-weighted loss, fraction exact) and per task."""
    rows = {t: {"loss": sum(s[0] for s in sc) / max(1, sum(s[1] for s in sc)),
                "acc": sum(s[2] for s in sc) / max(1, len(sc))} for t, sc in per_task.items()}
    return {"loss": statistics.fmean(r["loss"] for r in rows.values()),
            "acc": statistics.fmean(r["acc"] for r in rows.values()), "per_task": rows}


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% Student-t interval over the values; nan for a single value)."""
    n = len(values)
    m = statistics.fmean(values)
    if n < 2:
        return m, float("nan")
    t = T95.get(n - 1, 1.96)
    return m, t * statistics.stdev(values) / math.sqrt(n)


# --- data and training ---


def task_data(tok: Any, tasks: Sequence[str], n: int, split: str, seed: int) -> dict[str, list[Example]]:
    return {t: [tokenize_record(tok, r, f"{t}/{split}") for r in task_records(t, n, split, seed)] for t in tasks}


def fit(model: torch.nn.Module, params: list[torch.nn.Parameter], examples: list[Example], steps: int, lr: float,
        batch: int, seed: int, pad_id: int, extra_loss: Callable[[], torch.Tensor | None] | None = None) -> list[float]:
    """``steps`` AdamW steps on random batches of ``examples`` (seeded); returns the losses."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**collate(rng.sample(examples, min(batch, len(examples))), pad_id)).loss
        reg = extra_loss() if extra_loss else None
        (loss if reg is None else loss + reg).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def cached_lora(model: torch.nn.Module, name: str, path: Path, cfg: Config, seed: int,
                train: Callable[[list[torch.nn.Parameter]], list[float]]) -> dict[str, Any]:
    """Load ``path`` as adapter ``name`` if it exists; else add a LoRA, ``train`` it and save it there (atomically)."""
    from lora_diffusion import llm

    if path.is_file():
        llm.load_llm_adapter(model, path, name=name)
        return {"cached": True}
    ld.add_adapter(model, ld.AdapterSpec(rank=cfg.rank, alpha=2 * cfg.rank, targets="llm", seed=seed), name)
    ld.set_adapters(model, [name])
    params = [p for _, p in ld.adapter_parameters(model, name)]
    t0 = time.perf_counter()
    losses = train(params)
    for p in params:
        p.requires_grad_(False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.safetensors")
    llm.save_llm_adapter(model, tmp, name=name, overwrite=True)
    os.replace(tmp, path)
    return {"cached": False, "first_loss": losses[0], "last_loss": losses[-1], "train_s": time.perf_counter() - t0}


# --- part 1: task LoRAs and their mixtures ---


def evaluate(model: torch.nn.Module, data: dict[str, list[Example]], ids: tuple[int, int | None],
             setup: Callable[[str], None] | None = None) -> dict[str, Any]:
    per = {}
    for task, exs in data.items():
        if setup is not None:
            setup(task)
        per[task] = answer_scores(model, exs, *ids)
    return summarize(per)


def train_router(model: torch.nn.Module, method: str, names: list[str], train: list[Example], cfg: Config,
                 pad_id: int) -> tuple[Any, list[float]]:
    from lora_diffusion.inject.steps import TrainingHooks

    torch.manual_seed(cfg.seed)
    opts = {"xlora_dropout_p": 0.0} if method == "xlora" else {}
    f = fuse(model, names, method=method, **opts)
    hooks = TrainingHooks(model) if method == "mole" else None
    losses = fit(model, f.parameters(), train, cfg.router_steps, cfg.router_lr, cfg.batch, cfg.seed + 7, pad_id,
                 hooks.regularization if hooks else None)
    return f, losses


def task_part(model: torch.nn.Module, tok: Any, cfg: Config, cache: Path) -> tuple[dict[str, Any], list[str], dict]:
    tasks = cfg.tasks.split(",")
    ids = (tok.pad_token_id, tok.convert_tokens_to_ids("<|im_end|>"))
    train = task_data(tok, tasks, cfg.n_train, "train", cfg.seed)
    val = task_data(tok, tasks, cfg.n_val, "val", cfg.seed)
    test = task_data(tok, tasks, cfg.n_test, "test", cfg.seed)
    res: dict[str, Any] = {"base": evaluate(model, test, ids, lambda t: ld.disable_adapters(model))}
    names, info = [], {}
    for i, t in enumerate(tasks):
        name = f"task_{t}"
        info[name] = cached_lora(model, name, cache / f"{name}.safetensors", cfg, cfg.seed * 100 + i,
                                 lambda ps, t=t, i=i: fit(model, ps, train[t], cfg.steps, cfg.lr, cfg.batch,
                                                          cfg.seed * 100 + i, ids[0]))
        names.append(name)
        log.info("LoRA %s: %s", name, info[name])
    val_acc = {}
    for n in names:
        ld.set_adapters(model, [n])
        res[f"single:{n[5:]}"] = evaluate(model, test, ids)
        val_acc[n] = evaluate(model, val, ids)
    best = max(names, key=lambda n: (val_acc[n]["acc"], -val_acc[n]["loss"]))
    res["single best"] = {**res[f"single:{best[5:]}"], "chosen": best}
    ld.set_adapters(model, names, [1.0] * len(names))
    res["sum"] = evaluate(model, test, ids)
    ld.set_adapters(model, names, [1.0 / len(names)] * len(names))
    res["mean"] = evaluate(model, test, ids)
    res["oracle"] = evaluate(model, test, ids, lambda t: ld.set_adapters(model, [f"task_{t}"]))
    all_train = [e for t in tasks for e in train[t]]
    for method in ("xlora", "mole"):
        t0 = time.perf_counter()
        f, losses = train_router(model, method, names, all_train, cfg, ids[0])
        res[method] = {**evaluate(model, test, ids), "router_losses": [losses[0], losses[-1]],
                       "router_s": time.perf_counter() - t0}
        f.remove()
        unfuse(model)
    diag = {}
    for label, kw in (("lag", {"top_k": min(cfg.top_k, len(names))}), ("arrow", {"mode": "arrow", "top_k": 2})):
        f = fuse(model, names, method="lag", **kw)
        res[label] = evaluate(model, test, ids)
        if label == "lag":
            diag = {"routing": routing_accuracy(model, f, {t: (test[t], names.index(f"task_{t}")) for t in tasks},
                                                ids[0]), "keys": key_similarity(f)}
        unfuse(model)
    log.info("tasks: %s", {k: (round(v["acc"], 3), round(v["loss"], 3)) for k, v in res.items()})
    return res, names, {"loras": info, "lag_diagnostics": diag, "val": {n: val_acc[n]["acc"] for n in names},
                        "test_sets": {t: len(v) for t, v in test.items()}, "train_all": all_train}


def moa_row(model: torch.nn.Module, tok: Any, cfg: Config, data: dict[str, list[Example]],
            all_train: list[Example]) -> dict[str, Any]:
    """A MoA (new experts and routers) trained on the union for the library's total steps."""
    from lora_diffusion.fusion.moa import MoAConfig, add_moa

    ids = (tok.pad_token_id, tok.convert_tokens_to_ids("<|im_end|>"))
    moa = add_moa(model, MoAConfig(rank=cfg.rank, seed=cfg.seed), name="moa")
    ld.set_adapters(model, ["moa"])
    params = [p for _, p in ld.adapter_parameters(model, "moa")] + list(moa.parameters())
    steps = cfg.steps * len(data)
    t0 = time.perf_counter()
    losses = fit(model, [p for p in params if p.requires_grad], all_train, steps, cfg.lr, cfg.batch, cfg.seed + 11,
                 ids[0])
    return {**evaluate(model, data, ids), "steps": steps, "train_s": time.perf_counter() - t0,
            "losses": [losses[0], losses[-1]]}


# --- LAG diagnostics ---


@torch.no_grad()
def routing_accuracy(model: torch.nn.Module, fusion: Any, groups: dict[str, tuple[list[Example], int]],
                     pad_id: int) -> dict[str, Any]:
    """Per layer: fraction of real tokens LAG routes to the group's own adapter (index into the library)."""
    hits: dict[str, list[float]] = {}
    counts: dict[str, torch.Tensor] = {}
    for exs, own in groups.values():
        b = collate(exs, pad_id)
        fusion.record(True)
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        real = b["attention_mask"].flatten().bool()
        for key, c in fusion.combiners.items():
            idx = c.last_index[:, 0]
            own_i = c.names.index(fusion.names[own]) if fusion.names[own] in c.names else -1
            hits.setdefault(key, []).append(float((idx[real] == own_i).float().mean()))
            cnt = torch.bincount(idx[real], minlength=len(c.names)).float()
            counts[key] = counts[key] + cnt if key in counts else cnt
        fusion.record(False)
    per_layer = {k: statistics.fmean(v) for k, v in hits.items()}
    top_share = statistics.fmean(float(c.max() / c.sum()) for c in counts.values())
    return {"mean": statistics.fmean(per_layer.values()), "max_layer": max(per_layer.items(), key=lambda kv: kv[1]),
            "min_layer": min(per_layer.items(), key=lambda kv: kv[1]), "chance": 1 / len(fusion.names),
            "top_share": top_share}


@torch.no_grad()
def key_similarity(fusion: Any) -> dict[str, float]:
    """Mean |cos| between the Arrow keys a*_{i,1} of different adapters, over layers; and a random-direction reference."""
    vals, d = [], 0
    for c in fusion.combiners.values():
        a = torch.nn.functional.normalize(c.arrows.double(), dim=1)  # (n, in)
        n, d = a.shape
        cos = (a @ a.T).abs()
        vals.append(float((cos.sum() - cos.diagonal().sum()) / (n * (n - 1))))
    return {"mean_abs_cos": statistics.fmean(vals), "max_layer_abs_cos": max(vals),
            "random_reference": math.sqrt(2 / (math.pi * d))}


@torch.no_grad()
def init_alignment(model: torch.nn.Module, fusion: Any, seeds: dict[str, int], rank: int) -> dict[str, float]:
    """Where the Arrow keys come from: the share of each LoRA's key a*_{i,1} (unit) inside the row space of its
    *initial* A (re-created from its seed), vs r/in for a random direction; and ‖A - A0‖/‖A0‖. Unfuses the model."""
    keys = {k: (list(c.names), c.arrows.double().clone()) for k, c in fusion.combiners.items()}
    layers = dict(fusion.layers)
    unfuse(model)
    share, ref, drift, probe = [], [], [], "_init_probe"
    for name, seed in seeds.items():
        ld.add_adapter(model, ld.AdapterSpec(rank=rank, alpha=2 * rank, targets="llm", seed=seed), probe,
                       trainable=False)
        for key, (names, arrows) in keys.items():
            layer = layers[key]
            if name not in names or probe not in layer.adapters:
                continue
            a0, a = layer.adapters[probe].lora_A.double(), layer.adapters[name].lora_A.double()  # (r, in)
            q, _ = torch.linalg.qr(a0.T)  # (in, r): the initial row space
            share.append(float((q.T @ torch.nn.functional.normalize(arrows[names.index(name)], dim=0)).pow(2).sum()))
            ref.append(a0.shape[0] / a0.shape[1])
            drift.append(float((a - a0).norm() / a0.norm()))
        ld.remove_adapters(model, [probe])
    return {"key_in_init_rowspace": statistics.fmean(share), "random_reference": statistics.fmean(ref),
            "A_drift": statistics.fmean(drift)}


def lagdiag_part(model: torch.nn.Module, cfg: Config, cache: Path) -> dict[str, Any]:
    """The cached libraries' Arrow keys vs their initial A (no training; run after the tasks/knowledge parts)."""
    from lora_diffusion import llm

    libs = {"tasks": {f"task_{t}": cfg.seed * 100 + i for i, t in enumerate(cfg.tasks.split(","))},
            "knowledge": {f"know_{i:03d}": cfg.seed * 1000 + 500 + i for i in range(cfg.knowledge_loras)}}
    files = {"tasks": lambda n: cache / f"{n}.safetensors", "knowledge": lambda n: cache / "knowledge" / f"{n}.safetensors"}
    out = {}
    for lib, seeds in libs.items():
        paths = {n: files[lib](n) for n in seeds}
        if not all(p.is_file() for p in paths.values()):
            log.warning("lagdiag: the %s LoRAs are not all cached in %s; skipped", lib, cache)
            continue
        names = [llm.load_llm_adapter(model, p, name=n) for n, p in paths.items()]
        f = fuse(model, names, method="lag", top_k=min(cfg.top_k, len(names)))
        out[lib] = init_alignment(model, f, seeds, cfg.rank)
        ld.remove_adapters(model, names)
        log.info("lagdiag %s: %s", lib, out[lib])
    return out


# --- part 2: knowledge LoRAs (LAG) ---


KNOWLEDGE_SPLITS = {"train": lk.TRAIN_TEMPLATES[:1], "held-out": [lk.HELD_OUT]}  # one trained template (time)


def knowledge_eval(model: torch.nn.Module, tok: Any, facts: list[tuple[str, str]], choices: int, seed: int,
                   owner: dict[int, str] | None = None) -> dict[str, float]:
    """M-way multiple-choice accuracy per split (lag_knowledge's scoring; the same candidates for every condition)."""
    rng, out = random.Random(seed + 1), {}
    for split, templates in KNOWLEDGE_SPLITS.items():
        hits = total = 0
        for j, (c, v) in enumerate(facts):
            if owner is not None:
                ld.set_adapters(model, [owner[j]])
            cands = sorted([v, *rng.sample([w for _, w in facts if w != v], choices - 1)])
            for t in templates:
                hits += lk.choice_correct(model, tok, t, c, v, cands)
                total += 1
        out[split] = hits / total
    return out


def knowledge_part(model: torch.nn.Module, tok: Any, cfg: Config, cache: Path) -> dict:
    from lora_diffusion import llm

    facts = lk.make_facts(cfg.knowledge_loras * cfg.facts, cfg.seed)
    m = min(cfg.choices, len(facts))
    res: dict[str, Any] = {"base": knowledge_eval(model, tok, facts, m, cfg.seed)}
    names = []
    for i in range(cfg.knowledge_loras):
        name, mine = f"know_{i:03d}", facts[i * cfg.facts:(i + 1) * cfg.facts]
        batch = lk.lm_batch(tok, [t.format(c=c, v=v) for c, v in mine for t in lk.TRAIN_TEMPLATES])

        def train(ps: list[torch.nn.Parameter], batch: dict = batch) -> list[float]:
            return lk.train_lm(model, ps, batch, cfg.knowledge_steps, cfg.knowledge_lr)

        info = cached_lora(model, name, cache / "knowledge" / f"{name}.safetensors", cfg, cfg.seed * 1000 + 500 + i,
                           train)
        log.info("LoRA %s: %s", name, info)
        names.append(name)
    owner = {j: names[j // cfg.facts] for j in range(len(facts))}
    res["oracle"] = knowledge_eval(model, tok, facts, m, cfg.seed, owner)
    task_files = sorted(cache.glob("task_*.safetensors"))  # the tasks part's LoRAs, as distractors
    task_names = [llm.load_llm_adapter(model, f, name=f.stem) for f in task_files]
    k = min(cfg.top_k, len(names))
    runs = {f"lag (k={k})": (names, {"top_k": k}, True),
            f"lag (k={len(names)}, SpectR only)": (names, {"top_k": len(names)}, False)}
    if task_names:
        runs[f"lag over all {len(names) + len(task_names)} (+ task LoRAs)"] = (names + task_names, {"top_k": k}, True)
    diag = {}
    for label, (lib, kw, score) in runs.items():
        f = fuse(model, lib, method="lag", **kw)
        if score:
            res[label] = knowledge_eval(model, tok, facts, m, cfg.seed)
        diag[label] = {"routing": knowledge_routing(model, tok, f, facts, names, cfg), "keys": key_similarity(f)}
        unfuse(model)
    ld.set_adapters(model, names, [1.0 / len(names)] * len(names))
    res["merge 1/N"] = knowledge_eval(model, tok, facts, m, cfg.seed)
    log.info("knowledge: %s", res)
    return {"accuracy": res, "lag_diagnostics": diag, "chance": 1 / m}


@torch.no_grad()
def knowledge_routing(model: torch.nn.Module, tok: Any, fusion: Any, facts: list[tuple[str, str]], names: list[str],
                      cfg: Config) -> dict[str, Any]:
    """Routing accuracy on the fact statements (held-out template), all tokens, and at the token before the capital."""
    groups_all, last_hits = {}, []
    for i, name in enumerate(names):
        mine = facts[i * cfg.facts:(i + 1) * cfg.facts]
        exs = [Example(*[list(tok(lk.HELD_OUT.format(c=c, v=v))["input_ids"])] * 2, "k") for c, v in mine]
        groups_all[name] = (exs, fusion.names.index(name))
        for c, _ in mine:  # the prefix up to the capital: its last token is where the capital is predicted
            pre = tok(lk.HELD_OUT.split("{v}")[0].format(c=c), return_tensors="pt")["input_ids"]
            fusion.record(True)
            model(input_ids=pre)
            own = fusion.names.index(name)
            last_hits.append(statistics.fmean(
                float(cb.last_index[-1, 0] == cb.names.index(fusion.names[own])) for cb in fusion.combiners.values()))
            fusion.record(False)
    out = routing_accuracy(model, fusion, groups_all, tok.pad_token_id)
    out["last_prefix_token"] = statistics.fmean(last_hits)
    return out


# --- one seed, all seeds ---

PARTS = ("tasks", "knowledge", "moa", "lagdiag")


def run_part(cfg: Config, cache: Path, part: str) -> dict[str, Any]:
    from lora_diffusion import llm

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    model, tok = llm.load_causal_lm(cfg.model)
    model.requires_grad_(False)
    tok.padding_side = "right"
    out: dict[str, Any] = {"config": dataclasses.asdict(cfg), "torch": torch.__version__}
    if part == "tasks":
        tasks, _, extra = task_part(model, tok, cfg, cache)
        extra.pop("train_all")
        out.update(tasks=tasks, task_extra=extra)
    elif part == "moa":
        tasks = cfg.tasks.split(",")
        train = [e for ex in task_data(tok, tasks, cfg.n_train, "train", cfg.seed).values() for e in ex]
        out["moa"] = moa_row(model, tok, cfg, task_data(tok, tasks, cfg.n_test, "test", cfg.seed), train)
    elif part == "lagdiag":
        out["lagdiag"] = lagdiag_part(model, cfg, cache)
    else:
        out["knowledge"] = knowledge_part(model, tok, cfg, cache)
    out["wall_s"] = time.perf_counter() - t0
    return out


def seed_result(cfg: Config, cache_root: Path, part: str, spawn: bool = True) -> dict[str, Any]:
    """The cached result of one part of one seed, or run it (in a fresh process when ``spawn``) and cache it."""
    folder = cache_root / f"seed{cfg.seed}-{cfg.key()}"
    out = folder / f"{part}.json"
    if out.is_file():
        log.info("seed %d, %s: cached %s", cfg.seed, part, out)
        return json.loads(out.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    if spawn:
        argv = [sys.executable, __file__, "--worker", part, "--cache", str(cache_root)] + to_argv(cfg)
        env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads), "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": str(ROOT)}
        subprocess.run(argv, check=True, env=env, cwd=ROOT)
        return json.loads(out.read_text())
    res = run_part(cfg, folder, part)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1, default=str))
    os.replace(tmp, out)
    return res


# --- report ---


def fmt(values: Sequence[float], pct: bool = True) -> str:
    m, h = mean_ci(values)
    s = 100 if pct else 1
    ci = "" if math.isnan(h) else f" ± {h * s:.1f}" if pct else f" ± {h:.3f}"
    return f"{m * s:.1f}{ci}" if pct else f"{m:.3f}{ci}"


def report(results: list[dict[str, Any]]) -> str:
    seeds = [r["config"]["seed"] for r in results]
    cfg = results[0]["config"]
    lines = [f"seeds {seeds}: mean ± 95% t-interval half-width over seeds"]
    if "tasks" in results[0]:
        lines += ["", f"Tasks ({cfg['tasks']}; {cfg['n_test']} held-out records each)", "",
                  "| condition | accuracy % | held-out loss | accuracy / oracle |", "|---|---|---|---|"]
        orc = [r["tasks"]["oracle"]["acc"] for r in results]
        for row in results[0]["tasks"]:
            acc = [r["tasks"][row]["acc"] for r in results]
            loss = [r["tasks"][row]["loss"] for r in results]
            frac = [a / o if o else float("nan") for a, o in zip(acc, orc)]
            lines.append(f"| {row} | {fmt(acc)} | {fmt(loss, False)} | {fmt(frac, False)} |")
        per = results[0]["tasks"]["oracle"]["per_task"]
        lines += ["", "Per task, accuracy % (base / oracle / lag / xlora / mole / sum): " + "; ".join(
            f"{t} " + " / ".join(fmt([r["tasks"][c]["per_task"][t]["acc"] for r in results]).split(" ±")[0]
                                 for c in ("base", "oracle", "lag", "xlora", "mole", "sum")) for t in per)]
    diags = []
    if "tasks" in results[0]:
        diags.append(("tasks, lag", [r["task_extra"]["lag_diagnostics"] for r in results]))
    if "knowledge" in results[0]:
        kn = [r["knowledge"]["accuracy"] for r in results]
        lines += ["", f"Knowledge LoRAs ({cfg['knowledge_loras']} x {cfg['facts']} facts, "
                  f"{round(1 / results[0]['knowledge']['chance'])}-way choice, chance "
                  f"{100 * results[0]['knowledge']['chance']:.1f}%)", "",
                  "| condition | trained template % | held-out template % | held-out / oracle |", "|---|---|---|---|"]
        for row in kn[0]:
            tr, ho = [k[row]["train"] for k in kn], [k[row]["held-out"] for k in kn]
            frac = [h / k["oracle"]["held-out"] if k["oracle"]["held-out"] else float("nan") for h, k in zip(ho, kn)]
            lines.append(f"| {row} | {fmt(tr)} | {fmt(ho)} | {fmt(frac, False)} |")
        diags += [(f"knowledge, {k}", [r["knowledge"]["lag_diagnostics"][k] for r in results])
                  for k in results[0]["knowledge"]["lag_diagnostics"]]
    lines += ["", "LAG routing: tokens routed to the record's own LoRA (mean over layers), at the token that predicts "
              "the capital, share of the most-used LoRA per layer, and Arrow-key similarity", "",
              "| library | routed to own % | at the capital's token % | chance % | most-used LoRA's share % | "
              "mean abs cos of keys (random ref) |", "|---|---|---|---|---|---|"]
    for label, ds in diags:
        last = [d["routing"]["last_prefix_token"] for d in ds if "last_prefix_token" in d["routing"]]
        lines.append(f"| {label} | {fmt([d['routing']['mean'] for d in ds])} | {fmt(last) if last else ''} | "
                     f"{100 * ds[0]['routing']['chance']:.1f} | {fmt([d['routing']['top_share'] for d in ds])} | "
                     f"{fmt([d['keys']['mean_abs_cos'] for d in ds], False)} ({ds[0]['keys']['random_reference']:.3f}) |")
    if "lagdiag" in results[0]:
        lines += ["", "Where the Arrow keys come from: share of a LoRA's key inside the row space of its initial "
                  "(random) A, and how far A moved from its init", "",
                  "| library | key in init row space % | random direction % | ‖A − A0‖/‖A0‖ |", "|---|---|---|---|"]
        for lib in results[0]["lagdiag"]:
            ds = [r["lagdiag"][lib] for r in results if lib in r.get("lagdiag", {})]
            lines.append(f"| {lib} | {fmt([d['key_in_init_rowspace'] for d in ds])} | "
                         f"{100 * ds[0]['random_reference']:.1f} | {fmt([d['A_drift'] for d in ds], False)} |")
    return "\n".join(lines)


def to_argv(cfg: Config) -> list[str]:
    out = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, bool):
            out.append(f"--{f.name}" if v else f"--no-{f.name}")
        elif v is not None:
            out += [f"--{f.name}", str(v)]
    return out


def parse(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(Config):
        if f.type in ("bool", bool):
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default)
        else:
            typ = {"int": int, "float": float}.get(str(f.type), str)
            p.add_argument(f"--{f.name}", type=typ, default=f.default)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one process each")
    p.add_argument("--cache", type=Path, default=ROOT / "outputs" / "llm_mixtures", help="LoRAs and per-seed results")
    p.add_argument("--json", type=Path, default=None, help="write every seed's result and the report here")
    p.add_argument("--parts", default=",".join(PARTS), help="which parts to run (or read from the cache): "
                   "tasks (LoRAs, mixtures), knowledge (LAG), moa (a MoA trained on all tasks), "
                   "lagdiag (the cached LoRAs' Arrow keys vs their initial A; after tasks and knowledge)")
    p.add_argument("--worker", choices=PARTS, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    cfg = Config(**{f.name: getattr(a, f.name) for f in dataclasses.fields(Config)})
    unknown = [t for t in cfg.tasks.split(",") if t not in TASKS]
    if unknown:
        p.error(f"--tasks: unknown {unknown}; shipped: {sorted(TASKS)}")
    return cfg, a


def main(argv: list[str] | None = None) -> None:
    cfg, a = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if a.worker:
        seed_result(cfg, a.cache, a.worker, spawn=False)
        return
    results = []
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    parts = [p for p in a.parts.split(",") if p]
    for i, s in enumerate(seeds):
        t0, merged = time.perf_counter(), {}
        for part in parts:
            merged.update(seed_result(dataclasses.replace(cfg, seed=s), a.cache, part))
        if "moa" in merged and "tasks" in merged:
            merged["tasks"]["moa"] = merged.pop("moa")
        results.append(merged)
        log.info("seed %d done (%d/%d, %.0fs)", s, i + 1, len(seeds), time.perf_counter() - t0)
    text = report(results)
    print(text)  # noqa: T201 (the report)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"results": results, "report": text}, indent=1, default=str))


if __name__ == "__main__":
    main()
