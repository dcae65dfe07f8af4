"""LoRA merge (official ``merge_Unet`` rule) against PEFT's unmerged forward; key formats and errors."""

import copy

import pytest
import torch

from osdface.models.lora import (
    LoraFormatError,
    attach_lora,
    merge_lora_into,
    parse_lora_state_dict,
)
from osdface.testing import tiny_lora_state_dict, tiny_unet


def _unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        return unet(z, 399, encoder_hidden_states=ctx).sample


def test_merge_equals_peft_unmerged_forward_linear_and_conv():
    base = tiny_unet(0).eval()
    lora = tiny_lora_state_dict(base, seed=1, rank=4)
    kinds = {v.ndim for k, v in lora.items()}
    assert kinds == {2, 4}  # both linear and conv LoRA are exercised
    unmerged = copy.deepcopy(base)
    attach_lora(unmerged, lora)
    merged = copy.deepcopy(base)
    names = merge_lora_into(merged, lora)
    assert any("conv" in n for n in names) and any("to_q" in n for n in names)
    ref, out_m, out_u = _unet_out(base), _unet_out(merged), _unet_out(unmerged)
    assert not torch.allclose(ref, out_m, atol=1e-3)  # the LoRA changes the model
    assert torch.allclose(out_m, out_u, atol=1e-5)


def test_alpha_scales_the_update():
    base = tiny_unet(0).eval()
    lora = tiny_lora_state_dict(base, seed=1, rank=4)
    m1, m2 = copy.deepcopy(base), copy.deepcopy(base)
    merge_lora_into(m1, lora)  # alpha defaults to the rank: scale 1
    merge_lora_into(m2, lora, lora_alpha=8)  # scale 2
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    w0 = dict(base.named_modules())[name].weight
    d1 = dict(m1.named_modules())[name].weight - w0
    d2 = dict(m2.named_modules())[name].weight - w0
    assert torch.allclose(d2, 2 * d1, atol=1e-6)
    pair = parse_lora_state_dict(lora).pairs[name]
    assert torch.allclose(d1, pair.up @ pair.down, atol=1e-6)


def test_old_diffusers_format_linear():
    base = tiny_unet(0).eval()
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    w = dict(base.named_modules())[name].weight
    up, down = torch.randn(w.shape[0], 2), torch.randn(2, w.shape[1])
    merged = copy.deepcopy(base)
    merge_lora_into(merged, {f"{name}.lora.up.weight": up, f"{name}.lora.down.weight": down})
    assert torch.allclose(dict(merged.named_modules())[name].weight, w + up @ down, atol=1e-6)


def test_unmappable_keys_are_reported_and_nothing_changes():
    base = tiny_unet(0).eval()
    lora = tiny_lora_state_dict(base, seed=1)
    bad = dict(lora)
    bad["unet.no_such_block.to_q.lora_A.weight"] = torch.zeros(4, 8)
    bad["unet.no_such_block.to_q.lora_B.weight"] = torch.zeros(8, 4)
    bad["lora_te_text_model.encoder.weird"] = torch.zeros(1)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(LoraFormatError) as e:
        merge_lora_into(base, bad, source="bad.safetensors")
    msg = str(e.value)
    assert "bad.safetensors" in msg and "no_such_block.to_q" in msg and "lora_te_text_model.encoder.weird" in msg
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_shape_mismatch_is_reported():
    base = tiny_unet(0).eval()
    name = "conv_in"
    bad = {f"unet.{name}.lora_A.weight": torch.zeros(4, 3, 3, 3), f"unet.{name}.lora_B.weight": torch.zeros(32, 4, 1, 1)}
    with pytest.raises(LoraFormatError, match="conv_in"):
        merge_lora_into(base, bad)


def test_attach_checks_shapes_first_and_names_the_file():
    """attach_lora (unmerged) refuses a misfit before adding the adapter, naming the source."""
    base = tiny_unet(0).eval()
    lora = tiny_lora_state_dict(base, seed=1, rank=4)
    key = next(k for k in sorted(lora) if k.endswith("lora_B.weight") and lora[k].ndim == 2)
    bad = {**lora, key: torch.zeros(lora[key].shape[0] + 3, 4)}
    with pytest.raises(LoraFormatError, match=r"^my\.safetensors: .*wrong shapes") as e:
        attach_lora(base, bad, source="my.safetensors")
    assert key.removeprefix("unet.").removesuffix(".lora_B.weight") in str(e.value)
    assert not getattr(base, "peft_config", None)  # nothing attached


@pytest.mark.parametrize("case", ["rank_mismatch", "scalar_tensor", "alpha_not_scalar", "empty"])
def test_malformed_pairs_raise_lora_format_error_naming_the_source(case):
    base = tiny_unet(0).eval()
    name = "conv_in"
    a, b = torch.zeros(4, 4, 3, 3), torch.zeros(32, 4, 1, 1)
    sd = {f"unet.{name}.lora_A.weight": a, f"unet.{name}.lora_B.weight": b}
    if case == "rank_mismatch":
        sd[f"unet.{name}.lora_B.weight"] = torch.zeros(32, 5, 1, 1)
    elif case == "scalar_tensor":
        sd[f"unet.{name}.lora_A.weight"] = torch.tensor(1.0)
    elif case == "alpha_not_scalar":
        sd[f"unet.{name}.alpha"] = torch.ones(3)
    else:
        sd = {}
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(LoraFormatError, match=r"^f\.safetensors: "):
        merge_lora_into(base, sd, source="f.safetensors")
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
