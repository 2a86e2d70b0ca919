"""Bad input: one clear error naming the module/key/file and what was expected; the model is left as it was."""

from __future__ import annotations

import copy
import json
import os
import stat
import struct

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lora_diffusion as ld
from lora_diffusion import AdapterError, AdapterFileError, TargetError, UnknownVariantError

from .conftest import layer_and_input, perturb


def untouched(net: nn.Module, before: nn.Module) -> bool:
    sd0, sd1 = before.state_dict(), net.state_dict()
    no_wrappers = not any(isinstance(m, ld.AdaptedLayer) for m in net.modules())
    return no_wrappers and sd0.keys() == sd1.keys() and all(torch.equal(sd0[k], sd1[k]) for k in sd0) \
        and ld.list_adapters(net) == []


@pytest.fixture
def net():
    return layer_and_input("linear")[0]


def test_unknown_variant_lists_valid_ones(net):
    before = copy.deepcopy(net)
    with pytest.raises(UnknownVariantError, match="unknown variant 'lorra'; valid variants are: .*lora.*tlora"):
        ld.add_adapter(net, ld.AdapterSpec(variant="lorra", targets=["lin"]))
    assert untouched(net, before)


def test_rank_larger_than_layer_names_module_and_limit(net):
    before = copy.deepcopy(net)
    with pytest.raises(TargetError, match=r"module 'lin': rank 17 .*expected rank <= min\(out=24, in=16\) = 16"):
        ld.add_adapter(net, ld.AdapterSpec(rank=17, targets=["lin", "conv"]))
    assert untouched(net, before)


def test_rank_pattern_too_large_on_second_module_applies_nothing(net):
    before = copy.deepcopy(net)
    with pytest.raises(TargetError, match="module 'conv'"):
        ld.add_adapter(net, ld.AdapterSpec(rank=2, targets=["lin", "conv"], rank_pattern={"conv": 7}))
    assert untouched(net, before)


def test_patterns_matching_nothing(net):
    before = copy.deepcopy(net)
    with pytest.raises(TargetError, match=r"target patterns \['to_q'\] match no module of TinyNet"):
        ld.add_adapter(net, ld.AdapterSpec(targets=["to_q"]))
    assert untouched(net, before)


def test_target_of_unsupported_type_is_named(net):
    net.norm = nn.LayerNorm(4)
    before = copy.deepcopy(net)
    with pytest.raises(TargetError, match="module 'norm' is a LayerNorm"):
        ld.add_adapter(net, ld.AdapterSpec(targets=["lin", "norm"]))
    assert untouched(net, before)


def test_vera_failure_leaves_no_shared_tensors(net):
    before = copy.deepcopy(net)
    with pytest.raises(TargetError, match="'conv'.*vera"):
        ld.add_adapter(net, ld.AdapterSpec(variant="vera", targets=["lin", "conv"]))
    assert untouched(net, before)


@pytest.mark.parametrize("spec_kw,match", [
    ({"rank": 0}, r"AdapterSpec.rank: expected an integer >= 1, found 0"),
    ({"dropout": 1.5}, r"AdapterSpec.dropout"),
    ({"alpha": float("nan")}, r"AdapterSpec.alpha"),
])
def test_bad_spec_fields(spec_kw, match):
    with pytest.raises(AdapterError, match=match):
        ld.AdapterSpec(**spec_kw)


def test_unknown_option_lists_valid_options(net):
    before = copy.deepcopy(net)
    with pytest.raises(AdapterError, match=r"unknown option\(s\) \['minrank'\] for variant 'tlora'; valid options.*min_rank"):
        ld.add_adapter(net, ld.AdapterSpec(variant="tlora", targets=["lin"], options={"minrank": 2}))
    assert untouched(net, before)


def test_unknown_spec_field_in_json():
    with pytest.raises(AdapterError, match=r"unknown field\(s\) \['rnak'\]"):
        ld.AdapterSpec.from_json(json.dumps({"rnak": 4}))


def test_duplicate_adapter_name(net):
    ld.add_adapter(net, ld.AdapterSpec(targets=["lin"]))
    with pytest.raises(AdapterError, match="adapter 'default' already exists"):
        ld.add_adapter(net, ld.AdapterSpec(targets=["conv"]))
    assert not isinstance(net.conv, ld.AdaptedLayer)


def test_set_adapters_unknown_name(net):
    ld.add_adapter(net, ld.AdapterSpec(targets=["lin"]))
    with pytest.raises(AdapterError, match=r"no adapter named \['nope'\]; present: \['default'\]"):
        ld.set_adapters(net, ["nope"])


# --- files ---
@pytest.fixture
def good_file(tmp_path, net):
    ld.add_adapter(net, ld.AdapterSpec(rank=4, targets=["lin", "conv"]))
    perturb(net)
    return ld.save_adapter(net, tmp_path / "good.safetensors")


def fresh():
    return layer_and_input("linear")[0]


def check_refused(path, match):
    model = fresh()
    before = copy.deepcopy(model)
    with pytest.raises(AdapterFileError, match=match):
        ld.load_adapter(model, path)
    assert untouched(model, before)


def test_truncated_file(good_file, tmp_path):
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(good_file.read_bytes()[:-40])
    check_refused(bad, r"trunc.safetensors: tensors need \d+ bytes but the file has \d+; the file is truncated")


def test_header_that_lies(good_file, tmp_path):
    raw = good_file.read_bytes()
    bad = tmp_path / "lies.safetensors"
    bad.write_bytes(struct.pack("<Q", 10**7) + raw[8:])
    check_refused(bad, r"lies.safetensors: header claims 10000000 bytes")


def test_garbage_file(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"hello, this is not a tensor file at all")
    check_refused(bad, "garbage.safetensors")


def test_pickle_files_are_refused(tmp_path):
    for name in ("x.ckpt", "x.pt", "sneaky.safetensors"):
        torch.save({"a": torch.zeros(2)}, tmp_path / name)
        check_refused(tmp_path / name, "pickle")


def test_nan_tensor_is_named(good_file, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(str(good_file))
    with safe_open(str(good_file), "pt") as f:
        meta = f.metadata()
    key = sorted(tensors)[0]
    tensors[key][0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    check_refused(bad, f"tensor '{key}' contains NaN or Inf")


def test_shapes_that_do_not_fit_the_model(good_file):
    model = fresh()
    model.lin = nn.Linear(16, 30).double()  # another base model: out 30 instead of 24
    with pytest.raises(AdapterFileError, match=r"good.safetensors: tensor 'lin.lora_B' has shape \(24, 4\); expected \(30, 4\)"):
        ld.load_adapter(model, good_file)
    assert ld.list_adapters(model) == [] and not isinstance(model.lin, ld.AdaptedLayer)


def test_file_for_modules_the_model_lacks(good_file):
    model = fresh()
    del model.conv
    with pytest.raises(AdapterError, match=r"module\(s\) \['conv'\] not found in TinyNet"):
        ld.load_adapter(model, good_file)
    assert ld.list_adapters(model) == []


def test_file_without_our_metadata(tmp_path):
    bad = tmp_path / "foreign.safetensors"
    save_file({"lin.lora_A": torch.zeros(8, 16)}, str(bad), metadata={"ss_network_dim": "8"})
    check_refused(bad, "not a lora-diffusion canonical file")


def test_save_is_atomic_and_keeps_the_old_file_on_failure(good_file, monkeypatch):
    old = good_file.read_bytes()
    model = fresh()
    ld.add_adapter(model, ld.AdapterSpec(targets=["lin"]))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("lora_diffusion.io.files.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        ld.save_adapter(model, good_file)
    assert good_file.read_bytes() == old
    assert [p.name for p in good_file.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_saved_file_has_the_usual_permissions(tmp_path):
    """Atomic writes go through a private temporary file; the result must still be readable as a plain
    write would leave it (0o666 minus the umask), not owner-only."""
    model = fresh()
    ld.add_adapter(model, ld.AdapterSpec(targets=["lin"]))
    old = os.umask(0o022)
    try:
        path = ld.save_adapter(model, tmp_path / "a.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
