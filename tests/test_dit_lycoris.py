"""LyCORIS T-LoRA networks on Flux / SD3 transformers (SimpleTuner's ``create_lycoris(transformer, algo="tlora")``,
keys ``lycoris_<module>.q_layer.weight``): loaded onto the stock pipeline, equal to LyCORIS' own forward at each
timestep mask, and the mask set per denoising step by the generation hook."""

from __future__ import annotations

import copy
import gc
from unittest import mock

import pytest
import torch

import lora_diffusion as ld
from lora_diffusion.core.errors import AdapterFileError
from lora_diffusion.generate import load_pipeline

from .tiny_dit import flux_model, sd3_model  # noqa: F401
from .tiny_sd import _one_thread  # noqa: F401

ATTENTION = {"flux_model": "FluxAttention", "sd3_model": "Attention"}


def lycoris_network(transformer, attention: str, path, network_args: str | None):
    """A LyCORIS tlora network (rank 4) on every Linear of the transformer's attention modules, trained a little
    (random offsets on Q, P, λ), saved as SimpleTuner does."""
    from lycoris import LycorisNetwork, create_lycoris

    LycorisNetwork.apply_preset({"target_module": [attention], "target_name": []})
    with mock.patch.object(gc, "collect", lambda *a: 0):
        net = create_lycoris(transformer, 1.0, linear_dim=4, linear_alpha=4, algo="tlora")
    net.apply_to()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    net.save_weights(str(path), torch.float32, {"ss_network_args": network_args} if network_args else {})
    return net


def _call(fixture, transformer):
    g = torch.Generator().manual_seed(1)
    if fixture == "flux_model":
        kw = dict(hidden_states=torch.randn(1, 64, 16, generator=g), timestep=torch.tensor([0.5]),
                  guidance=torch.tensor([3.5]), txt_ids=torch.zeros(5, 3), img_ids=torch.zeros(64, 3))
    else:
        kw = dict(hidden_states=torch.randn(1, 4, 16, 16, generator=g), timestep=torch.tensor([500.0]))
    with torch.no_grad():
        return transformer(encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
                           pooled_projections=torch.randn(1, 32, generator=g), return_dict=False, **kw)[0]


@pytest.mark.parametrize("fixture", ["flux_model", "sd3_model"])
def test_lycoris_tlora_on_a_transformer_equals_lycoris(fixture, request, tmp_path):
    from lycoris.modules.tlora import clear_timestep_mask, compute_timestep_mask, set_timestep_mask

    src = request.getfixturevalue(fixture)
    pipe = load_pipeline(src)
    theirs = copy.deepcopy(pipe.transformer)
    path = tmp_path / "lycoris_tlora.safetensors"
    lycoris_network(theirs, ATTENTION[fixture], path, '{"algo": "tlora", "min_rank": 2, "alpha_rank_scale": 1.0}')
    name = ld.load_adapter(pipe, path)
    spec = ld.get_spec(pipe.transformer, name)
    assert spec.variant == "tlora" and spec.options["min_rank"] == 2
    assert len(ld.api.model_state(pipe.transformer).modules[name]) == (11 if fixture == "flux_model" else 15)
    base = _call(fixture, load_pipeline(src).transformer)
    try:
        for t in (0, 400, 999):
            set_timestep_mask(compute_timestep_mask(t, 1000, 4, 2, 1.0))
            with ld.timestep(pipe.transformer, t):
                ours = _call(fixture, pipe.transformer)
            want = _call(fixture, theirs)
            torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-5)
            assert (ours - base).abs().max() > 1e-4
    finally:
        clear_timestep_mask()


def test_lycoris_network_for_another_model_is_refused(flux_model, sd3_model, tmp_path):  # noqa: F811
    sd3 = load_pipeline(sd3_model)
    path = tmp_path / "sd3.safetensors"
    lycoris_network(copy.deepcopy(sd3.transformer), "Attention", path, None)
    flux = load_pipeline(flux_model)
    with pytest.raises(AdapterFileError, match="is not in the model"):
        ld.load_adapter(flux, path)
    assert ld.list_adapters(flux) == []
