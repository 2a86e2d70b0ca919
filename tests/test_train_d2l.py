"""Doc-to-LoRA context distillation (training/train_d2l.py): the KL is zero at equal logits and equals the full
KL when k covers the vocabulary; the shared-prefix forward equals separate forwards; the document generator is
seeded with disjoint held-out documents; a tiny end-to-end run writes, resumes and refuses to overwrite."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lora_diffusion.hyper.d2l import D2L
from training.d2l_data import make_documents, split_documents
from training.llm_data import char_tokenizer
from training.train_d2l import (
    TrainD2LConfig,
    answer_logits,
    choice_scores,
    kl_divergence,
    qa_sequence,
    teacher_topk,
    train,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def make_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("k", [5, 128])
def test_kl_zero_at_equal_logits_positive_otherwise(k):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(6, 128, generator=g) * 3
    logp, idx = teacher_topk(t, k)
    assert kl_divergence(logp, idx, t.clone()).abs() < 1e-6
    assert kl_divergence(logp, idx, t + 1e-3 * torch.randn(6, 128, generator=g)) < 1e-4
    assert kl_divergence(logp, idx, torch.randn(6, 128, generator=g)) > 0.1
    if k == 128:  # the whole vocabulary: the ordinary KL(teacher || student)
        s = torch.randn(6, 128, generator=g)
        want = F.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
        torch.testing.assert_close(kl_divergence(logp, idx, s), want.mean(), rtol=1e-5, atol=1e-6)


def test_kl_gradient_moves_student_towards_teacher():
    t = torch.randn(3, 128) * 2
    s = torch.zeros(3, 128, requires_grad=True)
    opt = torch.optim.SGD([s], lr=5.0)
    logp, idx = teacher_topk(t, 8)
    first = kl_divergence(logp, idx, s).item()
    for _ in range(50):
        opt.zero_grad()
        kl_divergence(logp, idx, s).backward()
        opt.step()
    assert kl_divergence(logp, idx, s).item() < 0.1 * first


def test_shared_prefix_forward_equals_separate_forwards():
    model, tok = make_llama(), char_tokenizer()
    doc = make_documents(1, seed=3)[0]
    seqs = [qa_sequence(tok, q.question, q.answer, doc.text) for q in doc.qa[:3]]
    got = answer_logits(model, seqs, pad_id=tok.pad_token_id)
    for (ids, labels), lg in zip(seqs, got):
        with torch.no_grad():
            full = model(input_ids=torch.tensor([ids])).logits[0]
        pos = [k - 1 for k, lab in enumerate(labels) if lab != -100]
        assert lg.shape == (len(pos), 128)
        torch.testing.assert_close(lg, full[pos], rtol=1e-4, atol=1e-5)
    scores = choice_scores(model, tok, doc.qa[0], doc.text)
    assert len(scores) == len(doc.qa[0].candidates) and all(s < 0 for s in scores)


def test_documents_are_seeded_and_held_out_is_disjoint():
    a, b = make_documents(4, seed=1), make_documents(4, seed=1)
    assert [d.text for d in a] == [d.text for d in b]
    assert make_documents(1, seed=2)[0].text != a[0].text
    train_docs, test_docs = split_documents(20, 10, seed=0)
    assert not {e for d in train_docs for e in d.entities} & {e for d in test_docs for e in d.entities}
    d = train_docs[0]
    assert len(d.qa) == 8
    for q in d.qa:
        assert q.candidates[0] == q.answer and len(set(q.candidates)) == 4
        assert q.answer in d.text and q.candidates[1] in d.text  # a same-kind distractor from the document
        assert q.candidates[2] not in d.text.split(" ") and q.candidates[3] not in d.text.split(" ")


def test_tiny_run_writes_resumes_and_refuses_overwrite(tmp_path):
    folder = tmp_path / "tiny"
    make_llama().save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    out = tmp_path / "run"
    c = TrainD2LConfig(out=str(out), model=str(folder), n_train=2, n_val=1, steps=4, eval_every=2, save_every=2,
                       questions_per_step=2, rank=2, latent_dim=8, n_blocks=1, chunk_tokens=512, top_k=8, lr=1e-2)
    hist = train(c)
    assert len(hist["loss"]) == 4 and [v[0] for v in hist["val"]] == [0, 2, 4]
    assert (out / "d2l.safetensors").is_file() and (out / "train_d2l.png").is_file()
    assert json.loads((out / "train_log.json").read_text())["config"]["steps"] == 4
    from lora_diffusion.llm import load_causal_lm

    model, _ = load_causal_lm(str(folder))
    hyper = D2L.load(out / "d2l.safetensors", model)
    assert any(b.abs().sum() > 0 for b in hyper.init_B.values()) or any(w.abs().sum() > 0 for w in hyper.head_W.values())
    with pytest.raises(FileExistsError, match="--resume"):
        train(c)
    c.steps, c.resume = 6, True
    hist = train(c)  # continues from checkpoint-4
    assert len(hist["loss"]) == 2
