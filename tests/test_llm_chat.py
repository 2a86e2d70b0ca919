"""python -m lora_diffusion.chat: streaming generation with one or more adapters, and merge-and-save."""

from __future__ import annotations

import io
import sys

import pytest
import torch

import lora_diffusion as ld
from lora_diffusion import llm
from lora_diffusion.llm import chat

from .test_llm_train import make_tiny_folder

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one intra-op thread (conftest)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    folder = make_tiny_folder(root / "model")
    paths = []
    for k, variant in enumerate(["lora", "dora"]):
        model, _ = llm.load_causal_lm(folder)
        ld.add_adapter(model, ld.AdapterSpec(variant=variant, rank=4, targets="llm", seed=k))
        with torch.no_grad():
            for _, p in ld.adapter_parameters(model):
                p.add_(0.3 * torch.randn_like(p))
        paths.append(llm.save_llm_adapter(model, root / f"{variant}.safetensors"))
    return folder, paths


def test_streamed_text_is_the_generated_answer(setup):
    folder, paths = setup
    model, tok = llm.load_causal_lm(folder)
    chat.load_adapters(model, [(paths[0], 1.0), (paths[1], 0.5)])
    assert ld.list_adapters(model) == ["lora", "dora"]
    out = io.StringIO()
    answer = chat.reply(model.eval(), tok, [{"role": "user", "content": "Shout: cat"}], max_new_tokens=12, out=out)
    assert out.getvalue() == answer + "\n" and len(answer) > 0
    # the adapters change the answer's logits (scales apply)
    ld.disable_adapters(model)
    plain = chat.reply(model, tok, [{"role": "user", "content": "Shout: cat"}], max_new_tokens=12, out=io.StringIO())
    ids = tok.apply_chat_template([{"role": "user", "content": "Shout: cat"}], add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    with torch.no_grad():
        base = model(**ids).logits
        ld.set_adapters(model, ["lora", "dora"], [1.0, 0.5])
        adapted = model(**ids).logits
    assert not torch.allclose(base, adapted) and isinstance(plain, str)


def test_cli_reads_stdin_streams_to_stdout_and_merges(setup, tmp_path, monkeypatch, capsys):
    folder, paths = setup
    monkeypatch.setattr(sys, "stdin", io.StringIO("Shout: dog\nShout: cat\n\n"))
    chat.main(["--model", str(folder), "--adapter", f"{paths[0]}:0.8", "--max_new_tokens", "5"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 2  # one streamed answer per user line
    chat.main(["--model", str(folder), "--adapter", str(paths[0]), "--merge_to", str(tmp_path / "m")])
    assert (tmp_path / "m" / "config.json").is_file()
    with pytest.raises(FileExistsError):
        chat.main(["--model", str(folder), "--adapter", str(paths[0]), "--merge_to", str(tmp_path / "m")])


def test_parse_adapter_scale():
    assert chat.parse_adapter("a.safetensors:0.5") == (chat.Path("a.safetensors"), 0.5)
    assert chat.parse_adapter("dir/a.safetensors") == (chat.Path("dir/a.safetensors"), 1.0)
