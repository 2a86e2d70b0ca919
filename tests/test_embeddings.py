"""Pivotal tuning / textual inversion: training only the new rows, exact removal, resume, every file form,
diffusers parity, and bad input that changes nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lora_diffusion as ld
from lora_diffusion import embeddings as E
from lora_diffusion.generate import load_pipeline
from lora_diffusion.io import embeddings as emb_io
from lora_diffusion.io.files import read_safetensors, write_safetensors
from training.config import ConfigError
from training.train_tlora import train

from .tiny_sd import _one_thread, sd_model, sdxl_model, subject, tiny_config  # noqa: F401

MODELS = ["sd_model", "sdxl_model"]


def _pipe(model: Path):
    pipe = load_pipeline(str(model))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _text_state(pipe) -> dict[str, torch.Tensor]:
    out = {}
    for role, (_, te) in E.encoders(pipe).items():
        out.update({f"{role}.{k}": v.clone() for k, v in te.state_dict().items()})
    return out


def _vectors(pipe, name: str = "default") -> dict[str, dict[str, torch.Tensor]]:
    return {e.token: e.vectors for e in E.current_vectors(pipe, name)}


@pytest.fixture(scope="module")
def trained(request, tmp_path_factory):
    """Pivotal tuning (LoRA + 2 placeholder vectors) on the tiny SD and SDXL pipelines, 3 steps."""
    out = {}
    for m in MODELS:
        model = request.getfixturevalue(m)
        images = request.getfixturevalue("subject")
        cfg = tiny_config(model, images, tmp_path_factory.mktemp(f"pivotal-{m}"), variant="lora", max_train_steps=3,
                          train_embedding=True, num_vectors=2, embedding_lr=0.05, prompt_template="a photo of {0}")
        out[m] = train(cfg).outputs
    return out


@pytest.mark.parametrize("model", MODELS)
def test_embedding_training_changes_only_the_new_rows(model, request, subject, tmp_path):  # noqa: F811
    path = request.getfixturevalue(model)
    base = _text_state(_pipe(path))
    cfg = tiny_config(path, subject, tmp_path / "out", variant="none", max_train_steps=3, train_embedding=True,
                      embedding_lr=0.05, initializer_token="dog")
    outputs = train(cfg).outputs
    pipe = _pipe(path)
    ld.load_adapter(pipe, outputs["canonical"])
    tok, te = E.encoders(pipe)["text_encoder"]
    new_id = tok.convert_tokens_to_ids("<sks>")
    after = _text_state(pipe)
    for k, v in base.items():
        if k.endswith("token_embedding.weight"):
            assert torch.equal(after[k][: v.shape[0]], v)  # every old row bit-exact
            dog = v[tok.convert_tokens_to_ids("dog</w>")]
            assert after[k].shape[0] == v.shape[0] + 1 and not torch.equal(after[k][new_id], dog)  # trained from 'dog'
        else:
            assert torch.equal(after[k], v), k  # the rest of the text encoder untouched


@pytest.mark.parametrize("model", MODELS)
def test_remove_restores_tokenizer_and_text_encoder_bit_exactly(model, request, trained):
    pipe = _pipe(request.getfixturevalue(model))
    toks = {r: (t, len(t), dict(t.get_vocab())) for r, (t, _) in E.encoders(pipe).items()}
    modules = {r: te.get_input_embeddings() for r, (_, te) in E.encoders(pipe).items()}
    base = _text_state(pipe)
    name = ld.load_adapter(pipe, trained[model]["canonical"])
    assert "<sks>" in pipe.tokenizer.get_vocab() and "<sks>_1" in pipe.tokenizer.get_vocab()
    assert pipe.maybe_convert_prompt("a photo of <sks>", pipe.tokenizer) == "a photo of <sks> <sks>_1"
    ld.remove_adapters(pipe, [name])
    for r, (tok, n, vocab) in toks.items():
        cur, cur_te = E.encoders(pipe)[r]
        assert cur is tok and len(cur) == n and cur.get_vocab() == vocab
        assert cur_te.get_input_embeddings() is modules[r] and cur_te.config.vocab_size == n
    after = _text_state(pipe)
    assert after.keys() == base.keys() and all(torch.equal(after[k], base[k]) for k in base)
    assert ld.list_adapters(pipe) == []


def test_removing_an_earlier_adapter_keeps_the_later_tokens(sd_model, trained, tmp_path):  # noqa: F811
    pipe = _pipe(sd_model)
    a = ld.load_adapter(pipe, trained["sd_model"]["canonical"], name="a")
    e = E.TokenEmbeddings("<other>", {"text_encoder": torch.randn(1, 32)})
    E.apply_embeddings(pipe, "b", [e])
    ld.remove_adapters(pipe, [a])
    assert "<sks>" not in pipe.tokenizer.get_vocab() and "<other>" in pipe.tokenizer.get_vocab()
    assert torch.equal(_vectors(pipe, "b")["<other>"]["text_encoder"], e.vectors["text_encoder"])


def test_resume_restores_embeddings_and_their_optimizer_state(sd_model, subject, tmp_path):  # noqa: F811
    kw = dict(variant="lora", max_train_steps=4, train_embedding=True, embedding_lr=0.05, checkpointing_steps=2,
              checkpoints_total_limit=None)
    full = train(tiny_config(sd_model, subject, tmp_path / "full", **kw))
    half = tiny_config(sd_model, subject, tmp_path / "half", **{**kw, "max_train_steps": 2})
    train(half)
    resumed = train(tiny_config(sd_model, subject, tmp_path / "half", **kw, resume_from_checkpoint="latest"))
    assert resumed.first_step == 3 and resumed.losses == full.losses[2:]
    a, _ = read_safetensors(full.outputs["canonical"])
    b, _ = read_safetensors(resumed.outputs["canonical"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(tmp_path / "half" / "checkpoints" / "checkpoint-2" / "shared.pt", weights_only=False)
    emb_group = next(i for i, g in enumerate(state["optimizer"]["param_groups"]) if g["role"] == "embedding")
    pid = state["optimizer"]["param_groups"][emb_group]["params"][0]
    assert state["optimizer"]["state"][pid]["exp_avg"].abs().sum() > 0 and "embeddings" in state


def test_embedding_steps_freeze_the_vectors(sd_model, subject, tmp_path):  # noqa: F811
    kw = dict(variant="lora", train_embedding=True, embedding_lr=0.05)
    stopped = train(tiny_config(sd_model, subject, tmp_path / "a", max_train_steps=3, embedding_steps=1, **kw))
    one = train(tiny_config(sd_model, subject, tmp_path / "b", max_train_steps=1, **kw))
    a, _ = read_safetensors(stopped.outputs["canonical"])
    b, _ = read_safetensors(one.outputs["canonical"])
    key = "bundle_emb.<sks>.string_to_param.*"
    assert torch.equal(a[key], b[key])  # trained for 1 step, then frozen
    assert not torch.equal(a["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B"],
                           b["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B"])


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("form", ["canonical", "kohya", "a1111", "diffusers_emb"])
def test_round_trip_in_every_format(model, form, request, trained, tmp_path):
    src = trained[model][form]
    pipe = _pipe(request.getfixturevalue(model))
    ld.load_adapter(pipe, trained[model]["canonical"], name="ref")
    ref = _vectors(pipe, "ref")["<sks>"]
    fresh = _pipe(request.getfixturevalue(model))
    name = ld.load_adapter(fresh, src, token="<sks>" if form == "diffusers_emb" else None)
    got = _vectors(fresh, name)
    assert list(got) == ["<sks>"] and got["<sks>"].keys() == ref.keys()
    assert all(torch.equal(got["<sks>"][r], ref[r]) for r in ref)
    again = tmp_path / f"again-{form}.safetensors"
    if form in ("a1111", "diffusers_emb"):
        emb_io.save_embeddings(fresh, again, name, "a1111" if form == "a1111" else "diffusers")
    else:
        ld.save_adapter(fresh, again, name, format=form)
    t0, _ = read_safetensors(src)
    t1, _ = read_safetensors(again)
    assert t0.keys() == t1.keys() and all(torch.equal(t0[k], t1[k]) for k in t0)


def test_files_from_the_wild(sd_model, tmp_path):  # noqa: F811
    """A1111 .pt (string_to_param), diffusers learned_embeds, the advanced script's <s0><s1> tokens."""
    pipe = _pipe(sd_model)
    v = torch.randn(2, 32)
    torch.save({"string_to_param": {"*": v}, "name": "mystyle"}, tmp_path / "mystyle.pt")
    assert ld.load_adapter(pipe, tmp_path / "mystyle.pt") == "mystyle"
    assert pipe.maybe_convert_prompt("a mystyle dog", pipe.tokenizer) == "a mystyle mystyle_1 dog"
    write_safetensors(tmp_path / "learned_embeds.safetensors", {"<cat-toy>": v[0]}, {})
    ld.load_adapter(pipe, tmp_path / "learned_embeds.safetensors")
    assert torch.equal(_vectors(pipe, "learned_embeds")["<cat-toy>"]["text_encoder"], v[:1])
    write_safetensors(tmp_path / "adv_emb.safetensors", {"clip_l": v}, {})
    ld.load_adapter(pipe, tmp_path / "adv_emb.safetensors", token="<s0><s1>")
    assert pipe.tokenizer.tokenize("a <s0><s1> dog")[1:3] == ["<s0>", "<s1>"]
    ld.remove_adapters(pipe)
    assert "<s0>" not in pipe.tokenizer.get_vocab() and "mystyle" not in pipe.tokenizer.get_vocab()


# --- bad input: one clear error, nothing changed ---
def test_placeholder_already_in_the_vocabulary(sd_model, subject, tmp_path):  # noqa: F811
    cfg = tiny_config(sd_model, subject, tmp_path / "out", variant="none", train_embedding=True, placeholder_token="dog")
    with pytest.raises(ConfigError, match="token 'dog</w>'|token 'dog' is already a word.*--allow_existing_token"):
        train(cfg)


def test_initializer_of_several_tokens(sd_model, subject, tmp_path):  # noqa: F811
    cfg = tiny_config(sd_model, subject, tmp_path / "out", variant="none", train_embedding=True,
                      initializer_token="snowdog")
    with pytest.raises(ConfigError, match="--initializer_token 'snowdog'.*splits it into .* tokens"):
        train(cfg)


def _unchanged(pipe, base, before):
    assert _text_state(pipe).keys() == base.keys()
    assert all(torch.equal(v, base[k]) for k, v in _text_state(pipe).items())
    assert {r: len(t) for r, (t, _) in E.encoders(pipe).items()} == before
    assert ld.list_adapters(pipe) == []


def test_sd1_embedding_on_sdxl_and_wrong_width(sd_model, sdxl_model, trained, tmp_path):  # noqa: F811
    pipe = _pipe(sdxl_model)
    base, before = _text_state(pipe), {r: len(t) for r, (t, _) in E.encoders(pipe).items()}
    with pytest.raises(E.EmbeddingError, match=r"sks.safetensors: token '<sks>'.*expects 'clip_l' \(32 wide\) and 'clip_g'"):
        ld.load_adapter(pipe, trained["sd_model"]["a1111"])
    with pytest.raises(E.EmbeddingError, match=r"token '<sks>'.*expects"):  # a LoRA bundling SD1 embeddings: no LoRA either
        ld.load_adapter(pipe, trained["sd_model"]["kohya"])
    _unchanged(pipe, base, before)
    sd = _pipe(sd_model)
    write_safetensors(tmp_path / "wide.safetensors", {"emb_params": torch.randn(1, 768)}, {})
    with pytest.raises(E.EmbeddingError, match=r"wide.safetensors: token 'wide'.*shape \(1, 768\).*expects \(1, 32\)"):
        ld.load_adapter(sd, tmp_path / "wide.safetensors")


def test_nan_embedding_and_clashing_tokens(sd_model, trained, tmp_path):  # noqa: F811
    pipe = _pipe(sd_model)
    base, before = _text_state(pipe), {r: len(t) for r, (t, _) in E.encoders(pipe).items()}
    t, meta = read_safetensors(trained["sd_model"]["kohya"])
    t["bundle_emb.<sks>.string_to_param.*"][0, 3] = float("nan")
    write_safetensors(tmp_path / "nan.safetensors", t, meta)
    with pytest.raises(ld.AdapterError, match="nan.safetensors.*(NaN|non-finite|nan)"):
        ld.load_adapter(pipe, tmp_path / "nan.safetensors")
    _unchanged(pipe, base, before)
    with pytest.raises(E.EmbeddingError, match="nan.safetensors: token '<sks>' embedding for text_encoder contains NaN"):
        E.check(pipe, emb_io.from_bundle(pipe, emb_io.split_bundle(t)[1], meta, str(tmp_path / "nan.safetensors")),
                str(tmp_path / "nan.safetensors"))
    ld.load_adapter(pipe, trained["sd_model"]["canonical"], name="first")
    with pytest.raises(E.EmbeddingError, match="token '<sks>' is already loaded \\(by 'first'\\)"):
        ld.load_adapter(pipe, trained["sd_model"]["kohya"], name="second")
    assert ld.list_adapters(pipe) == ["first"]


# --- parity with diffusers (the loader people use) ---
def _image(pipe, prompt: str) -> torch.Tensor:
    from lora_diffusion.generate import install_timestep_hook

    install_timestep_hook(pipe.unet, pipe.scheduler.config.num_train_timesteps)
    g = torch.Generator().manual_seed(7)
    return torch.from_numpy(pipe(prompt, num_inference_steps=3, guidance_scale=3.0, generator=g, height=32, width=32,
                                 output_type="np").images)


def test_kohya_bundle_and_a1111_file_generate_like_diffusers(sd_model, trained):  # noqa: F811
    """Ours: load_adapter of the kohya file (LoRA + bundle_emb) / of the A1111 file. diffusers: load_lora_weights
    of the LoRA keys and load_textual_inversion of the vectors (diffusers ignores bundle_emb). Same image."""
    prompt = "a photo of <sks>"
    tensors, _ = read_safetensors(trained["sd_model"]["kohya"])
    lora_only, raw = emb_io.split_bundle(tensors)
    vectors = raw["<sks>"]["string_to_param.*"]
    ours = _pipe(sd_model)
    ld.load_adapter(ours, trained["sd_model"]["kohya"])
    theirs = _pipe(sd_model)
    theirs.load_lora_weights(lora_only)
    theirs.load_textual_inversion(vectors, token="<sks>", tokenizer=theirs.tokenizer, text_encoder=theirs.text_encoder)
    assert theirs.maybe_convert_prompt(prompt, theirs.tokenizer) == ours.maybe_convert_prompt(prompt, ours.tokenizer)
    a, b = _image(ours, prompt), _image(theirs, prompt)
    assert (a - b).abs().max() < 1e-5 and (a - _image(_pipe(sd_model), prompt)).abs().max() > 1e-3
    # A1111 embedding file: the token is the file's stem ("sks"); diffusers: load_textual_inversion(path, token)
    ours, theirs = _pipe(sd_model), _pipe(sd_model)
    a1111 = trained["sd_model"]["a1111"]
    ld.load_adapter(ours, a1111, token="<emb>")
    theirs.load_textual_inversion(str(a1111), token="<emb>")
    assert (_image(ours, "a photo of <emb>") - _image(theirs, "a photo of <emb>")).abs().max() < 1e-6


# --- the recipe's other levers ---
def test_hue_rotation() -> None:
    from training.data import rotate_hue

    x = torch.rand(3, 5, 5) * 2 - 1
    assert torch.allclose(rotate_hue(x, 360.0), x, atol=1e-5) and rotate_hue(x, 0.0) is x
    gray = torch.full((3, 2, 2), 0.2)
    assert torch.allclose(rotate_hue(gray, 90.0), gray, atol=1e-5)  # no chroma: unchanged
    red = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1)
    assert rotate_hue(red, 120.0).argmax(0).item() != 0  # red turns toward another primary


def test_color_inversion_maps_the_worlds_texture_shades_onto_each_other(tmp_path) -> None:
    """--invert_p: an inverted view is 255 - x; a dark fill's lighter pattern becomes a light fill's darker one,
    exactly the demo world's rule (so a texture seen on one fill is seen with the other polarity too)."""
    from lora_diffusion.demo import world
    from training.config import TLoRAConfig, resolve_defaults
    from training.data import ImageSet

    scene = world.Scene("circle", "purple", "white", texture="dotted")
    world.render(scene, supersample=1).save(tmp_path / "x.png")
    images = ImageSet([tmp_path / "x.png"], 32, ["p"])
    images.invert_p = 0.5
    gen = torch.Generator().manual_seed(0)
    views = [images.draw(gen) for _ in range(64)]
    assert 16 < sum(v.invert for v in views) < 48
    inv = next(v for v in views if v.invert)
    assert torch.allclose(images.pixels(inv), -images.pixels(next(v for v in views if not v.invert)))
    fill = np.array(world.COLORS["purple"], dtype=np.float32)
    assert np.allclose(255 - world._shade(fill), world._shade(255 - fill), atol=1e-3)  # dark -> light fill
    cfg = TLoRAConfig()
    cfg.data.invert_p = 1.5
    with pytest.raises(ConfigError, match="--invert_p"):
        resolve_defaults(cfg, ld.variant_names())


def test_hue_jittered_views_take_their_own_captions(tmp_path) -> None:
    """--jitter_prompt_template: a jittered view is captioned from it (the color word the jitter made wrong is
    gone); without jitter, or without the option, the captions are the usual ones."""
    from lora_diffusion.demo import world
    from training.data import ImageSet
    from training.objectives import Conditioner

    world.render(world.Scene("ring", "red", "white"), supersample=1).save(tmp_path / "x.png")
    images = ImageSet([tmp_path / "x.png"], 32, ["a red sks on a white background"])
    images.jitter_prompts = ["a sks on a white background"]
    cond = Conditioner.__new__(Conditioner)  # prompt() reads only the sets and the class prompt
    cond.sets, cond.class_prompt = {False: images, True: None}, None
    gen = torch.Generator().manual_seed(0)
    assert {cond.prompt(images.draw(gen)) for _ in range(8)} == {"a red sks on a white background"}  # no jitter
    images.hue_jitter = 180.0
    views = [images.draw(gen) for _ in range(8)]
    assert all(v.jitter_prompt and v.hue for v in views)
    assert {cond.prompt(v) for v in views} == {"a sks on a white background"}


def test_jittered_captions_name_the_turned_colors() -> None:
    """--jitter_color_words: a color word becomes the color the hue rotation turned it into (the same rotation as the
    pixels'), with its article; words without hue, other words and unjittered views stay."""
    from training.data import COLOR_WORDS, hue_angle, recolor_caption

    to_purple = hue_angle(COLOR_WORDS["purple"]) - hue_angle(COLOR_WORDS["blue"])  # blue's hue onto purple's
    assert recolor_caption("a blue sks on a white background", to_purple) == "a purple sks on a white background"
    to_orange = hue_angle(COLOR_WORDS["orange"]) - hue_angle(COLOR_WORDS["red"])
    assert recolor_caption("A red sks, gray background", to_orange) == "An orange sks, gray background"
    assert recolor_caption("an orange sks", -to_orange) == "a red sks"
    assert recolor_caption("a blue sks on a yellow background", 0.0) == "a blue sks on a yellow background"
    assert recolor_caption("bluebird and redo on black", 90.0) == "bluebird and redo on black"
    turned = {recolor_caption("blue", d) for d in range(-180, 180, 10)}
    assert turned == {"red", "orange", "yellow", "green", "blue", "purple"}  # a full turn names every hue


def test_conditioner_renames_colors_of_jittered_views_only(tmp_path) -> None:
    """ImageSet.recolor: a jittered view's caption names its turned colors; an unjittered view's is the caption."""
    from lora_diffusion.demo import world
    from training.data import ImageSet, recolor_caption
    from training.objectives import Conditioner

    world.render(world.Scene("ring", "red", "white"), supersample=1).save(tmp_path / "x.png")
    images = ImageSet([tmp_path / "x.png"], 32, ["a red sks on a white background"])
    images.recolor = True
    cond = Conditioner.__new__(Conditioner)  # prompt() reads only the sets and the class prompt
    cond.sets, cond.class_prompt = {False: images, True: None}, None
    gen = torch.Generator().manual_seed(0)
    assert cond.prompt(images.draw(gen)) == "a red sks on a white background"
    images.hue_jitter = 180.0
    views = [images.draw(gen) for _ in range(16)]
    assert [cond.prompt(v) for v in views] == [recolor_caption("a red sks on a white background", v.hue) for v in views]
    assert len({cond.prompt(v) for v in views}) > 2


def test_caption_colors_are_found_and_swapped() -> None:
    """--recolor_p's captions: the subject's and the background's color words are found and replaced, articles fixed."""
    from lora_diffusion.demo import world
    from training.data import COLOR_WORDS, caption_colors, swap_colors

    assert {k: v for k, v in COLOR_WORDS.items() if k != "grey"} == world.COLORS  # the demo world's palette
    assert caption_colors("a blue sks on a white background") == ("blue", "white")
    assert caption_colors("a Red sks , gray background") == ("red", "gray")
    assert caption_colors("a photo of sks") is None and caption_colors("a sks on a red background") is None
    assert swap_colors("a blue sks on a blue background", ("blue", "blue"), ("red", "orange")) == \
        "a red sks on an orange background"
    assert swap_colors("An orange sks , yellow background", ("orange", "yellow"), ("green", "gray")) == \
        "A green sks , gray background"


def test_repainted_views_show_the_colors_their_captions_name(tmp_path) -> None:
    """--recolor_p: a repainted view's subject and background pixels are the colors its caption names (edges mixed
    the same way); captions without colors leave the views, and their random sequence, as without the option."""
    from lora_diffusion.demo import world
    from training.data import COLOR_WORDS, ImageSet, caption_colors
    from training.objectives import Conditioner

    world.render(world.Scene("ring", "blue", "white", size=0.7), supersample=1).save(tmp_path / "x.png")
    images = ImageSet([tmp_path / "x.png"], 32, ["a blue sks on a white background"])
    images.recolor_p, images.hue_jitter = 0.5, 180.0
    cond = Conditioner.__new__(Conditioner)  # prompt() reads only the sets and the class prompt
    cond.sets, cond.class_prompt = {False: images, True: None}, None
    gen = torch.Generator().manual_seed(0)
    views = [images.draw(gen) for _ in range(64)]
    painted = [v for v in views if v.colors]
    assert 16 < len(painted) < 48 and all(v.hue == 0 for v in painted) and all(v.hue for v in views if not v.colors)
    for v in painted[:8]:
        fill, background = caption_colors(cond.prompt(v))
        x = (images.pixels(v) + 1) * 127.5  # (3, 32, 32)
        assert torch.allclose(x[:, 0, 0], torch.tensor(COLOR_WORDS[background], dtype=x.dtype), atol=1.0)
        assert (x - torch.tensor(COLOR_WORDS[fill], dtype=x.dtype).view(3, 1, 1)).abs().amax(0).lt(1.0).sum() > 20
        assert fill != background and fill in world.SHAPE_COLORS
    world.render(world.Scene("circle", "green", "gray", texture="dotted"), supersample=1).save(tmp_path / "t.png")
    noise = (torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()
    Image.fromarray(noise).save(tmp_path / "photo.png")
    for image, caption in (("x.png", "a photo of sks"), ("t.png", "a green sks on a gray background"),
                           ("photo.png", "a red sks on a white background")):  # no colors; a texture; not flat
        other = ImageSet([tmp_path / image], 32, [caption])
        other.hue_jitter = 180.0
        plain = [other.draw(torch.Generator().manual_seed(1)) for _ in range(2)]
        other.recolor_p = 1.0
        assert not other.can_repaint() and [other.draw(torch.Generator().manual_seed(1)) for _ in range(2)] == plain
    from training.config import TLoRAConfig, resolve_defaults

    cfg = TLoRAConfig()
    cfg.data.recolor_p = -0.1
    with pytest.raises(ConfigError, match="--recolor_p"):
        resolve_defaults(cfg, ld.variant_names())
    cfg = TLoRAConfig()
    cfg.data.recolor_exclude = "green/gray#teal/blue"
    with pytest.raises(ConfigError, match="--recolor_exclude: 'teal/blue'"):
        resolve_defaults(cfg, ld.variant_names())


def test_held_out_color_pairs_are_never_painted(tmp_path) -> None:
    """--recolor_exclude: the pairs it names are never drawn; every other pair still is."""
    from lora_diffusion.demo import world
    from training.data import ImageSet, parse_color_pairs

    world.render(world.Scene("ring", "blue", "white"), supersample=1).save(tmp_path / "x.png")
    images = ImageSet([tmp_path / "x.png"], 32, ["a blue sks on a white background"])
    images.recolor_p = 1.0
    images.recolor_exclude = parse_color_pairs("green/gray # Red/blue")
    assert images.recolor_exclude == {("green", "gray"), ("red", "blue")}
    gen = torch.Generator().manual_seed(0)
    seen = {images.draw(gen).colors for _ in range(400)}
    assert len(seen) == 6 * 8 - 2 and not seen & images.recolor_exclude  # 6 hues x 8 other colors, less 2


def test_class_images_drawn_by_the_base_model(sd_model, subject, tmp_path):  # noqa: F811
    """--num_class_images: the base model draws them (cycling the '#' prompts) with .txt captions, then trains on them."""
    cls = tmp_path / "class"
    cfg = tiny_config(sd_model, subject, tmp_path / "out", variant="lora", max_train_steps=2, with_prior_preservation=True,
                      class_data_dir=str(cls), num_class_images=3, class_prompt="a photo of dog#a photo of cat",
                      num_inference_steps=2, hue_jitter=30.0, invert_p=0.5, jitter_prompt_template="a red {0}#{0}",
                      jitter_color_words=True, prompt_template="a red {0} on a white background", recolor_p=0.5)
    train(cfg)  # with the augmentations (inversion, captions of jittered views, their colors renamed, repainting) too
    assert sorted(p.name for p in cls.glob("*.png")) == ["class-00000.png", "class-00001.png", "class-00002.png"]
    assert [(cls / f"class-0000{i}.txt").read_text() for i in range(3)] == ["a photo of dog", "a photo of cat",
                                                                           "a photo of dog"]
    train(tiny_config(sd_model, subject, tmp_path / "again", variant="lora", max_train_steps=1,
                      with_prior_preservation=True, class_data_dir=str(cls), num_class_images=3))
    assert len(list(cls.glob("*.png"))) == 3  # enough already: none drawn


def test_demo_placeholder_rows_are_reserved() -> None:
    """On the demo model pivotal tuning trains the reserved 'sks' row; elsewhere an existing word is refused."""
    import lora_diffusion as ld
    from training.config import TLoRAConfig, resolve_defaults

    cfg = TLoRAConfig()
    cfg.embedding.train_embedding = True
    resolve_defaults(cfg, ld.variant_names())
    assert cfg.data.placeholder_token == "sks" and cfg.embedding.allow_existing_token
    cfg = TLoRAConfig()
    cfg.model.pretrained_model_name_or_path = "some/model"
    cfg.embedding.train_embedding = True
    resolve_defaults(cfg, ld.variant_names())
    assert cfg.data.placeholder_token == "<sks>" and not cfg.embedding.allow_existing_token


def test_a_flat_image_resized_to_the_training_resolution_is_repainted() -> None:
    """The README main job's picture (64 px, resized to 32: resampling rings past both colors along the line through
    them) is a flat red/blue mix, so --recolor_p repaints its views; the wrong caption colors still do not fit."""
    from training.data import COLOR_WORDS, ImageSet, is_two_color, load_image

    ring = Path(__file__).resolve().parents[1] / "assets" / "examples" / "ring" / "ring.png"
    x = load_image(ring, 32)
    assert is_two_color(x, COLOR_WORDS["red"], COLOR_WORDS["blue"])
    assert not is_two_color(x, COLOR_WORDS["red"], COLOR_WORDS["white"])
    images = ImageSet([ring], 32, ["a red sks on a blue background"])
    images.recolor_p = 0.5
    assert images.can_repaint()
    gray, black = (torch.tensor(COLOR_WORDS[c], dtype=x.dtype).view(3, 1, 1) / 127.5 - 1 for c in ("gray", "black"))
    shapes = black.expand(3, 32, 32).clone()
    shapes[:, 8:24, 8:24] = gray
    shapes[:, :8] = black + 1.8 * (gray - black)  # light gray: on the line through gray and black, far past gray
    assert not is_two_color(shapes, COLOR_WORDS["gray"], COLOR_WORDS["black"])
    assert is_two_color(shapes[:, 8:], COLOR_WORDS["gray"], COLOR_WORDS["black"])
