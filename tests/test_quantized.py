"""QLoRA / QDoRA: adapters over a bitsandbytes 4-bit NF4 base (works on CPU with bitsandbytes >= 0.46)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_diffusion as ld

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is a dev dependency")


def nf4_linear(lin: nn.Linear) -> nn.Module:
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=True, compute_dtype=torch.float32,
                          quant_type="nf4", compress_statistics=True)  # double quantization
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return q.to("cpu")


@pytest.fixture
def qnet():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32))
    net[0] = nf4_linear(net[0])
    return net


def test_4bit_base_output_matches_dequantized_weights(qnet):
    x = torch.randn(4, 64)
    w = bnb.functional.dequantize_4bit(qnet[0].weight.data, qnet[0].weight.quant_state)
    assert torch.allclose(qnet(x), x @ w.T + qnet[0].bias, atol=1e-5)


@pytest.mark.parametrize("variant", [v for v in ld.variant_names() if "linear" in ld.get_variant(v).kinds])
def test_adapter_over_4bit_base(qnet, variant):
    x = torch.randn(4, 64)
    y0 = qnet(x)
    ld.add_adapter(qnet, ld.AdapterSpec(variant=variant, rank=4, targets=["0"]))
    layer = qnet[0]
    assert isinstance(layer, ld.AdaptedLayer) and layer.adapters["default"].dtype == torch.float32
    if ld.get_variant(variant).identity_init:
        assert torch.allclose(qnet(x), y0, atol=1e-6)
    with torch.no_grad():
        for _, p in ld.adapter_parameters(qnet):
            p.add_(0.05 * torch.randn_like(p))
    # the adapted output equals the dequantized base with the adapter merged in full precision
    w = layer.base_weight()
    merged = layer.adapters["default"].merged_weight(w, layer._holder.current(), 1.0)
    assert torch.allclose(qnet(x), x @ merged.T + layer.bias, atol=1e-4)
    loss = qnet(x).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for _, p in ld.adapter_parameters(qnet))
    with pytest.raises(ld.AdapterError, match="quantized"):
        ld.merge_adapters(qnet)
