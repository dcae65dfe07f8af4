"""The export-friendly 77-token selection equals the sort/scatter-min implementation it replaced
(issue 14, item 2; docs/method.md §2.3), and exports to ONNX without Sort/TopK/scatter-reduce."""

import io

import pytest
import torch

from osdface.models.prompt_encoder import select_prompt_tokens


def _reference_select(
    distances: torch.Tensor, codebook: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The previous implementation (stable sort + scatter_reduce amin), kept verbatim as the oracle."""
    b, k, n = distances.shape
    dmin, codes = distances.min(dim=2)  # (B, K): best distance and code per position
    order = torch.sort(dmin, dim=1, stable=True).indices  # (B, K): positions, best first
    codes_sorted = torch.gather(codes, 1, order)  # (B, K)
    rank = torch.arange(k, device=codes.device).expand(b, k)
    # first rank at which each code appears (k = never): first-occurrence de-duplication
    first = torch.full((b, n), k, dtype=torch.long, device=codes.device)
    first.scatter_reduce_(1, codes_sorted, rank, reduce="amin", include_self=True)
    first_sorted, code_order = torch.sort(first, dim=1, stable=True)  # (B, N): codes by first rank
    take = min(num_tokens, n)
    idx = code_order[:, :take]  # (B, take)
    valid = first_sorted[:, :take] < k  # (B, take)
    idx = torch.where(valid, idx, torch.full_like(idx, -1))
    if take < num_tokens:  # a dictionary smaller than the prompt: always zero-filled at the end
        idx = torch.cat([idx, idx.new_full((b, num_tokens - take), -1)], dim=1)
    tokens = codebook[idx.clamp(min=0)] * (idx >= 0).unsqueeze(-1).to(codebook.dtype)  # (B, T, C)
    return tokens, idx


def _loop_select(distances: torch.Tensor, num_tokens: int) -> list[list[int]]:
    """The rule of §2.3 spelled out per sample in Python (second, independent oracle)."""
    out = []
    for d in distances:
        dmin, codes = d.min(dim=1)
        key = [(1, 0.0, p) if torch.isnan(dmin[p]) else (0, dmin[p].item() + 0.0, p) for p in range(len(dmin))]
        chosen = []
        for _, _, p in sorted(key):
            c = int(codes[p])
            if c not in chosen:
                chosen.append(c)
            if len(chosen) == num_tokens:
                break
        out.append(chosen + [-1] * (num_tokens - len(chosen)))
    return out


def _check(distances: torch.Tensor, codebook: torch.Tensor, num_tokens: int) -> torch.Tensor:
    tokens, idx = select_prompt_tokens(distances, codebook, num_tokens)
    ref_tokens, ref_idx = _reference_select(distances, codebook, num_tokens)
    assert idx.dtype == torch.int64 and tokens.dtype == codebook.dtype
    assert idx.shape == (distances.shape[0], num_tokens) and tokens.shape == (*idx.shape, codebook.shape[1])
    assert torch.equal(idx, ref_idx)
    assert torch.equal(tokens, ref_tokens)
    assert idx.tolist() == _loop_select(distances, num_tokens)
    for b in range(distances.shape[0]):  # batch > 1 equals batch 1
        tb, ib = select_prompt_tokens(distances[b : b + 1], codebook, num_tokens)
        assert torch.equal(ib, idx[b : b + 1]) and torch.equal(tb, tokens[b : b + 1])
    return idx


# (B, K, N, T): N < T, T > distinct codes, K < T, K = T, and sizes around the release (K 256, T 77)
SIZES = [(1, 1, 1, 1), (2, 5, 3, 8), (3, 4, 50, 10), (1, 16, 16, 16), (4, 64, 32, 77), (2, 256, 1024, 77),
         (3, 30, 7, 5), (2, 100, 200, 77), (5, 9, 9, 3), (1, 256, 64, 77)]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "B{}K{}N{}T{}".format(*s))
@pytest.mark.parametrize("seed", range(6))
def test_random_inputs_match_reference(size, seed):
    b, k, n, t = size
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(n, 6, generator=g)
    distances = torch.rand(b, k, n, generator=g)
    _check(distances, codebook, t)
    # quantised distances: many exact ties in dmin and between codes of a position
    _check(torch.randint(0, 4, (b, k, n), generator=g).float(), codebook, t)
    # few codes reachable: fewer distinct codes than T
    few = torch.full((b, k, n), 5.0)
    few[..., : min(n, 3)] = torch.rand(b, k, min(n, 3), generator=g)
    _check(few, codebook, t)


@pytest.mark.parametrize("seed", range(20))
def test_real_distances_match_reference(seed):
    from osdface.models.prompt_encoder import code_distances

    g = torch.Generator().manual_seed(seed)
    b, n, c = 1 + seed % 3, [16, 77, 300][seed % 3], 8
    codebook = torch.randn(n, c, generator=g)
    h = torch.randn(b, c, 16, 16, generator=g) * (0.5 + seed % 4)
    _check(code_distances(h, codebook), codebook, 77)


def test_all_distances_equal():
    codebook = torch.randn(10, 4)
    # every position's minimum is code 0 (lowest index on ties) and all dmin tie: one token
    idx = _check(torch.zeros(3, 20, 10), codebook, 7)
    assert idx.tolist() == [[0] + [-1] * 6] * 3


def test_ties_in_dmin_follow_position_index():
    # position p's nearest code is code p % 6, every dmin equal: codes in position order
    d = torch.ones(2, 12, 6)
    d[:, torch.arange(12), torch.arange(12) % 6] = 0.0
    assert _check(d, torch.randn(6, 3), 8).tolist() == [[0, 1, 2, 3, 4, 5, -1, -1]] * 2
    # reversed distances with pairwise ties: position order inside each tie
    d2 = torch.ones(1, 8, 8)
    for p, code in enumerate([5, 3, 5, 1, 0, 0, 7, 6]):
        d2[0, p, code] = [0.5, 0.5, 0.2, 0.2, 0.9, 0.9, 0.1, 0.1][p]
    assert _check(d2, torch.randn(8, 2), 8).tolist() == [[7, 6, 5, 1, 3, 0, -1, -1]]


def test_ties_between_codes_pick_lowest_code_index():
    d = torch.full((1, 4, 1024), 3.0)
    d[0, 0, [900, 7, 512]] = 1.0  # three codes tie for position 0: code 7
    d[0, 1, [1023, 1000]] = 0.5  # code 1000
    d[0, 2, :] = 0.25  # all tie: code 0
    assert torch.equal(d.min(dim=2).indices, torch.tensor([[7, 1000, 0, 0]]))  # torch: the first minimum
    assert _check(d, torch.randn(1024, 2), 6).tolist() == [[0, 1000, 7, -1, -1, -1]]


def test_every_position_same_code_and_tiny_dictionary():
    d = torch.rand(2, 256, 5)
    d[..., 3] = -1.0
    assert _check(d, torch.randn(5, 4), 77).tolist() == [[3] + [-1] * 76] * 2
    # N = 1 < T: one token, 76 zero rows
    tokens, idx = select_prompt_tokens(torch.rand(1, 256, 1), torch.ones(1, 4), 77)
    assert idx[0, 0] == 0 and (idx[0, 1:] == -1).all() and tokens[0, 1:].abs().sum() == 0


def test_special_values_match_reference():
    g = torch.Generator().manual_seed(0)
    d = torch.rand(2, 40, 12, generator=g)
    d[0, 3, 5] = -0.0
    d[0, 4, 2] = 0.0
    d[0, 5, 1] = 0.0
    d[0, 6, :] = float("inf")
    d[0, 7, :] = float("inf")
    d[1, 8, 4] = float("-inf")
    d[1, 9, 4] = float("-inf")
    d[1, 10, 3] = float("nan")  # NaN rows: min is NaN, sorted after every number, stably
    d[1, 11, :] = float("nan")
    d[1, 12, 0] = float("nan")
    _check(d, torch.randn(12, 3, generator=g), 40)
    _check(d, torch.randn(12, 3, generator=g), 5)


def test_dtypes_and_devices_unchanged():
    g = torch.Generator().manual_seed(1)
    d = torch.rand(2, 32, 16, generator=g)
    for cb_dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        _check(d, torch.randn(16, 4, generator=g).to(cb_dtype), 10)
    _check(d.double(), torch.randn(16, 4, generator=g), 10)
    _check(d.half(), torch.randn(16, 4, generator=g), 10)
    _check(torch.randint(0, 3, (2, 32, 16), generator=g).half(), torch.randn(16, 4, generator=g), 10)


class _Selector(torch.nn.Module):
    def __init__(self, codebook: torch.Tensor, num_tokens: int):
        super().__init__()
        self.register_buffer("codebook", codebook)
        self.num_tokens = num_tokens

    def forward(self, distances):
        return select_prompt_tokens(distances, self.codebook, self.num_tokens)


FORBIDDEN = {"Sort", "TopK", "ScatterElements", "ScatterND", "NonZero", "Unique", "Loop", "If"}
FORBIDDEN_ATEN = {"aten::sort", "aten::argsort", "aten::topk", "aten::scatter", "aten::scatter_", "aten::scatter_reduce",
                  "aten::scatter_reduce_", "aten::nonzero", "aten::unique", "aten::_unique2", "aten::unique_consecutive"}


def test_traced_graph_has_no_sort_topk_scatter_or_dynamic_shapes():
    """Needs torch only; the ONNX test below additionally needs the onnx package (torch.onnx.export does)."""
    codebook = torch.randn(32, 8)
    with torch.no_grad():
        traced = torch.jit.trace(_Selector(codebook, 12).eval(), (torch.rand(2, 20, 32),))
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert not kinds & (FORBIDDEN_ATEN | {"prim::Loop", "prim::If"}), kinds & FORBIDDEN_ATEN


def test_onnx_export_uses_standard_ops_only():
    import onnx  # the dev set-up installs the onnx extra; a missing package fails here, never skips
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(32, 8, generator=g)
    module = _Selector(codebook, 12).eval()
    example = torch.randint(0, 3, (2, 20, 32), generator=g).float()
    f = io.BytesIO()
    torch.onnx.export(module, (example,), f, dynamo=False, opset_version=17, input_names=["distances"],
                      output_names=["tokens", "indices"], dynamic_axes={"distances": {0: "batch", 1: "positions"}})
    model = onnx.load_from_string(f.getvalue())
    onnx.checker.check_model(model)
    op_types = {node.op_type for node in model.graph.node}
    assert not op_types & FORBIDDEN, op_types & FORBIDDEN
    assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 17
    try:
        import onnxruntime as ort
    except ImportError:
        return
    session = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        for d in (torch.rand(3, 20, 32, generator=gen), torch.randint(0, 3, (1, 9, 32), generator=gen).float(),
                  torch.rand(2, 40, 32, generator=gen)):
            tokens, idx = session.run(None, {"distances": d.numpy()})
            ref_tokens, ref_idx = _reference_select(d, codebook, 12)
            assert torch.equal(torch.from_numpy(idx), ref_idx)
            assert torch.equal(torch.from_numpy(tokens), ref_tokens)
