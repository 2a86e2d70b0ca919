"""The official T-LoRA FLUX checkpoint (ControlGenAI/T-LoRA flux/train.py: checkpoint-N/lora.pt, AttnProcsLayers keys,
vanilla T-LoRA layers, schedule in ../../logs/hparams.yml) loaded onto a stock FluxPipeline, with its mask."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

import lora_diffusion as ld
from lora_diffusion.core.errors import AdapterFileError
from lora_diffusion.core.functional import active_rank
from lora_diffusion.generate import load_pipeline
from lora_diffusion.io.files import read_safetensors

from .tiny_dit import flux_model, sd3_model  # noqa: F401
from .tiny_sd import _one_thread  # noqa: F401

RANK, MIN_RANK = 8, 2
PROCS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0", "to_q_proj": "add_q_proj",
         "to_k_proj": "add_k_proj", "to_v_proj": "add_v_proj"}


def official_state_dict(transformer, seed: int = 0) -> dict[str, torch.Tensor]:
    """What AttnProcsLayers(transformer.attn_processors).state_dict() holds after the official FLUX trainer: all seven
    LoRA layers (down (r, inner), up (inner, r)) in every '...attn.processor', single-stream blocks included."""
    g = torch.Generator().manual_seed(seed)
    inner = transformer.inner_dim
    out = {}
    for name in transformer.attn_processors:
        for p in PROCS:
            out[f"{name}.{p}_lora.down.weight"] = torch.randn(RANK, inner, generator=g) / RANK
            out[f"{name}.{p}_lora.up.weight"] = torch.randn(inner, RANK, generator=g) * 0.3
    return out


def write_run(folder: Path, sd: dict[str, torch.Tensor], tlora: bool = True) -> Path:
    """{exp}/checkpoint-100/lora.pt and {exp}/logs/hparams.yml as the official trainer lays them out."""
    ckpt = folder / "checkpoint-100"
    ckpt.mkdir(parents=True)
    torch.save(sd, ckpt / "lora.pt")
    (folder / "logs").mkdir()
    (folder / "logs" / "hparams.yml").write_text(f"tlora: {str(tlora).lower()}\nrank: {RANK}\nmin_rank: {MIN_RANK}\n"
                                                 "pretrained_model_name_or_path: black-forest-labs/FLUX.1-dev\n")
    return ckpt


def _inputs():
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 64, 16, generator=g), encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), guidance=torch.tensor([3.5]),
                txt_ids=torch.zeros(5, 3), img_ids=torch.zeros(64, 3))


@pytest.mark.parametrize("as_folder", [False, True])
def test_official_flux_checkpoint_equals_its_formula_at_each_timestep(flux_model, tmp_path, as_folder):  # noqa: F811
    """y = W x + up(down(x) ⊙ m_t), m_t the first r(t) = ⌊(1000 - t)(r - r_min)/1000⌋ + r_min ranks (official
    get_rank_by_timestep on the scheduler's t): computed here by merging the masked factors into a plain copy."""
    pipe = load_pipeline(flux_model)
    sd = official_state_dict(pipe.transformer)
    ckpt = write_run(tmp_path / "00001-ab12-dog_tlora8", sd)
    name = ld.load_adapter(pipe, ckpt if as_folder else ckpt / "lora.pt")
    spec = ld.get_spec(pipe.transformer, name)
    assert spec.variant == "tlora" and spec.options["min_rank"] == MIN_RANK and spec.options["ortho"] is False
    mods = sorted(ld.api.model_state(pipe.transformer).modules[name])
    # the joint block: 7 projections; the single block: q/k/v (its other four official layers are never called)
    assert mods == sorted([f"transformer_blocks.0.attn.{m}" for m in PROCS.values()] +
                          [f"single_transformer_blocks.0.attn.{m}" for m in ("to_q", "to_k", "to_v")])
    ref = load_pipeline(flux_model).transformer
    for t in (1000.0, 761.45, 500.0, 120.0, 0.0):
        r = active_rank(t, RANK, MIN_RANK, 1000)
        assert r == int((1000 - t) * (RANK - MIN_RANK) / 1000) + MIN_RANK  # the official formula
        merged = load_pipeline(flux_model).transformer
        with torch.no_grad():
            for key in [k for k in sd if k.endswith("down.weight")]:
                block, proc = key.split(".attn.processor.")
                p = proc.split("_lora.")[0]
                if block.startswith("single_") and p not in ("to_q", "to_k", "to_v"):
                    continue
                lin = merged.get_submodule(f"{block}.attn.{PROCS[p]}")
                up = sd[key.replace("down.weight", "up.weight")]
                lin.weight += up[:, :r] @ sd[key][:r]
            want = merged(**_inputs(), timestep=torch.tensor([t / 1000]), return_dict=False)[0]
            ld.set_timestep(pipe.transformer, t, 1000)
            got = pipe.transformer(**_inputs(), timestep=torch.tensor([t / 1000]), return_dict=False)[0]
            base = ref(**_inputs(), timestep=torch.tensor([t / 1000]), return_dict=False)[0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert (got - base).abs().max() > 1e-3


def test_plain_lora_run_has_no_mask(flux_model, tmp_path):  # noqa: F811
    pipe = load_pipeline(flux_model)
    ckpt = write_run(tmp_path / "run", official_state_dict(pipe.transformer), tlora=False)
    name = ld.load_adapter(pipe, ckpt)
    assert ld.get_spec(pipe.transformer, name).options["min_rank"] == RANK


def test_refusals_leave_the_model_unchanged(flux_model, tmp_path):  # noqa: F811
    pipe = load_pipeline(flux_model)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    sd = official_state_dict(pipe.transformer)
    sd["transformer_blocks.7.attn.processor.to_q_lora.down.weight"] = torch.zeros(RANK, pipe.transformer.inner_dim)
    sd["transformer_blocks.7.attn.processor.to_q_lora.up.weight"] = torch.zeros(pipe.transformer.inner_dim, RANK)
    ckpt = write_run(tmp_path / "more-blocks", sd)
    with pytest.raises(AdapterFileError, match=r"key 'transformer_blocks.7.attn.processor.to_q_lora.down.weight': this "
                       "LoRA is for Flux and adapts transformer_blocks.7; the model is Flux with 1 double-stream"):
        ld.load_adapter(pipe, ckpt)
    evil = tmp_path / "evil" / "checkpoint-1"
    evil.mkdir(parents=True)
    (evil / "lora.pt").write_bytes(pickle.dumps({"x": object()}))
    with pytest.raises(AdapterFileError, match="not a tensors-only torch file"):
        ld.load_adapter(pipe, evil / "lora.pt")
    assert ld.list_adapters(pipe) == []
    after = pipe.transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# --- our Flux T-LoRA written in the official FLUX layout ------------------------------------------------------------
OFFICIAL_TARGETS = [r"re:.*transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj)"]


class _OfficialLoRALinear(torch.nn.Module):
    """The shapes of the official ``flux/model/lora.py`` LoRALinearLayer (down: Linear(in, r), up: Linear(r, out))."""

    def __init__(self, inner: int, rank: int) -> None:
        super().__init__()
        self.down, self.up = torch.nn.Linear(inner, rank, bias=False), torch.nn.Linear(rank, inner, bias=False)


class _OfficialProcessor(torch.nn.Module):
    """FluxLoraAttnProcessor's seven LoRA layers (every processor has all seven, single-stream blocks included)."""

    def __init__(self, inner: int, rank: int) -> None:
        super().__init__()
        for p in PROCS:
            setattr(self, f"{p}_lora", _OfficialLoRALinear(inner, rank))


def _flux_tlora(pipe, ortho: bool) -> None:
    from .conftest import perturb

    spec = ld.AdapterSpec("tlora", rank=RANK, alpha=4, targets=OFFICIAL_TARGETS, seed=2,
                          options={"min_rank": MIN_RANK, "ortho": ortho})
    ld.add_adapter(pipe.transformer, spec, "t")
    perturb(pipe.transformer, "t", std=0.05)


@pytest.mark.parametrize("ortho", [False, True], ids=["vanilla", "ortho"])
@pytest.mark.parametrize("layout", ["run", "file"])
def test_our_flux_tlora_official_export_round_trip(flux_model, tmp_path, ortho, layout):  # noqa: F811
    """Our Flux T-LoRA -> the official FLUX layout (a run folder: checkpoint-0/lora.pt + logs/hparams.yml, or one
    .safetensors with tlora_* metadata) -> our reader: the same modules, schedule and outputs at every timestep.
    The vanilla run loads strictly into the official processors' layers (diffusers' AttnProcsLayers, as the official
    run_inference.py does); the ortho one uses the SDXL trainer's ortho names, which the official FLUX code has no
    layer for."""
    from diffusers.loaders import AttnProcsLayers

    pipe = load_pipeline(flux_model)
    _flux_tlora(pipe, ortho)
    out = tmp_path / ("run" if layout == "run" else "t.safetensors")
    weights = ld.save_adapter(pipe, out, "t", format="tlora-official")
    if layout == "run":
        assert weights == out / "checkpoint-0" / "lora.pt"
        hp = json.loads((out / "logs" / "hparams.yml").read_text())  # JSON is YAML
        assert (hp["tlora"], hp["rank"], hp["min_rank"], hp["output_dir"]) == (True, RANK, MIN_RANK, str(out.resolve()))
        sd = torch.load(weights, weights_only=True)
    else:
        sd, meta = read_safetensors(weights)
        assert (meta["tlora_rank"], meta["tlora_min_rank"]) == (str(RANK), str(MIN_RANK))
    procs = pipe.transformer.attn_processors
    assert {k.split("_lora.")[0].rsplit(".", 1)[0] for k in sd} == set(procs)  # all blocks, all seven layers
    if not ortho:
        layers = AttnProcsLayers({n: _OfficialProcessor(pipe.transformer.inner_dim, RANK) for n in procs})
        layers.load_state_dict(sd)  # strict, as the official inference loads lora.pt
    again = load_pipeline(flux_model)
    ld.load_adapter(again, weights, name="t")
    spec = ld.get_spec(again.transformer, "t")
    assert (spec.rank, spec.options["min_rank"], spec.options["ortho"]) == (RANK, MIN_RANK, ortho)
    assert sorted(ld.api.model_state(again.transformer).modules["t"]) == sorted(
        ld.api.model_state(pipe.transformer).modules["t"])  # zero layers (not adapted here) are not loaded back
    with torch.no_grad():
        for t in (1000.0, 761.45, 500.0, 120.0, 0.0):
            ld.set_timestep(pipe.transformer, t, 1000)
            ld.set_timestep(again.transformer, t, 1000)
            want = pipe.transformer(**_inputs(), timestep=torch.tensor([t / 1000]), return_dict=False)[0]
            got = again.transformer(**_inputs(), timestep=torch.tensor([t / 1000]), return_dict=False)[0]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_flux_official_export_refusals(flux_model, tmp_path):  # noqa: F811
    """What the official FLUX layout cannot hold is refused with the module / option named, and nothing written:
    to_add_out (no official layer), an MLP, a rank exponent."""
    for targets, opts, match in (
            (["re:.*transformer_blocks\\.0\\.attn\\.to_add_out"], {}, r"module 'transformer_blocks\.0\.attn\.to_add_out': "
             "the official T-LoRA FLUX layout adapts only"),
            (["re:.*ff\\.net\\.2"], {}, r"module 'transformer_blocks\.0\.ff\.net\.2'"),
            (OFFICIAL_TARGETS, {"rank_exponent": 0.5}, r"rank_exponent 0\.5: the official T-LoRA FLUX schedule")):
        pipe = load_pipeline(flux_model)
        ld.add_adapter(pipe.transformer, ld.AdapterSpec("tlora", rank=4, targets=targets,
                                                        options={"min_rank": 2, "ortho": False, **opts}), "t")
        with pytest.raises(AdapterFileError, match=match):
            ld.save_adapter(pipe, tmp_path / "run", "t", format="tlora-official")
        assert not (tmp_path / "run").exists()


def test_official_export_of_an_sd3_tlora_is_refused(sd3_model, tmp_path):  # noqa: F811
    pipe = load_pipeline(sd3_model)
    ld.add_adapter(pipe.transformer, ld.AdapterSpec("tlora", rank=4, targets=OFFICIAL_TARGETS,
                                                    options={"min_rank": 2, "ortho": False}), "t")
    with pytest.raises(AdapterFileError, match=r"a T-LoRA on a SD3 transformer; the official T-LoRA layouts are for "
                       "SDXL UNets and Flux.1 transformers"):
        ld.save_adapter(pipe, tmp_path / "run", "t", format="tlora-official")
    assert not (tmp_path / "run").exists()
