"""Every linear variant on tiny Llama and GPT-2 causal LMs: trains (loss falls), saves, reloads identically;
the trainer CLI end to end (outputs, exact resume, no overwrite, LoRA+, packing, checkpointing); PEFT export."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import lora_diffusion as ld
from lora_diffusion import llm
from training import train_llm
from training.config import ConfigError
from training.llm_data import char_tokenizer, collate, load_examples

from .conftest import FIXTURES, train_losses

TRAIN = FIXTURES / "llm_shout_train.jsonl"
EVAL = FIXTURES / "llm_shout_eval.jsonl"
RANKS = {"vera": 16}
LRS = {"vera": 5e-2, "adalora": 5e-2}  # AdaLoRA: λ = 0 and P, Q ~ N(0, 0.02²) at init: slow start


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one intra-op thread (conftest)


def tiny_model(arch: str, dtype: torch.dtype = torch.float32, hidden: int = 32):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    special = dict(pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **special)
        return LlamaForCausalLM(cfg).to(dtype).eval()
    cfg = GPT2Config(vocab_size=128, n_embd=hidden, n_layer=2, n_head=4, n_positions=64, **special)
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def make_tiny_folder(path: Path, arch: str = "llama", hidden: int = 32) -> Path:
    """A causal LM folder (random weights) with the character tokenizer: a stand-in for a hub model."""
    tiny_model(arch, hidden=hidden).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def batch(tok):
    return collate(load_examples(TRAIN, tok, 64)[:8], tok.pad_token_id)


def spec_for(variant: str) -> ld.AdapterSpec:
    return ld.AdapterSpec(variant=variant, rank=RANKS.get(variant, 4), targets="llm", seed=1)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", llm.llm_variant_names())
def test_variant_trains_saves_and_reloads(tmp_path, arch, variant, batch):
    model = tiny_model(arch)
    names = ld.add_adapter(model, spec_for(variant))
    assert len(names) == (14 if arch == "llama" else 8)  # 7 linears (llama) / c_attn, c_proj x2, c_fc (gpt2) per layer
    opt = torch.optim.AdamW(ld.param_groups(model, LRS.get(variant, 1e-2)))
    model.train()
    losses = train_losses(model, batch, opt, 8)
    assert losses[-1] < losses[0] - 0.05, losses
    model.eval()
    path = llm.save_llm_adapter(model, tmp_path / "a.safetensors")
    fresh = tiny_model(arch)
    llm.load_llm_adapter(fresh, path, name="default")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, fresh(**batch).logits)


@pytest.mark.parametrize("variant", [v for v in ld.variant_names() if ld.get_variant(v).uses_context])
def test_timestep_variants_are_refused_cleanly(tmp_path, variant):
    with pytest.raises(ld.AdapterError, match=rf"variant '{variant}' reads a per-call context .* diffusion timestep"):
        llm.check_llm_variant(variant)
    with pytest.raises(ld.AdapterError, match="diffusion timestep"):  # before any model is loaded
        train_llm.main(["--train_file", str(TRAIN), "--variant", variant, "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_adapter_for_another_base_model_is_refused(tmp_path):
    small, wide = tiny_model("llama"), tiny_model("llama", hidden=48)
    ld.add_adapter(small, spec_for("lora"))
    path = llm.save_llm_adapter(small, tmp_path / "a.safetensors")
    with pytest.raises(ld.AdapterFileError, match=r"trained on base model .*hidden_size 32 vs 48"):
        llm.load_llm_adapter(wide, path)
    assert ld.list_adapters(wide) == []
    with pytest.raises(ld.AdapterFileError, match="LlamaForCausalLM|model_type"):  # another architecture
        llm.load_llm_adapter(tiny_model("gpt2"), path)


def test_model_whose_modules_match_no_target(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(ld.TargetError, match=r"target patterns \['c_attn'\] match no module of LlamaForCausalLM.*q_proj"):
        ld.add_adapter(model, ld.AdapterSpec(targets=["c_attn"]))
    folder = make_tiny_folder(tmp_path / "m")
    with pytest.raises(ld.TargetError, match=r"\['to_q', 'to_v'\] match no module"):
        train_llm.main(["--model", str(folder), "--train_file", str(TRAIN), "--targets", "to_q,to_v",
                        "--output_dir", str(tmp_path / "o"), "--report_to", "none", "--no-progress"])
    assert not (tmp_path / "o" / "adapter.safetensors").exists()


def test_loraplus_puts_B_at_ratio_times_the_learning_rate():
    model = tiny_model("llama")
    ld.add_adapter(model, spec_for("lora"))
    cfg = train_llm.LLMConfig()
    cfg.optim.learning_rate, cfg.optim.loraplus_lr_ratio = 1e-3, 16.0
    opt = train_llm.build_optimizer(cfg, model, torch.device("cpu"))
    lrs = {g["role"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"A": 1e-3, "B": 16e-3}
    b_params = {id(p) for g in opt.param_groups if g["role"] == "B" for p in g["params"]}
    assert all(id(p) in b_params for n, p in ld.adapter_parameters(model) if n.endswith("lora_B"))


# --- the trainer CLI ---
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("tiny") / "llama")


def cli(folder: Path, out: Path, *extra: str) -> dict:
    return train_llm.main(["--model", str(folder), "--train_file", str(TRAIN), "--eval_file", str(EVAL),
                           "--output_dir", str(out), "--max_length", "64", "--lr", "1e-2", "--train_batch_size", "4",
                           "--no-progress", *extra])


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "adapter.safetensors")


def test_cli_trains_evaluates_and_writes_outputs(folder, tmp_path):
    out = tmp_path / "run"
    m = cli(folder, out, "--max_train_steps", "12", "--checkpointing_steps", "6", "--eval_steps", "6")
    assert m["after"]["eval_loss"] < m["before"]["eval_loss"]
    assert m["after"]["eval_ppl"] == pytest.approx(2.718281828 ** m["after"]["eval_loss"], rel=1e-6)
    assert (out / "adapter.safetensors").is_file() and (out / "config.yaml").is_file()
    assert json.loads((out / "metrics.json").read_text())["steps"] == 12
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-6"]
    assert list((out / "logs").rglob("events.out.tfevents.*")), "TensorBoard events"
    # nothing is written over an existing output without --overwrite
    before = (out / "adapter.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        cli(folder, out, "--max_train_steps", "2")
    assert (out / "adapter.safetensors").read_bytes() == before
    cli(folder, out, "--max_train_steps", "2", "--overwrite", "--report_to", "none")
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2


def test_resume_retraces_the_uninterrupted_run_exactly(folder, tmp_path):
    common = ["--lora_dropout", "0.1", "--checkpointing_steps", "3", "--report_to", "none", "--eval_fraction", "0"]
    cli(folder, tmp_path / "straight", "--max_train_steps", "7", *common)
    cli(folder, tmp_path / "cut", "--max_train_steps", "3", *common)
    cli(folder, tmp_path / "cut", "--max_train_steps", "7", "--resume_from_checkpoint", "latest", *common)
    a, b = adapter_tensors(tmp_path / "straight"), adapter_tensors(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(Exception, match="another run"):  # a checkpoint of another configuration is refused
        cli(folder, tmp_path / "cut", "--max_train_steps", "8", "--resume_from_checkpoint", "latest", "--rank", "4", *common)


@pytest.mark.parametrize("variant", ["dora", "loha"])
def test_cli_packing_accumulation_checkpointing_and_loraplus(folder, tmp_path, variant):
    m = cli(folder, tmp_path / "o", "--variant", variant, "--packing", "--gradient_accumulation_steps", "2",
            "--gradient_checkpointing", "--loraplus_lr_ratio", "4", "--max_train_steps", "6", "--report_to", "none",
            "--checkpointing_steps", "0")
    assert m["steps"] == 6 and m["after"]["eval_loss"] < m["before"]["eval_loss"]


# --- PEFT export ---
@pytest.mark.parametrize("variant", llm.PEFT_VARIANTS)
def test_peft_folder_loads_in_peft_with_identical_outputs(tmp_path, variant, batch):
    peft = pytest.importorskip("peft")
    base = tiny_model("llama", torch.float64)
    ours = copy.deepcopy(base)
    ld.add_adapter(ours, spec_for(variant))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in ld.adapter_parameters(ours):
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    try:
        folder = llm.save_peft_adapter(ours, tmp_path / "peft")
    except NotImplementedError as e:
        pytest.skip(str(e))
    assert (folder / "adapter_config.json").is_file()
    pm = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    with torch.no_grad():
        ref, got = ours(**batch).logits, pm(**batch).logits
    assert torch.allclose(ref, got, atol=1e-10, rtol=0), (ref - got).abs().max()
    assert not torch.equal(ref, tiny_model("llama", torch.float64)(**batch).logits)  # the adapter does something


def test_merge_and_save_writes_a_plain_model_with_the_same_outputs(tmp_path, batch, tok):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    ld.add_adapter(model, spec_for("dora"))
    with torch.no_grad():
        for _, p in ld.adapter_parameters(model):
            p.add_(0.05 * torch.randn_like(p))
        ref = model(**batch).logits
    out = llm.merge_and_save(model, tok, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, ref, atol=1e-5)
    with pytest.raises(FileExistsError, match="overwrite"):
        llm.merge_and_save(merged, tok, out)


def test_singlora_before_is_the_base_model(folder, tmp_path):
    """SingLoRA's "before" is measured at step 0 (u = 0: the base model, as every other variant's), not at the
    inference convention u = 1 (its random A·Aᵀ at full strength)."""
    base = cli(folder, tmp_path / "lora", "--max_train_steps", "1", "--report_to", "none")["before"]["eval_loss"]
    sing = cli(folder, tmp_path / "sing", "--max_train_steps", "1", "--report_to", "none", "--variant", "singlora")
    assert sing["before"]["eval_loss"] == pytest.approx(base, rel=1e-6)


def test_squeeze_then_continue_training_from_the_file(folder, tmp_path):
    """LoRA-Squeeze, then train_llm --init_adapter: the run starts from the squeezed rank-2 LoRA (its "before" is that
    adapter's loss, not the base model's) and saves a rank-2 LoRA."""
    from transformers import AutoModelForCausalLM

    first = cli(folder, tmp_path / "a", "--max_train_steps", "6", "--report_to", "none")
    model = AutoModelForCausalLM.from_pretrained(folder)
    sq = tmp_path / "sq.safetensors"
    ld.squeeze_file(tmp_path / "a" / "adapter.safetensors", sq, energy=1.0, model=model)  # exact: all energy
    m = cli(folder, tmp_path / "b", "--max_train_steps", "2", "--report_to", "none", "--init_adapter", str(sq))
    assert m["before"]["eval_loss"] == pytest.approx(first["after"]["eval_loss"], rel=1e-4)
    with pytest.raises(ConfigError, match="--init_adapter: .*no such file"):
        cli(folder, tmp_path / "c", "--init_adapter", str(tmp_path / "missing.safetensors"))
