"""A small, real, seeded suite of text tasks for Text-to-LoRA (issue 17): each task has several descriptions (the
hypernetwork's input), an input generator and an exact answer, so every record is checkable.

    python -m training.t2l_tasks --out data/t2l            # train.jsonl, eval.jsonl, heldout.jsonl, tasks.json

Records are ``{"prompt", "response", "task"}`` (the chat-record shape of ``training/llm_data.py``): the prompt is the
bare input (no instruction), so the model can only do the task if its adapter (or the description in the prompt,
for the in-context baseline) says which task it is. Held-out tasks (``HELD_OUT``) never appear in training
records; each has a related trained task (first/last word, max/min, uppercase/title case, underscore/hyphen,
add/multiply by two, ...), which is the kind of transfer the T2L paper measures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

WORDS = ("apple", "river", "stone", "cloud", "tiger", "bread", "green", "music", "paper", "light", "ocean", "chair",
         "horse", "plant", "smile", "train", "water", "house", "money", "table", "night", "flower", "garden", "silver",
         "window", "forest", "candle", "dragon", "pencil", "rocket", "summer", "winter", "castle", "bottle", "mirror")
ANTONYMS = {"hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "high": "low",
            "open": "closed", "early": "late", "full": "empty", "hard": "soft", "rich": "poor", "young": "old",
            "strong": "weak", "wet": "dry", "loud": "quiet", "long": "short", "up": "down", "in": "out",
            "good": "bad", "clean": "dirty", "true": "false", "win": "lose", "start": "end", "thick": "thin"}
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class Task:
    name: str
    descriptions: tuple[str, ...]  # several phrasings of the same task
    make_input: Callable[[random.Random], str]
    answer: Callable[[str], str]


def _words(rng: random.Random, lo: int = 3, hi: int = 5) -> str:
    return " ".join(rng.sample(WORDS, rng.randint(lo, hi)))


def _nums(rng: random.Random, n: int = 4, hi: int = 99) -> str:
    return " ".join(str(rng.randint(0, hi)) for _ in range(n))


def _pair(rng: random.Random) -> str:
    return f"{rng.randint(0, 50)} {rng.randint(0, 50)}"


def _antonym(rng: random.Random) -> str:
    return rng.choice(sorted(ANTONYMS))


TASKS: tuple[Task, ...] = (
    Task("uppercase", ("Convert the text to uppercase.", "Rewrite every letter as a capital letter.",
                       "Answer with the input in all caps.", "Make the whole text upper case."),
         _words, str.upper),
    Task("title_case", ("Capitalize the first letter of every word.", "Write each word with an initial capital.",
                        "Convert the text to title case.", "Start every word with a capital letter."),
         _words, lambda s: " ".join(w.capitalize() for w in s.split())),
    Task("reverse_words", ("Reverse the order of the words.", "Say the words backwards, last word first.",
                           "Output the words in reverse order.", "Flip the word order."),
         _words, lambda s: " ".join(s.split()[::-1])),
    Task("first_word", ("Return only the first word.", "Answer with the first word of the text.",
                        "Which word comes first? Output it.", "Keep the first word and drop the rest."),
         _words, lambda s: s.split()[0]),
    Task("last_word", ("Return only the last word.", "Answer with the final word of the text.",
                       "Which word comes last? Output it.", "Keep the last word and drop the rest."),
         _words, lambda s: s.split()[-1]),
    Task("sort_words", ("Sort the words alphabetically.", "Put the words in alphabetical order.",
                        "Arrange the words from A to Z.", "Output the words sorted in dictionary order."),
         _words, lambda s: " ".join(sorted(s.split()))),
    Task("count_words", ("Count the words and answer with the number.", "How many words are there? Give a digit.",
                         "Output the number of words in the text.", "Tell me the word count."),
         _words, lambda s: str(len(s.split()))),
    Task("join_underscore", ("Join the words with underscores.", "Connect the words using _ instead of spaces.",
                             "Write the words in snake_case.", "Replace every space with an underscore."),
         _words, lambda s: s.replace(" ", "_")),
    Task("join_hyphen", ("Join the words with hyphens.", "Connect the words using - instead of spaces.",
                         "Write the words in kebab-case.", "Replace every space with a hyphen."),
         _words, lambda s: s.replace(" ", "-")),
    Task("initials", ("Give the first letter of each word.", "Answer with the initials of the words.",
                      "Write only the initial letters, together.", "Make an acronym of the words in lowercase."),
         _words, lambda s: "".join(w[0] for w in s.split())),
    Task("drop_first", ("Remove the first word.", "Output everything except the first word.",
                        "Delete the opening word and keep the rest.", "Drop the first word of the text."),
         _words, lambda s: " ".join(s.split()[1:])),
    Task("max_number", ("Return the largest number.", "Which number is the biggest? Output it.",
                        "Find the maximum of the numbers.", "Answer with the highest value in the list."),
         _nums, lambda s: str(max(int(x) for x in s.split()))),
    Task("min_number", ("Return the smallest number.", "Which number is the lowest? Output it.",
                        "Find the minimum of the numbers.", "Answer with the least value in the list."),
         _nums, lambda s: str(min(int(x) for x in s.split()))),
    Task("sort_numbers", ("Sort the numbers from smallest to largest.", "Put the numbers in ascending order.",
                          "Order the numbers, lowest first.", "Output the numbers sorted increasingly."),
         _nums, lambda s: " ".join(str(x) for x in sorted(int(x) for x in s.split()))),
    Task("add", ("Add the two numbers.", "What is the sum of the two numbers?", "Compute the total of both numbers.",
                 "Answer with the first number plus the second."),
         _pair, lambda s: str(sum(int(x) for x in s.split()))),
    Task("digits_to_words", ("Spell out each digit as a word.", "Write every digit in English words.",
                             "Convert the digits to their names.", "Read the digits aloud as words."),
         lambda r: " ".join(str(r.randint(0, 9)) for _ in range(r.randint(3, 5))),
         lambda s: " ".join(DIGITS[int(x)] for x in s.split())),
    Task("antonym", ("Give the opposite of the word.", "Answer with an antonym.",
                     "What word means the reverse? Output it.", "Write the word with the opposite meaning."),
         _antonym, lambda s: ANTONYMS[s]),
    Task("repeat_word", ("Repeat the word three times.", "Say the word three times, separated by spaces.",
                         "Output the word thrice.", "Write the word, then again, then again."),
         lambda r: r.choice(WORDS), lambda s: " ".join([s] * 3)),
)
# held-out tasks: never in training records; each has a related trained task (in parentheses)
HELD_OUT = ("last_word",  # (first_word, drop_first)
            "min_number",  # (max_number, sort_numbers)
            "title_case",  # (uppercase)
            "join_hyphen")  # (join_underscore)


def task_by_name(name: str) -> Task:
    for t in TASKS:
        if t.name == name:
            return t
    raise KeyError(f"unknown task '{name}'; expected one of {[t.name for t in TASKS]}")


def split_tasks(held_out: Sequence[str] = HELD_OUT) -> tuple[list[Task], list[Task]]:
    """(training tasks, held-out tasks)."""
    for n in held_out:
        task_by_name(n)
    return [t for t in TASKS if t.name not in held_out], [t for t in TASKS if t.name in held_out]


def records(task: Task, n: int, seed: int) -> list[dict[str, str]]:
    """``n`` distinct records of ``task`` (fewer if the task has fewer distinct inputs), seeded by (task, seed)."""
    rng = random.Random(f"{task.name}:{seed}")
    out, seen = [], set()
    for _ in range(n * 20):
        x = task.make_input(rng)
        if x in seen:
            continue
        seen.add(x)
        out.append({"prompt": x, "response": task.answer(x), "task": task.name})
        if len(out) == n:
            break
    return out


def build_suite(n_train: int = 64, n_eval: int = 24, seed: int = 0,
                held_out: Sequence[str] = HELD_OUT) -> dict[str, list[dict[str, str]]]:
    """{"train": records of training tasks, "eval": other records of the same tasks, "heldout": records of the
    held-out tasks}; a task's eval inputs never repeat its train inputs."""
    train_t, held_t = split_tasks(held_out)
    out: dict[str, list[dict[str, str]]] = {"train": [], "eval": [], "heldout": []}
    for t in train_t:
        recs = records(t, n_train + n_eval, seed)
        n_ev = n_eval if len(recs) == n_train + n_eval else max(1, round(len(recs) * n_eval / (n_train + n_eval)))
        out["train"] += recs[: len(recs) - n_ev]  # a task with few distinct inputs (antonym) is split in proportion
        out["eval"] += recs[len(recs) - n_ev:]
    for t in held_t:
        out["heldout"] += records(t, n_eval, seed + 1)
    return out


def descriptions() -> dict[str, list[str]]:
    return {t.name: list(t.descriptions) for t in TASKS}


def write_suite(out_dir: str | os.PathLike, overwrite: bool = False, **kw) -> Path:
    out = Path(out_dir)
    names = ["train.jsonl", "eval.jsonl", "heldout.jsonl", "tasks.json"]
    clash = [n for n in names if (out / n).exists()]
    if clash and not overwrite:
        raise FileExistsError(f"{out} already holds {clash}; pass --overwrite to replace them")
    out.mkdir(parents=True, exist_ok=True)
    suite = build_suite(**kw)
    for split, recs in suite.items():
        tmp = out / f".{split}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
        os.replace(tmp, out / f"{split}.jsonl")
    meta = {"descriptions": descriptions(), "held_out": list(kw.get("held_out", HELD_OUT))}
    (out / "tasks.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    log.info("wrote %s", ", ".join(f"{k}: {len(v)} records" for k, v in suite.items()))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for train/eval/heldout .jsonl and tasks.json")
    p.add_argument("--n_train", type=int, default=64)
    p.add_argument("--n_eval", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_suite(a.out, a.overwrite, n_train=a.n_train, n_eval=a.n_eval, seed=a.seed)


if __name__ == "__main__":
    main()
