"""LLM data: JSONL records, chat templates with response-only labels, packing, buckets, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.llm_data import (
    IGNORE,
    DatasetError,
    batches,
    char_tokenizer,
    collate,
    load_examples,
    pack,
    split_eval,
    tokenize_chat,
    tokenize_record,
)

from .conftest import FIXTURES

TRAIN = FIXTURES / "llm_shout_train.jsonl"


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def write(tmp_path: Path, lines: list[str]) -> Path:
    p = tmp_path / "data.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def labelled_text(tok, ids: list[int], labels: list[int]) -> str:
    return tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])


def test_prompt_response_loss_only_on_the_response(tok):
    ex = tokenize_record(tok, {"prompt": "Shout: cat", "response": "CAT!"}, "x:1")
    assert tok.decode(ex.input_ids) == "<|im_start|>user\nShout: cat<|im_end|>\n<|im_start|>assistant\nCAT!<|im_end|>\n"
    assert labelled_text(tok, ex.input_ids, ex.labels) == "CAT!<|im_end|>\n"


def test_multi_turn_messages_label_every_assistant_turn(tok):
    msgs = [{"role": "system", "content": "be loud"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "A!"},
            {"role": "user", "content": "b"}, {"role": "assistant", "content": "B!"}]
    ids, labels = tokenize_chat(tok, msgs)
    assert labelled_text(tok, ids, labels) == "A!<|im_end|>\nB!<|im_end|>\n"


def test_text_records_train_on_every_token_and_end_with_eos(tok):
    ex = tokenize_record(tok, {"text": "hello"}, "x:1")
    assert ex.labels == ex.input_ids and ex.input_ids[-1] == tok.eos_token_id


def test_packing_keeps_labels_and_fills_blocks(tok):
    exs = load_examples(TRAIN, tok, 64)
    packed = pack(exs, 64)
    assert all(len(b) == 64 for b in packed[:-1])
    flat_ids = [i for e in exs for i in e.input_ids]
    assert [i for b in packed for i in b.input_ids] == flat_ids[:sum(len(b) for b in packed)]
    assert sum(lab != IGNORE for b in packed for lab in b.labels) == sum(lab != IGNORE for e in exs for lab in e.labels)


def test_buckets_are_deterministic_cover_everything_and_reduce_padding(tok):
    lengths = [len(e) for e in load_examples(TRAIN, tok, 64)]
    a, b = batches(lengths, 4, seed=1, epoch=0), batches(lengths, 4, seed=1, epoch=0)
    assert a == b and sorted(i for x in a for i in x) == list(range(len(lengths)))
    assert batches(lengths, 4, seed=1, epoch=1) != a

    def padding(bs):
        return sum(max(lengths[i] for i in x) * len(x) - sum(lengths[i] for i in x) for x in bs)

    assert padding(a) < padding(batches(lengths, 4, seed=1, epoch=0, bucket=False))


def test_collate_pads_with_ignored_labels(tok):
    exs = load_examples(TRAIN, tok, 64)[:3]
    b = collate(exs, tok.pad_token_id)
    n = max(len(e) for e in exs)
    assert b["input_ids"].shape == (3, n)
    for i, e in enumerate(exs):
        assert b["attention_mask"][i].sum() == len(e)
        assert (b["labels"][i, len(e):] == IGNORE).all()


def test_split_eval_is_seeded_and_disjoint(tok):
    exs = load_examples(TRAIN, tok, 64)
    tr, ev = split_eval(exs, 0.1, seed=3)
    assert len(ev) == 6 and len(tr) + len(ev) == len(exs)
    assert {e.where for e in ev} == {e.where for e in split_eval(exs, 0.1, seed=3)[1]}
    assert not {e.where for e in ev} & {e.where for e in tr}


# --- bad input: each error names the file and line, the field, or the limit ---
def test_line_that_is_not_json(tmp_path, tok):
    p = write(tmp_path, [json.dumps({"text": "ok"}), "{not json", json.dumps({"text": "ok"})])
    with pytest.raises(DatasetError, match=rf"{p}:2: not valid JSON"):
        load_examples(p, tok, 64)


def test_line_that_is_not_an_object(tmp_path, tok):
    p = write(tmp_path, ['["a", "b"]'])
    with pytest.raises(DatasetError, match=rf"{p}:1: expected a JSON object, found list"):
        load_examples(p, tok, 64)


@pytest.mark.parametrize("record,msg", [
    ({"input": "x", "output": "y"}, r":1: record has fields \['input', 'output'\]; expected 'text', 'messages'"),
    ({"prompt": "x"}, r":1: record has 'prompt' but no 'response' field"),
    ({"text": 3}, r":1: field 'text' must be a string, found int"),
    ({"messages": [{"role": "user"}]}, r":1: messages\[0\] must be an object with string fields 'role' and 'content'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r":1: 'messages' has no 'assistant' turn"),
])
def test_record_without_the_expected_fields(tmp_path, tok, record, msg):
    p = write(tmp_path, [json.dumps(record)])
    with pytest.raises(DatasetError, match=msg):
        load_examples(p, tok, 64)


def test_sequence_longer_than_the_context(tmp_path, tok):
    p = write(tmp_path, [json.dumps({"text": "short"}), json.dumps({"prompt": "x" * 80, "response": "y"})])
    with pytest.raises(DatasetError, match=rf"{p}:2: \d+ tokens, longer than the maximum sequence length 64"):
        load_examples(p, tok, 64)
    assert len(load_examples(p, tok, 64, too_long="drop")) == 1
    truncated = load_examples(p, tok, 64, too_long="truncate")
    assert len(truncated) == 1 and len(truncated[0]) <= 64  # the cut record kept no response token: skipped


def test_missing_file(tmp_path, tok):
    with pytest.raises(DatasetError, match="dataset file not found"):
        load_examples(tmp_path / "nope.jsonl", tok, 64)
