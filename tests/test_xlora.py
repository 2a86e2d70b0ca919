"""X-LoRA (lora_diffusion/fusion/xlora.py): parity with PEFT's XLoraModel on a tiny Llama in fp64, the invariants of
the reference test list (variants.md §20), the mixture file and bad input."""

from __future__ import annotations

import copy

import pytest
import torch

import lora_diffusion as ld
from lora_diffusion.fusion import fuse, load_mixture_weights, save_mixture, unfuse
from lora_diffusion.fusion.xlora import XLoraFusion

from .test_llm_train import tiny_model

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")
RANKS = {"a": 2, "b": 4, "c": 3}  # unequal ranks: X-LoRA mixes outputs, so ranks may differ (PEFT's too)
TARGETS = {"a": ["q_proj", "v_proj"], "b": ["q_proj", "v_proj", "down_proj"], "c": ["q_proj", "v_proj"]}


def peft_folders(base, root, n=3):
    """PEFT LoRA folders with random A and B (B != 0), as PeftModel.save_pretrained writes them."""
    out = {}
    for i, name in enumerate(list(RANKS)[:n]):
        torch.manual_seed(10 + i)
        cfg = peft.LoraConfig(r=RANKS[name], lora_alpha=2 * RANKS[name], target_modules=TARGETS[name],
                              init_lora_weights=False)
        pm = peft.get_peft_model(copy.deepcopy(base), cfg)
        pm.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def pair(tmp_path, n=3, **opts):
    """(PEFT XLoraModel, our model with the fusion) on one tiny Llama, the classifier weights copied over."""
    base = tiny_model("llama", torch.float64)
    base.config.use_cache = False
    folders = peft_folders(base, tmp_path, n)
    # PEFT loads the adapters as "0", "1", ... and then activates the config's keys: name them so
    adapters = {str(i): folder for i, folder in enumerate(folders.values())}
    cfg = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=base.config.hidden_size, adapters=adapters, **opts)
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    ours = copy.deepcopy(base).requires_grad_(False)
    for name, folder in folders.items():
        ld.load_adapter(ours, folder, name=name)
    f = fuse(ours, list(folders), method="xlora", **opts)
    clf = theirs.base_model.internal_xlora_classifier
    torch.manual_seed(5)
    with torch.no_grad():  # a non-trivial classifier, the same on both sides
        for p in clf.parameters():
            p.copy_(torch.randn_like(p))
        f.modules["classifier"].layers.load_state_dict(clf.layers.state_dict())
    ours.eval()
    return theirs, ours, f


IDS = torch.tensor([[5, 17, 33, 9, 101, 4, 60], [2, 8, 8, 90, 14, 3, 77]])
PEFT_CASES = {
    "defaults": {},
    "layerwise": {"layerwise_scalings": True},
    "deep_temperature": {"xlora_depth": 3, "xlora_size": 16, "softmax_temperature": 0.5},
    "topk_softmax": {"top_k_lora": 2, "enable_softmax_topk": True},
    "no_softmax_global": {"enable_softmax": False, "global_scaling_weight": 0.7},
    # PEFT builds the dummy scalings in float32 before casting (0.4 -> 0.4000000059604645): a value exact in fp32
    "pass_value": {"scaling_pass_value": 0.375, "layerwise_scalings": True},
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_matches_peft_xlora_model(tmp_path, case):
    theirs, ours, f = pair(tmp_path, **PEFT_CASES[case])
    with torch.no_grad():
        want = theirs(input_ids=IDS).logits
        got = ours(input_ids=IDS).logits
    base = tiny_model("llama", torch.float64)(input_ids=IDS).logits
    assert (want - base).abs().max() > 1e-3  # the LoRAs change the output
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(XLoraFusion.latest_scalings(f), theirs.base_model.internal_xlora_scalings,
                               rtol=1e-12, atol=1e-12)
    n_layers = len(f.combiners)
    assert XLoraFusion.latest_scalings(f).shape == (2, 7, n_layers, 3)


def test_classifier_training_step_matches_peft(tmp_path):
    """One AdamW step on the classifier only (LoRAs frozen), same loss and same classifier after it."""
    opts = {"xlora_depth": 2, "xlora_size": 8, "xlora_dropout_p": 0.0, "layerwise_scalings": True}
    theirs, ours, f = pair(tmp_path, **opts)
    tp = [p for p in theirs.parameters() if p.requires_grad]
    assert {id(p) for p in tp} == {id(p) for p in theirs.base_model.internal_xlora_classifier.parameters()}
    assert [p for p in ours.parameters() if p.requires_grad] == []  # classifier lives on the fusion
    losses = []
    for model, params in ((theirs, tp), (ours, f.parameters())):
        opt = torch.optim.AdamW(params, lr=1e-2)
        model.train()
        for _ in range(3):
            loss = model(input_ids=IDS, labels=IDS).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss.detach()))
    assert losses[:3] == pytest.approx(losses[3:], rel=1e-10, abs=1e-12)
    torch.testing.assert_close(f.modules["classifier"].layers.state_dict(),
                               theirs.base_model.internal_xlora_classifier.layers.state_dict())


# --- invariants (variants.md §20) ---
def loaded(tmp_path, n=3):
    base = tiny_model("llama", torch.float64)
    folders = peft_folders(base, tmp_path, n)
    model = copy.deepcopy(base).requires_grad_(False)
    for name, folder in folders.items():
        ld.load_adapter(model, folder, name=name)
    return base, model, list(folders)


def test_scaling_pass_with_value_zero_is_the_base_model(tmp_path):
    base, model, names = loaded(tmp_path)
    f = fuse(model, names, method="xlora")
    seen = {}
    clf = f.modules["classifier"]
    clf.register_forward_hook(lambda m, i, o: seen.update(h=i[0]))
    with torch.no_grad():
        model(input_ids=IDS)
        want = base(input_ids=IDS, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(seen["h"], want, rtol=0, atol=0)


@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("temperature", [0.3, 1.0, 4.0])
def test_scalings_shape_and_sum_to_one(tmp_path, layerwise, temperature):
    _, model, names = loaded(tmp_path)
    f = fuse(model, names, method="xlora", layerwise_scalings=layerwise, softmax_temperature=temperature)
    with torch.no_grad():
        model(input_ids=IDS)
    s = XLoraFusion.latest_scalings(f)
    assert s.shape == (*IDS.shape, len(f.combiners), len(names))
    torch.testing.assert_close(s.sum(-1), torch.ones(s.shape[:-1], dtype=s.dtype))
    if not layerwise:
        assert torch.equal(s, s[:, :, :1].expand_as(s))


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("softmax_topk", [False, True])
def test_topk_zeroes_the_rest(k, softmax_topk):
    from lora_diffusion.fusion.xlora import topk_scalings

    s = torch.softmax(torch.randn(2, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(k)), -1)
    out = topk_scalings(s, k, softmax_topk)
    assert ((out != 0).sum(-1) == k).all()
    kept = torch.topk(s, k, -1).indices
    assert torch.equal(out.gather(-1, kept) != 0, torch.ones_like(kept, dtype=torch.bool))
    if softmax_topk:
        torch.testing.assert_close(out.sum(-1), torch.ones(2, 5, dtype=torch.float64))


def test_only_the_classifier_trains(tmp_path):
    _, model, names = loaded(tmp_path)
    f = fuse(model, names, method="xlora")
    assert not any(p.requires_grad for p in model.parameters())
    assert f.parameters() and all(p.requires_grad for p in f.parameters())
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None for p in f.parameters())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("i", [0, 1, 2])
def test_one_hot_classifier_reproduces_that_lora(tmp_path, i):
    _, model, names = loaded(tmp_path)
    f = fuse(model, names, method="xlora", enable_softmax=False)
    last = f.modules["classifier"].layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
        last.bias[i] = 1.0
        got = model(input_ids=IDS).logits
        unfuse(model)
        assert not model._forward_pre_hooks  # the scaling-pass hook is gone with the fusion
        ld.set_adapters(model, [names[i]])
        want = model(input_ids=IDS).logits
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# --- the file, generation, bad input ---
def test_mixture_file_round_trip_and_generate(tmp_path):
    base, model, names = loaded(tmp_path)
    f = fuse(model, names, method="xlora", layerwise_scalings=True)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in f.parameters():
            p.normal_()
        want = model(input_ids=IDS).logits
    path = save_mixture(model, f, tmp_path / "xlora.safetensors")
    fresh = copy.deepcopy(base)
    name = ld.load_adapter(fresh, path)
    assert name == "xlora" and sorted(ld.list_adapters(fresh)) == sorted(names)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=IDS).logits, want, rtol=0, atol=0)
        out = fresh.generate(input_ids=IDS[:1, :3], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


@pytest.mark.parametrize("beams", [1, 3])
def test_generation_with_kv_cache_equals_without(tmp_path, beams):
    """Both passes keep a KV cache (the scaling pass its own, reordered with the beams): the same tokens and
    scores as re-running both passes over the whole sequence each step (PEFT's use_cache=False)."""
    _, model, names = loaded(tmp_path)
    f = fuse(model, names, method="xlora", layerwise_scalings=True)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in f.parameters():
            p.normal_()
    kw = dict(input_ids=IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=6, min_new_tokens=6, do_sample=False,
              num_beams=beams, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        cached = model.generate(use_cache=True, **kw)
        plain = model.generate(use_cache=False, **kw)
    assert torch.equal(cached.sequences, plain.sequences)
    # generate hands out fp32 scores
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(plain.scores), rtol=1e-6, atol=1e-6)
    with torch.no_grad(), pytest.raises(ld.AdapterError, match="a KV cache of 4 tokens that this X-LoRA generation"):
        old = model(input_ids=IDS[:, :4], use_cache=True)  # a cache from another sequence ...
        model(input_ids=IDS, use_cache=True)  # ... then a new prompt: the old cache no longer matches
        model(input_ids=IDS[:, :1], cache=old["cache"] if "cache" in old else old["past_key_values"])


def test_classifier_for_other_adapters_is_refused(tmp_path):
    _, model, names = loaded(tmp_path)
    f = fuse(model, names, method="xlora")
    path = save_mixture(model, f, tmp_path / "clf.safetensors", include_adapters=False)
    with torch.no_grad():  # adapter 'b' retrained: other tensors
        next(p for n, p in ld.adapter_parameters(model, "b")).add_(0.1)
    before = {k: v.clone() for k, v in f.modules.state_dict().items()}
    with pytest.raises(ld.AdapterFileError, match=r"'b' differs from the adapter it was trained with"):
        load_mixture_weights(f, model, path)
    assert all(torch.equal(v, f.modules.state_dict()[k]) for k, v in before.items())  # nothing applied


def test_topk_larger_than_adapters_is_refused_before_anything_changes(tmp_path):
    _, model, names = loaded(tmp_path)
    ld.set_adapters(model, ["a"])
    with pytest.raises(ld.AdapterError, match=r"top_k_lora=4 must be between 1 and the number of adapters \(3"):
        fuse(model, names, method="xlora", top_k_lora=4)
    assert all(layer.combiner is None and layer.active in ([], ["a"])
               for _, layer in ld.inject.walker.adapted_layers(model))


def test_dora_adapter_is_refused_by_name(tmp_path):
    _, model, names = loaded(tmp_path, n=2)
    ld.add_adapter(model, ld.AdapterSpec("dora", rank=2, targets=["q_proj"]), name="d")
    with pytest.raises(ld.AdapterError, match=r"adapter 'd' is a dora adapter .* needs additive adapters"):
        fuse(model, [*names, "d"], method="xlora")


def test_adapters_of_another_base_model_are_refused(tmp_path):
    from lora_diffusion import llm
    from lora_diffusion.fusion.mixture import check_same_base

    small, big = tiny_model("llama", hidden=32), tiny_model("llama", hidden=48)
    files = {}
    for name, m in (("small", small), ("big", big)):
        ld.add_adapter(m, ld.AdapterSpec("lora", rank=2, targets=["q_proj"]))
        files[name] = llm.save_llm_adapter(m, tmp_path / f"{name}.safetensors")
    with pytest.raises(ld.AdapterFileError, match=r"big.safetensors: adapter 'big' was trained on base .* hidden_size 48 vs 32"):
        check_same_base(files)


def test_a_unet_is_refused_with_the_reason(tiny_unet):
    for i in range(2):
        ld.add_adapter(tiny_unet, ld.AdapterSpec(rank=2, targets="unet-attn", seed=i), f"u{i}", trainable=False)
    with pytest.raises(ld.AdapterError, match=r"xlora: applies to LLMs .* use method='mole' for diffusion models"):
        fuse(tiny_unet, ["u0", "u1"], method="xlora")
    assert all(layer.combiner is None for _, layer in ld.inject.walker.adapted_layers(tiny_unet))


def test_options_are_peft_xlora_config_fields_and_convert(tmp_path):
    import dataclasses

    from lora_diffusion.fusion.xlora import options_from_peft

    ours = {f.name for f in dataclasses.fields(XLoraFusion.Options)}
    assert ours <= {f.name for f in dataclasses.fields(peft.XLoraConfig)}
    cfg = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=32, adapters={"0": "x", "1": "y"}, top_k_lora=1,
                           layerwise_scalings=True, softmax_temperature=0.5)
    cfg.save_pretrained(tmp_path)  # adapter_config.json, as PEFT writes it
    for src in (cfg, tmp_path / "adapter_config.json"):
        opts, adapters = options_from_peft(src)
        assert adapters == {"0": "x", "1": "y"} and set(opts) == ours
        assert (opts["top_k_lora"], opts["layerwise_scalings"], opts["softmax_temperature"]) == (1, True, 0.5)
