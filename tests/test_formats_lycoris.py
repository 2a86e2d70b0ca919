"""LoHa / LoKr (+ DoRA) files made by the lycoris-lora library itself (its kohya wrapper, as sd-scripts trains them)
on a UNet and a CLIP text encoder load here and reproduce LyCORIS.

Reference: LyCORIS' own forward with the network applied (what it computes while training and what A1111 and
ComfyUI merge), and for merged weights W + ``get_weight(shape)`` (scale applied once). LyCORIS'
``get_diff_weight()``/``get_merged_weight()`` multiply by the scale a second time (scale² · ΔW) when
alpha != rank; ``test_merge_matches_lycoris_forward_not_get_diff_weight`` records that.
"""

from __future__ import annotations

import copy

import pytest
import torch

import lora_diffusion as ld
from lora_diffusion.io.files import read_safetensors

from .test_formats_helpers import adaptable_weights, close, sd15_pipeline, te_call, unet_call

kohya = pytest.importorskip("lycoris.kohya")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one intra-op thread (conftest)


CASES = {
    "loha": dict(algo="loha"),
    "loha_tucker": dict(algo="loha", use_tucker=True),
    "loha_dora": dict(algo="loha", dora_wd=True),
    "lokr": dict(algo="lokr", factor=8),
    "lokr_decomposed_tucker": dict(algo="lokr", decompose_both=True, use_tucker=True, factor=4),
    "lokr_full": dict(algo="lokr", full_matrix=True, factor=8),
    "locon_dora": dict(algo="lora", dora_wd=True),
}


def lycoris_file(tmp_path, kwargs, alpha=2.0, dim=4, seed=0):
    pipe = sd15_pipeline(seed)
    unet, te = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    preset = tmp_path / "preset.toml"  # LyCORIS' "full" preset also names time_embedding twice (its own assertion fails)
    preset.write_text('enable_conv = true\nunet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", '
                      '"Upsample2D"]\nunet_target_name = ["conv_in", "conv_out"]\n'
                      'text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]\ntext_encoder_target_name = []\n')
    net = kohya.create_network(1.0, dim, alpha, None, te, unet, conv_dim=dim, conv_alpha=alpha, preset=str(preset), **kwargs)
    net.apply_to(te, unet, apply_text_encoder=True, apply_unet=True)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    path = tmp_path / f"lycoris_{kwargs['algo']}.safetensors"
    net.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    return pipe, net, unet, te, path


@pytest.mark.parametrize("case", list(CASES))
def test_lycoris_file_reproduces_lycoris_forward(tmp_path, case):
    pipe, net, ly_unet, ly_te, path = lycoris_file(tmp_path, CASES[case])
    ld.load_adapter(pipe, path, name="ly")
    assert close(unet_call(pipe.unet), unet_call(ly_unet), 1e-4) and close(te_call(pipe.text_encoder), te_call(ly_te), 1e-4)
    variants = {ld.get_spec(m, n).variant for m in (pipe.unet, pipe.text_encoder) for n in ld.list_adapters(m)}
    assert variants == ({"dora"} if "dora" in case else {CASES[case]["algo"].replace("lora", "lora")})


@pytest.mark.parametrize("case", ["loha", "lokr_decomposed_tucker"])
def test_merge_matches_lycoris_forward_not_get_diff_weight(tmp_path, case):
    pipe, net, ly_unet, _, path = lycoris_file(tmp_path, CASES[case], alpha=2.0, dim=4)
    paths = {f"lora_unet_{n.replace('.', '_')}": n for n, _ in ly_unet.named_modules()}
    ld.load_adapter(pipe, path, name="ly")
    ld.merge_adapters(pipe)
    ours = adaptable_weights(pipe.unet)
    quirk = 0
    for lm in net.unet_loras:
        path_ = paths[lm.lora_name]
        w0 = lm.org_module[0].weight.detach()
        want = w0 + lm.get_weight(lm.shape).to(w0).reshape(w0.shape)  # get_weight = scale · ΔW: what the forward adds
        assert torch.allclose(ours[path_], want, atol=1e-5, rtol=1e-4), path_
        quirk += not torch.allclose(w0 + lm.get_diff_weight()[0].to(w0).reshape(w0.shape), want, atol=1e-6)
    assert quirk > 0  # alpha/rank = 0.5: get_diff_weight applies it twice


def test_old_dora_orientation_is_named(tmp_path):
    pipe, _, _, _, path = lycoris_file(tmp_path, dict(algo="lora", dora_wd=True, wd_on_output=False))
    with pytest.raises(ld.AdapterFileError, match=r"lycoris_lora.safetensors: key '.*\.dora_scale'.*old per-input orientation"):
        ld.load_adapter(pipe, path)
    assert ld.list_adapters(pipe) == []


def test_lycoris_export_roundtrip(tmp_path):
    """Our kohya writer keeps LyCORIS names: a LoKr file re-exported by us reloads to the same outputs."""
    pipe, _, ly_unet, _, path = lycoris_file(tmp_path, CASES["lokr_decomposed_tucker"])
    ld.load_adapter(pipe, path, name="ly")
    out = ld.save_adapter(pipe, tmp_path / "again.safetensors", "ly", format="kohya")
    a, _ = read_safetensors(path)
    b, meta = read_safetensors(out)
    # LyCORIS on transformers 5 writes lora_te_encoder_…; we write kohya's lora_te_text_model_encoder_… (A1111/ComfyUI)
    assert set(a) == {k.replace("lora_te_text_model_", "lora_te_") for k in b} and meta["ss_network_module"] == "lycoris.kohya"
    fresh = sd15_pipeline(0)
    ld.load_adapter(fresh, out)
    assert close(unet_call(fresh.unet), unet_call(ly_unet), 1e-4)


def _lycoris_tlora(tmp_path, network_args: str | None):
    import gc
    from unittest import mock

    pipe = sd15_pipeline(0)
    unet, te = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    preset = tmp_path / "preset.toml"
    preset.write_text('unet_target_module = ["Attention"]\nunet_target_name = []\n'
                      'text_encoder_target_module = ["CLIPAttention"]\ntext_encoder_target_name = []\n')
    with mock.patch.object(gc, "collect", lambda *a: 0):  # LyCORIS runs gc.collect() per module: 0.6 s each here
        net = kohya.create_network(1.0, 4, 2.0, None, te, unet, preset=str(preset), algo="tlora")
    net.apply_to(te, unet, apply_text_encoder=True, apply_unet=True)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in net.parameters():  # Q, P, λ; the frozen copies are buffers (LyCORIS: principal SVD of W)
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    path = tmp_path / "lycoris_tlora.safetensors"
    meta = {"ss_network_module": "lycoris.kohya"} | ({"ss_network_args": network_args} if network_args else {})
    net.save_weights(str(path), torch.float32, meta)
    return pipe, unet, te, path


def test_lycoris_tlora_file_reproduces_lycoris(tmp_path, caplog):
    """LyCORIS tlora files store Q, P, λ, alpha; the frozen copies are rebuilt from the base weight's principal SVD as
    LyCORIS does at load. No schedule stored: full rank (LyCORIS without a mask), with a warning."""
    pipe, ly_unet, ly_te, path = _lycoris_tlora(tmp_path, None)
    ld.load_adapter(pipe, path, name="t")
    assert "without a stored schedule" in caplog.text and ld.get_spec(pipe.unet, "t").variant == "tlora"
    with ld.timestep(pipe, 900):
        assert close(unet_call(pipe.unet), unet_call(ly_unet), 1e-4) and close(te_call(pipe.text_encoder), te_call(ly_te), 1e-4)


def test_lycoris_tlora_schedule_from_network_args(tmp_path):
    from lycoris.modules.tlora import clear_timestep_mask, compute_timestep_mask, set_timestep_mask

    pipe, ly_unet, _, path = _lycoris_tlora(tmp_path, '{"algo": "tlora", "min_rank": 2, "alpha_rank_scale": 1.0}')
    ld.load_adapter(pipe, path, name="t")
    try:
        for t in (0, 500, 999):
            set_timestep_mask(compute_timestep_mask(t, 1000, 4, 2, 1.0))
            with ld.timestep(pipe.unet, t):
                assert close(unet_call(pipe.unet), unet_call(ly_unet), 1e-4), t
    finally:
        clear_timestep_mask()
