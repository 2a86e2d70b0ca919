"""Parity with PEFT: same weights in, same outputs out, in both directions of weight transfer.

For each variant PEFT implements (LoRA, rsLoRA, DoRA, VeRA, LoHa, LoKr) a PEFT model and one of ours
are built from the same deep-copied base module; one side's adapter is perturbed to random
non-zero values (an adapter at init is the identity, which would make the test trivial) and
copied into the other, then the weight deltas, the adapted outputs, the merged base weights and
the merged outputs are compared (PEFT ``merge_adapter()`` vs ``ld.merge_adapters``).

Parameter names map 1:1 (``<module>.<our param>`` <-> ``<module>.<PEFT param>.default[.weight]``).
The one reshape: PEFT stores a Conv2d DoRA magnitude as (1, out, 1, 1), ours is (out,).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import lora_diffusion as ld

from .conftest import TOL, perturb

peft = pytest.importorskip("peft")

DTYPES = [torch.float64, torch.float32]
DIRECTIONS = ["peft_to_ours", "ours_to_peft"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one intra-op thread (conftest)


class ParityNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 24)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        # VeRA: a second Linear of another size, so the shared projections are sliced in both dims
        # (in_max = 20 from lin2, out_max = 24 from lin).
        self.lin2 = nn.Linear(20, 8)
        # LoKr: out 48 = 6·8, in 32 = 4·8. The only layer here where decompose_both (W1 = 6x4 low-rank for
        # r < 3) and a low-rank / Tucker W2 (8x8x3x3 for r < 4) both take effect at once; on conv (4 -> 6)
        # W1 is 2x2 and cannot be decomposed.
        self.conv_big = nn.Conv2d(32, 48, 3, padding=1)


def make_inputs(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    shapes = {"lin": (3, 5, 16), "conv": (2, 4, 8, 8), "lin2": (3, 5, 20), "conv_big": (2, 32, 6, 6)}
    return {k: torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for k, s in shapes.items()}


@dataclass
class Case:
    id: str
    config: Callable[[], Any]  # a fresh PEFT config per test (PEFT mutates configs)
    spec: ld.AdapterSpec


LIN_CONV = ["lin", "conv"]
# alpha != rank everywhere (scale 1.5 for rank 4), so the scaling is exercised. PEFT's LoHa multiplies by
# torch.tensor(scaling), a float32 scalar: 1.5 is exact in float32, so that rounding does not enter fp64 results.
CASES = [
    Case("lora", lambda: peft.LoraConfig(r=4, lora_alpha=6, target_modules=LIN_CONV),
         ld.AdapterSpec("lora", rank=4, alpha=6, targets=LIN_CONV)),
    Case("rslora-flag", lambda: peft.LoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=LIN_CONV),
         ld.AdapterSpec("lora", rank=4, alpha=6, rslora=True, targets=LIN_CONV)),
    Case("rslora-variant", lambda: peft.LoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=LIN_CONV),
         ld.AdapterSpec("rslora", rank=4, alpha=6, targets=LIN_CONV)),
    Case("dora", lambda: peft.LoraConfig(r=4, lora_alpha=6, use_dora=True, target_modules=LIN_CONV),
         ld.AdapterSpec("dora", rank=4, alpha=6, targets=LIN_CONV)),
    Case("vera", lambda: peft.VeraConfig(r=4, target_modules=["lin", "lin2"], projection_prng_key=7),
         ld.AdapterSpec("vera", rank=4, seed=7, targets=["lin", "lin2"])),
    Case("loha", lambda: peft.LoHaConfig(r=4, alpha=6, target_modules=LIN_CONV),
         ld.AdapterSpec("loha", rank=4, alpha=6, targets=LIN_CONV)),
    # PEFT's use_effective_conv2d is LyCORIS' (and our) use_tucker: hada_t1/t2 (r, r, 3, 3) on the 3x3 conv
    Case("loha-tucker", lambda: peft.LoHaConfig(r=4, alpha=6, use_effective_conv2d=True, target_modules=LIN_CONV),
         ld.AdapterSpec("loha", rank=4, alpha=6, targets=LIN_CONV, options={"use_tucker": True})),
    # lin (r=2): W1 4x4 full, W2 = (6x2)(2x4); conv (r=1): W1 2x2, W2 = (3x1)(1x2·9);
    # conv_big (r=2): W1 6x4 full, W2 = (8x2)(2x8·9)
    Case("lokr", lambda: peft.LoKrConfig(r=2, alpha=3, rank_pattern={"conv": 1}, target_modules=["lin", "conv", "conv_big"]),
         ld.AdapterSpec("lokr", rank=2, alpha=3, rank_pattern={"conv": 1}, targets=["lin", "conv", "conv_big"])),
    # lin (r=1): W1 = (4x1)(1x4), W2 = (6x1)(1x4); conv_big (r=2): W1 = (6x2)(2x4), W2 low-rank
    Case("lokr-decompose-both",
         lambda: peft.LoKrConfig(r=2, alpha=3, rank_pattern={"lin": 1}, decompose_both=True, target_modules=["lin", "conv_big"]),
         ld.AdapterSpec("lokr", rank=2, alpha=3, rank_pattern={"lin": 1}, targets=["lin", "conv_big"],
                        options={"decompose_both": True})),
    # conv (r=1): W2 = Tucker t2 (1, 1, 3, 3); conv_big (r=2): W1 = (6x2)(2x4), W2 = Tucker t2 (2, 2, 3, 3)
    Case("lokr-tucker-decompose-both",
         lambda: peft.LoKrConfig(r=2, alpha=3, rank_pattern={"conv": 1}, decompose_both=True, use_effective_conv2d=True,
                                 target_modules=["conv", "conv_big"]),
         ld.AdapterSpec("lokr", rank=2, alpha=3, rank_pattern={"conv": 1}, targets=["conv", "conv_big"],
                        options={"decompose_both": True, "use_tucker": True})),
    # decompose_factor=2: in 16 = 2·8, out 24 = 2·12 (PEFT and LyCORIS agree for this factor, see the report)
    Case("lokr-factor", lambda: peft.LoKrConfig(r=2, alpha=3, decompose_factor=2, target_modules=["lin"]),
         ld.AdapterSpec("lokr", rank=2, alpha=3, targets=["lin"], options={"factor": 2})),
    # W2 full: lin r=3 (3 >= max(6, 4)/2), conv r=2 (2 >= max(3, 2)/2). On these layers W1 cannot be low-rank at
    # the same time, and with both factors full LyCORIS ignores alpha (scale 1) while PEFT keeps alpha/r;
    # we follow LyCORIS. alpha == rank here, so both scales are 1; "lokr-full-alpha" below shows the difference.
    Case("lokr-full-w2", lambda: peft.LoKrConfig(r=3, alpha=3, rank_pattern={"conv": 2}, alpha_pattern={"conv": 2},
                                                 target_modules=LIN_CONV),
         ld.AdapterSpec("lokr", rank=3, alpha=3, rank_pattern={"conv": 2}, alpha_pattern={"conv": 2}, targets=LIN_CONV)),
]
KNOWN_DIFFERENCES = [
    pytest.param(
        Case("lokr-full-alpha", lambda: peft.LoKrConfig(r=3, alpha=6, target_modules=["lin"]),
             ld.AdapterSpec("lokr", rank=3, alpha=6, targets=["lin"])),
        marks=pytest.mark.xfail(strict=True, reason="LoKr with W1 and W2 both full: PEFT scales by alpha/r, LyCORIS "
                                                    "(and we) by 1; the outputs differ by a factor alpha/r = 2"),
        id="lokr-full-alpha"),
]


def peft_key(param: str) -> str:
    """Our adapter parameter name -> PEFT's name on the same (wrapped) module."""
    param = param.removeprefix("inner.")  # DoRA's inner LoRA: PEFT keeps lora_A/lora_B on the layer itself
    if param in ("lora_A", "lora_B"):
        return f"{param}.default.weight"
    if param == "magnitude":
        return "lora_magnitude_vector.default.weight"
    return f"{param}.default"  # vera_lambda_*, hada_*, lokr_*: ParameterDicts keyed by adapter name


def build(case: Case, dtype: torch.dtype):
    torch.manual_seed(0)
    base = ParityNet().to(dtype)
    pm = peft.get_peft_model(copy.deepcopy(base), case.config())
    ours = copy.deepcopy(base)
    ld.add_adapter(ours, case.spec)
    pm.eval()
    ours.eval()
    return pm, pm.base_model.model, ours


def pairs(ours: nn.Module, pnet: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(key, our tensor, PEFT tensor) for every adapter tensor; checks that the map is 1:1."""
    out = []
    for key, t in ld.adapter_state_dict(ours).items():
        module, param = key.split(".", 1)
        p = pnet.get_submodule(module).get_parameter(peft_key(param))
        if param != "magnitude":
            assert p.shape == t.shape, f"{key}: ours {tuple(t.shape)}, PEFT {tuple(p.shape)}"
        out.append((key, t, p))
    peft_trainable = {n for n, p in pnet.named_parameters() if p.requires_grad}
    assert len(peft_trainable) == len(out), f"PEFT has {sorted(peft_trainable)}; ours {[k for k, _, _ in out]}"
    return out


@torch.no_grad()
def transfer(ours: nn.Module, pnet: nn.Module, direction: str) -> None:
    """Perturb the source side's adapter, then copy it into the other side."""
    if direction == "peft_to_ours":
        g = torch.Generator().manual_seed(5)
        for p in (p for p in pnet.parameters() if p.requires_grad):
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.1)
        sd = {k: p.detach().reshape(t.shape).clone() for k, t, p in pairs(ours, pnet)}
        ld.load_adapter_state_dict(ours, "default", sd)
    else:
        perturb(ours, "default", std=0.1, seed=5)
        for _, t, p in pairs(ours, pnet):
            p.copy_(t.reshape(p.shape))  # the DoRA conv magnitude: (out,) -> (1, out, 1, 1)
    for key, t, p in pairs(ours, pnet):
        assert torch.equal(t, p.reshape(t.shape)), key
        assert t.abs().max() > 0, f"{key} is zero: the comparison would be trivial"


def ours_layer(ours: nn.Module, module: str):
    return ours.get_submodule(module).adapters["default"]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert actual.dtype == expected.dtype == dtype, what
    torch.testing.assert_close(actual, expected, rtol=0, atol=TOL[dtype], msg=lambda m: f"{what}: {m}")


def check_parity(case: Case, dtype: torch.dtype, direction: str) -> None:
    pm, pnet, ours = build(case, dtype)
    transfer(ours, pnet, direction)
    x = make_inputs(dtype)
    modules = sorted({k.split(".", 1)[0] for k in ld.adapter_state_dict(ours)})
    with torch.no_grad():
        for m in modules:
            ad, pl = ours_layer(ours, m), pnet.get_submodule(m)
            # the weight delta (DoRA: of its inner LoRA; DoRA itself is not additive)
            ours_delta = (ad.inner if case.spec.variant == "dora" else ad).delta_weight()
            assert_close(ours_delta, pl.get_delta_weight("default"), dtype, f"{m}: delta weight")
            assert_close(ours.get_submodule(m)(x[m]), pnet.get_submodule(m)(x[m]), dtype, f"{m}: adapted output")
        pm.merge_adapter()
        ld.merge_adapters(ours)
        for m in modules:
            assert pnet.get_submodule(m).merged and ours.get_submodule(m).merged == ["default"]
            assert_close(ours.get_submodule(m).base_layer.weight, pnet.get_submodule(m).base_layer.weight, dtype,
                         f"{m}: merged weight")
            assert_close(ours.get_submodule(m)(x[m]), pnet.get_submodule(m)(x[m]), dtype, f"{m}: merged output")


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES] + KNOWN_DIFFERENCES)
def test_parity_with_peft(case: Case, dtype: torch.dtype, direction: str) -> None:
    check_parity(case, dtype, direction)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp64", "fp32"])
def test_vera_projections_equal_peft_bitwise(dtype: torch.dtype) -> None:
    """Our VeRA regenerates PEFT's shared projections from spec.seed == projection_prng_key, bit for bit."""
    case = next(c for c in CASES if c.id == "vera")
    pm, pnet, ours = build(case, dtype)
    store = ld.shared_tensors(ours)
    ours_a, ours_b = store["vera_A__default"], store["vera_B__default"]
    assert ours_a.shape == (4, 20) and ours_b.shape == (24, 4)  # (r, in_max), (out_max, r)
    for m in ("lin", "lin2"):
        peft_a, peft_b = pnet.get_submodule(m).vera_A["default"], pnet.get_submodule(m).vera_B["default"]
        # PEFT draws them in float32 and casts them to the base layer's dtype (exact for float64); ours stay
        # float32 and are cast when used. Compare in PEFT's dtype: equal means bitwise equal draws.
        assert torch.equal(ours_a.to(peft_a.dtype), peft_a), m
        assert torch.equal(ours_b.to(peft_b.dtype), peft_b), m
