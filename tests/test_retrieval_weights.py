"""AutoLoRA's weight-based retriever: trained on a synthetic library whose themes share weight structure,
it embeds LoRAs of a theme close together and finds LoRAs that carry no metadata at all."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from lora_diffusion.io.files import write_safetensors
from lora_diffusion.retrieval import LoraLibrary, default_embedder
from lora_diffusion.retrieval.weights import (
    EncoderConfig,
    TrainConfig,
    WeightRetriever,
    WeightRetrieverError,
    layer_key,
    read_deltas,
    theme_cosines,
)
from training.train_retriever import main as train_main
from training.train_retriever import train_on_library

pytestmark = pytest.mark.usefixtures("one_thread")

# demo-UNet-like attention layers: (module, in, out)
LAYERS = [(f"down_blocks.0.attentions.0.transformer_blocks.0.attn{a}.to_{p}", 64, 64) for a in (1, 2) for p in "qv"]
LAYERS += [(f"mid_block.attentions.0.transformer_blocks.0.attn1.to_{p}", 128, 128) for p in "qk"]
THEMES = {"cyber": "cyberpunk neon city at night", "ghibli": "studio ghibli anime landscape", "mecha": "giant mecha robot",
          "pixel": "pixel art game sprite", "face": "close-up portrait of a face", "clay": "3d clay render"}
EXTRA = ("detailed", "colorful", "soft light", "high contrast", "sharp")


def synthetic_library(root, per_theme: int = 5, seed: int = 0):
    """Per theme a shared rank-2 ΔW direction per layer; each LoRA = that direction at a random strength + its own
    rank-2 noise, written with random factor mixing (same ΔW, different A/B). The last LoRA of each theme has no
    metadata and a meaningless name. Returns (folder, {file: theme})."""
    g = torch.Generator().manual_seed(seed)
    base = {t: [(torch.randn(o, 2, generator=g), torch.randn(2, i, generator=g)) for _, i, o in LAYERS] for t in THEMES}
    themes, n = {}, 0
    for t, text in THEMES.items():
        for j in range(per_theme):
            tensors = {}
            for (mod, i, o), (u, v) in zip(LAYERS, base[t]):
                up = torch.cat([u * (0.5 + torch.rand(1, generator=g)), torch.randn(o, 2, generator=g) * 0.7], 1)
                down = torch.cat([v, torch.randn(2, i, generator=g)], 0)
                mix = torch.randn(4, 4, generator=g) + 3 * torch.eye(4)
                key = "lora_unet_" + mod.replace(".", "_")
                s = 0.01 * float(torch.rand(1, generator=g) * 10 + 0.1)  # any overall scale
                tensors[f"{key}.lora_up.weight"] = up @ torch.linalg.inv(mix) * s
                tensors[f"{key}.lora_down.weight"] = mix @ down
                tensors[f"{key}.alpha"] = torch.tensor(4.0)
            n += 1
            if j < per_theme - 1:
                name = f"{t}_style_{j}"
                meta = {"ss_output_name": name, "modelspec.description": f"{text}, {EXTRA[j % len(EXTRA)]}",
                        "ss_tag_frequency": json.dumps({f"10_{t}": {w: 5 for w in text.split()[:3]}})}
            else:
                name, meta = f"lora_{n:04d}", {}
            write_safetensors(root / f"{name}.safetensors", tensors, meta)
            themes[f"{name}.safetensors"] = t
    return root, themes


@pytest.fixture(scope="module")
def minilm():
    return default_embedder()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, minilm):
    folder, themes = synthetic_library(tmp_path_factory.mktemp("wlib"))
    lib = LoraLibrary(folder, embedder=minilm)
    out = folder / ".lora_retriever.safetensors"
    retriever, report = train_on_library(lib, out, EncoderConfig(width=64, probes=2), TrainConfig(steps=250, seed=0),
                                         themes=list(THEMES), embedder=minilm, progress=False)
    return lib, themes, retriever, report, out


def test_same_theme_vs_cross_theme_cosine(trained):
    lib, themes, retriever, report, _ = trained
    assert len(report.trained_on) == 24 and sum("description is only" in w for w in report.skipped.values()) == 6
    emb = retriever.embeddings(lib, lib.entries)  # all 30, the 6 never trained on too
    files = sorted(emb)
    same, cross = theme_cosines(torch.stack([emb[f] for f in files]), [themes[f] for f in files])
    held = [f for f in files if f.startswith("lora_")]
    pairs = [(float(emb[h] @ emb[f]), themes[h] == themes[f]) for h in held for f in files if f not in held]
    h_same = sum(c for c, same_theme in pairs if same_theme) / sum(s for _, s in pairs)  # never-trained vs trained
    h_cross = sum(c for c, same_theme in pairs if not same_theme) / sum(not s for _, s in pairs)
    logging.getLogger(__name__).warning(
        "weight embeddings, 30 LoRAs / 6 themes: same theme %.3f, cross theme %.3f (report over described ones: "
        "%.3f vs %.3f; the 6 never trained on vs the rest: %.3f vs %.3f); training top-1 %.2f", same, cross,
        report.same_theme, report.cross_theme, h_same, h_cross, report.top1_train)
    assert same > 0.6 and cross < 0.2 and same - cross > 0.5, (same, cross)
    assert h_same > h_cross + 0.4


def test_loras_without_metadata_found_by_their_weights(trained, minilm):
    lib, themes, retriever, _, _ = trained
    held = {t: f for f, t in themes.items() if f.startswith("lora_")}
    found_text = found_weights = 0
    for t, text in THEMES.items():
        only_text = [m.entry.file for m in lib.retrieve(text, k=5, weights=None)]
        mixed = lib.retrieve(text, k=5)  # "auto": the folder's .lora_retriever.safetensors
        assert all(m.weight_score is not None for m in mixed)
        found_text += held[t] in only_text
        found_weights += held[t] in [m.entry.file for m in mixed]
    logging.getLogger(__name__).warning("LoRAs without metadata in the top 5 of their theme's prompt: %d/6 with "
                                        "weights, %d/6 by text alone", found_weights, found_text)
    assert found_weights >= 5 and found_weights > found_text, (found_weights, found_text)


def test_save_load_roundtrip_and_bad_files(trained, tmp_path, minilm):
    lib, themes, retriever, _, out = trained
    again = WeightRetriever.load(out)
    f = next(iter(themes))
    assert torch.allclose(again.embed_file(lib.folder / f), retriever.embed_file(lib.folder / f), atol=1e-6)
    assert again.embedder_id == "all-MiniLM-L6-v2" and again.info["steps"] == 250
    with pytest.raises(WeightRetrieverError, match="not a weight-retriever file"):
        WeightRetriever.load(lib.folder / f)
    other = tmp_path / "other.safetensors"
    write_safetensors(other, {"lora_unet_x_y.lora_down.weight": torch.ones(2, 3),
                              "lora_unet_x_y.lora_up.weight": torch.ones(3, 2)}, {})
    with pytest.raises(WeightRetrieverError, match="none of its layers"):
        retriever.embed_file(other)


def test_layer_keys_agree_across_formats():
    m = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert layer_key("lora_unet_" + m.replace(".", "_")) == layer_key("unet." + m) == "unet:" + m.replace(".", "_")
    assert layer_key("lora_te_text_model_encoder_layers_0_self_attn_q_proj") == \
        layer_key("text_encoder.text_model.encoder.layers.0.self_attn.q_proj") == \
        layer_key("text_encoder.encoder.layers.0.self_attn.q_proj")
    assert layer_key(m) == layer_key("unet." + m)  # a bare UNet's file


def test_read_deltas_formats(tmp_path):
    from .retrieval_library import build_library

    folder, files = build_library(tmp_path)
    for role in ("ring", "heart", "watercolor"):  # canonical, kohya, diffusers
        d = read_deltas(folder / files[role])
        key = "unet:mid_block_attentions_0_transformer_blocks_0_attn2_to_k"
        assert d[key][0].shape == (128, 4) and d[key][1].shape == (4, 64)
    with pytest.raises(Exception, match="truncated"):
        read_deltas(folder / files["broken"])


def test_command_trains_saves_and_reports(tmp_path, minilm, monkeypatch, caplog):
    import training.train_retriever as tr

    monkeypatch.setattr(tr, "default_embedder", lambda: minilm)
    folder, _ = synthetic_library(tmp_path / "lib", per_theme=2)
    with caplog.at_level(logging.INFO, logger="train_retriever"):
        train_main(["--library", str(folder), "--steps", "20", "--width", "32", "--themes", ",".join(THEMES),
                    "--save-every", "10"])
    assert (folder / ".lora_retriever.safetensors").is_file() and "same theme" in caplog.text
    assert not list(folder.glob("*.tmp")) and not list(folder.glob(".*.tmp"))
    with pytest.raises(SystemExit, match=rf"^error: .*{tmp_path / 'none'}"):
        train_main(["--library", str(tmp_path / "none")])


def test_read_deltas_loha_dense_and_refusals(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = {n: torch.randn(*s, generator=g) for n, s in
         (("w1_a", (6, 2)), ("w1_b", (2, 5)), ("w2_a", (6, 2)), ("w2_b", (2, 5)))}
    f = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    write_safetensors(tmp_path / "loha.safetensors", {f"{f}.hada_{n}": t for n, t in w.items()}, {})
    (dw, none), = read_deltas(tmp_path / "loha.safetensors").values()
    assert none is None and torch.allclose(dw, (w["w1_a"] @ w["w1_b"]) * (w["w2_a"] @ w["w2_b"]))
    write_safetensors(tmp_path / "ia3.safetensors", {f"{f}.weight": torch.ones(6)}, {})
    with pytest.raises(WeightRetrieverError, match="no LoRA/LoCon/LoHa factor pairs"):
        read_deltas(tmp_path / "ia3.safetensors")
    write_safetensors(tmp_path / "tlora.safetensors", {"unet.x.lora_A": torch.ones(2, 3), "unet.x.lora_B": torch.ones(3, 2),
                                                        "unet.x.lora_S": torch.ones(2)},
                      {"format": "lora-diffusion", "variant": "tlora"})
    with pytest.raises(WeightRetrieverError, match="export it to kohya"):
        read_deltas(tmp_path / "tlora.safetensors")
