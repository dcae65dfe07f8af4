"""VRE architecture, the 77-token selection rule and the prompt adapter (spec §2.2–2.5)."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from osdface.models.prompt_encoder import (
    PromptAdapter,
    VisualPromptEncoder,
    code_distances,
    select_prompt_tokens,
)

SHAPES = json.loads((Path(__file__).parents[1] / "data" / "vre_state_dict_shapes.json").read_text())


def reference_selection(h: torch.Tensor, codebook: torch.Tensor, n_min: int) -> torch.Tensor:
    """The official per-sample loop (lq_embed/vqvae.py VectorQuantizer.inference), batch 1."""
    z = h.permute(0, 2, 3, 1).contiguous().view(1, -1, codebook.shape[1])
    d = torch.sum(z**2, dim=2, keepdim=True) + torch.sum(codebook**2, dim=1) - 2 * torch.matmul(z, codebook.t())
    min_values, min_indices = torch.min(d, dim=2)
    buf = torch.zeros(d.shape[1], 2)
    buf[:, 0] = min_indices[0].to(buf.dtype)
    buf[:, 1] = min_values[0]
    _, order = torch.sort(buf[:, 1], dim=0)
    buf = buf[order]
    seen, selected = set(), []
    for idx in buf[:, 0]:
        if idx.item() not in seen:
            selected.append(int(idx.item()))
            seen.add(idx.item())
        if len(selected) >= n_min:
            break
    enc = torch.zeros(n_min, codebook.shape[0])
    enc[: len(selected)].scatter_(1, torch.tensor(selected).unsqueeze(1), 1)
    return torch.matmul(enc, codebook).unsqueeze(0)


def test_default_architecture_matches_released_state_dict():
    vre = VisualPromptEncoder()
    sd = vre.state_dict()
    expected = SHAPES["vre_encoder"]
    assert set(sd) == set(expected)
    for k, shape in expected.items():
        assert list(sd[k].shape) == shape, k
    assert sum(p.numel() for p in vre.parameters()) == SHAPES["vre_encoder_param_count"]["total"] == 29_172_416
    adapter = PromptAdapter(512, 1024)
    assert {k: list(v.shape) for k, v in adapter.state_dict().items()} == SHAPES["embedding_adapter"]
    assert sum(p.numel() for p in adapter.parameters()) == 394_496


def test_default_encoder_latent_grid_is_16x16():
    vre = VisualPromptEncoder(ch=32, ch_mult=(1, 1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32, embed_dim=32)
    with torch.no_grad():
        h = vre.encode_features(torch.zeros(1, 3, 512, 512))
    assert h.shape == (1, 32, 16, 16)


def test_selection_orders_by_distance_deduplicates_and_zero_fills():
    codebook = torch.eye(6) * 10  # 6 codes, dimension 6
    # 4 positions (2x2 grid): nearest codes 3, 1, 3, 5 with distances growing 0.0, 0.01, 0.04, 0.09
    feats = torch.stack([codebook[3] + 0.0, codebook[1] + 0.1, codebook[3] + 0.2, codebook[5] + 0.3])
    feats[1, 0] -= 0.1  # keep code 1 nearest for position 1 but at a larger distance than position 0
    h = feats.t().reshape(1, 6, 2, 2)  # (B, C, H, W), row-major grid
    tokens, idx = select_prompt_tokens(code_distances(h, codebook), codebook, num_tokens=5)
    d = code_distances(h, codebook)[0].min(1).values
    order = torch.argsort(d).tolist()
    expected_codes = []
    for pos in order:
        c = [3, 1, 3, 5][pos]
        if c not in expected_codes:
            expected_codes.append(c)
    assert idx[0].tolist() == expected_codes + [-1] * (5 - len(expected_codes))
    assert len(expected_codes) == 3  # the duplicate code 3 appears once
    assert torch.equal(tokens[0, :3], codebook[expected_codes])
    assert torch.count_nonzero(tokens[0, 3:]) == 0  # zero-filled tail


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_selection_equals_official_loop(seed):
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(64, 16, generator=g)
    h = torch.randn(1, 16, 8, 8, generator=g) * 1.5
    tokens, _ = select_prompt_tokens(code_distances(h, codebook), codebook, num_tokens=20)
    assert torch.equal(tokens, reference_selection(h, codebook, 20))


def test_selection_with_few_distinct_codes_gives_zero_rows():
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(32, 8, generator=g)
    # every position sits on one of 10 codes -> exactly 10 non-zero prompt rows of 77
    codes = torch.arange(64) % 10
    h = codebook[codes].t().reshape(1, 8, 8, 8)
    tokens, idx = select_prompt_tokens(code_distances(h, codebook), codebook, num_tokens=77)
    assert tokens.shape == (1, 77, 8)
    assert int((tokens.abs().sum(-1) > 0).sum()) == 10
    assert (idx[0, 10:] == -1).all() and sorted(idx[0, :10].tolist()) == list(range(10))


def test_batched_selection_equals_per_sample():
    g = torch.Generator().manual_seed(3)
    codebook = torch.randn(40, 12, generator=g)
    h = torch.randn(5, 12, 6, 6, generator=g)
    tokens, idx = select_prompt_tokens(code_distances(h, codebook), codebook, 16)
    for b in range(5):
        tb, ib = select_prompt_tokens(code_distances(h[b : b + 1], codebook), codebook, 16)
        assert torch.equal(tokens[b : b + 1], tb) and torch.equal(idx[b : b + 1], ib)
        assert torch.equal(tb, reference_selection(h[b : b + 1], codebook, 16))


def test_vre_batch_equals_single(tiny_vre_config):
    from osdface.testing import tiny_vre

    vre = tiny_vre(0).eval()
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        batched = vre(x)
        single = torch.cat([vre(x[i : i + 1]) for i in range(3)])
    assert batched.shape == (3, tiny_vre_config["num_tokens"], tiny_vre_config["embed_dim"])
    assert torch.allclose(batched, single, atol=1e-5)


def test_official_input_normalisation_is_applied_twice():
    from osdface.testing import tiny_vre

    official, standard = tiny_vre(0), tiny_vre(0, input_normalization="standard")
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    assert torch.equal(official.preprocess(x), (x - 0.5) / 0.5)  # encoder sees [-3, 1]
    assert torch.equal(standard.preprocess(x), x)
    y = torch.rand(1, 3, 96, 96) * 2 - 1  # wrong size: bilinear, align_corners=False, like the wrapper
    expected = (F.interpolate(y, size=(64, 64), mode="bilinear", align_corners=False) - 0.5) / 0.5
    assert torch.equal(official.preprocess(y), expected)


def test_fp16_selection_matches_fp32_codes():
    from osdface.testing import tiny_vre

    vre = tiny_vre(0).eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        h = vre.encode_features(x)
        _, idx32 = select_prompt_tokens(code_distances(h, vre.codebook), vre.codebook, 8)
        h16, cb16 = h.half(), vre.codebook.half()
        d16 = code_distances(h16, cb16)
    assert d16.dtype == torch.float32  # distances are never evaluated in half precision
    _, idx16 = select_prompt_tokens(d16, cb16, 8)
    assert torch.equal(idx16, idx32)


def test_adapter_matches_formula_and_bounds():
    torch.manual_seed(0)
    adapter = PromptAdapter(16, 24)
    v = torch.randn(2, 7, 16) * 3
    out = adapter(v)
    w1, b1 = adapter.conv1.weight[..., 0], adapter.conv1.bias
    w2, b2 = adapter.conv2.weight[..., 0], adapter.conv2.bias
    expected = F.silu(F.silu(v @ w1.t() + b1) @ w2.t() + b2)
    assert out.shape == (2, 7, 24)
    assert torch.allclose(out, expected, atol=1e-5)
    assert out.min() >= -0.27847  # SiLU after the last layer too
    zero_token = adapter(torch.zeros(1, 1, 16))[0, 0]
    assert torch.allclose(zero_token, F.silu(F.silu(b1) @ w2.t() + b2), atol=1e-6)  # zero rows do not stay zero


def test_components_save_load_roundtrip(tmp_path):
    from osdface.testing import tiny_vre

    vre = tiny_vre(4)
    vre.save_pretrained(tmp_path / "vre")
    assert (tmp_path / "vre" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = VisualPromptEncoder.from_pretrained(tmp_path / "vre")
    assert loaded.config.input_normalization == "official" and loaded.config.num_tokens == 77
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vre(x), loaded(x))


def test_architecture_is_read_back_from_weights(tiny_vre_config):
    from osdface.models.prompt_encoder import infer_vre_config

    def norm(cfg):
        return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in cfg.items() if not k.startswith("_")}

    for cfg in ({}, tiny_vre_config):
        original = VisualPromptEncoder(**cfg)
        rebuilt = VisualPromptEncoder(**infer_vre_config(original.state_dict()))
        assert norm(rebuilt.config) == norm(original.config)
    assert infer_vre_config(VisualPromptEncoder().state_dict())["resolution"] == 512
