"""python -m lora_diffusion.internalize: a text file -> a canonical LoRA (and PEFT folder) that loads with
load_adapter and PeftModel with identical outputs and chats with lora_diffusion.chat; refusals name what is wrong."""

from __future__ import annotations

import pytest
import torch

import lora_diffusion as ld
from lora_diffusion import llm
from lora_diffusion.hyper import internalize_cli as cli
from lora_diffusion.hyper.d2l import D2L, D2LConfig, internalize, reset
from lora_diffusion.llm import chat
from training.llm_data import char_tokenizer

DOC = "The capital of Zorblat is Mivo. The national animal of Zorblat is the otter. Zorblat was founded in 1742."


pytestmark = pytest.mark.usefixtures("one_thread")


def make_folder(path, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    LlamaForCausalLM(cfg).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("d2l_cli")
    folder = make_folder(root / "model")
    model, _ = llm.load_causal_lm(str(folder))
    hyper = D2L.for_model(model, D2LConfig(rank=4, alpha=8.0, latent_dim=16, n_heads=2, targets=["down_proj", "v_proj"],
                                           chunk_tokens=64))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hyper.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    hpath = hyper.save(root / "d2l.safetensors", base_model="tiny")
    doc = root / "doc.txt"
    doc.write_text(DOC)
    return root, folder, hpath, doc


def logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor([[5, 17, 99, 3, 64]])).logits


def test_file_to_adapter_loads_chats_and_matches_peft(setup, tmp_path, capsys, caplog):
    root, folder, hpath, doc = setup
    out, peft_dir = tmp_path / "doc.safetensors", tmp_path / "peft"
    cli.main(["--hyper", str(hpath), "--doc", str(doc), "--out", str(out), "--model", str(folder),
              "--peft_dir", str(peft_dir)])
    model, tok = llm.load_causal_lm(str(folder))
    base = logits(model)
    internalize(model, DOC, D2L.load(hpath, model), tok)  # 105 characters in chunks of 64: rank 2·4
    want = logits(model)
    assert ld.get_spec(model, "d2l").rank == 8 and not torch.allclose(want, base)
    reset(model)
    llm.load_llm_adapter(model, out, name="doc")
    torch.testing.assert_close(logits(model), want, rtol=0, atol=1e-6)

    import peft
    from transformers import AutoModelForCausalLM

    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), str(peft_dir)).eval()
    torch.testing.assert_close(logits(theirs), want, rtol=1e-5, atol=1e-5)

    caplog.set_level("INFO")
    chat.main(["--model", str(folder), "--adapter", str(out), "--prompt", "Capital?", "--max_new_tokens", "4"])
    assert capsys.readouterr().out.strip() and "active adapters: doc x1" in caplog.text  # 4 tokens of a random model
    with pytest.raises(SystemExit) as e:  # existing output without --overwrite
        cli.main(["--hyper", str(hpath), "--doc", str(doc), "--out", str(out), "--model", str(folder)])
    assert e.value.code == 2 and "exists; pass --overwrite" in capsys.readouterr().err
    cli.main(["--hyper", str(hpath), "--doc", str(doc), "--out", str(out), "--model", str(folder), "--overwrite"])


def error_of(capsys, *args) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(list(args))
    assert e.value.code == 2
    return capsys.readouterr().err


def test_bad_input_is_refused_with_a_clear_error(setup, tmp_path, capsys):
    root, folder, hpath, doc = setup
    out = tmp_path / "x.safetensors"
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    common = ["--hyper", str(hpath), "--out", str(out), "--model", str(folder)]
    assert "empty.txt: the document is empty" in error_of(capsys, *common, "--doc", str(empty))
    assert "document not found" in error_of(capsys, *common, "--doc", str(tmp_path / "missing.txt"))
    err = error_of(capsys, *common, "--doc", str(doc), "--no_chunking")
    assert "doc.txt: document of 105 tokens is longer than the chunk limit of 64 tokens" in err and "chunking is off" in err
    assert "the limit is 1" in error_of(capsys, *common, "--doc", str(doc), "--max_chunks", "1")
    other = make_folder(tmp_path / "other", layers=3)
    err = error_of(capsys, "--hyper", str(hpath), "--out", str(out), "--model", str(other), "--doc", str(doc))
    assert "this D2L hypernetwork was trained on base model 'tiny'" in err and "num_hidden_layers 2 vs 3" in err
    assert not out.exists()  # nothing written on any refusal


def test_module_entry_point_runs():
    import subprocess
    import sys
    from pathlib import Path

    r = subprocess.run([sys.executable, "-m", "lora_diffusion.internalize", "--help"], capture_output=True, text=True,
                       cwd=Path(__file__).parent.parent)
    assert r.returncode == 0 and "--hyper" in r.stdout
