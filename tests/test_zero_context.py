"""SD3 without T5: collapsing the 256 zero context tokens into one with an ln(256) logit bias gives the stock
transformer's output (with adapters on every joint projection), and the pipeline's images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lora_diffusion as ld
from lora_diffusion.generate import install_timestep_hook, load_pipeline
from lora_diffusion.zero_context import collapse_zero_context, restore_zero_context, trailing_zero_rows

from .tiny_dit import sd3_model  # noqa: F401
from .tiny_sd import _one_thread  # noqa: F401


@pytest.fixture
def pipe(sd3_model):  # noqa: F811
    p = load_pipeline(str(sd3_model), components={"text_encoder_3": None, "tokenizer_3": None})
    p.set_progress_bar_config(disable=True)
    ld.add_adapter(p.transformer, ld.AdapterSpec(variant="tlora", rank=4, targets="dit-attn-mlp", seed=0,
                                                 options={"min_rank": 2}))
    for layer in (m for _, lay in ld.api.adapted_layers(p.transformer) for m in lay.adapters.values()):
        for t in layer.parameters():
            torch.nn.init.normal_(t, std=0.1)  # a non-zero update everywhere (B starts at zero)
    install_timestep_hook(p.transformer, 1000)
    return p


def test_trailing_zero_rows():
    c = torch.randn(2, 6, 3)
    c[:, 3:] = 0
    assert trailing_zero_rows(c) == 3
    c[1, 5, 0] = 1e-30
    assert trailing_zero_rows(c) == 0 and trailing_zero_rows(torch.zeros(1, 4, 2)) == 4


def test_collapsed_context_gives_the_stock_output(pipe):
    emb, neg, pooled, _ = pipe.encode_prompt("a photo of a dog", None, None, do_classifier_free_guidance=True)
    assert trailing_zero_rows(emb) == 256  # T5 dropped: the pipeline's 256 zero rows
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    kw = dict(hidden_states=x, timestep=torch.tensor([700.0, 700.0]), encoder_hidden_states=torch.cat([neg, emb]),
              pooled_projections=torch.cat([pooled, pooled]), return_dict=False)
    with torch.no_grad():
        ref = pipe.transformer(**kw)[0]
        assert collapse_zero_context(pipe.transformer)
        seen = []
        attn = pipe.transformer.transformer_blocks[0].attn
        h = attn.add_k_proj.register_forward_hook(lambda m, a, o: seen.append(o.shape[1]))
        got = pipe.transformer(**kw)[0]
        h.remove()
    assert seen == [emb.shape[1] - 255]  # CLIP tokens + one zero token
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    restore_zero_context(pipe.transformer)
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(**kw)[0], ref, rtol=0, atol=0)


def test_pipeline_images_are_unchanged(pipe):
    def draw():
        g = torch.Generator().manual_seed(0)
        return pipe("a photo of a dog", num_inference_steps=3, guidance_scale=4.0, generator=g, height=32, width=32,
                    output_type="np").images
    ref = draw()
    collapse_zero_context(pipe.transformer)
    got = draw()
    assert np.abs(got - ref).max() < 1e-4
