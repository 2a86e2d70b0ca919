"""Doc-to-LoRA benchmark: answer questions about held-out documents without them in the prompt.

    python benchmarks/d2l.py --hyper outputs/d2l/d2l.safetensors --seeds 0,1 --n_docs 16 --json outputs/d2l_bench.json

Accuracy (multiple choice, highest log-likelihood among the answer, the same fact of the document's other country
and two values not in the document; chance 25%) on documents never trained on, for
  base     the frozen model, question only
  d2l      the model + the LoRA generated from the document (one forward pass), question only
  d2l_other  control: the LoRA generated from another held-out document (what is not document-specific)
  context  the frozen model with the document in the prompt (the upper bound the student is distilled from)
per seed (an independent sample of held-out documents) and pooled with a 95% Wilson interval; "in-doc" is the
share of answers that pick a value the document contains (right or the other country's).
Cost (``--lengths``): for documents of growing length, the time to answer one question (prefill + 8 greedy
tokens, median of ``--repeats``) with the LoRA vs with the document in context, the one-off internalize time,
and the answering state in memory (KV cache + adapter tensors) and the process's peak-RSS growth.
``--parts accuracy`` / ``--parts cost`` run one half; ``--combine a.json b.json`` pools runs (one per seed).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.procmem import reset_hwm, rss_kib, trim  # noqa: E402
from lora_diffusion.hyper.d2l import D2L, internalize, reset  # noqa: E402
from training.d2l_data import Document, make_document, split_documents  # noqa: E402
from training.train_d2l import IGNORE, SYSTEM, answer_logits, qa_sequence  # noqa: E402

log = logging.getLogger("bench_d2l")
MODES = ("base", "d2l", "d2l_other", "context")


def held_out(train_cfg: dict[str, Any], n_docs: int, seed: int, n_entities: int = 2) -> list[Document]:
    """Documents whose countries occur in neither the checkpoint's training nor its validation documents."""
    train_docs, val_docs = split_documents(train_cfg["n_train"], train_cfg["n_val"], train_cfg["seed"])
    seen = {e for d in train_docs + val_docs for e in d.entities}
    rng, out = random.Random(50_000 + seed), []
    while len(out) < n_docs:
        d = make_document(rng, n_entities)
        if not seen & set(d.entities):
            out.append(d)
            seen |= set(d.entities)
    return out


def doc_choices(model: Any, tok: Any, doc: Document, with_doc: bool) -> list[int]:
    """The picked candidate index per question (all questions' candidates in one shared-prefix forward)."""
    seqs = [qa_sequence(tok, q.question, c, doc.text if with_doc else None) for q in doc.qa for c in q.candidates]
    with torch.no_grad():
        logits = answer_logits(model, seqs, pad_id=tok.pad_token_id or 0)
    scores = []
    for (ids, labels), lg in zip(seqs, logits):
        tgt = torch.tensor([t for t, lab in zip(ids, labels) if lab != IGNORE])
        scores.append(float(torch.log_softmax(lg.float(), -1).gather(-1, tgt[:, None]).sum()))
    k, picks = len(doc.qa[0].candidates), []
    for i in range(len(doc.qa)):
        s = scores[i * k:(i + 1) * k]
        picks.append(max(range(k), key=s.__getitem__))
    return picks


def accuracy(model: Any, tok: Any, hyper: D2L, docs: list[Document]) -> dict[str, dict[str, Any]]:
    res: dict[str, dict[str, Any]] = {m: {"correct": [], "in_doc": []} for m in MODES}
    t0 = time.time()
    for i, doc in enumerate(docs):
        for mode in MODES:
            if mode.startswith("d2l"):  # d2l_other: the LoRA of another held-out document (control)
                internalize(model, (doc if mode == "d2l" else docs[(i + 1) % len(docs)]).text, hyper, tok)
            picks = doc_choices(model, tok, doc, mode == "context")
            reset(model)
            n_in = len(doc.entities)  # candidates [answer, other countries' facts..., outside values]
            res[mode]["correct"] += [p == 0 for p in picks]
            res[mode]["in_doc"] += [p < n_in for p in picks]
        el = time.time() - t0
        log.info("document %d/%d  %s  ETA %.0f s", i + 1, len(docs),
                 "  ".join(f"{m} {sum(res[m]['correct']) / len(res[m]['correct']):.2f}" for m in MODES),
                 el / (i + 1) * (len(docs) - i - 1))
    return res


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (float("nan"), float("nan"))
    p, d = k / n, 1 + z * z / n
    c, h = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (c - h, c + h)


# --- cost as the document grows ---
def _answer(model: Any, ids: list[int], new_tokens: int) -> tuple[float, int]:
    """Prefill ``ids`` and decode ``new_tokens`` greedily; (seconds, KV-cache bytes)."""
    t = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens - 1):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    sec = time.perf_counter() - t
    kv = sum(x.numel() * x.element_size() for layer in cache.layers for x in (layer.keys, layer.values))
    return sec, kv


def _prompt(tok: Any, question: str, document: str | None) -> list[int]:
    user = question if document is None else f"{document}\n\n{question}"
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    return list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])


def _measure(model: Any, ids: list[int], repeats: int, new_tokens: int) -> dict[str, float]:
    trim()
    base = rss_kib("VmRSS")
    reset_hwm()
    times, kv = [], 0
    for _ in range(repeats):
        sec, kv = _answer(model, ids, new_tokens)
        times.append(sec)
    peak = rss_kib("VmHWM")
    return {"prompt_tokens": len(ids), "seconds": statistics.median(times), "kv_bytes": kv,
            "peak_rss_growth_mib": (peak - base) / 1024 if peak and base else float("nan")}


def cost(model: Any, tok: Any, hyper: D2L, lengths: list[int], repeats: int, new_tokens: int = 8) -> list[dict[str, Any]]:
    rows = []
    for n_ent in lengths:
        doc = make_document(random.Random(90_000 + n_ent), n_ent)
        q = doc.qa[0].question
        doc_tokens = len(tok(doc.text, add_special_tokens=False)["input_ids"])
        t = time.perf_counter()
        lora = internalize(model, doc.text, hyper, tok)
        t_int = time.perf_counter() - t
        adapter_bytes = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in lora.values())
        with_lora = _measure(model, _prompt(tok, q, None), repeats, new_tokens)
        reset(model)
        in_ctx = _measure(model, _prompt(tok, q, doc.text), repeats, new_tokens)
        rank = next(iter(lora.values()))[0].shape[0]
        rows.append({"facts": 4 * n_ent, "doc_tokens": doc_tokens, "lora_rank": rank, "internalize_s": t_int,
                     "adapter_bytes": adapter_bytes, "lora": with_lora, "context": in_ctx,
                     "latency_ratio_context_over_lora": in_ctx["seconds"] / with_lora["seconds"]})
        log.info("%d-token document: answer %.3f s with the LoRA (rank %d; internalize %.2f s once) vs %.3f s in "
                 "context (x%.2f); KV %.2f MiB vs %.2f MiB (+ adapter %.2f MiB)", doc_tokens, with_lora["seconds"],
                 rank, t_int, in_ctx["seconds"], rows[-1]["latency_ratio_context_over_lora"],
                 with_lora["kv_bytes"] / 2**20, in_ctx["kv_bytes"] / 2**20, adapter_bytes / 2**20)
    return rows


# --- reporting ---
def pooled(results: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in MODES:
        correct = [c for r in results for c in r["accuracy"][m]["correct"]]
        in_doc = [c for r in results for c in r["accuracy"][m]["in_doc"]]
        per_seed = [sum(r["accuracy"][m]["correct"]) / len(r["accuracy"][m]["correct"]) for r in results]
        out[m] = {"accuracy": sum(correct) / len(correct), "ci95": wilson(sum(correct), len(correct)),
                  "n": len(correct), "per_seed": per_seed, "in_doc": sum(in_doc) / len(in_doc)}
    return out


def report(results: list[dict[str, Any]]) -> str:
    lines = []
    acc = [r for r in results if "accuracy" in r]
    if acc:
        p = pooled(acc)
        lines += ["| condition | accuracy (pooled) | 95% CI | per seed | picks a value from the document |",
                  "|---|---|---|---|---|"]
        for m in MODES:
            lo, hi = p[m]["ci95"]
            seeds = ", ".join(f"{a:.3f}" for a in p[m]["per_seed"])
            lines.append(f"| {m} | {p[m]['accuracy']:.3f} (n={p[m]['n']}) | [{lo:.3f}, {hi:.3f}] | {seeds} | "
                         f"{p[m]['in_doc']:.3f} |")
    for r in results:
        for row in r.get("cost", []):
            lines.append(f"cost: {row['doc_tokens']} doc tokens: answer {row['lora']['seconds']:.3f} s (LoRA, rank "
                         f"{row['lora_rank']}, internalize {row['internalize_s']:.2f} s once) vs "
                         f"{row['context']['seconds']:.3f} s (in context), ratio {row['latency_ratio_context_over_lora']:.2f}; "
                         f"KV {row['lora']['kv_bytes'] / 2**20:.2f} vs {row['context']['kv_bytes'] / 2**20:.2f} MiB, "
                         f"adapter {row['adapter_bytes'] / 2**20:.2f} MiB; peak RSS growth "
                         f"{row['lora']['peak_rss_growth_mib']:.1f} vs {row['context']['peak_rss_growth_mib']:.1f} MiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--hyper", default="outputs/d2l/d2l.safetensors")
    p.add_argument("--train_log", default=None, help="the run's train_log.json (default: next to --hyper)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--n_docs", type=int, default=16, help="held-out documents per seed (8 questions each)")
    p.add_argument("--parts", default="accuracy,cost")
    p.add_argument("--lengths", default="2,6,14", help="countries per document for the cost part (4 facts each)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--combine", nargs="*", default=None, help="pool these JSON results and print the table")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if a.combine:
        print(report([r for f in a.combine for r in json.loads(Path(f).read_text())["runs"]]))
        return
    torch.set_num_threads(a.threads)
    from lora_diffusion.llm import load_causal_lm

    model, tok = load_causal_lm()
    model.eval().requires_grad_(False)
    hyper = D2L.load(a.hyper, model)
    train_cfg = json.loads(Path(a.train_log or Path(a.hyper).with_name("train_log.json")).read_text())["config"]
    runs = []
    parts = a.parts.split(",")

    def save() -> None:  # after each part, so a later failure keeps what was measured
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            out = {"command": " ".join(sys.argv), "hyper": a.hyper, "train_config": train_cfg, "runs": runs}
            Path(a.json).write_text(json.dumps(out, indent=1))

    for seed in [int(s) for s in a.seeds.split(",")] if "accuracy" in parts else []:
        runs.append({"seed": seed, "accuracy": accuracy(model, tok, hyper, held_out(train_cfg, a.n_docs, seed))})
        save()
    print(report(runs), flush=True)
    if "cost" in parts:
        runs.append({"cost": cost(model, tok, hyper, [int(x) for x in a.lengths.split(",")], a.repeats)})
        save()
        print(report([runs[-1]]))


if __name__ == "__main__":
    main()
