"""A seeded demo-world LoRA library, written the way our trainer and kohya's sd-scripts write files.

Weights are random low-rank factors on a few of the demo UNet's attention layers (real names and shapes):
retrieval by text reads headers only. ``build_library`` returns the folder and the ground truth.

Contents (15 files): 3 concept LoRAs of the held-out shapes (ring, heart, moon), 6 style LoRAs (held-out
textures dotted and checkered, and striped, pastel, neon, watercolor), 4 distractors (one with no metadata
at all), an SDXL file (another base family) and a truncated file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lora_diffusion.core.spec import AdapterSpec
from lora_diffusion.io import canonical
from lora_diffusion.io.files import write_safetensors

# demo UNet attention layers: (module, in, out); attn2.to_k reads the 64-wide text states
DEMO_LAYERS = (
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 64, 64),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 64, 64),
    ("mid_block.attentions.0.transformer_blocks.0.attn2.to_k", 64, 128),
    ("up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v", 64, 64),
)
SDXL_LAYERS = (("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 2048, 640),
               ("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, 1280))


def _factors(g: torch.Generator, i: int, o: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rank, i, generator=g) * 0.1, torch.randn(o, rank, generator=g) * 0.01


def trainer_file(path: Path, g: torch.Generator, meta: dict[str, str], rank: int = 4) -> Path:
    """Canonical file as ``training.train_tlora`` saves it (trigger_word, class_name, prompt_template, ...)."""
    tensors = {}
    for mod, i, o in DEMO_LAYERS:
        a, b = _factors(g, i, o, rank)
        tensors[f"unet.{mod}.lora_A"], tensors[f"unet.{mod}.lora_B"] = a, b
    conv = "down_blocks.0.attentions.0.proj_in"  # a 1x1 conv on the demo model (SD1.x uses conv proj_in too)
    a, b = _factors(g, 64, 64, rank)
    tensors[f"unet.{conv}.lora_A"], tensors[f"unet.{conv}.lora_B"] = a[..., None, None], b[..., None, None]
    entry = canonical.ComponentEntry(AdapterSpec(rank=rank, targets="unet-full"), [m for m, _, _ in DEMO_LAYERS] + [conv],
                                     "UNet2DConditionModel", "default")
    extra = {"base_model": "demo-model", "resolution": "32", "steps": "800", "trainer": "training.train_tlora",
             "variant": "lora", "rank": str(rank), "alpha": str(rank), **meta}
    write_safetensors(path, tensors, canonical.encode_metadata({"unet": entry}, extra))
    return path


def kohya_meta(name: str, tags: dict[str, int], folder: str, version: str = "sd_v1", **extra: str) -> dict[str, str]:
    """The ``ss_*`` keys sd-scripts writes (``ss_base_model_version`` left out for non-SD bases: the demo model)."""
    meta = {"ss_output_name": name, "ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "1",
            "ss_tag_frequency": json.dumps({folder: tags}),
            "ss_dataset_dirs": json.dumps({folder: {"n_repeats": 10, "img_count": 12}}),
            "ss_num_train_images": "120", "ss_learning_rate": "0.0001", "ss_sd_model_name": "demo-sd",
            "modelspec.sai_model_spec": "1.0.0", "modelspec.implementation": "https://github.com/kohya-ss/sd-scripts"}
    if version:
        meta["ss_base_model_version"] = version
    return {**meta, **extra}


def kohya_file(path: Path, g: torch.Generator, meta: dict[str, str], layers=None, rank: int = 4) -> Path:
    tensors = {}
    for mod, i, o in layers or DEMO_LAYERS:
        key = mod if mod.startswith("lora_") else "lora_unet_" + mod.replace(".", "_")
        a, b = _factors(g, i, o, rank)
        tensors |= {f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.alpha": torch.tensor(1.0)}
    write_safetensors(path, tensors, meta)
    return path


def diffusers_file(path: Path, g: torch.Generator, meta: dict[str, str] | None = None, rank: int = 4) -> Path:
    tensors = {}
    for mod, i, o in DEMO_LAYERS:
        a, b = _factors(g, i, o, rank)
        tensors[f"unet.{mod}.lora_A.weight"], tensors[f"unet.{mod}.lora_B.weight"] = a, b
    write_safetensors(path, tensors, meta or {})
    return path


def _tags(*pairs: tuple[str, int]) -> dict[str, int]:
    return dict(pairs)


def build_library(root: Path, seed: int = 0) -> tuple[Path, dict[str, str]]:
    """Write the library under ``root``; returns (folder, {role: relative file}) e.g. {"ring": "concepts/ring.safetensors"}."""
    g = torch.Generator().manual_seed(seed)
    lib = root / "loras"
    files: dict[str, str] = {}

    def put(role: str, rel: str) -> Path:
        files[role] = rel
        return lib / rel

    # concepts: our trainer (canonical) and kohya
    trainer_file(put("ring", "concepts/ring.safetensors"), g, {
        "trigger_word": "sks ring", "placeholder_token": "sks", "class_name": "ring",
        "prompt_template": "a red {0} on a blue background",
        "captions": json.dumps(["a red sks ring on a blue background"])})
    kohya_file(put("heart", "concepts/heart_v2.safetensors"), g, kohya_meta(
        "heart_v2", _tags(("ohwx heart", 12), ("heart shape", 12), ("red", 5), ("white background", 4)), "10_ohwx heart",
        version="", **{"modelspec.title": "Heart shape", "modelspec.trigger_phrase": "ohwx heart"}))
    kohya_file(put("moon", "concepts/crescentMoon-000010.safetensors"), g, kohya_meta(
        "crescentMoon", _tags(("crescent moon", 12), ("moon", 12), ("yellow", 6), ("black background", 5)),
        "12_moon", version="", **{"ss_training_comment": "crescent moon shape, trained on 12 renders"}))
    # styles
    kohya_file(put("dotted", "styles/dotted_texture.safetensors"), g, kohya_meta(
        "dotted_texture", _tags(("dotted texture", 20), ("polka dots", 15), ("pattern", 8)), "10_dotted", version=""))
    trainer_file(put("checkered", "styles/checkered.safetensors"), g, {
        "trigger_word": "checkered", "class_name": "checkered texture",
        "description": "checkered texture style: a checkerboard pattern of squares",
        "captions": json.dumps(["a blue checkered square on a white background"])})
    kohya_file(put("striped", "styles/stripes-v1.safetensors"), g, kohya_meta(
        "stripes", _tags(("striped texture", 20), ("diagonal stripes", 10)), "10_stripes", version=""))
    kohya_file(put("pastel", "styles/pastelStyle.safetensors"), g, kohya_meta(
        "pastelStyle", _tags(("pastel colors", 20), ("soft colors", 9), ("light", 4)), "8_pastel", version="",
        **{"modelspec.description": "soft pastel color palette style"}))
    kohya_file(put("neon", "styles/neon_glow_lora.safetensors"), g, kohya_meta(
        "neon_glow", _tags(("neon glow", 18), ("glowing outlines", 11), ("dark", 3)), "10_neon", version=""))
    wc = diffusers_file(put("watercolor", "styles/wc_style.safetensors"), g, {"name": "wc_style"})
    wc.with_name("wc_style.txt").write_text("Watercolor painting style: soft washes of paint, wet edges, paper texture.\n")
    # distractors
    kohya_file(put("cat", "distractors/cat_photo.safetensors"), g, kohya_meta(
        "cat_photo", _tags(("cat", 30), ("photo", 12), ("fur", 6), ("sitting", 5)), "20_cat", version=""))
    city = kohya_file(put("city", "distractors/cyberpunk-city.safetensors"), g, kohya_meta(
        "cyberpunk-city", _tags(("city", 20), ("night", 9), ("skyscrapers", 7)), "5_city", version=""))
    city.with_name("cyberpunk-city.json").write_text(json.dumps(
        {"description": "futuristic cyberpunk city streets at night", "activation text": "cybercity",
         "sd version": "Unknown", "preferred weight": 0.8, "notes": ""}))
    face = kohya_file(put("face", "distractors/animeFace.safetensors"), g, kohya_meta(
        "animeFace", _tags(("1girl", 30), ("anime", 20), ("portrait", 10)), "10_face", version=""))
    face.with_name("animeFace.civitai.info").write_text(json.dumps(
        {"name": "Anime Face", "trainedWords": ["animeface"], "description": "<p>anime portrait faces</p>",
         "baseModel": "Other", "tags": ["anime", "character"]}))
    diffusers_file(put("unnamed", "distractors/lora_000123.safetensors"), g)  # no metadata, a meaningless name
    # another base family: SDXL (kohya SGM names, 2048-wide cross-attention) with a relevant description
    kohya_file(put("sdxl", "sdxl/ring_xl.safetensors"), g, kohya_meta(
        "ring_xl", _tags(("ring", 12), ("ring shape", 10)), "10_ring", version="sdxl_base_v1-0"), layers=SDXL_LAYERS)
    # a corrupted download: the header says more bytes than the file has
    bad = put("broken", "broken/dotted_old.safetensors")
    good = kohya_file(lib / "broken" / "tmp.safetensors", g, kohya_meta("dotted_old", {"dotted": 3}, "1_d", version=""))
    bad.write_bytes(good.read_bytes()[:-200])
    good.unlink()
    return lib, files


CONCEPTS = {"ring": ("ring", "rings"), "heart": ("heart", "hearts"), "moon": ("crescent moon", "moon")}
STYLES = {"dotted": ("dotted", "polka-dot"), "checkered": ("checkered", "checkerboard"), "striped": ("striped", "stripy"),
          "pastel": ("pastel-colored", "pastel"), "neon": ("neon glowing", "neon"), "watercolor": ("watercolor", "watercolor")}
TEMPLATES = ("a red {s} {c} on a blue background", "{c1} drawn in {s1} style, yellow background",
             "{s} {c}, green on white")


def prompts() -> list[tuple[str, str, str]]:
    """54 fixed prompts (3 concepts x 6 styles x 3 wordings): (prompt, concept role, style role)."""
    out = []
    for c, (c0, c1) in CONCEPTS.items():
        for s, (s0, s1) in STYLES.items():
            for t in TEMPLATES:
                out.append((t.format(c=c0, c1=c1, s=s0, s1=s1), c, s))
    return out
