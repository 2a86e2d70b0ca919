"""Doc-to-LoRA context distillation (docs/hyper.md, variants.md §23).

    python -m training.train_d2l --out outputs/d2l --steps 400 --threads 1

Teacher = the frozen base with the document in the prompt; student = the base + the LoRA the hypernetwork
generates from the document, without it in the prompt. Loss: KL(teacher || student) on the answer tokens of
questions about the document (seeded made-up facts, training/d2l_data.py), the teacher's distribution kept as its
top-k tokens plus one bin for the rest of the vocabulary (an exact KL of that coarse-grained distribution: zero
iff the student's top-k probabilities equal the teacher's). Held-out documents (never trained on) give a
validation KL. Checkpoints (``checkpoint-<step>``, --resume) and the final hypernetwork ``d2l.safetensors``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_diffusion.hyper.d2l import D2L, D2LConfig, apply_lora, read_document
from lora_diffusion.llm import base_name

from .checkpoint import CheckpointManager, GlobalRNG
from .d2l_data import QA, Document, split_documents
from .llm_data import IGNORE, tokenize_chat

log = logging.getLogger("train_d2l")
SYSTEM = "Answer with the fact only."
TRAIN_NAME = "d2l_train"
Seq = tuple[list[int], list[int]]  # (input_ids, labels)


@dataclass
class TrainD2LConfig:
    out: str = "outputs/d2l"
    model: str | None = None  # None: the offline SmolLM2-135M-Instruct
    n_train: int = 96  # training documents (8 questions each)
    n_val: int = 8  # held-out documents for the validation KL
    steps: int = 400
    questions_per_step: int = 4
    lr: float = 2e-4  # 1e-3 diverged (held-out KL 1.31 -> 5.2 at step 50)
    weight_decay: float = 0.01
    warmup: int = 20
    grad_clip: float = 1.0
    top_k: int = 32  # teacher tokens kept per answer position (+ one bin for the rest)
    eval_every: int = 50
    save_every: int = 50
    seed: int = 0
    threads: int | None = None
    max_minutes: float = 0.0  # > 0: stop (and save) after this many minutes of training steps
    overwrite: bool = False
    resume: bool = False
    # hypernetwork
    rank: int = 8
    alpha: float = 16.0
    targets: str = "down_proj"
    latent_dim: int = 64
    n_blocks: int = 2
    chunk_tokens: int = 256  # training documents must fit one chunk

    def hyper_config(self) -> D2LConfig:
        return D2LConfig(rank=self.rank, alpha=self.alpha, targets=self.targets.split(","), latent_dim=self.latent_dim,
                         n_blocks=self.n_blocks, chunk_tokens=self.chunk_tokens, seed=self.seed)


# --- prompts ---
def qa_sequence(tokenizer: Any, question: str, answer: str, document: str | None) -> Seq:
    """Chat (system, user, assistant) as token ids with labels on the answer; the document (if any) leads the user turn."""
    user = question if document is None else f"{document}\n\n{question}"
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user},
            {"role": "assistant", "content": answer}]
    return tokenize_chat(tokenizer, msgs)


def _lcp(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def answer_logits(model: nn.Module, seqs: list[Seq], params: dict[str, torch.Tensor] | None = None,
                  pad_id: int = 0) -> list[torch.Tensor]:
    """For each sequence, the logits (n_answer, V) predicting its labelled tokens. The sequences' common prefix
    (the document, the system prompt) runs once and is shared through the KV cache; ``params`` replaces
    parameters (the generated LoRA) with differentiable tensors."""
    def run(**kw: Any) -> Any:
        return model(**kw) if params is None else torch.func.functional_call(model, params, (), kw, strict=False)

    ids = [s for s, _ in seqs]
    first = min(next(k for k, lab in enumerate(labels) if lab != IGNORE) for _, labels in seqs)
    p = min(_lcp(ids), first - 1)
    dev = next(model.parameters()).device
    cache = None
    if p > 0:
        cache = run(input_ids=torch.tensor([ids[0][:p]], device=dev), use_cache=True).past_key_values
        cache.batch_repeat_interleave(len(ids))
    width = max(len(s) for s in ids) - p
    batch = torch.tensor([s[p:] + [pad_id] * (width - len(s) + p) for s in ids], device=dev)  # right pad: causal
    logits = run(input_ids=batch, past_key_values=cache, use_cache=cache is not None).logits  # (N, width, V)
    return [logits[i, [k - 1 - p for k, lab in enumerate(labels) if lab != IGNORE]] for i, (_, labels) in enumerate(seqs)]


# --- the loss ---
def teacher_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, V) -> log-probabilities (n, k) and indices (n, k) of the teacher's top-k tokens."""
    logp = torch.log_softmax(logits.float(), -1)
    return logp.topk(min(k, logp.shape[-1]), -1)


def _rest(logp_top: torch.Tensor) -> torch.Tensor:
    """log(1 - Σ exp(logp_top)): the mass outside the top-k, clamped (0 when k covers the vocabulary)."""
    return torch.log((1 - logp_top.exp().sum(-1)).clamp_min(1e-12))


def kl_divergence(t_logp: torch.Tensor, t_idx: torch.Tensor, s_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) on the top-k tokens + one 'rest' bin. Shapes: t_logp, t_idx
    (n, k); s_logits (n, V). Zero iff the student's probabilities of the k tokens equal the teacher's."""
    s_top = torch.log_softmax(s_logits.float(), -1).gather(-1, t_idx)
    t_rest, s_rest = _rest(t_logp), _rest(s_top)
    kl = (t_logp.exp() * (t_logp - s_top)).sum(-1) + t_rest.exp() * (t_rest - s_rest)
    return kl.mean()


# --- data ---
@dataclass
class Prepared:
    acts: torch.Tensor  # (L, T, hidden) of the document (one chunk), bf16
    student: list[Seq]  # per question, without the document
    teacher: list[tuple[torch.Tensor, torch.Tensor]]  # per question, top-k (logp, idx) per answer token


def prepare(model: nn.Module, tokenizer: Any, doc: Document, hyper: D2L, top_k: int) -> Prepared:
    """Activations, student sequences and the teacher's top-k on every answer token (no grad)."""
    chunks = read_document(model, tokenizer, doc.text, hyper.config)
    if len(chunks) != 1:
        raise ValueError(f"training document of {sum(c.shape[1] for c in chunks)} tokens does not fit one chunk of "
                         f"{hyper.config.chunk_tokens} tokens (--chunk_tokens)")
    acts = chunks[0]
    with torch.no_grad():
        t_logits = answer_logits(model, [qa_sequence(tokenizer, q.question, q.answer, doc.text) for q in doc.qa],
                                 pad_id=tokenizer.pad_token_id or 0)
    return Prepared(acts.to(torch.bfloat16), [qa_sequence(tokenizer, q.question, q.answer, None) for q in doc.qa],
                    [teacher_topk(t, top_k) for t in t_logits])


def lora_params(lora: dict[str, tuple[torch.Tensor, torch.Tensor]], name: str = TRAIN_NAME) -> dict[str, torch.Tensor]:
    """Generated (A, B) per module -> the parameter names of adapter ``name`` (for ``functional_call``)."""
    out = {}
    for m, (a, b) in lora.items():
        out[f"{m}.adapters.{name}.lora_A"], out[f"{m}.adapters.{name}.lora_B"] = a, b
    return out


def doc_loss(model: nn.Module, hyper: D2L, item: Prepared, questions: list[int], pad_id: int) -> torch.Tensor:
    """Student KL on ``questions`` of one document, differentiable w.r.t. the hypernetwork."""
    params = lora_params(hyper(item.acts.float()))
    s_logits = answer_logits(model, [item.student[i] for i in questions], params, pad_id)
    return torch.stack([kl_divergence(*item.teacher[i], s) for i, s in zip(questions, s_logits)]).mean()


def validation_kl(model: nn.Module, hyper: D2L, items: list[Prepared], pad_id: int) -> float:
    with torch.no_grad():
        return float(torch.stack([doc_loss(model, hyper, it, list(range(len(it.student))), pad_id)
                                  for it in items]).mean())


def base_kl(model: nn.Module, items: list[Prepared], pad_id: int) -> float:
    """The validation KL of the base model without the document (the generated LoRA at zero)."""
    with torch.no_grad():
        vals = []
        for it in items:
            s = answer_logits(model, it.student, pad_id=pad_id)
            vals.extend(float(kl_divergence(*t, x)) for t, x in zip(it.teacher, s))
    return sum(vals) / len(vals)


# --- scoring multiple-choice answers (evaluation, benchmarks/d2l.py) ---
def choice_scores(model: nn.Module, tokenizer: Any, qa: QA, document: str | None) -> list[float]:
    """Sum of log-probabilities of each candidate answer (and its end-of-turn), answer first."""
    seqs = [qa_sequence(tokenizer, qa.question, c, document) for c in qa.candidates]
    with torch.no_grad():
        logits = answer_logits(model, seqs, pad_id=tokenizer.pad_token_id or 0)
    out = []
    for (ids, labels), lg in zip(seqs, logits):
        tgt = torch.tensor([t for t, lab in zip(ids, labels) if lab != IGNORE], device=lg.device)
        out.append(float(torch.log_softmax(lg.float(), -1).gather(-1, tgt[:, None]).sum()))
    return out


def _schedule(step: int, c: TrainD2LConfig) -> float:
    if step < c.warmup:
        return (step + 1) / c.warmup
    return 0.5 * (1 + math.cos(math.pi * (step - c.warmup) / max(1, c.steps - c.warmup)))


def _check_out(c: TrainD2LConfig) -> Path:
    out = Path(c.out)
    if (out / "d2l.safetensors").exists() or any(out.glob("checkpoint-*")):
        if not (c.overwrite or c.resume):
            raise FileExistsError(f"{out} holds a D2L run; pass --resume to continue it or --overwrite to start over")
        if c.overwrite and not c.resume:
            import shutil

            for p in out.glob("checkpoint-*"):
                shutil.rmtree(p)
    out.mkdir(parents=True, exist_ok=True)
    return out


def setup(c: TrainD2LConfig) -> tuple[nn.Module, Any, D2L, list[Prepared], list[Prepared]]:
    """Base model (frozen), hypernetwork, and the prepared train / held-out documents."""
    from lora_diffusion.llm import load_causal_lm

    model, tok = load_causal_lm(c.model)
    model.eval().requires_grad_(False)
    hyper = D2L.for_model(model, c.hyper_config())
    train_docs, val_docs = split_documents(c.n_train, c.n_val, c.seed)
    t0, items = time.time(), []
    for i, d in enumerate(train_docs + val_docs):
        items.append(prepare(model, tok, d, hyper, c.top_k))
        if (i + 1) % 16 == 0:
            el = time.time() - t0
            log.info("teacher and activations: %d/%d documents (ETA %.0f s)", i + 1, len(train_docs) + len(val_docs),
                     el / (i + 1) * (len(train_docs) + len(val_docs) - i - 1))
    zero = {m: (torch.zeros_like(a), torch.zeros_like(b)) for m, (a, b) in hyper.generate([items[0].acts.float()]).items()}
    apply_lora(model, hyper, zero, TRAIN_NAME)  # its tensors are replaced by the generated ones in each forward
    return model, tok, hyper, items[: len(train_docs)], items[len(train_docs):]


def train(c: TrainD2LConfig) -> dict[str, Any]:
    out = _check_out(c)
    if c.threads:
        torch.set_num_threads(c.threads)
    model, tok, hyper, train_items, val_items = setup(c)
    pad = tok.pad_token_id or 0
    opt = torch.optim.AdamW(hyper.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, c))
    run_only = ("out", "steps", "overwrite", "resume", "threads", "eval_every", "save_every", "max_minutes")
    ckpt = CheckpointManager(out, {k: v for k, v in asdict(c).items() if k not in run_only}, keep_last=2)
    shared, local = {"hyper": hyper, "opt": opt, "sched": sched}, {"rng": GlobalRNG()}
    start = ckpt.resume("latest" if c.resume else None, shared, local)
    hist: dict[str, list] = {"loss": [], "val": [[0, base_kl(model, val_items, pad)]]}
    log.info("validation KL of the base model (no document, no LoRA): %.4f", hist["val"][0][1])
    t0 = time.time()
    for step in range(start, c.steps):
        rng = random.Random(c.seed * 1_000_003 + step)  # the step's data, reproducible across resumes
        item = rng.choice(train_items)
        qs = rng.sample(range(len(item.student)), min(c.questions_per_step, len(item.student)))
        loss = doc_loss(model, hyper, item, qs, pad)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hyper.parameters(), c.grad_clip)
        opt.step()
        sched.step()
        hist["loss"].append(loss.item())
        done = step + 1
        if done % 10 == 0 or done == c.steps:
            rate = (time.time() - t0) / (done - start)
            recent = hist["loss"][-10:]
            log.info("step %d/%d  KL %.4f  %.1f s/step  ETA %.0f s", done, c.steps, sum(recent) / len(recent),
                     rate, rate * (c.steps - done))
        if done % c.eval_every == 0 or done == c.steps:
            hist["val"].append([done, validation_kl(model, hyper, val_items, pad)])
            log.info("step %d: held-out validation KL %.4f (base %.4f)", done, hist["val"][-1][1], hist["val"][0][1])
        late = c.max_minutes > 0 and time.time() - t0 > 60 * c.max_minutes
        if done % c.save_every == 0 or done == c.steps or late:
            ckpt.save_once(done, shared, local)
        if late:
            log.warning("stopping at step %d of %d: --max_minutes %g reached", done, c.steps, c.max_minutes)
            hist["val"].append([done, validation_kl(model, hyper, val_items, pad)])
            break
    hyper.save(out / "d2l.safetensors", base_model=base_name(model))
    (out / "train_log.json").write_text(json.dumps({"config": asdict(c), **hist}, indent=1))
    _plot(hist, out / "train_d2l.png")
    log.info("wrote %s", out / "d2l.safetensors")
    return hist


def _plot(hist: dict[str, list], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    loss = hist["loss"]
    w = max(1, len(loss) // 40)
    smooth = [sum(loss[i:i + w]) / len(loss[i:i + w]) for i in range(0, len(loss), w)]
    ax.plot([i + w / 2 for i in range(0, len(loss), w)], smooth, label="train KL (student vs teacher)")
    ax.plot(*zip(*hist["val"]), "o-", label="held-out KL (step 0 = base, no doc)")
    ax.set_xlabel("step"), ax.set_ylabel("KL"), ax.legend(), ax.set_title("Doc-to-LoRA context distillation")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> TrainD2LConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainD2LConfig):
        d = f.default
        if isinstance(d, bool):
            p.add_argument(f"--{f.name}", action="store_true")
        else:
            p.add_argument(f"--{f.name}", type=int if f.name == "threads" else type(d) if d is not None else str,
                           default=d)
    return TrainD2LConfig(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    train(parse_args(argv))


if __name__ == "__main__":
    main()
