"""The shipped seeded LLM tasks (training/llm_data.py) and the metrics of benchmarks/llm_mixtures.py: answers follow
each task's rule, held-out words are never training words, exact match equals greedy decoding, loss and intervals."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch import nn

import lora_diffusion as ld
from benchmarks.llm_mixtures import (
    answer_scores,
    init_alignment,
    key_similarity,
    mean_ci,
    routing_accuracy,
    summarize,
)
from lora_diffusion.fusion import fuse
from training.llm_data import (
    IGNORE,
    TASKS,
    WORDS,
    DatasetError,
    char_tokenizer,
    collate,
    task_records,
    tokenize_record,
    word_split,
)

from .conftest import perturb

pytestmark = pytest.mark.usefixtures("one_thread")

RULES = {
    "shout": lambda p: p.removeprefix("Shout: ").upper() + "!",
    "repeat": lambda p: " ".join([p.removeprefix("Repeat: ")] * 3),
    "bracket": lambda p: f"[[{p.removeprefix('Bracket: ')}]]",
    "swap": lambda p: ", ".join(reversed(p.removeprefix("Swap: ").split(", "))),
    "count": lambda p: str(len(p.removeprefix("Count: ").split())),
}


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_records_follow_the_rule_use_only_their_split_and_are_seeded(task):
    assert set(RULES) == set(TASKS)  # a new task needs its rule here
    for split in ("train", "val", "test"):
        recs = task_records(task, 12, split, seed=3)
        assert len(recs) == 12 and len({r["prompt"] for r in recs}) == 12
        for r in recs:
            assert r["task"] == task and r["response"] == RULES[task](r["prompt"])
            words = r["prompt"].split(": ", 1)[1].replace(",", "").split()
            assert all(word_split(w) == split for w in words), (split, words)
    assert task_records(task, 12, "test", seed=3) == task_records(task, 12, "test", seed=3)
    assert task_records(task, 12, "train", seed=3) != task_records(task, 12, "train", seed=4)


def test_splits_partition_the_words_and_bad_names_are_refused():
    by = {s: {w for w in WORDS if word_split(w) == s} for s in ("train", "val", "test")}
    assert sum(map(len, by.values())) == len(set(WORDS)) and all(len(v) >= 15 for v in by.values())
    with pytest.raises(DatasetError, match="unknown task 'nope'.*shout"):
        task_records("nope", 3)
    with pytest.raises(DatasetError, match="unknown split 'dev'"):
        task_records("shout", 3, "dev")


class Oracle(nn.Module):
    """Logits that put 10 on the next token of the batch (a perfect predictor), except at ``wrong`` (row, position),
    where the argmax is token 5."""

    def __init__(self, wrong: set[tuple[int, int]]) -> None:
        super().__init__()
        self.wrong = wrong

    def forward(self, input_ids, attention_mask=None):
        b, t = input_ids.shape
        logits = torch.zeros(b, t, 128)
        nxt = torch.cat([input_ids[:, 1:], input_ids[:, :1]], 1)
        logits.scatter_(2, nxt[..., None], 10.0)
        for i, j in self.wrong:
            logits[i, j] = 0.0
            logits[i, j, 5] = 20.0
        return type("Out", (), {"logits": logits})()


def test_exact_match_is_all_answer_tokens_through_end_of_turn_and_loss_is_their_nll(tok):
    exs = [tokenize_record(tok, {"prompt": "Shout: cat", "response": r}, "x") for r in ("CAT!", "DOG!!")]
    eos = tok.eos_token_id
    first = [next(k for k, lab in enumerate(e.labels) if lab != IGNORE) for e in exs]  # first answer token
    trail = [len(e.labels) - 1 for e in exs]  # the labelled newline after <|im_end|>: not part of the answer
    perfect = answer_scores(Oracle(set()), exs, tok.pad_token_id, eos)
    assert [s[1] for s in perfect] == [5, 6]  # "CAT!" + <|im_end|>, "DOG!!" + <|im_end|>
    assert all(s[2] for s in perfect)
    p = torch.log_softmax(torch.tensor([10.0] + [0.0] * 127), 0)[0]
    assert perfect[0][0] == pytest.approx(-5 * float(p), rel=1e-3)
    # a wrong token inside the answer (predicted at position first+1 for the 2nd answer token) breaks exact match
    s = answer_scores(Oracle({(0, first[0])}), exs, tok.pad_token_id, eos)
    assert [x[2] for x in s] == [False, True] and s[0][0] > perfect[0][0]
    # a wrong end-of-turn (the model would keep talking) too; what follows it does not count
    eot = [k for k, t in enumerate(exs[1].input_ids) if t == eos and exs[1].labels[k] != IGNORE][0]
    s = answer_scores(Oracle({(1, eot - 1)}), exs, tok.pad_token_id, eos)
    assert [x[2] for x in s] == [True, False]
    s = answer_scores(Oracle({(0, trail[0] - 1), (1, trail[1] - 1)}), exs, tok.pad_token_id, eos)
    assert [x[2] for x in s] == [True, True] and s[0][0] == pytest.approx(perfect[0][0])


def prompt_ids(tok, prompt: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def test_exact_match_agrees_with_greedy_decoding(tiny_llama, tok):
    """A tiny Llama memorises "Shout: ab" -> "AB!"; for every record, exact match == greedy decoding gives exactly
    the answer and stops, both outcomes occurring."""
    recs = [{"prompt": f"Shout: {w}", "response": r} for w in ("ab", "cd") for r in ("A", "AB!", "x", "CD!")]
    exs = [tokenize_record(tok, r, "x") for r in recs]
    batch = collate([exs[1]], tok.pad_token_id)
    opt = torch.optim.Adam(tiny_llama.parameters(), lr=1e-2)
    for _ in range(40):
        tiny_llama(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    tiny_llama.eval()
    scores = answer_scores(tiny_llama, exs, tok.pad_token_id, tok.eos_token_id, batch=3)
    for rec, (_, n, exact) in zip(recs, scores):
        prompt = prompt_ids(tok, rec["prompt"])
        gen = tiny_llama.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(prompt):]
        want = tok(rec["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert exact == (gen.tolist() == want), (rec, tok.decode(gen))
    assert scores[1][2] and not all(s[2] for s in scores)


def test_summary_averages_tasks_and_the_interval_is_student_t():
    s = summarize({"a": [(2.0, 2, True), (4.0, 2, False)], "b": [(1.0, 4, True)]})
    assert s["per_task"]["a"] == {"loss": 1.5, "acc": 0.5} and s["per_task"]["b"] == {"loss": 0.25, "acc": 1.0}
    assert s["loss"] == pytest.approx(0.875) and s["acc"] == pytest.approx(0.75)
    m, h = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and h == pytest.approx(4.303 / math.sqrt(3))
    assert math.isnan(mean_ci([0.5])[1])


def test_lag_routing_diagnostics_are_fractions_of_the_library(tiny_llama, tok):
    for i in range(3):
        ld.add_adapter(tiny_llama, ld.AdapterSpec(rank=2, targets="llm", seed=i), f"k{i}", trainable=False)
        perturb(tiny_llama, f"k{i}", seed=i)
    f = fuse(tiny_llama, ["k0", "k1", "k2"], method="lag", top_k=2)
    exs = [tokenize_record(tok, {"prompt": "Shout: ab", "response": "AB!"}, "x")]
    accs = [routing_accuracy(tiny_llama, f, {"g": (exs, own)}, tok.pad_token_id)["mean"] for own in range(3)]
    assert sum(accs) == pytest.approx(1.0) and all(0 <= a <= 1 for a in accs)
    keys = key_similarity(f)
    assert 0 <= keys["mean_abs_cos"] <= keys["max_layer_abs_cos"] <= 1 and keys["random_reference"] > 0


def test_init_alignment_finds_keys_that_are_the_initial_A(tiny_llama):
    """A LoRA whose A is still its seeded init has its Arrow key inside the init's row space (share 1, drift 0);
    one whose A moved does not."""
    for i in range(2):
        ld.add_adapter(tiny_llama, ld.AdapterSpec(rank=2, alpha=4, targets="llm", seed=10 + i), f"k{i}",
                       trainable=False)
    with torch.no_grad():
        for n, p in ld.adapter_parameters(tiny_llama, "k0"):
            if "lora_B" in n:
                p.normal_(0, 0.1)
    perturb(tiny_llama, "k1", std=0.5)
    out = {}
    for name in ("k0", "k1"):
        f = fuse(tiny_llama, ["k0", "k1"], method="lag", top_k=1)
        out[name] = init_alignment(tiny_llama, f, {name: 10 + int(name[1])}, rank=2)
    assert out["k0"]["key_in_init_rowspace"] == pytest.approx(1.0, abs=1e-6) and out["k0"]["A_drift"] == 0
    assert out["k1"]["A_drift"] > 0.1 and out["k1"]["key_in_init_rowspace"] < 0.9
    assert out["k0"]["random_reference"] == pytest.approx(statistics.fmean([2 / 32] * 4 + [2 / 64] + [2 / 32] * 2))
    assert "_init_probe" not in ld.list_adapters(tiny_llama)


def test_knowledge_loras_train_through_one_function_without_warnings(tiny_llama):
    """lag_knowledge.train_lm (also llm_mixtures' knowledge LoRAs) lowers the loss, trains only the given tensors and
    reads the losses without autograd's requires_grad-to-scalar warning."""
    import warnings

    from benchmarks import lag_knowledge as lk

    model = tiny_llama
    ld.add_adapter(model, ld.AdapterSpec(rank=2, targets="llm", seed=0), "k")
    params = [p for _, p in ld.adapter_parameters(model, "k")]
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "adapters" not in n}
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        losses = lk.train_lm(model, params, batch, steps=8, lr=1e-2)
    assert len(losses) == 8 and losses[-1] < losses[0] and not model.training
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
