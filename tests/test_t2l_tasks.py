"""The Text-to-LoRA task suite (training/t2l_tasks.py): distinct checkable tasks, several phrasings, a clean
train/held-out split, seeded records usable by the LLM data pipeline."""

from __future__ import annotations

import json

import pytest

from training import llm_data
from training.t2l_tasks import HELD_OUT, TASKS, build_suite, records, split_tasks, task_by_name, write_suite

EXAMPLES = {  # task: (input, expected answer), written by hand
    "uppercase": ("apple river", "APPLE RIVER"), "title_case": ("apple river", "Apple River"),
    "reverse_words": ("a b c", "c b a"), "first_word": ("a b c", "a"), "last_word": ("a b c", "c"),
    "sort_words": ("pear apple fig", "apple fig pear"), "count_words": ("a b c d", "4"),
    "join_underscore": ("a b c", "a_b_c"), "join_hyphen": ("a b c", "a-b-c"), "initials": ("red big cat", "rbc"),
    "drop_first": ("a b c", "b c"), "max_number": ("3 41 7 9", "41"), "min_number": ("3 41 7 9", "3"),
    "sort_numbers": ("10 9 100", "9 10 100"), "add": ("12 30", "42"), "digits_to_words": ("3 0 7", "three zero seven"),
    "antonym": ("hot", "cold"), "repeat_word": ("tiger", "tiger tiger tiger"),
}


def test_suite_size_and_phrasings():
    names = [t.name for t in TASKS]
    assert len(names) == len(set(names)) >= 12
    assert set(EXAMPLES) == set(names), "every task has a hand-written check"
    descs = [d for t in TASKS for d in t.descriptions]
    assert len(descs) == len(set(descs)), "phrasings are distinct across tasks"
    assert all(len(t.descriptions) >= 3 for t in TASKS)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_answers_are_right(name):
    x, y = EXAMPLES[name]
    assert task_by_name(name).answer(x) == y


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_generated_inputs_are_valid(task):
    recs = records(task, 30, seed=0)
    assert len(recs) >= 10 and len({r["prompt"] for r in recs}) == len(recs)
    for r in recs:
        assert r["response"] == task.answer(r["prompt"]) and r["response"].strip() and r["task"] == task.name


def test_split_and_determinism():
    train_t, held_t = split_tasks()
    assert {t.name for t in held_t} == set(HELD_OUT) and not {t.name for t in train_t} & set(HELD_OUT)
    a, b = build_suite(n_train=16, n_eval=8, seed=3), build_suite(n_train=16, n_eval=8, seed=3)
    assert a == b and a != build_suite(n_train=16, n_eval=8, seed=4)
    assert not {r["task"] for r in a["train"] + a["eval"]} & set(HELD_OUT)
    full = build_suite()  # defaults: every training task has eval records, antonym (24 inputs) in proportion
    assert {r["task"] for r in full["eval"]} == {t.name for t in train_t}
    assert {r["task"] for r in a["heldout"]} == set(HELD_OUT)
    for t in train_t:
        tr = {r["prompt"] for r in a["train"] if r["task"] == t.name}
        ev = {r["prompt"] for r in a["eval"] if r["task"] == t.name}
        assert tr and ev and not tr & ev


def test_unknown_held_out_task_named():
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        split_tasks(["nope"])


def test_write_suite_and_llm_data(tmp_path):
    write_suite(tmp_path, n_train=4, n_eval=2)
    meta = json.loads((tmp_path / "tasks.json").read_text())
    assert meta["held_out"] == list(HELD_OUT) and len(meta["descriptions"]) == len(TASKS)
    exs = llm_data.load_examples(tmp_path / "train.jsonl", llm_data.char_tokenizer(), max_length=512)
    assert len(exs) == 4 * (len(TASKS) - len(HELD_OUT))
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_suite(tmp_path)
    write_suite(tmp_path, overwrite=True, n_train=2, n_eval=1)
