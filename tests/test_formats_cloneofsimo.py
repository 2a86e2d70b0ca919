"""cloneofsimo/lora files (``save_safeloras_with_embeds``): ``unet:<i>:up/down``, ``text_encoder:<i>:up/down`` in
that library's traversal order (``_find_modules_v2``: classes from the metadata in ``modules()`` order, then their
Linear (+ Conv2d for ResnetBlock2D) layers in ``named_modules()`` order), ranks in ``<comp>:<i>:rank``, pivotal-tuning
tokens ``<s1>`` with metadata ``"<embed>"``. Built on the embedded demo model (real tokenizer); ΔW = up·down."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import lora_diffusion as ld
from lora_diffusion.demo.model import load_demo_pipeline
from lora_diffusion.io.files import write_safetensors

from .test_formats_helpers import adaptable_weights, max_rel_diff

pytestmark = pytest.mark.usefixtures("one_thread")
UNET_DEFAULT = ["CrossAttention", "Attention", "GEGLU"]
UNET_EXTENDED = ["ResnetBlock2D", "CrossAttention", "Attention", "GEGLU"]


@pytest.fixture(scope="module")
def demo():
    return load_demo_pipeline()


def _expected_order(pipe) -> dict[str, list[str]]:
    """Written out from the library's rule for this UNet layout (not computed by the code under test):
    per transformer block attn1 q/k/v/out, attn2 q/k/v/out, GEGLU proj; down_blocks, then up_blocks, then mid_block
    (the UNet registers up_blocks before mid_block); text encoder k/v/q/out (CLIPAttention's definition order)."""
    blocks = [n for n, _ in pipe.unet.named_modules() if n.endswith("transformer_blocks.0")]
    attn = [f"{b}.{a}.{p}" for b in blocks for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")]
    unet = [m for b in blocks for m in [x for x in attn if x.startswith(b + ".")] + [f"{b}.ff.net.0.proj"]]
    te = [f"encoder.layers.{i}.self_attn.{p}" for i in range(pipe.text_encoder.config.num_hidden_layers)
          for p in ("k_proj", "v_proj", "q_proj", "out_proj")]
    assert blocks[-1].startswith("mid_block")
    return {"unet": unet, "text_encoder": te}


def _file(tmp_path, pipe, order: dict[str, list[str]], targets: dict[str, list[str]], seed=0):
    g = torch.Generator().manual_seed(seed)
    w = {c: adaptable_weights(pipe.components[c]) for c in order}
    sd, meta, want = {}, {}, copy.deepcopy(w)
    for comp, mods in order.items():
        meta[comp] = json.dumps(targets[comp])
        for i, m in enumerate(mods):
            shape = w[comp][m].shape
            r = 2 + i % 3
            down = torch.randn(r, *shape[1:], generator=g) * 0.1
            up = torch.randn(shape[0], r, *([1] * (len(shape) - 2)), generator=g) * 0.1
            sd[f"{comp}:{i}:down"], sd[f"{comp}:{i}:up"] = down.half(), up.half()  # the library saves fp16
            meta[f"{comp}:{i}:rank"] = str(r)
            want[comp][m] = want[comp][m] + (up.half().float().flatten(1) @ down.half().float().flatten(1)).view(shape)
    width = pipe.text_encoder.config.hidden_size
    sd["<s1>"], sd["<s2>"] = torch.randn(width, generator=g), torch.randn(width, generator=g)
    meta["<s1>"] = meta["<s2>"] = "<embed>"
    path = tmp_path / "lora_weight.safetensors"
    write_safetensors(path, sd, meta)
    return path, want, sd


def test_cloneofsimo_file_loads_in_traversal_order_with_tokens(tmp_path, demo):
    pipe = copy.deepcopy(demo)
    order = _expected_order(pipe)
    path, want, sd = _file(tmp_path, pipe, order, {"unet": UNET_DEFAULT, "text_encoder": ["CLIPAttention"]})
    from lora_diffusion.io.library import describe

    info = describe(path)
    assert info["format"] == "cloneofsimo" and info["components"] == {"unet": 36, "text_encoder": 8}
    ld.load_adapter(pipe, path, name="c")
    assert pipe.tokenizer.convert_tokens_to_ids("<s1>") != pipe.tokenizer.unk_token_id
    row = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("<s2>")]
    assert torch.equal(row, sd["<s2>"])
    ld.merge_adapters(pipe)
    for comp in want:
        assert max_rel_diff(adaptable_weights(pipe.components[comp]), want[comp]) < 1e-5, comp
    ld.unmerge_adapters(pipe)
    ld.remove_adapters(pipe)
    assert pipe.tokenizer.convert_tokens_to_ids("<s1>") == demo.tokenizer.convert_tokens_to_ids("<s1>")


def test_text_encoder_only_file_and_wrong_counts_are_named(tmp_path, demo):
    pipe = copy.deepcopy(demo)
    order = {"text_encoder": _expected_order(pipe)["text_encoder"]}
    path, _, sd = _file(tmp_path, pipe, order, {"text_encoder": ["CLIPAttention"]})
    ld.load_adapter(pipe, path, name="te")
    ld.remove_adapters(pipe)
    sd = {k: v for k, v in sd.items() if not k.startswith("text_encoder:7")}
    meta = {"text_encoder": json.dumps(["CLIPAttention"]), "<s1>": "<embed>", "<s2>": "<embed>"}
    write_safetensors(tmp_path / "short.safetensors", sd, meta)
    with pytest.raises(ld.AdapterFileError, match=r"short.safetensors: keys 'text_encoder:0..6' \(cloneofsimo lora\): "
                                                  r"7 layers, the model has 8 under \['CLIPAttention'\]"):
        ld.load_adapter(pipe, tmp_path / "short.safetensors")
    assert ld.list_adapters(pipe) == [] and pipe.tokenizer.convert_tokens_to_ids("<s1>") == \
        demo.tokenizer.convert_tokens_to_ids("<s1>")


def test_extended_set_takes_resnet_layers_in_definition_order(demo):
    from lora_diffusion.io.cloneofsimo import traversal

    order = traversal(demo.unet, UNET_EXTENDED)
    r0 = "down_blocks.0.resnets.0."
    i = order.index(r0 + "conv1")
    assert order[i:i + 3] == [r0 + "conv1", r0 + "time_emb_proj", r0 + "conv2"]  # ResnetBlock2D's Linear/Conv2d order
    assert len(order) == len(traversal(demo.unet, UNET_DEFAULT)) + sum(
        1 for n, m in demo.unet.named_modules() if ".resnets." in n and type(m).__name__ in ("Conv2d", "Linear"))
