"""QLoRA / QDoRA on a causal LM: the frozen base in 4-bit NF4 with double quantization (bitsandbytes, CPU),
loaded from a folder (transformers BitsAndBytesConfig) or quantized after loading (the GGUF route);
the base output equals the bitsandbytes-dequantized weights; adapters (fp32) train over it; peak memory."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lora_diffusion as ld
from lora_diffusion import llm
from training.llm_data import char_tokenizer, collate, load_examples

from .conftest import FIXTURES, train_losses
from .test_llm_train import make_tiny_folder, tiny_model

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is a dev dependency")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one intra-op thread (conftest)


@pytest.fixture(scope="module")
def batch():
    tok = char_tokenizer()
    return collate(load_examples(FIXTURES / "llm_shout_train.jsonl", tok, 64)[:4], tok.pad_token_id)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("q") / "llama", hidden=64)


def dequantized_copy(qmodel: nn.Module, fmodel: nn.Module) -> nn.Module:
    """``fmodel`` with every weight that is 4-bit in ``qmodel`` replaced by bitsandbytes' dequantization of it."""
    out = copy.deepcopy(fmodel)
    n = 0
    for name, m in qmodel.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
            out.get_submodule(name).weight.data.copy_(w)
            n += 1
    assert n == 14  # 7 linears x 2 layers (lm_head stays in full precision)
    return out


def check_nf4_double_quant(model: nn.Module) -> None:
    q = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert q and all(m.weight.quant_state.quant_type == "nf4" and m.weight.quant_state.nested for m in q)
    assert all(m.weight.dtype == torch.uint8 and not m.weight.requires_grad for m in q)


@pytest.mark.parametrize("route", ["bnb-config", "quantize-after-load"])
def test_4bit_base_output_matches_dequantized_weights(folder, batch, route):
    from transformers import AutoModelForCausalLM

    if route == "bnb-config":
        qmodel, _ = llm.load_causal_lm(folder, load_in_4bit=True)
    else:  # what a GGUF base goes through: transformers will not combine gguf_file with a quantization_config
        qmodel, _ = llm.load_causal_lm(folder)
        llm.quantize_4bit(qmodel)
    check_nf4_double_quant(qmodel)
    fmodel = AutoModelForCausalLM.from_pretrained(folder).eval()
    ref = dequantized_copy(qmodel, fmodel)
    with torch.no_grad():
        got, want, full = qmodel.eval()(**batch).logits, ref(**batch).logits, fmodel(**batch).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert not torch.allclose(got, full, atol=1e-4)  # it is quantized


@pytest.mark.parametrize("variant", ["lora", "dora"])  # QLoRA, QDoRA
def test_qlora_and_qdora_train_over_the_4bit_base(folder, batch, variant):
    model, _ = llm.load_causal_lm(folder, load_in_4bit=True)
    frozen = {n: p.data.clone() for n, p in model.named_parameters()}
    ld.add_adapter(model, ld.AdapterSpec(variant=variant, rank=4, targets="llm"))
    assert {p.dtype for _, p in ld.adapter_parameters(model)} == {torch.float32}
    opt = torch.optim.AdamW(ld.param_groups(model, 1e-2))
    model.train()
    losses = train_losses(model, batch, opt, 6)
    assert losses[-1] < losses[0] - 0.05, losses
    base = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if ".adapters." not in n}
    assert all(torch.equal(base[n], t) for n, t in frozen.items())
    with pytest.raises(ld.AdapterError, match="4-bit"):
        llm.merge_and_save(model, None, folder.parent / "merged")


def test_eval_mode_inference_does_not_change_the_4bit_weights(folder, batch):
    """bitsandbytes repacks 4-bit weights in place for CPU inference; load_causal_lm turns that off, so an
    evaluation pass (eval mode, no grad) leaves QDoRA's dequantized weights and later training forwards intact."""
    model, _ = llm.load_causal_lm(folder, load_in_4bit=True)
    ld.add_adapter(model, ld.AdapterSpec(variant="dora", rank=4, targets="llm"))
    with torch.no_grad():
        before = model.train()(**batch).logits
        model.eval()(**batch)
        after = model.train()(**batch).logits
    assert torch.equal(before, after)


@pytest.mark.slow
def test_qlora_step_needs_less_memory_than_a_16bit_base(tmp_path):
    """Memory of a LoRA training step, each in a fresh subprocess: RSS held by the loaded base plus the peak RSS
    of one step above it (method in benchmarks/bench_llm.py), bf16 base vs 4-bit NF4 base with double
    quantization. The base is a 100M-parameter Llama (201 MB of bf16 weights, 66 MB in NF4 + fp32 embeddings)."""
    from benchmarks.bench_llm import make_model_folder, measure_memory

    folder = make_model_folder(tmp_path / "m", hidden=1024, layers=8, intermediate=2816)
    bf16 = measure_memory(folder, load_in_4bit=False, seq=16)
    q4 = measure_memory(folder, load_in_4bit=True, seq=16)
    assert q4["param_storage_mb"] < 0.35 * bf16["param_storage_mb"]
    assert q4["peak_mb"] < bf16["peak_mb"] - 50, (q4, bf16)


def test_tiny_model_4bit_skip_lm_head():
    model = tiny_model("llama", hidden=64)
    names = llm.quantize_4bit(model)
    assert "lm_head" not in names and len(names) == 14 and llm.is_4bit(model)
