"""Every registered variant on real model classes: a tiny diffusers UNet2DConditionModel, a tiny
LlamaForCausalLM and a tiny GPT2LMHeadModel (transformers' Conv1D, weight stored transposed).

Parametrized over ``ld.variant_names()``, so a new variant is covered without editing this file.
Models run in float64 (adapters follow the base dtype), so the merge tolerance is tight; one fp32
test checks the merge at the fp32 tolerance of a deep model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import lora_diffusion as ld

from .conftest import all_variants, perturb, unet_inputs

# Relative tolerance (max abs error / max abs value) of a whole deep model; a property of the dtype.
DEEP_TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
TIMESTEP = 500  # T-LoRA: r(500) = 3 of rank 4 (min_rank 2), so the mask is not trivial

# (model, targets): None picks the model's default preset (all Linear / Conv1D layers);
# "unet-full" adds the UNet's resnet convolutions and attention projections.
CASES = [("unet", None), ("unet", "unet-full"), ("llama", None), ("gpt2", None)]
CASE_IDS = ["unet", "unet-full", "llama", "gpt2"]


def _handles_convs(variant: str) -> bool:
    return "conv2d" in ld.get_variant(variant).kinds


# (case, variant) pairs the variant can adapt: "unet-full" has Conv2d layers, which VeRA (Linear only) refuses
PAIRS = [pytest.param(c, v, id=f"{i}-{v}") for c, i in zip(CASES, CASE_IDS) for v in all_variants()
         if c[1] != "unet-full" or _handles_convs(v)]
LINEAR_ONLY = [v for v in all_variants() if not _handles_convs(v)]


@dataclass
class Built:
    model: nn.Module  # the model that gets the adapter
    fresh: nn.Module  # an untouched copy of the base model
    inputs: dict
    kind: str
    spec: ld.AdapterSpec


def _inputs(kind: str, dtype: torch.dtype) -> dict:
    if kind == "unet":
        sample, enc = unet_inputs(batch=2, seed=0)
        return {"sample": sample.to(dtype), "timestep": torch.tensor([TIMESTEP, TIMESTEP]),
                "encoder_hidden_states": enc.to(dtype)}
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, 128, (2, 9), generator=g), "use_cache": False}


def forward(b: Built, model: nn.Module | None = None) -> torch.Tensor:
    model = b.model if model is None else model
    with torch.no_grad():
        out = model(**b.inputs)
    return out.sample if b.kind == "unet" else out.logits


def build(request, kind: str, variant: str, targets, dtype=torch.float64) -> Built:
    model = request.getfixturevalue(f"tiny_{kind}").to(dtype)
    spec = ld.AdapterSpec(variant=variant, rank=4, targets=targets, seed=3)
    return Built(model, copy.deepcopy(model), _inputs(kind, dtype), kind, spec)


def supported(b: Built) -> bool:
    """Whether the variant handles every layer kind the spec targets (VeRA: Linear only)."""
    kinds = ld.get_variant(b.spec.variant).kinds
    found = ld.find_targets(b.model, b.spec).values()
    return all("conv2d" in kinds if isinstance(m, nn.Conv2d) else "linear" in kinds for m in found)


def add(b: Built, name: str = "default") -> list[str]:
    names = ld.add_adapter(b.model, b.spec, name)
    if ld.get_variant(b.spec.variant).uses_context:
        ld.set_timestep(b.model, TIMESTEP)
    return names


def setup(request, case, variant, dtype=torch.float64) -> Built:
    kind, targets = case
    b = build(request, kind, variant, targets, dtype)
    assert supported(b), "PAIRS lists only the (case, variant) pairs the variant can adapt"
    return b


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def base_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's own (non-adapter) parameters and buffers, by their current names."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".adapters." not in k}


def assert_bit_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    diff = [k for k in expected if not torch.equal(actual[k], expected[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:5]}"


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,variant", PAIRS)
def test_add_adapter_targets_trainable_identity(request, case, variant):
    b = setup(request, case, variant)
    base_out = forward(b)
    expected = sorted(ld.find_targets(b.model, b.spec))
    names = add(b)
    assert sorted(names) == expected and len(names) > 0
    assert all(isinstance(b.model.get_submodule(n), ld.AdaptedLayer) for n in names)
    if b.kind == "gpt2":  # the default preset reaches transformers' transposed Conv1D layers
        assert any(type(b.model.get_submodule(n).base_layer).__name__ == "Conv1D" for n in names)
    # only adapter parameters are trainable, in the base model's dtype
    trainable = {id(p) for p in b.model.parameters() if p.requires_grad}
    adapter = {id(p) for _, p in ld.adapter_parameters(b.model)}
    assert adapter and trainable == adapter
    assert all(p.dtype == torch.float64 for _, p in ld.adapter_parameters(b.model))
    out = forward(b)
    assert out.dtype == base_out.dtype
    if ld.get_variant(variant).identity_init:
        assert torch.equal(out, base_out), f"output changed at init (rel err {rel_err(out, base_out):.3g})"


@pytest.mark.parametrize("case,variant", PAIRS)
def test_merge_unmerge(request, case, variant):
    b = setup(request, case, variant)
    base_out = forward(b)
    add(b)
    perturb(b.model)
    weights = base_snapshot(b.model)
    out = forward(b)
    assert rel_err(out, base_out) > 1e-6, "perturbed adapters should change the output"

    ld.merge_adapters(b.model)
    assert all(layer.merged == ["default"] for _, layer in _layers(b.model))
    merged_weights = base_snapshot(b.model)
    assert any(not torch.equal(merged_weights[k], weights[k]) for k in weights), "merge wrote no weight"
    merged_out = forward(b)
    assert rel_err(merged_out, out) <= DEEP_TOL[torch.float64], f"merged output rel err {rel_err(merged_out, out):.3g}"

    ld.unmerge_adapters(b.model)
    assert all(layer.merged == [] for _, layer in _layers(b.model))
    assert_bit_equal(base_snapshot(b.model), weights)
    assert torch.equal(forward(b), out)


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("case,variant", PAIRS)
def test_remove_restores_modules_and_outputs(request, case, variant, merged):
    b = setup(request, case, variant)
    modules = dict(b.model.named_modules())
    state = snapshot(b.model)
    base_out = forward(b)
    add(b)
    perturb(b.model)
    if merged:
        ld.merge_adapters(b.model)
    ld.remove_adapters(b.model)
    after = dict(b.model.named_modules())
    assert after.keys() == modules.keys()
    assert all(after[k] is modules[k] for k in modules), "remove_adapters must put the original module objects back"
    assert not any(isinstance(m, ld.AdaptedLayer) for m in after.values())
    assert ld.list_adapters(b.model) == []
    assert_bit_equal(snapshot(b.model), state)
    assert torch.equal(forward(b), base_out)


@pytest.mark.parametrize("case,variant", PAIRS)
def test_save_load_roundtrip(request, case, variant, tmp_path):
    b = setup(request, case, variant)
    add(b)
    perturb(b.model)
    out = forward(b)
    path = ld.save_adapter(b.model, tmp_path / "my_adapter.safetensors", "default")
    name = ld.load_adapter(b.fresh, path)
    assert name == "my_adapter"
    assert ld.get_spec(b.fresh, name) == b.spec
    if ld.get_variant(variant).uses_context:
        ld.set_timestep(b.fresh, TIMESTEP)
    assert sorted(n for n, _ in _layers(b.fresh)) == sorted(n for n, _ in _layers(b.model))
    assert torch.equal(forward(b, b.fresh), out)
    assert not any(p.requires_grad for _, p in ld.adapter_parameters(b.fresh))


@pytest.mark.parametrize("variant", LINEAR_ONLY)
def test_unsupported_layer_kind_is_refused(request, variant):
    """Targets with convolutions and a Linear-only variant: a clear TargetError, the model untouched."""
    b = build(request, "unet", variant, "unet-full")
    assert not supported(b)
    modules = dict(b.model.named_modules())
    with pytest.raises(ld.TargetError, match="conv2d"):
        ld.add_adapter(b.model, b.spec)
    after = dict(b.model.named_modules())
    assert after.keys() == modules.keys() and all(after[k] is modules[k] for k in modules)
    assert ld.list_adapters(b.model) == []


@pytest.mark.parametrize("case,variant", PAIRS)
def test_merge_fp32(request, case, variant):
    """The same merge check in fp32, at the fp32 tolerance of a deep model."""
    b = setup(request, case, variant, dtype=torch.float32)
    add(b)
    assert all(p.dtype == torch.float32 for _, p in ld.adapter_parameters(b.model))
    perturb(b.model, std=0.05)
    out = forward(b)
    ld.merge_adapters(b.model)
    err = rel_err(forward(b), out)
    assert err <= DEEP_TOL[torch.float32], f"fp32 merged output rel err {err:.3g}"


def _layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ld.AdaptedLayer)]
