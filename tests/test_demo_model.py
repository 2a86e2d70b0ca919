"""The embedded demo model: the pipeline folder our code builds loads in stock diffusers and generates;
missing or damaged folders give a clear message; the pretraining command runs, stops and resumes."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from lora_diffusion.demo import model as dm
from lora_diffusion.demo import world
from training import pretrain_demo as pd

TINY = pd.Arch(resolution=16, vae_channels=(8, 16), unet_channels=(16, 32), text_hidden=16, max_length=16)
TINY_FLAGS = ["--resolution", "16", "--vae-channels", "8,16", "--unet-channels", "16,32", "--text-hidden", "16",
              "--max-length", "16"]


pytestmark = pytest.mark.usefixtures("one_thread")  # one intra-op thread, restored after the module


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return pd.build_demo_pipeline(tmp_path_factory.mktemp("demo") / "demo-sd", TINY)


def test_folder_loads_in_stock_diffusers_and_generates(tiny_folder):
    from diffusers import StableDiffusionPipeline

    assert dm.check_model_folder(tiny_folder) == []
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_folder), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    t = time.time()
    image = pipe("a red star on a blue background", num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images[0]
    assert time.time() - t < 20 and image.size == (16, 16)
    assert pipe.unet.config.addition_embed_type == "text" and pipe.scheduler.config.prediction_type == "v_prediction"
    from safetensors import safe_open

    with safe_open(str(next((tiny_folder / "unet").glob("*.safetensors"))), "pt") as f:
        w = f.get_tensor(next(iter(f.keys())))
        assert w.dtype == torch.float32 and torch.equal(w.half().float(), w)  # fp16 values, fp32 storage
    info = dm.demo_model_info(tiny_folder)
    assert info["heldout_shapes"] == list(world.HELDOUT_SHAPES) and info["trained"] is False


def test_tokenizer_is_word_level_with_placeholders(tiny_folder):
    pipe = dm.load_demo_pipeline(tiny_folder)
    tok = pipe.tokenizer
    ids = tok("A red <v1> star, sks xyzzy").input_ids
    words = tok.convert_ids_to_tokens(ids)
    assert words == ["<|startoftext|>", "a", "red", "<v1>", "star", ",", "sks", "<|unk|>", "<|endoftext|>"]
    assert pipe.text_encoder.config.vocab_size == len(tok)
    for p in world.PLACEHOLDERS:
        assert len(tok(p, add_special_tokens=False).input_ids) == 1


def test_missing_and_damaged_models_say_how_to_rebuild(tmp_path, tiny_folder, monkeypatch):
    monkeypatch.setenv(dm.ENV_ASSETS, str(tmp_path / "no-assets"))
    with pytest.raises(dm.DemoModelError, match=r"missing.*python -m training\.pretrain_demo"):
        dm.default_model_path()
    with pytest.raises(dm.DemoModelError, match=r"python -m training\.pretrain_demo"):
        dm.load_demo_pipeline()
    assert dm.default_model_path(check=False) == tmp_path / "no-assets" / dm.DEMO_MODEL_DIRNAME

    import shutil

    broken = tmp_path / "assets" / dm.DEMO_MODEL_DIRNAME
    shutil.copytree(tiny_folder, broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-100])
    monkeypatch.setenv(dm.ENV_ASSETS, str(tmp_path / "assets"))
    with pytest.raises(dm.DemoModelError, match=r"damaged.*unet.*truncated.*python -m training\.pretrain_demo"):
        dm.default_model_path()
    (broken / "model_index.json").write_text("{not json")
    assert any("model_index.json is not valid JSON" in p for p in dm.check_model_folder(broken))


@pytest.mark.slow  # a fresh interpreter imports torch (seconds; tens of seconds on a busy machine)
def test_library_does_not_import_training():
    code = ("import sys, lora_diffusion.demo.model, lora_diffusion.demo.evaluator, lora_diffusion.demo.world; "
            "bad = [m for m in sys.modules if m == 'training' or m.startswith('training.')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_pretrain_command_stops_resumes_and_exports(tmp_path):
    common = [*TINY_FLAGS, "--out", str(tmp_path / "work"), "--model-dir", str(tmp_path / "model"), "--vae-steps", "3",
              "--vae-batch", "4", "--vae-pool", "8", "--bank", "8", "--unet-steps", "4", "--unet-batch", "4",
              "--checkpoint-every", "2", "--measure", "0"]
    assert pd.main([*common, "--max-minutes", "0"]) == 3  # stops after its first step, with a checkpoint
    state = torch.load(tmp_path / "work" / "checkpoint.pt", weights_only=False)
    assert (state["stage"], state["step"]) == ("vae", 1)
    with pytest.raises(SystemExit, match="--resume"):
        pd.main(common)  # refuses to overwrite a run
    with pytest.raises(SystemExit, match="another architecture"):
        pd.main([*common, "--resume", "--unet-channels", "16,16"])
    assert pd.main([*common, "--resume"]) == 0
    assert dm.check_model_folder(tmp_path / "model") == []
    info = json.loads((tmp_path / "model" / "demo_model.json").read_text())
    assert info["trained"] is True and "scaling_factor" in info["metrics"]["vae"]
    pipe = dm.load_demo_pipeline(tmp_path / "model")
    assert pipe.vae.config.scaling_factor == pytest.approx(info["metrics"]["vae"]["scaling_factor"], rel=1e-3)
    assert pipe("a blue circle on a white background", num_inference_steps=2, output_type="np").images.shape == (1, 16, 16, 3)


def test_shipped_demo_model_is_complete_and_small():
    path = dm.default_model_path(check=False)
    if not path.exists():
        pytest.skip("assets/demo-sd not built (python -m training.pretrain_demo)")
    assert dm.check_model_folder(path) == []
    assert sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) <= 20 * 2**20
    info = dm.demo_model_info()
    assert info["trained"] is True and info["vocabulary"] == world.vocabulary()
