"""train_llm --mixture xlora|mole: only the classifier/gates train, the output file loads with load_adapter and in
the chat, resume retraces the straight run, bad input is named."""

from __future__ import annotations

import io

import pytest
import torch
from safetensors.torch import load_file

import lora_diffusion as ld
from lora_diffusion import llm
from lora_diffusion.llm import chat
from training import train_llm

from .test_llm_train import EVAL, TRAIN, make_tiny_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama folder, a LoRA trained on the shout data (12 steps) and a random LoRA of another rank."""
    root = tmp_path_factory.mktemp("mix")
    folder = make_tiny_folder(root / "model")
    train_llm.main(["--model", str(folder), "--train_file", str(TRAIN), "--output_dir", str(root / "shout"),
                    "--max_length", "64", "--lr", "1e-2", "--max_train_steps", "12", "--eval_fraction", "0",
                    "--no-progress", "--report_to", "none", "--no-export_peft"])
    model, _ = llm.load_causal_lm(folder)
    ld.add_adapter(model, ld.AdapterSpec(rank=2, targets="llm", seed=3))
    with torch.no_grad():
        for _, p in ld.adapter_parameters(model):
            p.add_(0.2 * torch.randn_like(p))
    noise = llm.save_llm_adapter(model, root / "noise.safetensors")
    shout = root / "shout.safetensors"
    shout.write_bytes((root / "shout" / "adapter.safetensors").read_bytes())
    return folder, [shout, noise]


def cli(folder, out, adapters, *extra):
    return train_llm.main(["--model", str(folder), "--train_file", str(TRAIN), "--eval_file", str(EVAL),
                           "--output_dir", str(out), "--max_length", "64", "--lr", "1e-2", "--train_batch_size", "4",
                           "--no-progress", "--report_to", "none", "--adapters", ",".join(map(str, adapters)), *extra])


@pytest.mark.parametrize("method,opts", [("xlora", '{"xlora_depth": 2, "xlora_size": 16, "xlora_dropout_p": 0.0}'),
                                         ("mole", '{"balance_weight": 0.1}')])
def test_mixture_trains_only_its_weights_and_the_file_loads(setup, tmp_path, method, opts):
    folder, adapters = setup
    m = cli(folder, tmp_path / "run", adapters, "--mixture", method, "--mixture_options", opts, "--max_train_steps", "10")
    assert m["after"]["eval_loss"] < m["before"]["eval_loss"]
    path = tmp_path / "run" / "adapter.safetensors"
    stored = load_file(path)
    for a in adapters:  # the frozen adapters travel unchanged
        theirs = load_file(a)
        assert all(torch.equal(stored[f"adapter/{a.stem}/{k}"], v) for k, v in theirs.items())
    model, tok = llm.load_causal_lm(folder)
    names = chat.load_adapters(model, [(path, 1.0)])
    assert names == [] and sorted(ld.list_adapters(model)) == ["noise", "shout"]
    out = io.StringIO()
    answer = chat.reply(model.eval(), tok, [{"role": "user", "content": "Shout: cat"}], max_new_tokens=6, out=out)
    assert out.getvalue() == answer + "\n"
    if method == "xlora":  # the CLI with a per-token scalings plot
        chat.main(["--model", str(folder), "--adapter", str(path), "--prompt", "Shout: dog", "--max_new_tokens", "5",
                   "--plot_scalings", str(tmp_path / "scalings.png")])
        assert (tmp_path / "scalings.png").stat().st_size > 1000


def test_resume_retraces_the_straight_run(setup, tmp_path):
    folder, adapters = setup
    common = ["--mixture", "xlora", "--checkpointing_steps", "3", "--eval_fraction", "0",
              "--mixture_options", '{"xlora_depth": 2, "xlora_size": 8}']  # dropout 0.2 in the classifier: RNG too
    cli(folder, tmp_path / "straight", adapters, "--max_train_steps", "6", *common)
    cli(folder, tmp_path / "cut", adapters, "--max_train_steps", "3", *common)
    cli(folder, tmp_path / "cut", adapters, "--max_train_steps", "6", "--resume_from_checkpoint", "latest", *common)
    a, b = load_file(tmp_path / "straight" / "adapter.safetensors"), load_file(tmp_path / "cut" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("mixture/modules.classifier") for k in a)


def test_bad_input_is_named_and_nothing_is_written(setup, tmp_path):
    folder, adapters = setup
    with pytest.raises(ld.AdapterError, match=r"top_k_lora=3 must be between 1 and the number of adapters \(2"):
        cli(folder, tmp_path / "k", adapters, "--mixture", "xlora", "--mixture_options", '{"top_k_lora": 3}')
    with pytest.raises(Exception, match=r"--adapters: a mixture combines at least 2 adapters; got 1"):
        cli(folder, tmp_path / "one", adapters[:1], "--mixture", "mole")
    with pytest.raises(Exception, match=r"--merge with --mixture xlora"):
        cli(folder, tmp_path / "m", adapters, "--mixture", "xlora", "--merge")
    other = make_tiny_folder(tmp_path / "wide", hidden=48)
    model, _ = llm.load_causal_lm(other)
    ld.add_adapter(model, ld.AdapterSpec(rank=2, targets="llm"))
    wide = llm.save_llm_adapter(model, tmp_path / "wide.safetensors")
    with pytest.raises(ld.AdapterFileError, match=r"wide.safetensors: adapter 'wide' was trained on base .*hidden_size 48 vs 32"):
        cli(folder, tmp_path / "w", [adapters[0], wide], "--mixture", "xlora")
    assert not any((tmp_path / d / "adapter.safetensors").exists() for d in ("k", "one", "m", "w"))
