"""Pivotal tuning on SD3 (both CLIP encoders), the DiT demo model's defaults and the one flag that names it
(``--model demo-sd3``) in the trainer and the personalization benchmark, on a tiny SD3 pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lora_diffusion as ld
from lora_diffusion import embeddings as E
from lora_diffusion.core.functional import active_rank
from lora_diffusion.demo import model as demo
from lora_diffusion.generate import generate, install_timestep_hook, load_pipeline
from lora_diffusion.io import embeddings as emb_io
from lora_diffusion.io.files import read_safetensors
from training.config import TLoRAConfig, parse_args, resolve_defaults
from training.train_tlora import train

from .tiny_dit import build_tiny_sd3, sd3_model  # noqa: F401
from .tiny_sd import _one_thread, subject, tiny_config  # noqa: F401

FORMS = ["canonical", "kohya", "a1111", "diffusers_emb"]


def _pipe(model: Path):
    pipe = load_pipeline(str(model))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _clip_state(pipe) -> dict[str, torch.Tensor]:
    return {f"{r}.{k}": v.clone() for r, (_, te) in E.encoders(pipe).items() for k, v in te.state_dict().items()}


@pytest.fixture(scope="module")
def pivotal(sd3_model, subject, tmp_path_factory):  # noqa: F811
    """T-LoRA + a 2-vector placeholder on the tiny SD3 pipeline, 3 steps."""
    cfg = tiny_config(sd3_model, subject, tmp_path_factory.mktemp("sd3-pivotal"), variant="tlora", max_train_steps=3,
                      train_embedding=True, num_vectors=2, embedding_lr=0.05, prompt_template="a photo of {0}")
    return train(cfg)


def test_sd3_pivotal_trains_both_clip_encoders_and_only_the_new_rows(sd3_model, pivotal):  # noqa: F811
    pipe = _pipe(sd3_model)
    assert list(E.encoders(pipe)) == ["text_encoder", "text_encoder_2"]  # T5 sees word pieces, no new row
    base = _clip_state(pipe)
    t5 = {k: v.clone() for k, v in pipe.text_encoder_3.state_dict().items()}
    init = {r: te.get_input_embeddings().weight[tok.convert_tokens_to_ids("dog</w>")].clone()
            for r, (tok, te) in E.encoders(pipe).items()}
    ld.load_adapter(pipe, pivotal.outputs["canonical"])
    after = _clip_state(pipe)
    for role, (tok, _) in E.encoders(pipe).items():
        ids = tok.convert_tokens_to_ids(["<sks>", "<sks>_1"])
        rows = after[f"{role}.text_model.embeddings.token_embedding.weight"]
        assert not torch.equal(rows[ids[0]], init[role]) and not torch.equal(rows[ids[1]], init[role])  # trained
    for k, v in base.items():
        n = v.shape[0]
        assert torch.equal(after[k][:n], v), k  # old rows and every other weight bit-exact
    assert all(torch.equal(v, pipe.text_encoder_3.state_dict()[k]) for k, v in t5.items())


@pytest.mark.parametrize("form", FORMS)
def test_sd3_embeddings_round_trip_in_every_format(sd3_model, pivotal, form, tmp_path):  # noqa: F811
    """clip_l/clip_g as SDXL (text_encoder, text_encoder_2), in the canonical file, kohya's bundle, the A1111 and the
    diffusers embedding files: loaded exactly, written again byte-equal (kohya: its embeddings)."""
    src = pivotal.outputs[form]
    tensors, _ = read_safetensors(src)
    if form in ("a1111", "diffusers_emb"):
        assert set(tensors) == {"clip_l", "clip_g"}
    else:
        assert {"bundle_emb.<sks>.clip_l", "bundle_emb.<sks>.clip_g"} <= set(tensors)
    ref_pipe = _pipe(sd3_model)
    ld.load_adapter(ref_pipe, pivotal.outputs["canonical"], name="ref")
    ref = E.current_vectors(ref_pipe, "ref")[0].vectors
    pipe = _pipe(sd3_model)
    name = ld.load_adapter(pipe, src, token="<sks>" if form == "diffusers_emb" else None)
    got = E.current_vectors(pipe, name)
    assert [e.token for e in got] == ["<sks>"] and got[0].names == ["<sks>", "<sks>_1"]
    assert got[0].vectors.keys() == ref.keys() and all(torch.equal(got[0].vectors[r], ref[r]) for r in ref)
    again = tmp_path / "again.safetensors"
    if form in ("a1111", "diffusers_emb"):
        emb_io.save_embeddings(pipe, again, name, "a1111" if form == "a1111" else "diffusers")
    else:
        ld.save_adapter(pipe, again, name, format=form)
    back, _ = read_safetensors(again)
    if form == "kohya":  # its fused-qkv LoRA comes back as the same ΔW at another rank: the embeddings are compared
        back, tensors = ({k: v for k, v in t.items() if k.startswith(emb_io.BUNDLE)} for t in (back, tensors))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_sd3_generate_expands_the_token_and_masks_per_step(sd3_model, pivotal):  # noqa: F811
    """The stock SD3 pipeline has no multi-vector expansion: generate writes `<sks>` out as `<sks> <sks>_1`, and
    the T-LoRA mask follows each denoising step's t; removing the adapter restores the text encoders."""
    pipe = _pipe(sd3_model)
    before = _clip_state(pipe)
    name = ld.load_adapter(pipe, pivotal.outputs["canonical"])
    assert E.expand_prompt(pipe, "a photo of <sks>, on <sks>_1") == "a photo of <sks> <sks>_1, on <sks>_1"
    seen = []
    model = pipe.transformer
    install_timestep_hook(model, 1000)  # before ours: ours reads the t it set
    layer = next(ad for _, lay in ld.api.adapted_layers(model) for ad in lay.adapters.values())
    holder = ld.api.model_state(model).holder
    model.register_forward_pre_hook(lambda m, a: seen.append(layer.mask(holder.current()).sum(-1).flatten()[0]))
    ours = generate(pipe, ["a photo of <sks>"], steps=3, guidance_scale=1.0, seed=0, height=32, width=32)[0]
    want = [active_rank(float(t), 4, 2, 1000) for t in pipe.scheduler.timesteps]  # r(t) at t = 1000 σ of each step
    assert [int(r) for r in seen] == want and len(set(want)) > 1
    g = torch.Generator().manual_seed(0)
    written = pipe("a photo of <sks> <sks>_1", num_inference_steps=3, guidance_scale=1.0, generator=g, height=32,
                   width=32).images[0]
    assert list(ours.getdata()) == list(written.getdata())
    g = torch.Generator().manual_seed(0)
    short = pipe("a photo of <sks>", num_inference_steps=3, guidance_scale=1.0, generator=g, height=32,
                 width=32).images[0]
    assert list(ours.getdata()) != list(short.getdata())  # the second vector matters
    ld.remove_adapters(pipe, [name])
    after = _clip_state(pipe)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.fixture
def demo_dit(sd3_model, tmp_path, monkeypatch):  # noqa: F811
    """A tiny SD3 pipeline standing in for the embedded DiT demo model (assets/demo-sd3) in a temporary assets/."""
    assets = tmp_path / "assets"
    folder = build_tiny_sd3(assets / "demo-sd3")
    (folder / "demo_model.json").write_text(json.dumps({"format": demo.DEMO_FORMAT, "family": "sd3"}))
    (assets / "evaluator").symlink_to(demo.assets_dir() / "evaluator")  # the real one (benchmark)
    monkeypatch.setenv(demo.ENV_ASSETS, str(assets))
    monkeypatch.chdir(tmp_path)  # no local folder called demo-sd3 shadows the name
    return folder


def test_the_flag_names_the_dit_demo_model_and_its_defaults(demo_dit):
    cfg, _, _ = parse_args(TLoRAConfig, ["--model", "demo-sd3", "--variant", "lora"])
    resolve_defaults(cfg, ld.variant_names())
    d = demo.DIT_TRAIN_DEFAULTS
    assert cfg.model.pretrained_model_name_or_path == str(demo_dit) and cfg.model.model_family == "sd3"
    assert cfg.adapter.targets == d["targets"] and cfg.embedding.train_embedding
    assert cfg.optim.learning_rate == pytest.approx(1e-4 * d["lr_scale"])
    assert (cfg.optim.max_train_steps, cfg.data.hue_jitter, cfg.data.recolor_p) == (d["max_train_steps"],
                                                                                    d["hue_jitter"], d["recolor_p"])
    assert cfg.data.placeholder_token == "sks" and cfg.flow.weighting_scheme == "logit_normal"
    assert demo.resolve_demo_name("demo-sd") == str(demo.assets_dir() / demo.DEMO_MODEL_DIRNAME)
    assert demo.resolve_demo_name("my/model") == "my/model"
    import shutil

    from lora_diffusion.generate import ModelLoadError

    shutil.rmtree(demo_dit / "transformer")
    with pytest.raises(ModelLoadError, match="'demo-sd3' names the embedded demo model .*damaged.*pretrain_demo_dit"):
        load_pipeline("demo-sd3")
    (demo_dit.parent.parent / "demo-sd3").mkdir()  # a local folder of that name wins
    assert demo.resolve_demo_name("demo-sd3") == "demo-sd3"


@pytest.mark.slow
def test_trainer_and_benchmark_run_on_the_dit_demo_model(demo_dit, subject, tmp_path):  # noqa: F811
    """`train_tlora --model demo-sd3` with the demo defaults (pivotal tuning, hue jitter), and the personalization
    benchmark with the same flag: T-LoRA and LoRA rows."""
    from benchmarks import personalization as pb

    cfg = tiny_config("demo-sd3", subject, tmp_path / "run", variant="tlora", max_train_steps=2, resolution=None,
                      placeholder_token="<sks>")
    out = train(cfg).outputs
    assert cfg.embedding.train_embedding and cfg.data.hue_jitter == demo.DIT_TRAIN_DEFAULTS["hue_jitter"]
    assert {"canonical", "kohya", "diffusers", "a1111", "diffusers_emb"} <= set(out)
    bench = tmp_path / "bench"
    pb.main(["--model", "demo-sd3", "--variants", "tlora:4,lora:4", "--concepts", "ring", "--seeds", "0",
             "--regimes", "bare", "--sweep", "1,2", "--prompts", "1", "--images", "2", "--sample-steps", "2",
             "--device", "cpu", "--out", str(bench)])
    runs = json.loads((bench / "results.json").read_text())["runs"]
    tl = [r for r in runs if r["variant"] == "tlora:4"]
    assert sorted(r["step"] for r in tl) == [1, 2] and tl[0]["targets"] == demo.DIT_TRAIN_DEFAULTS["targets"]
    assert tl[0]["embedding"] and {r["variant"] for r in runs} == {"base", "tlora:4", "lora:4"}
    assert "| bare | lora:4 | 2 |" in (bench / "table.md").read_text()


def test_sd3_text_encoder_adapters_travel_in_every_file(sd3_model, subject, tmp_path):  # noqa: F811
    """--text_encoder_targets on SD3: a LoRA on both CLIP encoders, in the canonical, kohya (lora_te1/te2) and
    diffusers files, each loading back onto the stock pipeline with the same modules adapted."""
    cfg = tiny_config(sd3_model, subject, tmp_path, variant="lora", max_train_steps=2, train_embedding=True,
                      text_encoder_targets="clip-text")
    out = train(cfg).outputs
    for form in ("canonical", "kohya", "diffusers"):
        pipe = _pipe(sd3_model)
        ld.load_adapter(pipe, out[form])
        counts = [len(list(ld.api.adapted_layers(m))) for m in (pipe.text_encoder, pipe.text_encoder_2,
                                                                 pipe.transformer)]
        assert counts[0] == counts[1] > 0 and counts[2] > 0, form
