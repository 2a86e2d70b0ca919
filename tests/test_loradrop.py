"""LoRA-drop (variants.md §16): importance ‖ΔW x‖², the cumulative cut, one shared adapter per shape group (one
storage, summed gradient, stored once), exports with per-module copies, the trainers' importance stage, bad input."""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_diffusion as ld
from lora_diffusion.io.files import read_safetensors
from lora_diffusion.variants.loradrop import DropPlan, cut, measure_importance, normalize, plan, share_groups

from .conftest import perturb
from .tiny_sd import sd_model, subject, tiny_config  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """Three 8x8 linears (one shape group), an 8->6 and a 6->8 linear, two 3x3 convs of one shape."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.down, self.up = nn.Linear(8, 6), nn.Linear(6, 8)
        self.conv1, self.conv2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        h = self.c(torch.relu(self.b(torch.relu(self.a(x)))))
        h = self.up(torch.tanh(self.down(h)))
        g = self.conv2(torch.relu(self.conv1(img)))
        return h.sum(-1) + g.mean(dim=(1, 2, 3))[:, None]


LINEARS = ["a", "b", "c", "down", "up"]
ALL = [*LINEARS, "conv1", "conv2"]


def net_and_inputs(seed: int = 0):
    torch.manual_seed(seed)
    net = Net().double()
    g = torch.Generator().manual_seed(seed + 1)
    return net, torch.randn(3, 5, 8, generator=g, dtype=torch.float64), torch.randn(3, 4, 6, 6, generator=g,
                                                                                    dtype=torch.float64)


def spec(shared=(), rank: int = 2, **kw) -> ld.AdapterSpec:
    return ld.AdapterSpec("loradrop", rank=rank, alpha=3.0, targets=ALL, seed=5,
                          options={"shared": [list(g) for g in shared], **kw})


# --- the importance and the cut ---
def test_importance_equals_the_squared_lora_output_norm_by_hand():
    net, x, img = net_and_inputs()
    ld.add_adapter(net, ld.AdapterSpec("lora", rank=2, alpha=3.0, targets=ALL, seed=5))
    perturb(net, std=0.3)
    inputs: dict[str, torch.Tensor] = {}
    hooks = [net.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: inputs.update({n: a[0]}))
             for n in ALL]
    scores = measure_importance(net, "default", lambda: net(x, img))
    for h in hooks:
        h.remove()
    for n in ALL:  # g_i = ‖s·B A x_i‖² summed over every row / position
        ad = net.get_submodule(n).adapters["default"]
        dw = 1.5 * (ad.lora_B.flatten(1) @ ad.lora_A.flatten(1)).view(net.get_submodule(n).base_layer.weight.shape)
        out = F.conv2d(inputs[n], dw, padding=1) if n.startswith("conv") else inputs[n] @ dw.T
        assert math.isclose(scores[n], float(out.detach().pow(2).sum()), rel_tol=1e-12), n
    imp = normalize(scores)
    assert math.isclose(sum(imp.values()), 1.0, rel_tol=1e-12) and list(imp) == ALL


def test_importance_sums_over_every_forward_of_the_sample():
    net, x, img = net_and_inputs()
    ld.add_adapter(net, ld.AdapterSpec("lora", rank=2, targets=ALL))
    perturb(net)
    once = measure_importance(net, "default", lambda: net(x, img))
    twice = measure_importance(net, "default", lambda: (net(x[:1], img[:1]), net(x[1:], img[1:])))
    assert all(math.isclose(once[n], twice[n], rel_tol=1e-10) for n in ALL)
    assert not any(isinstance(m, nn.Module) and m._forward_hooks for m in net.modules())  # hooks removed


def test_cut_keeps_the_smallest_prefix_reaching_the_threshold():
    imp = {"w": 0.05, "x": 0.5, "y": 0.15, "z": 0.3}
    assert cut(imp, 0.8) == ["x", "z"]
    assert cut(imp, 0.81) == ["x", "z", "y"]
    assert cut(imp, 0.5) == ["x"] and cut(imp, 1.0) == ["x", "z", "y", "w"]
    rng = random.Random(0)
    for _ in range(200):
        raw = {f"m{i}": rng.random() ** 3 for i in range(rng.randint(1, 12))}
        imp = normalize(raw)
        t = rng.choice([rng.random(), 1.0, 0.9])
        t = max(t, 1e-6)
        kept = cut(imp, t)
        best = sorted(imp.values(), reverse=True)
        assert sorted((imp[m] for m in kept), reverse=True) == best[:len(kept)]  # the most important ones
        assert sum(imp[m] for m in kept) >= t - 1e-12  # reaches T
        assert sum(best[:len(kept) - 1]) < t - 1e-12  # no smaller set does (the top k-1 are the best k-1)


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.0001, 2, float("nan"), float("inf"), "0.9", True])
def test_threshold_outside_0_1_is_one_clear_error(bad):
    with pytest.raises(ld.AdapterError, match=r"threshold: .*must be in \(0, 1\]"):
        cut({"a": 1.0}, bad)
    net, _, _ = net_and_inputs()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ld.AdapterError, match=r"option threshold: .*must be in \(0, 1\]"):
        ld.add_adapter(net, spec(threshold=bad))
    assert not list(ld.adapter_parameters(net)) and net.state_dict().keys() == before.keys()  # nothing applied


# --- sharing ---
def test_groups_by_shape_or_strict():
    net, _, _ = net_and_inputs()
    ld.add_adapter(net, ld.AdapterSpec("lora", rank=2, targets=ALL))
    p = plan(net, "default", {"a": 0.0, "b": 1.0, "c": 2.0, "down": 0.5, "up": 0.5, "conv1": 0.1, "conv2": 0.1}, 0.5)
    assert p.kept == ["c", "b"] and p.shared == [["a"], ["down"], ["up"], ["conv1", "conv2"]]
    keys = {n: (layer.info.kind, *layer.info.weight_shape, 2) for n, layer in ld.inject.walker.adapted_layers(net)}
    assert share_groups(["a", "b", "c"], keys, strict=True) == [["a", "b", "c"]]
    with pytest.raises(ld.AdapterError, match=r"3 shapes \(linear 8x8 rank 2: \['a', 'b'\]; linear 6x8 rank 2: "
                                              r"\['down'\]; conv2d 4x4x3x3 rank 2: \['conv1'\]\)"):
        share_groups(["a", "b", "down", "conv1"], keys, strict=True)


def test_strict_sharing_across_shapes_is_refused_naming_the_modules_and_nothing_is_applied():
    net, x, img = net_and_inputs()
    want = net(x, img)
    with pytest.raises(ld.AdapterError, match=r"linear 8x8 rank 2: \['a', 'b'\]; linear 6x8 rank 2: \['down'\]"):
        ld.add_adapter(net, spec([["a", "b", "down"]]))
    assert not list(ld.adapter_parameters(net)) and torch.equal(net(x, img), want)
    with pytest.raises(ld.AdapterError, match=r"module\(s\) \['nope'\] are not targets"):
        ld.add_adapter(net, spec([["a", "nope"]]))
    with pytest.raises(ld.AdapterError, match="module 'a' is in more than one group"):
        ld.add_adapter(net, spec([["a", "b"], ["a", "c"]]))
    assert not list(ld.adapter_parameters(net))


def shared_net():
    net, x, img = net_and_inputs()
    ld.add_adapter(net, spec([["c", "a", "b"], ["conv2", "conv1"]]))  # owners: the first in module order (a, conv1)
    perturb(net, std=0.3)
    return net, x, img


def test_shared_layers_use_one_storage_and_the_parameter_count_follows():
    net, _, _ = shared_net()
    ads = {n: net.get_submodule(n).adapters["default"] for n in ALL}
    for group in (["a", "b", "c"], ["conv1", "conv2"]):
        a0, b0 = ads[group[0]].factors()
        for n in group[1:]:
            a, b = ads[n].factors()
            assert a is a0 and b is b0 and a.data_ptr() == a0.data_ptr() and b.data_ptr() == b0.data_ptr()
            assert not list(ads[n].parameters()) and ads[n].owner is ads[group[0]]
    assert ads["down"].factors()[0].data_ptr() != ads["a"].factors()[0].data_ptr()
    r = 2  # (kept + groups) · r(in + out): a's group, down, up, conv1's group
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == r * (16 + 14 + 14 + (36 + 4))
    assert len({id(p) for g in ld.param_groups(net, 1e-3) for p in g["params"]}) == 8  # 4 adapters, once each


def test_the_shared_adapter_receives_the_summed_gradient():
    net, x, img = shared_net()
    ref, _, _ = net_and_inputs()  # plain LoRA, each layer its own copy of the same tensors
    ld.add_adapter(ref, ld.AdapterSpec("lora", rank=2, alpha=3.0, targets=ALL))
    with torch.no_grad():
        for n in ALL:
            a, b = net.get_submodule(n).adapters["default"].factors()
            ref.get_submodule(n).adapters["default"].lora_A.copy_(a)
            ref.get_submodule(n).adapters["default"].lora_B.copy_(b)
    out, want = net(x, img), ref(x, img)
    assert torch.allclose(out, want, atol=1e-12, rtol=0)
    out.pow(2).sum().backward()
    want.pow(2).sum().backward()
    for group in (["a", "b", "c"], ["conv1", "conv2"], ["down"], ["up"]):
        shared = net.get_submodule(group[0]).adapters["default"]
        for t in ("lora_A", "lora_B"):
            summed = sum(getattr(ref.get_submodule(n).adapters["default"], t).grad for n in group)
            assert torch.allclose(getattr(shared, t).grad, summed, atol=1e-12, rtol=1e-12), (group, t)


def test_canonical_file_stores_the_shared_adapter_once_and_reloads(tmp_path):
    net, x, img = shared_net()
    want = net(x, img)
    path = ld.save_adapter(net, tmp_path / "drop.safetensors")
    sd, meta = read_safetensors(path)
    assert sorted(sd) == sorted(f"{m}.{t}" for m in ("a", "down", "up", "conv1") for t in ("lora_A", "lora_B"))
    entry = json.loads(meta["adapters"])[""]
    assert entry["spec"]["variant"] == "loradrop"
    assert entry["spec"]["options"]["shared"] == [["c", "a", "b"], ["conv2", "conv1"]]
    fresh, _, _ = net_and_inputs()
    ld.load_adapter(fresh, path, name="x")
    assert torch.equal(fresh(x, img), want)
    b = fresh.get_submodule("b").adapters["x"]
    assert b.factors()[0] is fresh.get_submodule("a").adapters["x"].lora_A
    from lora_diffusion.io.library import describe

    info = describe(path)["lora_drop"]  # what `python -m lora_diffusion.convert inspect` prints
    assert info["own_adapter"] == 2 and info["shared"] == ["3 modules share one adapter (c, ...)",
                                                           "2 modules share one adapter (conv2, ...)"]


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "peft"])
def test_exports_write_the_shared_adapter_per_module_and_reload_identically(tmp_path, fmt):
    from .test_formats_helpers import sd15_pipeline, unet_call

    pipe = sd15_pipeline()
    attn = "down_blocks.0.attentions.0.transformer_blocks.0"
    shared = [[f"{attn}.attn1.to_q", f"{attn}.attn1.to_k", f"{attn}.attn1.to_v"], [f"{attn}.attn1.to_out.0",
                                                                                 f"{attn}.attn2.to_out.0"]]
    s = ld.AdapterSpec("loradrop", rank=4, alpha=2.0, targets=["to_q", "to_k", "to_v", "to_out.0"], seed=3,
                       options={"shared": shared})
    ld.add_adapter(pipe.unet, s, "x")
    perturb(pipe.unet, "x", std=0.05)
    want = unet_call(pipe.unet)
    path = ld.save_adapter(pipe, tmp_path / ("x" if fmt == "peft" else "x.safetensors"), "x", format=fmt)
    again = sd15_pipeline()
    ld.load_adapter(again, path, name="y")
    assert ld.get_spec(again.unet, "y").variant == "lora"  # plain per-module LoRAs
    for group in shared:  # materialized: equal copies, separate storage
        a = [again.unet.get_submodule(m).adapters["y"].lora_A for m in group]
        assert all(torch.equal(a[0], t) and t.data_ptr() != a[0].data_ptr() for t in a[1:])
    assert torch.equal(unet_call(again.unet), want)  # bitwise: same tensors, same ops


def test_stratified_sample_is_proportional_deterministic_and_without_repeats():
    from training.lora_drop import length_strata, stratified

    lengths = [5] * 40 + [50] * 40 + [20] * 20  # quartile strata of 100 records
    strata = length_strata(lengths)
    assert sorted(set(strata)) == [0, 1, 2, 3] and all(strata.count(q) == 25 for q in range(4))
    idx = stratified(strata, 16, seed=3)
    assert len(idx) == len(set(idx)) == 16 and idx == stratified(strata, 16, seed=3) != stratified(strata, 16, seed=4)
    assert [sum(strata[i] == q for i in idx) for q in range(4)] == [4, 4, 4, 4]
    uneven = [0] * 70 + [1] * 20 + [2] * 10
    assert sorted(Counter(uneven[i] for i in stratified(uneven, 10, 0)).values()) == [1, 2, 7]
    assert stratified(strata, 500, 0) == list(range(100))


# --- the trainers ---
@pytest.fixture(scope="module")
def llm_folder(tmp_path_factory):
    from .test_llm_train import make_tiny_folder

    return make_tiny_folder(tmp_path_factory.mktemp("tiny") / "llama")


def llm_cli(folder, out, *extra: str) -> dict:
    from training import train_llm

    from .test_llm_train import EVAL, TRAIN

    return train_llm.main(["--model", str(folder), "--train_file", str(TRAIN), "--eval_file", str(EVAL),
                           "--output_dir", str(out), "--max_length", "64", "--lr", "1e-2", "--train_batch_size", "4",
                           "--no-progress", "--report_to", "none", "--variant", "loradrop", *extra])


def test_llm_trainer_runs_the_importance_stage_then_trains_the_plan(llm_folder, tmp_path):
    out = tmp_path / "run"
    m = llm_cli(llm_folder, out, "--max_train_steps", "6", "--lora_drop_steps", "3", "--lora_drop_samples", "8",
                "--lora_drop_threshold", "0.6", "--checkpointing_steps", "3")
    p = DropPlan.from_dict(json.loads((out / "lora_drop.json").read_text()))
    assert len(p.importance) == 14 and math.isclose(sum(p.importance.values()), 1.0, rel_tol=1e-9)
    assert p.kept == cut(p.importance, 0.6) and 0 < len(p.kept) < 14
    assert sorted(p.kept + [m for g in p.shared for m in g]) == sorted(p.importance)
    assert m["steps"] == 6 and m["after"]["eval_loss"] < m["before"]["eval_loss"]
    sd, meta = read_safetensors(out / "adapter.safetensors")
    spec_ = json.loads(meta["adapters"])[""]["spec"]
    assert spec_["variant"] == "loradrop" and spec_["options"]["shared"] == p.shared
    owners = {g[0] for g in p.shared}  # module order = the plan's order: the first of each group stores it
    assert {k.rsplit(".", 1)[0] for k in sd} == set(p.kept) | owners
    assert m["trainable_params"] == sum(v.numel() for v in sd.values())
    # the PEFT folder holds every module (the shared tensors copied)
    psd, _ = read_safetensors(out / "peft" / "adapter_model.safetensors")
    assert len(psd) == 2 * 14
    # a resumed run reads the plan instead of measuring again
    (out / "lora_drop.json").write_text(json.dumps({**p.to_dict(), "threshold": 0.6}))
    llm_cli(llm_folder, out, "--max_train_steps", "7", "--lora_drop_steps", "3", "--lora_drop_samples", "8",
            "--lora_drop_threshold", "0.6", "--resume_from_checkpoint", "latest")
    again, _ = read_safetensors(out / "adapter.safetensors")
    assert again.keys() == sd.keys()


def test_llm_trainer_strict_sharing_across_shapes_stops_with_the_modules_named(llm_folder, tmp_path):
    out = tmp_path / "strict"
    with pytest.raises(ld.AdapterError, match=r"one shared adapter needs layers of one shape; the layers to share "
                                              r"have [2-4] shapes \(linear \d+x\d+ rank 8: \['model\.layers\.\d\."):
        llm_cli(llm_folder, out, "--max_train_steps", "4", "--lora_drop_steps", "1", "--lora_drop_strict",
                "--lora_drop_threshold", "0.3")
    assert not (out / "lora_drop.json").exists() and not (out / "adapter.safetensors").exists()


@pytest.mark.parametrize("flags, match", [
    (["--lora_drop_threshold", "1.5"], r"--lora_drop_threshold: .*must be in \(0, 1\] .*; found 1.5"),
    (["--lora_drop_threshold", "0"], r"--lora_drop_threshold: .*must be in \(0, 1\] .*; found 0.0"),
    (["--lora_drop_samples", "0"], "--lora_drop_samples: expected an integer >= 1"),
    (["--lora_drop_steps", "0"], "--lora_drop_steps: expected an integer >= 1"),
])
def test_trainer_flags_are_checked_before_anything_loads(tmp_path, flags, match):
    from training.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        llm_cli(tmp_path / "no-such-model", tmp_path / "o", *flags)  # the model is never opened
    assert not (tmp_path / "o").exists()


def test_print_config_shows_the_lora_drop_section(capsys):
    import yaml

    from training import train_llm, train_tlora

    train_llm.main(["--train_file", "x.jsonl", "--variant", "loradrop", "--lora_drop_threshold", "0.8", "--print-config"])
    assert yaml.safe_load(capsys.readouterr().out)["lora_drop"]["lora_drop_threshold"] == 0.8
    train_tlora.main(["--variant", "loradrop", "--max_train_steps", "300", "--print-config"])
    section = yaml.safe_load(capsys.readouterr().out)["lora_drop"]
    assert section["lora_drop_threshold"] == 0.9 and section["lora_drop_steps"] == 30  # resolved: 10% of the run


def test_diffusion_trainer_importance_stage_uses_its_denoising_loss(tmp_path, monkeypatch, sd_model, subject):  # noqa: F811
    from training import lora_drop
    from training.train_tlora import train

    seen = []
    real = lora_drop.importance_stage

    def spy(acc, model, spec_, sample, loss_fn, args, lr, progress=True):
        seen.append([t for _, t in sample])
        return real(acc, model, spec_, sample, loss_fn, args, lr, progress)

    monkeypatch.setattr(lora_drop, "importance_stage", spy)
    model = sd_model
    cfg = tiny_config(model, subject, tmp_path / "out", variant="loradrop", max_train_steps=2)
    cfg.lora_drop.lora_drop_samples, cfg.lora_drop.lora_drop_threshold = 4, 0.5
    res = train(cfg)
    assert seen and sorted(t // 250 for t in seen[0]) == [0, 1, 2, 3]  # one timestep per stratum of [0, 1000)
    p = DropPlan.from_dict(json.loads((tmp_path / "out" / "lora_drop.json").read_text()))
    assert p.shared and cut(p.importance, 0.5) == p.kept
    assert cfg.lora_drop.lora_drop_steps == 1  # 10% of 2 steps, at least 1
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model)
    name = ld.load_adapter(pipe, res.outputs["canonical"])
    assert ld.get_spec(pipe.unet, name).options["shared"] == p.shared
    assert "loradrop_stage1" not in ld.list_adapters(pipe)
    # --init_adapter continues that LoRA-drop adapter (its groups from the file, no second importance stage)
    seen.clear()
    more = tiny_config(model, subject, tmp_path / "more", variant="lora", max_train_steps=1)
    more.adapter.init_adapter = str(res.outputs["canonical"])
    res2 = train(more)
    assert not seen and more.adapter.variant == "loradrop"
    again = StableDiffusionPipeline.from_pretrained(model)
    name = ld.load_adapter(again, res2.outputs["canonical"])
    assert ld.get_spec(again.unet, name).options["shared"] == p.shared


# --- --lora_drop_match_params: LoRA-drop at a uniform LoRA's size (issue 15's equal-parameter comparison) ---
def _infos(shapes: dict[str, tuple[int, int]]):
    from lora_diffusion.core.layerinfo import LayerInfo

    return {m: LayerInfo("linear", o, i) for m, (o, i) in shapes.items()}


def test_match_uniform_is_exact_on_layers_of_one_shape():
    from lora_diffusion.variants.loradrop import match_uniform

    infos = _infos({f"l{i}": (16, 16) for i in range(12)})
    importance = normalize({f"l{i}": 2.0 ** -i for i in range(12)})
    p = plan_of(importance, 0.9, infos)  # the cut keeps 4: 4 own + 1 shared = 5 adapters, 12·8 = 96 not divisible
    q = match_uniform(p, infos, 8)
    assert len(q.kept) >= len(p.kept) and q.kept == sorted(importance, key=lambda m: -importance[m])[:len(q.kept)]
    assert q.rank * q.trainable_per_rank({m: 32 for m in infos}) == 8 * 12 * 32  # exactly the uniform count
    assert (len(q.kept) + len(q.shared)) == 96 // q.rank and len(q.kept) == 5  # 6 adapters at rank 16
    assert cut(q.importance, q.threshold) == q.kept  # the recorded threshold reproduces the layers
    assert DropPlan.from_dict(json.loads(json.dumps(q.to_dict()))) == q  # the rank travels with the plan file
    s = q.spec(ld.AdapterSpec("lora", rank=8, alpha=4.0, targets=list(infos)))
    assert s.rank == q.rank and s.alpha == 4.0 * q.rank / 8  # α/r kept


def test_match_uniform_on_mixed_shapes_is_the_closest_count():
    from lora_diffusion.variants.loradrop import match_uniform

    infos = _infos({"a": (8, 8), "b": (8, 8), "c": (8, 8), "down": (6, 8), "up": (8, 6)})
    sizes = {m: i.fan_in + i.out_features for m, i in infos.items()}
    importance = normalize({"a": 5.0, "b": 1.0, "c": 1.0, "down": 2.0, "up": 1.0})
    p = plan_of(importance, 0.5, infos)
    q = match_uniform(p, infos, 4)
    target = 4 * sum(sizes.values())
    err = abs(q.rank * q.trainable_per_rank(sizes) - target)
    ranked = sorted(importance, key=lambda m: -importance[m])
    for k in range(len(p.kept), 6):  # no other number of kept layers (at its best rank) gets closer
        kept = ranked[:k]
        groups = share_groups([m for m in importance if m not in kept], {m: (i.weight_shape,) for m, i in infos.items()})
        per = sum(sizes[m] for m in kept) + sum(sizes[g[0]] for g in groups)
        assert err <= abs(max(1, round(target / per)) * per - target)


def plan_of(importance, threshold, infos):
    kept = cut(importance, threshold)
    keys = {m: (i.weight_shape,) for m, i in infos.items()}
    return DropPlan(threshold, importance, kept, share_groups([m for m in importance if m not in kept], keys))


def test_llm_trainer_match_params_trains_a_uniform_loras_count(llm_folder, tmp_path):
    out = tmp_path / "match"
    base = ["--max_train_steps", "2", "--lora_drop_steps", "1", "--lora_drop_samples", "4", "--targets",
            "q_proj,o_proj", "--rank", "4", "--lora_drop_threshold", "0.5"]
    m = llm_cli(llm_folder, out, *base, "--lora_drop_match_params")
    p = DropPlan.from_dict(json.loads((out / "lora_drop.json").read_text()))
    ref = llm_cli(llm_folder, tmp_path / "lora", *base[:-2], "--variant", "lora")  # the last --variant wins
    assert p.rank is not None and p.rank >= 4 and cut(p.importance, p.threshold) == p.kept
    assert m["trainable_params"] == ref["trainable_params"]  # q_proj and o_proj of the tiny model: one shape
