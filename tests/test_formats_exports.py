"""Our exports mean the same in every loader: each registered variant, exported to each external format, read by
our loader, by diffusers (with and without the file's metadata), by PEFT, and by a reimplementation of the rule
ComfyUI and A1111 apply to a LoRA file (W + (alpha/r)·up·down, scale 1 without an alpha key), gives the output of
the in-memory adapter. T-LoRA and VeRA exports whose full rank exceeds a layer's min(out, in) reload on their own model.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import lora_diffusion as ld
from lora_diffusion.core.registry import variant_names
from lora_diffusion.io.bundle import model_view
from lora_diffusion.io.files import read_safetensors, write_safetensors

from .conftest import perturb
from .test_formats_helpers import adaptable_weights, close, max_rel_diff, sd15_pipeline, te_call, unet_call

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one intra-op thread (conftest)

FORMATS = ("kohya", "diffusers", "peft")
NO_FORM = {("loha", "diffusers"), ("lokr", "diffusers")}  # refused, named (diffusers reads LoRA only)
UNET_T = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv2"]  # linear + 1x1 and 3x3 convs
TE_T = ["q_proj", "v_proj", "fc1"]


def _spec(variant: str, rank: int = 4, linear_only: bool = False) -> ld.AdapterSpec:
    targets = [t for t in UNET_T if not (linear_only and t.startswith(("conv", "proj_in")))]
    return ld.AdapterSpec(variant, rank=rank, alpha=rank / 2, targets=targets, seed=3)  # alpha != rank


def _adapted(variant: str, rank: int = 4):
    pipe = sd15_pipeline()
    linear_only = variant == "vera"
    ld.add_adapter(pipe.unet, _spec(variant, rank, linear_only), "x")
    ld.add_adapter(pipe.text_encoder, ld.AdapterSpec(variant, rank=rank, alpha=rank * 2, targets=TE_T, seed=4), "x")
    for m in (pipe.unet, pipe.text_encoder):
        perturb(m, "x", std=0.05)
    return pipe


def _merged(pipe) -> dict[str, dict[str, torch.Tensor]]:
    p = copy.deepcopy(pipe)
    ld.merge_adapters(p)
    return {c: adaptable_weights(p.components[c]) for c in ("unet", "text_encoder")}


def _lora_delta(t: dict[str, torch.Tensor], shape) -> tuple[torch.Tensor, float] | None:
    down, up = t.get("lora_down.weight", t.get("lora_A.weight")), t.get("lora_up.weight", t.get("lora_B.weight"))
    if down is None:
        return None
    return (up.flatten(1) @ down.flatten(1)).reshape(shape), float(down.shape[0])


def _loha_delta(t: dict[str, torch.Tensor], shape) -> tuple[torch.Tensor, float] | None:
    if "hada_w1_a" not in t:
        return None
    if "hada_t1" in t:  # A1111 make_weight_cp: einsum('i j k l, j r, i p -> p r k l', t, w_b, w_a)
        w1 = torch.einsum("i j k l, j r, i p -> p r k l", t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
        w2 = torch.einsum("i j k l, j r, i p -> p r k l", t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
    else:
        w1, w2 = t["hada_w1_a"] @ t["hada_w1_b"], t["hada_w2_a"] @ t["hada_w2_b"]
    return (w1 * w2).reshape(shape), float(t["hada_w1_b"].shape[0])


def _lokr_delta(t: dict[str, torch.Tensor], shape) -> tuple[torch.Tensor, float | None] | None:
    if not any(k.startswith("lokr_") for k in t):
        return None
    dim = None
    w1 = t.get("lokr_w1")
    if w1 is None:
        w1, dim = t["lokr_w1_a"] @ t["lokr_w1_b"], float(t["lokr_w1_b"].shape[0])
    w2 = t.get("lokr_w2")
    if w2 is None:
        dim = float(t["lokr_w2_b"].shape[0])
        if "lokr_t2" in t:
            w2 = torch.einsum("i j k l, i p, j r -> p r k l", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"].flatten(1)
            if len(shape) == 4:
                w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2).reshape(shape), dim


def comfy_rule(pipe, sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The ComfyUI / A1111 rule, written from their documented behaviour (docs: ../shared/reference formats.md §2-3):
    LoRA W += up·down · alpha/r (scale 1 without '<module>.alpha'); LoHa (w1a·w1b ⊙ w2a·w2b, or the Tucker rebuild)
    · alpha/r; LoKr kron(W1, W2).reshape(W.shape) · alpha/dim (1 when both factors are full); dora_scale
    W' = dora_scale · (W + ΔW)/‖W + ΔW‖ per output row. kohya names (lora_unet_/lora_te_ + path with '_') or diffusers
    names (unet./text_encoder. + path). Every tensor must be used."""
    out = {c: adaptable_weights(pipe.components[c]) for c in ("unet", "text_encoder")}
    names = {}
    for comp, ws in out.items():
        for path in ws:
            kpath = path if comp == "unet" else f"text_model.{path}"
            names[f"{'lora_unet' if comp == 'unet' else 'lora_te'}_{kpath.replace('.', '_')}"] = (comp, path)
            names[f"{comp}.{path}"] = (comp, path)
    by_mod: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in sd.items():
        mod = next(m for m in (key.rsplit(".", 2)[0], key.rsplit(".", 1)[0]) if m in names)
        by_mod.setdefault(mod, {})[key[len(mod) + 1:]] = v.float()
    for mod, t in by_mod.items():
        comp, path = names[mod]
        w = out[comp][path]
        delta, dim = _lora_delta(t, w.shape) or _loha_delta(t, w.shape) or _lokr_delta(t, w.shape)
        scale = float(t["alpha"]) / dim if "alpha" in t and dim is not None else 1.0
        w = w + scale * delta
        if "dora_scale" in t or "lora_magnitude_vector" in t:
            m = t.get("dora_scale", t.get("lora_magnitude_vector")).reshape(-1, *([1] * (w.dim() - 1)))
            w = m * w / w.flatten(1).norm(dim=1).reshape(m.shape)
        out[comp][path] = w
    return out


def _diffusers_ref(path, strip_metadata: bool = False):
    ref = sd15_pipeline()
    if strip_metadata:
        sd, meta = read_safetensors(path)
        path = path.with_name("no_meta.safetensors")
        write_safetensors(path, sd, {"format": "pt"})
    ref.load_lora_weights(str(path), adapter_name="r")
    return ref


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("variant", variant_names())
def test_export_reads_the_same_in_every_loader(tmp_path, variant, fmt):
    pipe = _adapted(variant)
    want_u, want_t = unet_call(pipe.unet), te_call(pipe.text_encoder)
    if (variant, fmt) in NO_FORM:
        with pytest.raises(ld.AdapterFileError, match=f"variant '{variant}': diffusers LoRA files have no {variant} form"):
            ld.save_adapter(pipe, tmp_path / "x.safetensors", "x", format=fmt)
        return
    path = ld.save_adapter(pipe, tmp_path / ("x" if fmt == "peft" else "x.safetensors"), "x", format=fmt)
    again = sd15_pipeline()
    ld.load_adapter(again, path, name="y")  # ours
    assert close(unet_call(again.unet), want_u, 1e-4) and close(te_call(again.text_encoder), want_t, 1e-4)
    if fmt == "peft":
        from peft import PeftModel

        te = PeftModel.from_pretrained(sd15_pipeline().text_encoder, str(path / "text_encoder")).eval()
        unet = PeftModel.from_pretrained(sd15_pipeline().unet, str(path / "unet")).eval()
        assert close(te_call(te), want_t, 1e-4) and close(unet_call(unet), want_u, 1e-4)
        return
    sd, _ = read_safetensors(path)
    want = _merged(pipe)
    got = comfy_rule(sd15_pipeline(), sd)  # LoRA, LoHa, LoKr and DoRA keys
    assert max(max_rel_diff(got[c], want[c]) for c in want) < 1e-4
    plain = not any(k.endswith(("dora_scale", "lora_magnitude_vector")) or ".hada_" in k or ".lokr_" in k for k in sd)
    if plain:  # diffusers reads LoRA keys (it drops kohya dora_scale and refuses LoHa/LoKr)
        for strip in (False, True) if fmt == "diffusers" else (False,):
            ref = _diffusers_ref(path, strip)
            assert close(unet_call(ref.unet), want_u, 1e-4), strip
            # diffusers 0.42 on transformers 5 drops kohya's (A1111/ComfyUI) 'lora_te_text_model_' keys: the rule checks them
            assert fmt == "kohya" or close(te_call(ref.text_encoder), want_t, 1e-4), strip


def test_diffusers_export_bakes_the_scale(tmp_path):
    pipe = _adapted("lora")
    path = ld.save_adapter(pipe, tmp_path / "d.safetensors", "x", format="diffusers")
    _, meta = read_safetensors(path)
    cfg = json.loads(meta["lora_adapter_metadata"])
    assert cfg["unet.lora_alpha"] == cfg["unet.r"] == 4 and not cfg["unet.alpha_pattern"] and not cfg["unet.use_rslora"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("variant", ["tlora", "vera"])
def test_full_rank_export_above_layer_width_reloads(tmp_path, variant, fmt, caplog):
    """T-LoRA rank 24 (2r = 48 > 32, the narrow layers' width) and VeRA rank 40 become LoRA of rank min(2r, out, in)
    by an SVD of the product (exact); the file reloads on the same model with the same output."""
    pipe = sd15_pipeline()
    rank = 24 if variant == "tlora" else 40
    ld.add_adapter(pipe.unet, _spec(variant, rank, linear_only=variant == "vera"), "x")
    perturb(pipe.unet, "x", std=0.05)
    want = unet_call(pipe.unet)
    if variant == "vera" and fmt == "peft":  # PEFT has VeRA: no conversion
        return
    path = ld.save_adapter(pipe, tmp_path / ("x" if fmt == "peft" else "x.safetensors"), "x", format=fmt)
    again = sd15_pipeline()
    ld.load_adapter(again, path, name="y")
    spec = ld.get_spec(again.unet, "y")
    ranks = {spec.rank_for(m) for m in spec.targets}
    assert max(ranks) <= 64 and 32 in ranks  # 64-wide layers keep min(2r, 64); 32-wide ones are cut to 32
    assert close(unet_call(again.unet), want, 1e-4)


def test_loaded_rank_above_layer_width_is_valid(tmp_path):
    """A kohya file of rank 48 on a 32-wide layer is a valid ΔW: it loads (as kohya and A1111 load it); only a new
    adapter is refused, with a message that says why."""
    pipe = sd15_pipeline()
    mod = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(48, 32, generator=g) * 0.1, torch.randn(32, 48, generator=g) * 0.1
    flat = f"lora_unet_{mod.replace('.', '_')}"
    write_safetensors(tmp_path / "wide.safetensors", {f"{flat}.lora_down.weight": down, f"{flat}.lora_up.weight": up,
                                                      f"{flat}.alpha": torch.tensor(24.0)}, {})
    w = pipe.unet.get_submodule(mod).weight.detach().clone()
    ld.load_adapter(pipe, tmp_path / "wide.safetensors")
    ld.merge_adapters(pipe)
    assert torch.allclose(pipe.unet.get_submodule(mod).weight, w + 0.5 * up @ down, atol=1e-6)
    with pytest.raises(ld.TargetError, match=r"rank 48 is larger than the layer allows for a new adapter.*no capacity"):
        ld.add_adapter(sd15_pipeline().unet, ld.AdapterSpec(rank=48, targets=[mod]), "new")


def test_demo_model_tlora_rank_64_exports_reload(tmp_path):
    """The trainer's case: T-LoRA rank 64 on the demo model's 64-wide attention (2r = 128 > 64) exported to kohya and
    diffusers reloads on the demo model with the same output (was: 'rank 128 is larger than the layer allows')."""
    from lora_diffusion.demo.model import load_demo_pipeline

    pipe = load_demo_pipeline()
    ld.add_adapter(pipe.unet, ld.AdapterSpec("tlora", rank=64, targets="unet-attn", seed=1), "t")
    perturb(pipe.unet, "t", std=0.02)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, pipe.unet.config.in_channels, 8, 8, generator=g)
    enc = torch.randn(1, 5, pipe.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        want = pipe.unet(x, 500, enc).sample
    for fmt in ("kohya", "diffusers"):
        path = ld.save_adapter(pipe, tmp_path / f"t_{fmt}.safetensors", "t", format=fmt)
        fresh = load_demo_pipeline()
        ld.load_adapter(fresh, path, name="t")
        spec, view = ld.get_spec(fresh.unet, "t"), model_view(fresh.unet)
        assert {spec.rank_for(m) for m in spec.targets} == {64, 128}  # min(2r, out, in) per layer
        assert all(spec.rank_for(m) == min(128, view[m].out_features, view[m].fan_in) for m in spec.targets)
        with torch.no_grad():
            assert close(fresh.unet(x, 500, enc).sample, want, 1e-4), fmt
