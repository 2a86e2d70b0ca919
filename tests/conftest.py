"""Shared fixtures: tiny models built from configs (nothing is downloaded)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

import lora_diffusion as ld
from lora_diffusion.io.files import single_thread

FIXTURES = Path(__file__).parent / "fixtures"
# Tolerances are a property of the dtype, never of the variant.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
# Gradio keeps uploads in one shared /tmp/gradio by default: two test runs (or a running app) on one machine then
# delete each other's files mid-upload. Each test session gets its own folder (an explicit setting is kept).
os.environ.setdefault("GRADIO_TEMP_DIR", tempfile.mkdtemp(prefix="lora-diffusion-gradio-"))


@pytest.fixture(autouse=True)
def _restore_logger_levels():
    """CLIs called in-process (``build_demo_library.main`` quiets ``lora_diffusion`` for its run) must not leave a
    later test's ``caplog`` without the records it checks: every logger level changed by a test is put back."""
    def levels() -> dict[str, int]:
        return {n: lg.level for n, lg in logging.root.manager.loggerDict.items() if isinstance(lg, logging.Logger)}

    before = levels()
    yield
    for name, level in levels().items():
        if level != before.get(name, logging.NOTSET):
            logging.getLogger(name).setLevel(before.get(name, logging.NOTSET))


@pytest.fixture(scope="module")
def one_thread():
    """Modules of many tiny tensor ops run faster and steadier on one intra-op thread (2 shared cores).

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    with single_thread():
        yield


def train_losses(model: nn.Module, batch: dict, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    """``steps`` optimizer steps of a transformers model on one batch; the loss of each."""
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def all_variants() -> list[str]:
    return ld.variant_names()


class TinyNet(nn.Module):
    """A Linear (16 -> 24) and a Conv2d (4 -> 6, 3x3): the harness of variants.md §0."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 24)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)


def layer_and_input(kind: str, dtype=torch.float64, batch: int = 3):
    torch.manual_seed(0)
    net = TinyNet().to(dtype)
    if kind == "linear":
        return net, "lin", torch.randn(batch, 5, 16, dtype=dtype)
    return net, "conv", torch.randn(batch, 4, 8, 8, dtype=dtype)


def run(net: nn.Module, target: str, x: torch.Tensor) -> torch.Tensor:
    return net.get_submodule(target)(x)


def perturb(model: nn.Module, name: str | None = None, std: float = 0.1, seed: int = 1) -> None:
    """Give every adapter parameter a random non-zero value (so merge tests are not trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in ld.adapter_parameters(model, name):
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def tiny_unet_config() -> dict:
    return dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8,
    )


@pytest.fixture
def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_unet_config()).eval()


def unet_inputs(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 7, 32, generator=g))


@pytest.fixture
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def load_config(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())
