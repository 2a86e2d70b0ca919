"""Training parity with PEFT on a causal LM: same base, same initial adapter weights, same batches and optimizer
-> the same loss at every step (tiny Llama, float64, 8 steps of SGD or AdamW)."""

from __future__ import annotations

import copy

import pytest
import torch

import lora_diffusion as ld
from training.llm_data import char_tokenizer, collate, load_examples

from .conftest import FIXTURES
from .test_llm_train import tiny_model

peft = pytest.importorskip("peft")
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    "lora": (lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_LINEARS),
             ld.AdapterSpec("lora", rank=4, alpha=8, targets="llm")),
    "rslora": (lambda: peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=LLAMA_LINEARS),
               ld.AdapterSpec("rslora", rank=4, alpha=8, targets="llm")),
    "dora": (lambda: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=LLAMA_LINEARS),
             ld.AdapterSpec("dora", rank=4, alpha=8, targets="llm")),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one intra-op thread (conftest)


def peft_param(pnet: torch.nn.Module, key: str) -> torch.nn.Parameter:
    module, param = key.rsplit(".", 1)
    param = {"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight",
             "magnitude": "lora_magnitude_vector.default.weight"}[param]
    return pnet.get_submodule(module.removesuffix(".inner")).get_parameter(param)


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
@pytest.mark.parametrize("case", list(CASES))
def test_training_loss_matches_peft_step_by_step(case, optim):
    tok = char_tokenizer()
    exs = load_examples(FIXTURES / "llm_shout_train.jsonl", tok, 64)
    data = [collate(exs[i:i + 4], tok.pad_token_id) for i in range(0, 32, 4)]
    make_config, spec = CASES[case]
    base = tiny_model("llama", torch.float64)
    ours = copy.deepcopy(base)
    ld.add_adapter(ours, spec)
    pm = peft.get_peft_model(copy.deepcopy(base), make_config())
    # start from the same non-trivial adapter: ours perturbed (B != 0), copied into PEFT
    g = torch.Generator().manual_seed(0)
    mapped = []
    with torch.no_grad():
        for key, p in ld.adapter_parameters(ours):
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            mkey = key.replace(".adapters.default", "")
            q = peft_param(pm.base_model.model, mkey)
            q.copy_(p.reshape(q.shape))
            mapped.append((p, q))
    assert len(mapped) == sum(p.requires_grad for p in pm.parameters())

    def make_opt(params):
        return torch.optim.SGD(params, lr=0.1) if optim == "sgd" else torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)

    o1, o2 = make_opt([p for p, _ in mapped]), make_opt([q for _, q in mapped])
    ours.train()
    pm.train()
    l1, l2 = [], []
    for batch in data:
        for model, opt, losses in ((ours, o1, l1), (pm, o2, l2)):
            loss = model(**batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert l1[-1] < l1[0]
    assert l1 == pytest.approx(l2, abs=1e-10, rel=0), list(zip(l1, l2))
    for p, q in mapped:
        assert torch.allclose(p, q.reshape(p.shape), atol=1e-10, rtol=0)
