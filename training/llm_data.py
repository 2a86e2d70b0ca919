"""Text data for causal-LM adapter training: JSONL records -> token ids and labels, packing, buckets, batches.

One record per line, one of three shapes:

- ``{"text": "..."}``: plain language modelling, loss on every token;
- ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}``;
- ``{"prompt": "...", "response": "..."}`` (optionally ``"system"``): one user/assistant exchange.

Chat records are rendered with the tokenizer's chat template (ChatML when it has none) and the loss
is taken only on the assistant turns (their content and end-of-turn marker): prompt tokens get the
label -100. Every error names the file, the line and the field.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_diffusion.llm import CHATML_TEMPLATE

log = logging.getLogger(__name__)

IGNORE = -100
TOO_LONG = ("error", "truncate", "drop")


class DatasetError(ValueError):
    """A bad dataset file, line or record; the message names the file and line."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    where: str  # "file:line", for messages

    def __len__(self) -> int:
        return len(self.input_ids)


# --- reading ---
def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ("file:line", record) for every non-blank line; a line that is not a JSON object raises."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{i}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DatasetError(f"{where}: expected a JSON object, found {type(rec).__name__}")
            yield where, rec


def _str_field(rec: dict[str, Any], key: str, where: str) -> str:
    v = rec[key]
    if not isinstance(v, str):
        raise DatasetError(f"{where}: field '{key}' must be a string, found {type(v).__name__}")
    return v


def record_messages(rec: dict[str, Any], where: str) -> list[dict[str, str]] | None:
    """The chat messages of a record, or None for a ``{"text"}`` record. Raises naming missing/bad fields."""
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DatasetError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
        out = []
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DatasetError(f"{where}: messages[{j}] must be an object with string fields 'role' and 'content', "
                                   f"found {json.dumps(m)[:80]}")
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in out):
            raise DatasetError(f"{where}: 'messages' has no 'assistant' turn, so there is nothing to train on")
        return out
    if "prompt" in rec or "response" in rec:
        for k in ("prompt", "response"):
            if k not in rec:
                raise DatasetError(f"{where}: record has '{'response' if k == 'prompt' else 'prompt'}' but no '{k}' field")
        msgs = [{"role": "user", "content": _str_field(rec, "prompt", where)},
                {"role": "assistant", "content": _str_field(rec, "response", where)}]
        if "system" in rec:
            msgs.insert(0, {"role": "system", "content": _str_field(rec, "system", where)})
        return msgs
    if "text" in rec:
        _str_field(rec, "text", where)
        return None
    raise DatasetError(f"{where}: record has fields {sorted(rec)}; expected 'text', 'messages', or 'prompt' and 'response'")


# --- tokenizing ---
def ensure_chat_template(tokenizer: Any) -> None:
    """Give a tokenizer without a chat template the ChatML one (its markers become plain text if not tokens)."""
    if getattr(tokenizer, "chat_template", None) is None:
        tokenizer.chat_template = CHATML_TEMPLATE


def _render(tokenizer: Any, msgs: list[dict[str, str]], gen: bool) -> str:
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


def tokenize_chat(tokenizer: Any, msgs: list[dict[str, str]], where: str = "") -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels only on assistant turns.

    Each assistant turn is the text between the rendering of the messages before it (with the
    generation prompt) and the rendering including it; tokens whose characters fall there are labelled.
    """
    ensure_chat_template(tokenizer)
    full = _render(tokenizer, msgs, False)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start, end = _render(tokenizer, msgs[:i], True), _render(tokenizer, msgs[: i + 1], False)
        if not (full.startswith(end) and end.startswith(start)):
            raise DatasetError(f"{where}: the chat template does not render conversations prefix by prefix; "
                               "cannot tell the response tokens apart")
        spans.append((len(start), len(end)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE] * len(ids)
    for k, (a, b) in enumerate(enc["offset_mapping"]):
        if b > a and any(s <= a and b <= e for s, e in spans):
            labels[k] = ids[k]
    return ids, labels


def tokenize_text(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    ids = list(tokenizer(text)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids, list(ids)


def tokenize_record(tokenizer: Any, rec: dict[str, Any], where: str) -> Example:
    msgs = record_messages(rec, where)
    ids, labels = tokenize_text(tokenizer, rec["text"]) if msgs is None else tokenize_chat(tokenizer, msgs, where)
    return Example(ids, labels, where)


def load_examples(path: str | os.PathLike, tokenizer: Any, max_length: int, too_long: str = "error") -> list[Example]:
    """Tokenize every record of a JSONL file. ``too_long``: what to do with a record longer than ``max_length``
    tokens: "error" (default, names the line), "truncate" or "drop"."""
    if too_long not in TOO_LONG:
        raise DatasetError(f"too_long: expected one of {TOO_LONG}, found {too_long!r}")
    out, dropped = [], 0
    for where, rec in read_jsonl(path):
        ex = tokenize_record(tokenizer, rec, where)
        if len(ex) > max_length:
            if too_long == "error":
                raise DatasetError(f"{where}: {len(ex)} tokens, longer than the maximum sequence length {max_length} "
                                   "(raise --max_length up to the model's context, or pass --too_long truncate|drop)")
            if too_long == "drop":
                dropped += 1
                continue
            ex = Example(ex.input_ids[:max_length], ex.labels[:max_length], where)
        if all(lab == IGNORE for lab in ex.labels[1:]):
            log.warning("%s: no token to train on (after truncation?); skipped", where)
            continue
        out.append(ex)
    if dropped:
        log.warning("%s: dropped %d records longer than %d tokens", path, dropped, max_length)
    if not out:
        raise DatasetError(f"{path}: no usable records")
    return out


def context_length(model: Any) -> int | None:
    cfg = getattr(model, "config", None)
    for k in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, k, None)
        if isinstance(v, int):
            return v
    return None


# --- splitting, packing, batching ---
def split_eval(examples: list[Example], fraction: float, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, eval): a seeded random ``fraction`` (at least one example) held out."""
    if not 0 < fraction < 1:
        raise DatasetError(f"eval fraction must be in (0, 1), found {fraction}")
    if len(examples) < 2:
        raise DatasetError("need at least 2 records to hold some out for evaluation")
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    n = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    held = set(idx[:n])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def pack(examples: Sequence[Example], seq_len: int) -> list[Example]:
    """Concatenate examples (in order) and cut into blocks of ``seq_len`` tokens; the last block may be shorter.
    Attention crosses example boundaries (plain packing); labels keep each example's mask, and the first
    token of every block is never a target of the previous one."""
    ids: list[int] = []
    labels: list[int] = []
    for e in examples:
        ids.extend(e.input_ids)
        labels.extend(e.labels)
    return [Example(ids[i:i + seq_len], labels[i:i + seq_len], f"packed block {i // seq_len}")
            for i in range(0, len(ids), seq_len) if any(lab != IGNORE for lab in labels[i + 1:i + seq_len])]


def batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, bucket: bool = True,
            drop_last: bool = False) -> list[list[int]]:
    """Index batches for one epoch, deterministic in (seed, epoch). With ``bucket``, examples of similar
    length are batched together (sorted within shuffled windows of 50 batches) to reduce padding."""
    rng = random.Random(seed * 1_000_003 + epoch)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    if bucket:
        w = batch_size * 50
        idx = [i for k in range(0, len(idx), w) for i in sorted(idx[k:k + w], key=lambda j: lengths[j])]
    out = [idx[k:k + batch_size] for k in range(0, len(idx), batch_size)]
    if drop_last and out and len(out[-1]) < batch_size:
        out.pop()
    rng.shuffle(out)
    return out


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels (-100 on padding)."""
    n = max(len(e) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e)] = torch.tensor(e.input_ids)
        labels[i, :len(e)] = torch.tensor(e.labels)
        mask[i, :len(e)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def num_targets(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that contribute to the loss (labels shift by one inside the model)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def steps_per_epoch(n_examples: int, batch_size: int, drop_last: bool = False) -> int:
    return n_examples // batch_size if drop_last else math.ceil(n_examples / batch_size)


# --- a tiny offline tokenizer (tests, demos on models built from a config) ---
def char_tokenizer(chat_template: str = CHATML_TEMPLATE) -> Any:
    """A character-level fast tokenizer: printable ASCII and newline, plus <pad>, <unk>, <|im_start|>,
    <|im_end|> (= eos). 100 ids, so it fits models with a vocabulary of 128. Nothing is downloaded."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + ["\n"] + [chr(c) for c in range(32, 127)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), "isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = chat_template
    return tok


# --- small seeded tasks with checkable answers (benchmarks/llm_mixtures.py, demos) ---
# Common English nouns; each word belongs to one split forever (by a stable hash), so held-out words are never
# trained on, whatever the seed.
WORDS = tuple("""apple anchor arrow badge basket beacon bottle branch bridge bucket button cabin camera candle
canyon carpet castle cellar chain chair cherry circle cloud clover coffee comet copper cotton crayon crown
desert dinner dragon drum eagle engine falcon feather fence forest fountain garden garlic ginger glove guitar
hammer harbor helmet honey island jacket jungle kettle kitten ladder lantern lemon letter lizard magnet mango
marble meadow mirror monkey mountain needle night ocean orange orbit oyster paddle palace panda paper parrot
pencil pepper pillow planet pocket potato puzzle rabbit radio ribbon river rocket saddle salmon shadow shelter
silver spider spoon square statue summer tablet temple thunder ticket tiger timber tomato tower tunnel turtle
valley velvet violin wagon walnut window winter wizard yogurt zebra""".split())
SPLITS = ("train", "val", "test")


def word_split(word: str) -> str:
    """The split a word belongs to, fixed by a stable hash: ~60% train, ~20% val, ~20% test."""
    import zlib

    h = zlib.crc32(word.encode()) % 10
    return "train" if h < 6 else "val" if h < 8 else "test"


def _shout(rng: random.Random, words: Sequence[str]) -> tuple[str, str]:
    w = rng.choice(words)
    return f"Shout: {w}", f"{w.upper()}!"


def _repeat(rng: random.Random, words: Sequence[str]) -> tuple[str, str]:
    w = rng.choice(words)
    return f"Repeat: {w}", f"{w} {w} {w}"


def _bracket(rng: random.Random, words: Sequence[str]) -> tuple[str, str]:
    w = rng.choice(words)
    return f"Bracket: {w}", f"[[{w}]]"


def _swap(rng: random.Random, words: Sequence[str]) -> tuple[str, str]:
    a, b = rng.sample(list(words), 2)
    return f"Swap: {a}, {b}", f"{b}, {a}"


def _count(rng: random.Random, words: Sequence[str]) -> tuple[str, str]:
    k = rng.randint(2, 6)
    return f"Count: {' '.join(rng.choice(words) for _ in range(k))}", str(k)


# task name -> generator of one (prompt, response) from a seeded rng and the split's words; every answer is exact
TASKS = {"shout": _shout, "repeat": _repeat, "bracket": _bracket, "swap": _swap, "count": _count}


def task_records(task: str, n: int, split: str = "train", seed: int = 0) -> list[dict[str, str]]:
    """``n`` seeded ``{"prompt", "response", "task"}`` records of a shipped task, drawn from the split's words only.

    Tasks (``TASKS``): shout "Shout: honey" -> "HONEY!"; repeat -> "honey honey honey"; bracket -> "[[honey]]";
    swap "Swap: honey, lemon" -> "lemon, honey"; count "Count: honey lemon kiwi" -> "3". Records of one call are
    distinct when the split has enough combinations (else repeats are allowed and logged)."""
    if task not in TASKS:
        raise DatasetError(f"unknown task {task!r}; shipped tasks: {sorted(TASKS)}")
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {SPLITS}")
    words = [w for w in WORDS if word_split(w) == split]
    rng = random.Random(f"{task}/{split}/{seed}")
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    for _ in range(n * 20):
        p, r = TASKS[task](rng, words)
        if p not in seen:
            seen.add(p)
            out.append({"prompt": p, "response": r, "task": task})
        if len(out) == n:
            return out
    log.warning("task %s/%s: only %d distinct records; %d repeated", task, split, len(out), n - len(out))
    return out + [out[i % len(out)] for i in range(n - len(out))]
