"""CLIP-IQA port (``osdface.evaluation.clipiqa``) against pyiqa 0.1.12's ``clipiqa``.

Fixtures (``tests/evaluation/data``), made once by a scratch script from pyiqa's own
``archs/clip_model.py`` + ``archs/clipiqa_arch.py`` (prompts tokenised by openai-clip 1.0.1):

* ``clipiqa_keys.json``: the key / shape table of the RN50 state dict that ``clip.load`` loads
  strictly, and the keys OpenAI stores as float16;
* ``clipiqa_tiny.safetensors`` + ``clipiqa_tiny.json``: seeded weights of a tiny CLIP of the same
  code (ResNet width 4, 2 attention-pool heads, 1 text layer) and pyiqa's scores on three
  analytic images. Tolerance: relative 1e-4 (the port reproduces them to float32 rounding).
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from osdface.errors import ModelFileError
from osdface.evaluation.clipiqa import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PROMPT_PAIRS,
    CLIPIQAMetric,
    build_clip,
    load_clip_state_dict,
    load_clip_weights,
    openai_fp16_keys,
    read_torchscript_state_dict,
)
from osdface.safe_load import UnsafeCheckpointError
from osdface.weights import WeightsNotFoundError

DATA = Path(__file__).parent / "data"
KEYS = json.loads((DATA / "clipiqa_keys.json").read_text())
TINY = json.loads((DATA / "clipiqa_tiny.json").read_text())
RTOL = 1e-4


def _images() -> dict[str, torch.Tensor]:
    """The fixture's analytic test images (same code as the scratch script that made the reference)."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    a = torch.stack([xx, yy, 0.5 + 0.5 * torch.sin(6.0 * (xx + yy))])[None]
    yy, xx = torch.meshgrid(torch.arange(48.0), torch.arange(80.0), indexing="ij")
    b = torch.stack([((xx // 8 + yy // 8) % 2) * 0.8 + 0.1, xx / 79, 1 - yy / 47])[None]
    yy, xx = torch.meshgrid(torch.arange(33.0), torch.arange(40.0), indexing="ij")
    c = torch.stack([(xx * yy) / (32 * 39), 0.25 + 0.5 * (xx % 3 == 0).float(), 0.7 - 0.6 * yy / 32])[None]
    return {"a_64x64": a, "b_48x80": b, "c_33x40": c}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_sd() -> dict[str, torch.Tensor]:
    """Full state dict of the tiny fixture CLIP (the token table is stored as the prompt rows only)."""
    from safetensors.torch import load_file

    stored = load_file(str(DATA / "clipiqa_tiny.safetensors"))
    sd = {k: v for k, v in stored.items() if not k.startswith("token_embedding.")}
    table = torch.zeros(TINY["arch"]["text_cfg"]["vocab_size"], TINY["arch"]["text_cfg"]["width"])
    table[stored["token_embedding.rows"]] = stored["token_embedding.values"]
    sd["token_embedding.weight"] = table
    return sd


def _tiny_dir(tmp_path: Path, sd: dict[str, torch.Tensor], name: str = "w") -> Path:
    d = tmp_path / name
    d.mkdir()
    torch.save(sd, d / "RN50.pt")
    return d


class _ReleaseLike(nn.Module):
    """Module tree with OpenAI's RN50.pt layout (+ its metadata buffers) to ``torch.jit.trace`` / save."""

    def __init__(self, clip: nn.Module, metadata: dict[str, int]):
        super().__init__()
        for name, child in clip.named_children():
            setattr(self, name, child)
        for name, p in clip.named_parameters(recurse=False):
            setattr(self, name, p)
        for name, value in metadata.items():
            self.register_buffer(name, torch.tensor(value))

    def forward(self, x):
        return x * self.logit_scale


def _save_torchscript(clip: nn.Module, path: Path) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(_ReleaseLike(clip, KEYS["metadata_buffers"]),
                                 torch.ones((), dtype=clip.logit_scale.dtype))
        torch.jit.save(traced, str(path))


# ----------------------------------------------------------------------------------------------
# (1) key / shape table of the released checkpoint
# ----------------------------------------------------------------------------------------------


#: a release-layout parameter stored expanded (stride 0) in the ``expanded`` variant
_EXPANDED_KEY = "text_projection"


@pytest.fixture(scope="module")
def rn50_release(tmp_path_factory) -> dict[str, Path]:
    """TorchScript archives in the release layout (~250 MB), written once: folders by variant.

    Float16 where OpenAI's file is, metadata buffers, every tensor densely filled with its own
    index in ``KEYS["keys"]`` so that any name mix-up is visible after loading. Variants:
    ``release``, and ``expanded`` (the same with :data:`_EXPANDED_KEY` stored as a stride-0 view).
    """
    root = tmp_path_factory.mktemp("clip_release")
    with torch.device("meta"):
        model = build_clip()
    model = model.to_empty(device="cpu")
    fp16 = set(KEYS["openai_fp16"])
    order = list(KEYS["keys"])
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name in KEYS["keys"]:
            dtype = torch.float16 if name in fp16 else t.dtype
            t.data = torch.full(t.shape, order.index(name), dtype=dtype)
    for variant in ("release", "expanded"):
        if variant == "expanded":
            p = getattr(model, _EXPANDED_KEY)
            p.data = p.data[:1, :1].expand(p.shape)
        (root / variant).mkdir()
        _save_torchscript(model, root / variant / "RN50.pt")
    del model, p
    yield {v.name: v for v in root.iterdir()}
    shutil.rmtree(root, ignore_errors=True)


def test_rn50_key_table_and_release_layout_loads(rn50_release):
    with torch.device("meta"):
        model = build_clip()
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == KEYS["keys"]
    assert openai_fp16_keys(model) == KEYS["openai_fp16"]

    # the release-layout archive (see rn50_release): every tensor holds its own index
    fp16 = set(KEYS["openai_fp16"])
    order = list(KEYS["keys"])
    path = rn50_release["release"] / "RN50.pt"
    sd = load_clip_state_dict(path)
    assert {k: list(v.shape) for k, v in sd.items()} == KEYS["keys"]  # metadata buffers dropped
    assert {k for k, v in sd.items() if v.dtype == torch.float16} == fp16
    with torch.device("meta"):
        target = build_clip()
    target = target.to_empty(device="cpu")
    load_clip_weights(target, sd, path)
    for name, v in target.state_dict().items():
        assert v.dtype in (torch.float32, torch.int64)
        assert torch.all(v == order.index(name)), name


def test_expanded_tensor_in_release_layout_refused_by_name(rn50_release):
    """A stride-0 (expanded) tensor in the release archive is refused, naming the file and the key."""
    with pytest.raises(ModelFileError, match=r"RN50\.pt") as e:
        CLIPIQAMetric(weights_dir=rn50_release["expanded"])
    assert _EXPANDED_KEY in str(e.value) and "expanded" in str(e.value)


def test_strict_check_names_file_and_keys(tmp_path, tiny_sd):
    model = build_clip(TINY["arch"])
    bad = {
        "missing": {k: v for k, v in tiny_sd.items() if k != "visual.layer3.0.bn2.running_var"},
        "extra": {**tiny_sd, "visual.attnpool.extra_proj.weight": torch.zeros(2)},
        "shape": {**tiny_sd, "text_projection": torch.zeros(16, 17)},
    }
    expected = {"missing": "visual.layer3.0.bn2.running_var", "extra": "visual.attnpool.extra_proj.weight",
                "shape": "text_projection"}
    for kind, sd in bad.items():
        path = tmp_path / f"{kind}.pt"
        torch.save(sd, path)
        with pytest.raises(ValueError, match=str(path)) as err:
            load_clip_weights(model, load_clip_state_dict(path), path)
        assert expected[kind] in str(err.value)
    # the metric refuses it the same way, naming the file in the weights folder
    d = _tiny_dir(tmp_path, bad["shape"])
    with pytest.raises(ValueError, match=r"RN50\.pt.*text_projection"):
        CLIPIQAMetric(weights_dir=d, arch=TINY["arch"])


def test_containers_prefixes_and_safetensors_are_accepted(tmp_path, tiny_sd):
    from safetensors.torch import save_file

    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in tiny_sd.items()}}
    torch.save(wrapped, tmp_path / "wrapped.pt")
    save_file({k: v.contiguous() for k, v in tiny_sd.items()}, str(tmp_path / "plain.safetensors"))
    (tmp_path / "renamed.pt").write_bytes((tmp_path / "plain.safetensors").read_bytes())
    with_meta = {**tiny_sd, "input_resolution": torch.tensor(224), "context_length": torch.tensor(77)}
    torch.save(with_meta, tmp_path / "with_meta.pt")
    for name in ("wrapped.pt", "plain.safetensors", "renamed.pt", "with_meta.pt"):
        sd = load_clip_state_dict(tmp_path / name)
        assert sorted(sd) == sorted(tiny_sd), name
        assert all(torch.equal(sd[k], tiny_sd[k]) for k in sd), name
    # a damaged safetensors file is refused naming the file and safetensors' reason
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "plain.safetensors").read_bytes()[:-64])
    with pytest.raises(ModelFileError, match=r"cut\.safetensors: not a valid safetensors file \(.+\)"):
        load_clip_state_dict(tmp_path / "cut.safetensors")


# ----------------------------------------------------------------------------------------------
# TorchScript reader: real archives, never executed
# ----------------------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.register_buffer("scale", torch.tensor([2.0, 3.0]))
        self.plain = torch.arange(4.0)  # a tensor attribute, not state

    def forward(self, x):
        return self.bn(self.lin(x)) * self.scale.sum() + self.plain


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _Block()
        self.seq = nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 2, bias=False))
        self.half_param = nn.Parameter(torch.randn(5).half())

    def forward(self, x):
        return self.seq(self.block(x)).sum() + self.half_param.float().sum()


@pytest.mark.parametrize("mode", ["script", "trace"])
def test_torchscript_reader_returns_the_state_dict(tmp_path, mode):
    import warnings

    torch.manual_seed(0)
    net = _Net().eval()
    with torch.no_grad():
        net.block.bn.running_mean.normal_()
        net.block.bn.running_var.uniform_(0.5, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        jit = torch.jit.script(net) if mode == "script" else torch.jit.trace(net, torch.randn(3, 3))
        torch.jit.save(jit, str(tmp_path / "net.pt"))
    got = read_torchscript_state_dict(tmp_path / "net.pt")
    want = net.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert "block.plain" not in got


def _archive(path: Path, data_pkl: bytes) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("evil/data.pkl", data_pkl)
        zf.writestr("evil/constants.pkl", pickle.dumps(()))
        zf.writestr("evil/code/__torch__.py", "class M(Module):\n  __parameters__ = []\n  __buffers__ = []\n")
        zf.writestr("evil/version", "3\n")


def test_torchscript_reader_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    # os.system(...) as the root object, and hidden inside a TorchScript module's state
    direct = b"cos\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR."
    nested = (b"\x80\x02c__torch__\nM\n)\x81}(X\x01\x00\x00\x00acos\nsystem\n(V"
              + f"touch {marker}".encode() + b"\ntRub.")
    for i, payload in enumerate((direct, nested)):
        path = tmp_path / f"evil{i}.pt"
        _archive(path, payload)
        with pytest.raises(UnsafeCheckpointError, match="os.system"):
            read_torchscript_state_dict(path)
        with pytest.raises(UnsafeCheckpointError, match="os.system"):
            load_clip_state_dict(path)
    assert not marker.exists()

    # any other global (here builtins.eval) is refused too
    path = tmp_path / "evil_eval.pt"
    _archive(path, b"cbuiltins\neval\n(V1+1\ntR.")
    with pytest.raises(UnsafeCheckpointError, match="builtins.eval"):
        read_torchscript_state_dict(path)


def test_non_module_archive_is_rejected(tmp_path):
    path = tmp_path / "list.pt"
    _archive(path, pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(ValueError, match="does not hold a module"):
        read_torchscript_state_dict(path)
    buf = io.BytesIO()
    torch.save({"a": torch.zeros(1)}, buf)
    (tmp_path / "plain.pt").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="not a TorchScript archive"):
        read_torchscript_state_dict(tmp_path / "plain.pt")


# ----------------------------------------------------------------------------------------------
# (2) cross-implementation fixture
# ----------------------------------------------------------------------------------------------


def test_prompts_and_tokens_equal_openai_clip():
    m = CLIPIQAMetric(pretrained=False, arch=TINY["arch"])
    assert [p for pair in PROMPT_PAIRS for p in pair] == [
        "Good image", "bad image", "Sharp image", "blurry image", "sharp edges", "blurry edges",
        "High resolution image", "low resolution image", "Noise-free image", "noisy image"]
    assert m.tokens.shape == (10, 77)
    assert m.tokens[:, :8].tolist() == TINY["tokens"]  # openai-clip's clip.tokenize ids
    assert not m.tokens[:, 8:].any()
    assert m.text_features.shape == (10, TINY["arch"]["embed_dim"])


@pytest.mark.parametrize("pos_embedding", [False, True])
def test_matches_pyiqa_reference_on_tiny_weights(tmp_path, tiny_sd, pos_embedding):
    images = _images()
    for name, x in images.items():
        assert float(x.double().sum()) == pytest.approx(TINY["image_sums"][name], rel=1e-6)
    m = CLIPIQAMetric(weights_dir=_tiny_dir(tmp_path, tiny_sd), arch=TINY["arch"], pos_embedding=pos_embedding)
    ref = TINY["scores_pos_embedding" if pos_embedding else "scores"]
    got = {name: m(x) for name, x in images.items()}
    got["batch_a_aflip"] = m(torch.cat([images["a_64x64"], images["a_64x64"].flip(-1)]))
    for name, want in ref.items():
        torch.testing.assert_close(got[name], torch.tensor(want, dtype=torch.float64), rtol=RTOL, atol=0)


def test_torchscript_release_format_gives_the_same_scores(tmp_path, tiny_sd):
    """Tiny weights written as an OpenAI-style TorchScript archive named RN50.pt load and score identically."""
    clip = build_clip(TINY["arch"])
    clip.load_state_dict(tiny_sd)
    fp16 = set(openai_fp16_keys(clip))
    for name, p in clip.named_parameters():
        if name in fp16:
            p.data = p.data.half()
    d = tmp_path / "jit"
    d.mkdir()
    _save_torchscript(clip, d / "RN50.pt")
    m = CLIPIQAMetric(weights_dir=d, arch=TINY["arch"])
    for name, x in _images().items():
        torch.testing.assert_close(m(x), torch.tensor(TINY["scores"][name], dtype=torch.float64), rtol=RTOL, atol=0)


def test_float32_weights_are_rounded_like_clip_load(tmp_path, tiny_sd):
    g = torch.Generator().manual_seed(5)
    fp16 = set(openai_fp16_keys(build_clip(TINY["arch"])))
    # float32 weights that are not float16-representable
    noisy = {k: (v.float() + 1e-4 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v
             for k, v in tiny_sd.items()}
    rounded = {k: v.half().float() if k in fp16 else v for k, v in noisy.items()}
    a = CLIPIQAMetric(weights_dir=_tiny_dir(tmp_path, noisy, "a"), arch=TINY["arch"])
    b = CLIPIQAMetric(weights_dir=_tiny_dir(tmp_path, rounded, "b"), arch=TINY["arch"])
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(sa["visual.conv1.weight"], noisy["visual.conv1.weight"].half().float())
    assert torch.equal(sa["visual.bn1.running_var"], noisy["visual.bn1.running_var"])  # not rounded
    x = _images()["a_64x64"]
    assert torch.equal(a(x), b(x))


# ----------------------------------------------------------------------------------------------
# (3) pre-processing
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_random():
    return CLIPIQAMetric(pretrained=False, arch=TINY["arch"])


def test_preprocessing_is_clip_normalisation_at_native_size(tiny_random):
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    x = mean.expand(2, 3, 37, 53).double()  # float64 input
    out = tiny_random.preprocess(x)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 37, 53)  # no resize, no crop
    assert out.abs().max() < 1e-6
    torch.testing.assert_close(tiny_random.preprocess((mean + std).expand(1, 3, 40, 31)), torch.ones(1, 3, 40, 31))
    torch.testing.assert_close(tiny_random.preprocess(torch.zeros(1, 3, 32, 32)), (-mean / std).expand(1, 3, 32, 32))

    seen = []
    hook = tiny_random.model.visual.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        x = torch.rand(1, 3, 45, 70, generator=torch.Generator().manual_seed(1))
        tiny_random(x)
    finally:
        hook.remove()
    torch.testing.assert_close(seen[0], (x - mean) / std)


def test_size_limits(tiny_random):
    assert torch.isfinite(tiny_random(torch.full((1, 3, 31, 31), 0.5))).all()
    assert torch.isfinite(tiny_random(torch.full((1, 3, 31, 500), 0.5))).all()
    with pytest.raises(ValueError, match="at least 31x31"):
        tiny_random(torch.full((1, 3, 30, 64), 0.5))


def test_positional_embedding_flag(tmp_path, tiny_sd):
    """Default: the attention-pool positional table is not used; ``pos_embedding=True`` uses it."""
    other = {**tiny_sd, "visual.attnpool.positional_embedding": tiny_sd["visual.attnpool.positional_embedding"] * 3}
    x = _images()["b_48x80"]
    scores = {}
    for pos in (False, True):
        for label, sd in (("orig", tiny_sd), ("other", other)):
            d = _tiny_dir(tmp_path, sd, f"{pos}-{label}")
            scores[pos, label] = CLIPIQAMetric(weights_dir=d, arch=TINY["arch"], pos_embedding=pos)(x)
    assert torch.equal(scores[False, "orig"], scores[False, "other"])
    assert (scores[True, "orig"] - scores[True, "other"]).abs().item() > 1e-3


# ----------------------------------------------------------------------------------------------
# (4) missing weights, (5) batching / determinism
# ----------------------------------------------------------------------------------------------


def test_missing_weight_file_is_named(tmp_path):
    with pytest.raises(WeightsNotFoundError, match=r"RN50\.pt"):
        CLIPIQAMetric(weights_dir=tmp_path)


def test_batch_equals_singles_finite_deterministic(tiny_random):
    assert tiny_random.name == "clipiqa" and not tiny_random.full_reference and not tiny_random.lower_better
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 64, 48, generator=g)
    batch = tiny_random(x)
    singles = torch.cat([tiny_random(x[:1]), tiny_random(x[1:])])
    assert batch.dtype == torch.float64 and batch.shape == (2,)
    assert torch.isfinite(batch).all() and ((batch > 0) & (batch < 1)).all()
    torch.testing.assert_close(batch, singles, rtol=1e-6, atol=1e-7)
    assert torch.equal(tiny_random(x), batch)
    again = CLIPIQAMetric(pretrained=False, arch=TINY["arch"])  # seeded random weights
    assert torch.equal(again(x), batch)
    assert not any(p.requires_grad for p in tiny_random.model.parameters())
    assert not tiny_random.model.training
