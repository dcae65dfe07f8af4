"""Hostile checkpoints (issue 12): refused with one line naming the file, before anything large is allocated.

Every hostile file is generated here (pickle / zipfile / torch.save); nothing binary is committed.
CLI cases assert: exit code 2, one ``osdface: error: <file>: ...`` line, nothing written, the
weights folder byte-identical afterwards. The two memory bombs run in a child process under an
address-space cap (see :data:`AS_CAP`).
"""

import argparse
import collections
import hashlib
import io
import json
import math
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from osdface.cli import main
from osdface.errors import ModelFileError, WeightsNotFoundError
from osdface.safe_load import UnsafeCheckpointError, load_torch_checkpoint

#: Address-space cap of the child processes. A *normal* tiny load (import torch with its CUDA
#: libraries mapped, read the tiny official layout, one CPU thread) peaks at ~3.4 GiB of virtual
#: memory (VmPeak 3.36 GiB measured with torch 2.14 CPU+CUDA wheels; 3.0 GiB is too little to
#: import torch). 4.5 GiB leaves ~1.1 GiB of margin, well under the ~3 GiB each bomb would need.
AS_CAP = int(4.5 * (1 << 30))
#: Resident-memory ceiling asserted in the children (a normal tiny load: VmHWM ~0.95 GiB).
RSS_CEILING_KIB = int(1.6 * (1 << 20))

_STORAGE_TYPE = {torch.float32: torch.FloatStorage, torch.int64: torch.LongStorage}


# ---------------------------------------------------------------------------------------------
# Building hostile files
# ---------------------------------------------------------------------------------------------


class _Storage:
    """A storage reference written as torch does: ('storage', torch.FloatStorage, key, 'cpu', numel)."""

    def __init__(self, key, numel, dtype=torch.float32):
        self.key, self.numel, self.dtype = key, numel, dtype


class _Tensor:
    """Pickles as ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` with any claims."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class _Pickler(pickle.Pickler):
    def __init__(self, f, pid=None):
        super().__init__(f, protocol=2)
        self._pid = pid

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return self._pid or ("storage", _STORAGE_TYPE[obj.dtype], obj.key, "cpu", obj.numel)
        return None


def _as_refs(obj, records):
    """Replace real tensors in ``obj`` by :class:`_Tensor` references; their bytes go into ``records``."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().contiguous()
        key = f"r{len(records)}"
        records[key] = t.numpy().tobytes()
        return _Tensor(_Storage(key, t.numel(), t.dtype), 0, t.shape, t.stride())
    if isinstance(obj, dict):
        return type(obj)((k, _as_refs(v, records)) for k, v in obj.items())
    return obj


def write_zip_checkpoint(path, obj, records=None, pid=None, deflate=()):
    """A torch-style zip checkpoint of ``obj`` (real tensors become records); ``deflate`` names records
    to compress. A record given as an ``int`` is that many zero bytes, deflated in 16 MiB chunks."""
    records = dict(records or {})
    obj = _as_refs(obj, records)
    buf = io.BytesIO()
    _Pickler(buf, pid).dump(obj)
    with zipfile.ZipFile(path, "w", compresslevel=1) as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        zf.writestr("archive/version", "3\n")
        for key, data in records.items():
            zf.compression = zipfile.ZIP_DEFLATED if key in deflate else zipfile.ZIP_STORED  # level 1: fastest
            with zf.open(f"archive/data/{key}", "w", force_zip64=isinstance(data, int)) as f:
                if isinstance(data, int):
                    chunk = bytes(16 << 20)
                    for _ in range(data // len(chunk)):
                        f.write(chunk)
                else:
                    f.write(data)


def forge_uncompressed_size(path, name, size):
    """Make the zip headers (local and central) of record ``name`` claim ``size`` inflated bytes."""
    raw = bytearray(path.read_bytes())
    enc = name.encode()
    for sig, size_at, len_at, name_at in ((b"PK\x03\x04", 22, 26, 30), (b"PK\x01\x02", 24, 28, 46)):
        i = raw.find(sig)
        while i >= 0:
            n = struct.unpack_from("<H", raw, i + len_at)[0]
            if raw[i + name_at: i + name_at + n] == enc:
                struct.pack_into("<I", raw, i + size_at, size)
            i = raw.find(sig, i + 4)
    path.write_bytes(bytes(raw))


def official_ckpt(weights):
    """The tiny official associate_2.ckpt as a dict (the test's own file, so a full unpickle is fine)."""
    return torch.load(weights / "associate_2.ckpt", weights_only=False)


def _sha_tree(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


@pytest.fixture()
def weights_copy(official_layout, tmp_path):
    """A private copy of the tiny official weights folder (the base model is shared, read-only)."""
    base, weights = official_layout
    d = tmp_path / "OSDFace"
    shutil.copytree(weights, d)
    return base, d


def _convert_refuses(capsys, base, weights, out, *needles):
    """``osdface convert``: exit 2, one error line naming the file and ``needles``, nothing written."""
    before = _sha_tree(weights)
    assert main(["convert", "--base-model", str(base), "--weights", str(weights), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    msg = err[0]
    assert msg.startswith("osdface: error: ") and str(weights) in msg, msg
    for needle in needles:
        assert needle in msg, msg
    assert "weights_only" not in msg
    assert not out.exists()
    assert _sha_tree(weights) == before
    return msg


# ---------------------------------------------------------------------------------------------
# Memory bombs, in a child process under an address-space cap
# ---------------------------------------------------------------------------------------------

_CHILD = """
import json, resource, sys
cap = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
from osdface.cli import main
for weights, out in json.loads(sys.argv[3]):
    rc = main(["convert", "--base-model", sys.argv[2], "--weights", weights, "-o", out])
    print("RC", rc, flush=True)
    print("osdface: end of run", file=sys.stderr, flush=True)
hwm = [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print("VmHWM_KiB", hwm)
"""


def test_memory_bombs_refused_in_a_capped_child(official_layout, tmp_path):
    """One child process (under :data:`AS_CAP`) converts: the normal tiny release (so the cap is not
    what refuses the bombs), a ~2 kB codebook expanded (stride 0) to 24 million entries (3 GiB if
    the VRE were built from it), and a ~12 MB adapter whose deflated record inflates to 2.5 GiB."""
    base, weights = official_layout
    stride0, deflate = tmp_path / "stride0", tmp_path / "deflate"
    for d in (stride0, deflate):
        shutil.copytree(weights, d)
    ckpt = official_ckpt(weights)
    ckpt["state_dict"]["vqvae_LQ.quantize.embedding.weight"] = torch.randn(1, 32).expand(24_000_000, 32)
    torch.save(ckpt, stride0 / "associate_2.ckpt")
    n = 5 << 29
    write_zip_checkpoint(deflate / "embedding_change_weights.pth",
                         {"conv1.weight": _Tensor(_Storage("0", n // 4), 0, (n // 4,), (1,))},
                         records={"0": n}, deflate={"0"})
    assert (stride0 / "associate_2.ckpt").stat().st_size < 2 << 20
    assert (deflate / "embedding_change_weights.pth").stat().st_size < 32 << 20
    before = {d: _sha_tree(d) for d in (stride0, deflate)}
    runs = [(str(d), str(tmp_path / f"model_{d.name}")) for d in (weights, stride0, deflate)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-c", _CHILD, str(AS_CAP), str(base), json.dumps(runs)],
                       capture_output=True, text=True, timeout=300, env=env)
    rcs = [int(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("RC ")]
    hwm = [int(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("VmHWM_KiB")]
    errors = [[line for line in block.splitlines() if line.startswith("osdface: error:")]
              for block in r.stderr.split("osdface: end of run")]
    assert rcs == [0, 2, 2], r.stderr[-3000:]
    assert errors[0] == [], errors
    assert len(errors[1]) == 1 and str(stride0 / "associate_2.ckpt") in errors[1][0], errors
    assert "stride-0" in errors[1][0] and "(24000000, 32)" in errors[1][0]
    assert len(errors[2]) == 1 and str(deflate / "embedding_change_weights.pth") in errors[2][0], errors
    assert "decompression bomb" in errors[2][0]
    assert hwm and hwm[0] < RSS_CEILING_KIB
    assert (tmp_path / "model_OSDFace").is_dir()
    for d in (stride0, deflate):
        assert not (tmp_path / f"model_{d.name}").exists() and _sha_tree(d) == before[d]


# ---------------------------------------------------------------------------------------------
# The CLI on implausible or malformed release files
# ---------------------------------------------------------------------------------------------


def _tamper_vre(weights, key, value):
    ckpt = official_ckpt(weights)
    ckpt["state_dict"][key] = value
    torch.save(ckpt, weights / "associate_2.ckpt")


CODEBOOK = "vqvae_LQ.quantize.embedding.weight"


@pytest.mark.parametrize("case", ["huge_dense_codebook", "wide_conv_in", "expanded", "overlapping", "nan",
                                  "int_dtype", "not_a_tensor"])
def test_convert_refuses_implausible_vre(case, weights_copy, tmp_path, capsys):
    base, weights = weights_copy
    if case == "huge_dense_codebook":  # dense, so really in the file (9 MB), but over VRE_BOUNDS
        _tamper_vre(weights, CODEBOOK, torch.zeros(70_000, 32))
        needles = ("quantize.embedding.weight", "(70000, 32)", "65536", "VRE_BOUNDS['n_embed']")
    elif case == "wide_conv_in":
        _tamper_vre(weights, "vqvae_LQ.encoder.conv_in.weight", torch.zeros(5000, 3, 1, 1))
        needles = ("encoder.conv_in.weight", "(5000, 3, 1, 1)", "VRE_BOUNDS['channels']")
    elif case == "expanded":
        _tamper_vre(weights, CODEBOOK, torch.randn(1, 32).expand(100_000, 32))
        needles = ("quantize.embedding.weight", "stride-0")
    elif case == "overlapping":
        _tamper_vre(weights, CODEBOOK, torch.randn(64).as_strided((16, 32), (2, 1)))
        needles = ("overlapping",)
    elif case == "nan":
        cb = torch.randn(16, 32)
        cb[3, 4] = math.nan
        _tamper_vre(weights, CODEBOOK, cb)
        needles = ("'quantize.embedding.weight'", "NaN")
    elif case == "int_dtype":
        _tamper_vre(weights, "vqvae_LQ.quant_conv.bias", torch.zeros(32, dtype=torch.int64))
        needles = ("'quant_conv.bias'", "torch.int64")
    else:
        _tamper_vre(weights, "vqvae_LQ.quant_conv.bias", "not a tensor")
        needles = ("'quant_conv.bias'", "str, not a tensor")
    _convert_refuses(capsys, base, weights, tmp_path / "model", str(weights / "associate_2.ckpt"), *needles)


def _legacy_evil(path, marker):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": Evil()}, path, _use_new_zipfile_serialization=False)


@pytest.mark.parametrize("case", ["random_bytes", "truncated_zip", "empty", "legacy_code", "legacy_namespace",
                                  "plain_pickle_int", "top_level_list"])
def test_convert_names_what_an_unreadable_vre_file_is(case, weights_copy, tmp_path, capsys):
    base, weights = weights_copy
    vre = weights / "associate_2.ckpt"
    marker = tmp_path / "pwned"
    if case == "random_bytes":
        vre.write_bytes(np.random.default_rng(0).bytes(4096))
        needles = ("not a PyTorch checkpoint", "random bytes")
    elif case == "truncated_zip":
        vre.write_bytes(vre.read_bytes()[:5000])
        needles = ("truncated or corrupt zip",)
    elif case == "empty":
        vre.write_bytes(b"")
        needles = ("empty",)
    elif case == "legacy_code":
        _legacy_evil(vre, marker)
        needles = ("legacy (non-zip)", "system'")
    elif case == "legacy_namespace":
        torch.save(official_ckpt(weights), vre, _use_new_zipfile_serialization=False)
        needles = ("legacy (non-zip)", "'argparse.Namespace'", "zip")
    elif case == "plain_pickle_int":
        vre.write_bytes(pickle.dumps(5))
        needles = ("not a PyTorch checkpoint",)
    else:
        torch.save([1, 2], vre)
        needles = ("found list",)
    _convert_refuses(capsys, base, weights, tmp_path / "model", str(vre), *needles)
    assert not marker.exists()


def test_restore_with_implausible_weights_exits_2_and_writes_nothing(weights_copy, faces, tmp_path, capsys):
    base, weights = weights_copy
    _tamper_vre(weights, CODEBOOK, torch.randn(1, 32).expand(100_000, 32))
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, f in enumerate(faces[:2]):
        Image.fromarray(f).save(inputs / f"face{i}.png")
    before_in, before_w = _sha_tree(inputs), _sha_tree(weights)
    out = tmp_path / "out"
    rc = main(["restore", str(inputs), "-o", str(out), "--aligned", "--base-model", str(base),
               "--weights", str(weights)])
    assert rc == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and str(weights / "associate_2.ckpt") in err[0] and "stride-0" in err[0], err
    assert not out.exists() or not any(out.iterdir())
    assert _sha_tree(inputs) == before_in and _sha_tree(weights) == before_w


def test_nan_in_adapter_and_lora_names_the_first_bad_key(official_layout, tmp_path):
    from safetensors.torch import load_file, save_file

    from osdface.weights import load_lora_file, load_official_adapter_state_dict

    _, weights = official_layout
    sd = torch.load(weights / "embedding_change_weights.pth", weights_only=True)
    sd["conv2.bias"] = sd["conv2.bias"].clone()
    sd["conv2.bias"][0] = math.inf
    torch.save(sd, tmp_path / "adapter.pth")
    with pytest.raises(ModelFileError, match=r"adapter\.pth: 'conv2\.bias' contains NaN or Inf"):
        load_official_adapter_state_dict(tmp_path / "adapter.pth")
    lora = load_file(str(weights / "pytorch_lora_weights.safetensors"))
    first = next(iter(lora))
    lora[first] = torch.full_like(lora[first], math.nan)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ModelFileError, match=rf"lora\.safetensors: '{first}' contains NaN"):
        load_lora_file(tmp_path / "lora.safetensors")


# ---------------------------------------------------------------------------------------------
# The loader on malformed archives: only its documented errors, one line naming the file
# ---------------------------------------------------------------------------------------------

NS = argparse.Namespace(n_embed=16)  # forces our own reader (torch's weights_only refuses it)


def _ok_tensor(key="0"):
    return _Tensor(_Storage(key, 4), 0, (4,), (1,))


@pytest.mark.parametrize("restricted", [False, True], ids=["torch-reader", "own-reader"])
@pytest.mark.parametrize("case", ["missing_record", "bad_pid", "record_size", "past_end", "negative_stride",
                                  "lying_header", "top_level_none"])
def test_malformed_archives_raise_model_file_error(case, restricted, tmp_path):
    path = tmp_path / "bad.ckpt"
    extra = {"hp": NS} if restricted else {}
    records, pid, deflate = {"0": bytes(16)}, None, ()
    obj = {"w": _ok_tensor(), **extra}
    if case == "missing_record":
        records = {}
    elif case == "bad_pid":
        pid = ("storage", "not a type")
    elif case == "record_size":
        obj = {"w": _Tensor(_Storage("0", 10**6), 0, (10**6,), (1,)), **extra}
    elif case == "past_end":
        obj = {"w": _Tensor(_Storage("0", 4), 2, (4,), (1,)), **extra}
    elif case == "negative_stride":
        obj = {"w": _Tensor(_Storage("0", 4), 3, (4,), (-1,)), **extra}
    elif case == "lying_header":  # 16 MiB of zeros deflated; the headers claim the 16 bytes the tensor needs
        records, deflate = {"0": 16 << 20}, {"0"}
    else:
        obj = None if not restricted else [NS, None]
    write_zip_checkpoint(path, obj, records=records, pid=pid, deflate=deflate)
    if case == "lying_header":
        forge_uncompressed_size(path, "archive/data/0", 16)
    before = path.read_bytes()
    if case == "top_level_none":  # loads fine; the release readers then name what was found
        from osdface.weights import load_official_adapter_state_dict

        with pytest.raises(ModelFileError) as e:
            load_official_adapter_state_dict(path)
    else:
        with pytest.raises(ModelFileError) as e:
            load_torch_checkpoint(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg and "weights_only" not in msg, msg
    assert path.read_bytes() == before


def test_size_claims_inside_the_pickle_are_refused(tmp_path):
    """``bytearray(10**12)`` is a builtin call the pickle may make; a size argument is refused."""

    class Bomb:
        def __reduce__(self):
            return (bytearray, (10**12,))

    path = tmp_path / "b.ckpt"
    write_zip_checkpoint(path, {"hp": NS, "b": Bomb()})
    with pytest.raises(ModelFileError, match=r"b\.ckpt: malformed checkpoint: bytearray\(\) called with a int"):
        load_torch_checkpoint(path)


def test_legacy_storage_claim_past_the_file_is_refused(tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.zeros(4)}, path, _use_new_zipfile_serialization=False)
    raw = bytearray(path.read_bytes())
    size_at = len(raw) - 16 - 8  # the int64 element count written before the 16 data bytes
    assert struct.unpack_from("<q", raw, size_at)[0] == 4
    raw = raw[:-8]  # truncate the data
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match=r"legacy\.pth: legacy storage .* past the end"):
        load_torch_checkpoint(path)


def test_documented_errors_only(tmp_path):
    with pytest.raises(WeightsNotFoundError):
        load_torch_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "x.pth").write_bytes(b"\x00" * 100)
    with pytest.raises(ModelFileError) as e:
        load_torch_checkpoint(tmp_path / "x.pth")
    assert isinstance(e.value, ValueError)  # old `except ValueError` callers still catch it
    assert not issubclass(UnsafeCheckpointError, ValueError)
