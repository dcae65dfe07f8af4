"""The hostile-input corpus (issue 12): small, named, hostile variants of every model input.

Nothing here is a committed binary: :func:`build_corpus` writes everything from tiny seeded models
(:func:`osdface.testing.write_official_layout`, ``osdface convert``, one ``osdface train generator``
step) plus ``pickle`` / ``zipfile`` / ``torch.save`` / ``json``. Each :class:`Case` is one pristine
model input (an official-layout folder, a converted model folder, a stage-2 run) with exactly one
file (or folder) made hostile: code-running pickles, random bytes, truncation, wrong top-level
objects, wrong keys and shapes, NaNs, absurd configs, memory bombs.

Families and the subcommands that read them (see :data:`COMMANDS`):

* ``official``: ``--base-model SD_DIR --weights OSDFACE_DIR`` → ``restore --aligned``, ``restore``
  (whole photo), ``convert``, ``train generator --weights``;
* ``model``: ``--model MODEL_DIR`` (made by ``convert``) → ``restore --aligned``, ``restore``;
* ``run``: a stage-2 run folder → ``export -o``, ``export --official-layout``. The checkpoint's
  ``manifest.json`` checksums are recomputed after the hostile edit (a forged but consistent run),
  so the hostile file reaches the parsers; ``*-not-resealed`` cases keep the old sums;
* ``resume``: a stage-2 run folder → ``train generator --resume`` (a valid resume at the last step
  trains nothing; a refused one must leave the run untouched);
* face-layer files (:data:`FILE_FAMILIES`), with the pristine ``--model`` folder: ``retinaface``
  (``--detector retinaface_mobile0.25 --detector-weights``), ``retinaface-r50`` (``--detector
  retinaface_resnet50``; refusals only), ``yunet`` (.onnx) → ``restore`` (whole photo) and ``align``;
  ``parsing`` (``--parsing-model``), ``bg-upsampler`` / ``bg-upsampler-st`` (``--upscale 2
  --bg-upsampler`` .pth / .safetensors) → ``restore``;
* metric weight files: ``metric-lpips``, ``metric-ids`` (ArcFace .pth), ``metric-facenet``,
  ``metric-niqe`` (.npz), each alone in a ``--weights-dir`` → ``evaluate`` and ``benchmark-table``
  with that one metric. :data:`SKIPPED_METRIC_FILES` lists the files left out and why.

The valid face-layer and metric files are osdface's own network classes with random weights
(:func:`build_pristine_files`), each run once as a control, so a refusal is about the file.

Cases marked ``bomb`` could make an unguarded loader allocate gigabytes; the tests run them in a
child process under ``RLIMIT_AS`` (:func:`run_capped`).

As a script, writes the corpus and a README listing the cases::

    python tests/hostile/corpus.py OUT_DIR
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import io
import json
import os
import pickle
import random
import shutil
import struct
import sys
import traceback
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TINY_GENERATOR_CONFIG = REPO / "configs" / "generator-tiny.yaml"
PHOTO_SOURCE = REPO / "tests" / "assets" / "face" / "kodim04.jpg"

BASE = "stable-diffusion-2-1-base"
WEIGHTS = "OSDFace"
VRE_FILE = "associate_2.ckpt"
ADAPTER_FILE = "embedding_change_weights.pth"
LORA_FILE = "pytorch_lora_weights.safetensors"
CKPT = "checkpoints/step-0000001"  # the one checkpoint of the pristine stage-2 run

#: Expected outcomes.
REFUSE = "refuse"  # exit 2; last stderr line 'osdface: error: ...' naming the file; nothing written
REFUSE_OR_FAIL_INPUT = "refuse-or-fail-input"  # REFUSE, or (restore only) exit 1 reporting each input, naming the file
REFUSE_OR_ACCEPT = "refuse-or-accept"  # an unusual but not harmful file: REFUSE, or exit 0
ACCEPT = "accept"  # a valid file: exit 0

#: Bombs: a normal run's peak address space + this margin is the child's RLIMIT_AS.
CAP_MARGIN = 1 << 30
#: Zip bomb: the deflated zero record inflates to this many bytes (~2 MB file; deflate tops out at ~1030:1).
ZIP_BOMB_BYTES = 2 << 30
#: Stride-0 codebook: dictionary entries claimed (x 32 floats = 3.1 GB if ever materialised).
STRIDE0_ENTRIES = 24_000_000
#: Stride-0 weight of a face-layer / metric file: claimed size if ever materialised.
STRIDE0_BYTES = 3 << 30

FAST_TRAIN = ["loss.ea_dists=0", "loss.identity=0", "data.val_images=0", "train.val_every=0"]


# ----------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One hostile variant, materialised under ``root`` by :func:`build_corpus`."""

    name: str  # "<family>/<slug>"
    family: str  # official | model | run
    target: str  # offending file or folder, relative to ``root``
    description: str
    expect: str = REFUSE
    bomb: bool = False
    root: Path = Path()
    base: Path | None = None  # SD 2.1-base folder the commands use
    weights: Path | None = None  # official release folder
    model: Path | None = None  # converted model folder
    run: Path | None = None  # stage-2 run folder
    shared: list[Path] = field(default_factory=list)  # pristine folders the commands also read

    @property
    def commands(self) -> tuple[str, ...]:
        return FAMILY_COMMANDS[self.family]

    @property
    def offending(self) -> Path:
        return self.root / self.target

    @property
    def needle(self) -> str:
        """What the error must name: the file's basename, with its subfolder inside a model folder."""
        parts = Path(self.target).parts
        inner = parts[1:]  # drop OSDFace/, model/, run/, stable-diffusion-2-1-base/
        if self.family in ("run", "resume") and len(inner) > 2 and inner[0] == "checkpoints":
            inner = inner[2:]
        return "/".join(inner[-2:]) if len(inner) > 1 else inner[-1]

    @property
    def marker(self) -> Path:
        """Created only if code from a hostile file ran."""
        return self.root / "PWNED"

    def input_roots(self, inputs: Path) -> list[Path]:
        return [self.root, *self.shared, inputs]


@dataclass
class _Spec:
    family: str
    target: str
    slug: str
    description: str
    make: Callable[[Path, _Ctx], None]
    expect: str = REFUSE
    bomb: bool = False

    @property
    def name(self) -> str:
        return f"{self.family}/{self.slug}"


@dataclass
class _Ctx:
    vre_ckpt: dict  # the pristine associate_2.ckpt content
    adapter: dict
    lora: dict
    marker: Path
    seed: int
    nets: dict = field(default_factory=dict)  # file family -> its pristine state dict (face layer, metrics)
    pristine: Path | None = None  # the case's pristine file (file families)


SPECS: list[_Spec] = []


def _spec(family, target, slug, description, expect=REFUSE, bomb=False):
    def deco(fn):
        SPECS.append(_Spec(family, target, slug, description, fn, expect, bomb))
        return fn

    return deco


# ----------------------------------------------------------------------------------------- writers
class _RunsCode:
    """Unpickling this runs a shell command (``os.system``): the payload of a malicious checkpoint."""

    def __init__(self, marker: Path):
        self.cmd = f"touch '{marker}'"

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _Rec:
    """A storage record of a hand-written torch zip archive."""

    def __init__(self, key: str, numel: int):
        self.key, self.numel = key, numel


class _FakeTensor:
    """Pickles exactly as ``torch.save`` pickles a float32 tensor: ``_rebuild_tensor_v2(storage, ...)``."""

    def __init__(self, rec: _Rec, size, stride):
        self.rec, self.size, self.stride = rec, tuple(size), tuple(stride)

    def __reduce_ex__(self, protocol):
        import torch

        return (torch._utils._rebuild_tensor_v2,
                (self.rec, 0, self.size, self.stride, False, collections.OrderedDict()))


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Rec):
            import torch

            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


def write_zip_bomb_checkpoint(path: Path, obj: Any, bomb_key: tuple[str, ...], inflated_bytes: int = ZIP_BOMB_BYTES,
                              columns: int = 32) -> None:
    """A torch zip checkpoint of ``obj`` whose tensor at ``obj[k0][k1]...`` (``bomb_key``) is a
    ``(inflated_bytes / 4 / columns, columns)`` float32 tensor stored as a ZIP_DEFLATED record of
    zeros: a small file (~1 MB per GiB) that inflates to ``inflated_bytes`` when read.

    The zeros are streamed through :mod:`zipfile`; each 16 MiB chunk compresses (full flush) to the
    same bytes, so the compressor replays them instead of deflating gigabytes again.
    """
    import torch

    records: dict[str, bytes] = {}

    def convert(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().float().contiguous()
            rec = _Rec(str(len(records)), t.numel())
            records[rec.key] = t.numpy().tobytes()
            return _FakeTensor(rec, t.shape, t.stride())
        if isinstance(x, dict):
            return {k: convert(v) for k, v in x.items()}
        return x

    out = convert(obj)
    chunk = 1 << 24
    n_chunks = inflated_bytes // chunk
    numel = n_chunks * chunk // 4
    holder = out
    for k in bomb_key[:-1]:
        holder = holder[k]
    holder[bomb_key[-1]] = _FakeTensor(_Rec("bomb", numel), (numel // columns, columns), (columns, 1))
    buf = io.BytesIO()
    _TorchPickler(buf, protocol=2).dump(out)
    prefix = path.stem
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{prefix}/data.pkl", buf.getvalue())
        zf.writestr(f"{prefix}/byteorder", "little")
        for key, raw in records.items():
            zf.writestr(f"{prefix}/data/{key}", raw)
        info = zipfile.ZipInfo(f"{prefix}/data/bomb")
        info.compress_type = zipfile.ZIP_DEFLATED
        zeros = bytes(chunk)
        deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
        block = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)

        class _Replay:  # the deflate output of one more chunk of zeros after a full flush
            def compress(self, data):
                assert len(data) == chunk
                return block

            def flush(self):
                return deflate.flush()

        with zf.open(info, "w", force_zip64=inflated_bytes >= 1 << 31) as f:
            f._compressor = _Replay()
            for _ in range(n_chunks):
                f.write(zeros)
        zf.writestr(f"{prefix}/version", "3\n")


def _torch_save(obj, path: Path, legacy: bool = False) -> None:
    import torch

    if legacy:
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        torch.save(obj, path)


def _random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=2))


def _with_state_dict(ctx: _Ctx, sd: dict) -> dict:
    return {**ctx.vre_ckpt, "state_dict": sd}


# -------------------------------------------------------------------- official layout: .ckpt / .pth
_CODEBOOK = "vqvae_LQ.quantize.embedding.weight"


def _register_torch_file_cases() -> None:
    for file, short in ((VRE_FILE, "ckpt"), (ADAPTER_FILE, "pth")):
        target = f"{WEIGHTS}/{file}"
        is_vre = file == VRE_FILE

        def good(ctx, is_vre=is_vre):
            return ctx.vre_ckpt if is_vre else ctx.adapter

        def good_sd(ctx, is_vre=is_vre):
            return dict(ctx.vre_ckpt["state_dict"] if is_vre else ctx.adapter)

        def save_sd(path, ctx, sd, is_vre=is_vre):
            _torch_save(_with_state_dict(ctx, sd) if is_vre else sd, path)

        _spec("official", target, f"{short}-zip-os-system",
              f"{file}: zip checkpoint whose pickle calls os.system (touches a marker file)")(
            lambda p, c, is_vre=is_vre: _torch_save(
                {**c.vre_ckpt, "hyper_parameters": _RunsCode(c.marker)} if is_vre else _RunsCode(c.marker), p))
        _spec("official", target, f"{short}-legacy-os-system",
              f"{file}: legacy (non-zip) torch.save file whose pickle calls os.system")(
            lambda p, c: _torch_save(_RunsCode(c.marker), p, legacy=True))
        _spec("official", target, f"{short}-random-bytes", f"{file}: 4 KiB of random bytes")(
            lambda p, c: p.write_bytes(_random_bytes(4096, c.seed)))
        _spec("official", target, f"{short}-empty", f"{file}: 0 bytes")(lambda p, c: p.write_bytes(b""))
        _spec("official", target, f"{short}-truncated-zip", f"{file}: the valid zip cut in half")(
            lambda p, c: _truncate(p))
        _spec("official", target, f"{short}-legacy-format",
              f"{file}: the valid content saved in torch's legacy (non-zip) format",
              expect=REFUSE_OR_ACCEPT if is_vre else ACCEPT)(
            lambda p, c, good=good: _torch_save(good(c), p, legacy=True))
        for name, obj in (("list", [1.0, 2.0]), ("int", 7), ("none", None)):
            _spec("official", target, f"{short}-toplevel-{name}", f"{file}: a zip whose data.pkl top level is {obj!r}")(
                lambda p, c, obj=obj: _torch_save(obj, p))

        def non_tensor(p, c, good_sd=good_sd, save_sd=save_sd, is_vre=is_vre):
            sd = good_sd(c)
            key = _CODEBOOK if is_vre else next(iter(sd))
            sd[key] = [[0.5] * 4] * 4
            save_sd(p, c, sd)

        _spec("official", target, f"{short}-non-tensor-value", f"{file}: a state-dict value is a nested list")(
            non_tensor)

        def missing(p, c, good_sd=good_sd, save_sd=save_sd, is_vre=is_vre):
            sd = good_sd(c)
            del sd[_CODEBOOK if is_vre else next(iter(sd))]
            save_sd(p, c, sd)

        _spec("official", target, f"{short}-missing-keys", f"{file}: a required tensor is missing")(missing)

        def extra(p, c, good_sd=good_sd, save_sd=save_sd, is_vre=is_vre):
            import torch

            sd = good_sd(c)
            sd["vqvae_LQ.encoder.extra.weight" if is_vre else "extra.weight"] = torch.zeros(3, 3)
            save_sd(p, c, sd)

        _spec("official", target, f"{short}-extra-keys", f"{file}: an unexpected tensor besides the real ones")(extra)

        def wrong_shape(p, c, good_sd=good_sd, save_sd=save_sd, is_vre=is_vre):
            import torch

            sd = good_sd(c)
            key = "vqvae_LQ.quant_conv.weight" if is_vre else "conv1.weight"
            shape = list(sd[key].shape)
            shape[-1] += 2
            sd[key] = torch.zeros(shape)
            save_sd(p, c, sd)

        _spec("official", target, f"{short}-wrong-shapes", f"{file}: a tensor with a wrong shape")(wrong_shape)

        def nan(p, c, good_sd=good_sd, save_sd=save_sd, is_vre=is_vre):
            sd = good_sd(c)
            if is_vre:  # the whole dictionary: every prompt token is NaN
                sd[_CODEBOOK] = sd[_CODEBOOK].clone().fill_(float("nan"))
            else:
                w = sd["conv1.weight"].clone()
                w.view(-1)[0] = float("nan")
                sd["conv1.weight"] = w
            save_sd(p, c, sd)

        _spec("official", target, f"{short}-nan-values", f"{file}: NaN weights", expect=REFUSE_OR_FAIL_INPUT)(nan)

        def zip_bomb(p, c, good_sd=good_sd, is_vre=is_vre):
            sd = good_sd(c)
            if is_vre:
                write_zip_bomb_checkpoint(p, _with_state_dict(c, sd), ("state_dict", _CODEBOOK))
            else:
                write_zip_bomb_checkpoint(p, sd, ("conv2.weight",))

        _spec("official", target, f"{short}-zip-bomb",
              f"{file}: a deflated storage record that inflates to {ZIP_BOMB_BYTES >> 30} GiB (~2 MB file)",
              bomb=True)(zip_bomb)

    def stride0(p, c):
        import torch

        sd = dict(c.vre_ckpt["state_dict"])
        sd[_CODEBOOK] = torch.full((1,), 0.5).expand(STRIDE0_ENTRIES, sd[_CODEBOOK].shape[1])
        _torch_save(_with_state_dict(c, sd), p)

    _spec("official", f"{WEIGHTS}/{VRE_FILE}", "ckpt-stride0-codebook",
          f"{VRE_FILE}: a stride-0 (expanded) codebook claiming {STRIDE0_ENTRIES:,} entries in a 1-element storage",
          bomb=True)(stride0)


_register_torch_file_cases()


# ------------------------------------------------------------------- official layout: LoRA file
_LT = f"{WEIGHTS}/{LORA_FILE}"


def _safetensors_raw(header: dict, data: bytes, length: int | None = None) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + data


_spec("official", _LT, "lora-empty", f"{LORA_FILE}: 0 bytes")(lambda p, c: p.write_bytes(b""))
_spec("official", _LT, "lora-random-bytes", f"{LORA_FILE}: 4 KiB of random bytes")(
    lambda p, c: p.write_bytes(_random_bytes(4096, c.seed + 1)))
_spec("official", _LT, "lora-truncated", f"{LORA_FILE}: the valid file cut in half")(lambda p, c: _truncate(p))
_spec("official", _LT, "lora-header-huge-tensors",
      f"{LORA_FILE}: a header claiming two 10^6 x 10^6 float32 tensors (4 TB) over 16 bytes of data")(
    lambda p, c: p.write_bytes(_safetensors_raw({
        "unet.conv_in.lora_A.weight": {"dtype": "F32", "shape": [1000000, 1000000], "data_offsets": [0, 4 * 10**12]},
        "unet.conv_in.lora_B.weight": {"dtype": "F32", "shape": [1000000, 1000000],
                                       "data_offsets": [4 * 10**12, 8 * 10**12]},
    }, bytes(16))))
_spec("official", _LT, "lora-header-length-huge", f"{LORA_FILE}: the header-length field claims 2^62 bytes")(
    lambda p, c: p.write_bytes(_safetensors_raw({}, bytes(16), length=1 << 62)))


def _lora_save(p: Path, sd: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(p))


def _lora_wrong_keys(p, c):
    import torch

    _lora_save(p, {"unet.no_such_block.to_q.lora_A.weight": torch.zeros(4, 32),
                   "unet.no_such_block.to_q.lora_B.weight": torch.zeros(32, 4)})


def _lora_wrong_shapes(p, c):
    import torch

    sd = dict(c.lora)
    key = next(k for k in sd if k.endswith("lora_B.weight"))
    shape = list(sd[key].shape)
    shape[1] += 3  # rank of B no longer matches A
    sd[key] = torch.zeros(shape)
    _lora_save(p, sd)


def _lora_nan(p, c):
    sd = dict(c.lora)
    key = next(k for k in sd if k.endswith("lora_B.weight"))
    sd[key] = sd[key].clone().fill_(float("nan"))
    _lora_save(p, sd)


_spec("official", _LT, "lora-wrong-keys", f"{LORA_FILE}: valid safetensors whose keys name no UNet module")(
    _lora_wrong_keys)
_spec("official", _LT, "lora-wrong-shapes", f"{LORA_FILE}: a lora_B whose rank does not match its lora_A")(
    _lora_wrong_shapes)
_spec("official", _LT, "lora-nan-values", f"{LORA_FILE}: a NaN lora_B", expect=REFUSE_OR_FAIL_INPUT)(_lora_nan)


# ------------------------------------------------------------------- official layout: SD base folder
_spec("official", f"{BASE}/unet/config.json", "base-unet-config-huge-channel",
      "SD base unet/config.json: block_out_channels [1000000, 64]", bomb=True)(
    lambda p, c: _edit_json(p, block_out_channels=[1000000, 64]))
_spec("official", f"{BASE}/unet/config.json", "base-unet-config-malformed", "SD base unet/config.json: not JSON")(
    lambda p, c: p.write_text('{"block_out_channels": [32, 64'))
_spec("official", f"{BASE}/unet/diffusion_pytorch_model.safetensors", "base-unet-weights-truncated",
      "SD base unet weights cut in half")(lambda p, c: _truncate(p))
_spec("official", f"{BASE}/vae/config.json", "base-vae-config-absurd",
      "SD base vae/config.json: latent_channels 10^6, block_out_channels 10^7", bomb=True)(
    lambda p, c: _edit_json(p, latent_channels=1000000, block_out_channels=[10**7, 8, 16, 16]))
_spec("official", f"{BASE}/scheduler/scheduler_config.json", "base-scheduler-10-steps",
      "SD base scheduler_config.json: num_train_timesteps 10 (the model runs at t=399)")(
    lambda p, c: _edit_json(p, num_train_timesteps=10))


# ------------------------------------------------------------------------------- model folder
def _model_spec(target, slug, description, **kw):
    return _spec("model", f"model/{target}", slug, description, **kw)


_model_spec("model_index.json", "index-malformed", "model_index.json: not JSON")(
    lambda p, c: p.write_text('{"_class_name": "OSDFacePipeline", "timestep": '))
_model_spec("model_index.json", "index-wrong-types", 'model_index.json: "timestep": [399], "resolution": {"px": 64}')(
    lambda p, c: _edit_json(p, timestep=[399], resolution={"px": 64}))
_model_spec("model_index.json", "index-not-an-object", "model_index.json: a JSON list")(
    lambda p, c: p.write_text("[1, 2, 3]"))
_model_spec("model_index.json", "index-timestep-5000", "model_index.json: timestep 5000 (scheduler has 1000)")(
    lambda p, c: _edit_json(p, timestep=5000))
_model_spec("model_index.json", "index-resolution-3000", "model_index.json: resolution 3000 (the VRE is 64 px)",
            bomb=True)(lambda p, c: _edit_json(p, resolution=3000))
_model_spec("unet/config.json", "unet-config-huge-channel", "unet/config.json: block_out_channels [1000000, 64]",
            bomb=True)(lambda p, c: _edit_json(p, block_out_channels=[1000000, 64]))
_model_spec("unet/config.json", "unet-config-wrong-types", 'unet/config.json: "layers_per_block": "two"')(
    lambda p, c: _edit_json(p, layers_per_block="two"))
_model_spec("vae/config.json", "vae-config-absurd", "vae/config.json: latent_channels 10^6, block_out_channels 10^7",
            bomb=True)(lambda p, c: _edit_json(p, latent_channels=1000000, block_out_channels=[10**7, 8, 16, 16]))
_model_spec("vre/config.json", "vre-config-absurd", "vre/config.json: n_embed 10^9, num_tokens 10^8", bomb=True)(
    lambda p, c: _edit_json(p, n_embed=10**9, num_tokens=10**8))
_model_spec("scheduler/scheduler_config.json", "scheduler-config-malformed", "scheduler_config.json: not JSON")(
    lambda p, c: p.write_text("{]"))
_model_spec("unet/diffusion_pytorch_model.safetensors", "unet-weights-empty", "unet weights: 0 bytes")(
    lambda p, c: p.write_bytes(b""))
_model_spec("unet/diffusion_pytorch_model.safetensors", "unet-weights-truncated", "unet weights cut in half")(
    lambda p, c: _truncate(p))
_model_spec("vre/diffusion_pytorch_model.safetensors", "vre-weights-random-bytes", "vre weights: random bytes")(
    lambda p, c: p.write_bytes(_random_bytes(4096, c.seed + 2)))


def _nofuse(fn):
    fn.nofuse = True  # the case starts from the --no-fuse-lora model folder (with unet_lora/)
    return fn


_model_spec("unet_lora/adapter_config.json", "lora-config-malformed", "unet_lora/adapter_config.json: not JSON")(
    _nofuse(lambda p, c: p.write_text('{"r": 4, "lora_alpha": ')))
_model_spec("unet_lora/adapter_config.json", "lora-config-alpha-abc", 'unet_lora/adapter_config.json: "lora_alpha": "abc"')(
    _nofuse(lambda p, c: _edit_json(p, lora_alpha="abc")))
_model_spec("unet_lora/adapter_config.json", "lora-config-missing",
            "unet_lora/adapter_config.json deleted (the LoRA weights are there)")(_nofuse(lambda p, c: p.unlink()))
_model_spec(f"unet_lora/{LORA_FILE}", "lora-nan", "unet_lora weights: a NaN lora_B", expect=REFUSE_OR_FAIL_INPUT)(
    _nofuse(lambda p, c: _lora_nan(p, c)))
_model_spec("vae", "missing-subfolder", "the vae/ subfolder is missing")(lambda p, c: shutil.rmtree(p))


# ----------------------------------------------------------------------------------- stage-2 run
def _unsealed(fn):
    fn.unsealed = True  # keep the checkpoint's manifest.json as it was (see reseal_manifest)
    return fn


def reseal_manifest(ckpt: Path, pristine_ckpt: Path) -> None:
    """Recompute the sizes and SHA-256 sums in ``ckpt/manifest.json`` (if there is one) for the files as
    they are now: a consistent, forged checkpoint, so the hostile file reaches the parsers behind the
    checksum check. Files the pristine manifest leaves out (``trainer_state.json``) stay out."""
    manifest = ckpt / "manifest.json"
    if not manifest.is_file():
        return
    data = json.loads(manifest.read_text())
    listed = set(data["files"])
    unlisted = {p.relative_to(pristine_ckpt).as_posix() for p in pristine_ckpt.rglob("*") if p.is_file()} - listed
    data["files"] = {
        rel: {"size": q.stat().st_size, "sha256": hashlib.sha256(q.read_bytes()).hexdigest()}
        for q in sorted(ckpt.rglob("*")) if q.is_file()
        for rel in [q.relative_to(ckpt).as_posix()] if rel not in unlisted and rel != "manifest.json"
    }
    manifest.write_text(json.dumps(data, indent=1))


def _run_spec(target, slug, description, **kw):
    return _spec("run", f"run/{CKPT}/{target}", slug, description, **kw)


_run_spec(f"unet_lora/{LORA_FILE}", "lora-empty", "checkpoint unet_lora weights: 0 bytes")(
    lambda p, c: p.write_bytes(b""))
_run_spec(f"unet_lora/{LORA_FILE}", "lora-nan", "checkpoint unet_lora weights: a NaN lora_B")(_lora_nan)
_run_spec("unet_lora/adapter_config.json", "lora-config-malformed", "checkpoint unet_lora/adapter_config.json: not JSON")(
    lambda p, c: p.write_text('{"r": '))
_run_spec("unet_lora/adapter_config.json", "lora-config-alpha-abc", 'checkpoint adapter_config.json: "lora_alpha": "abc"')(
    lambda p, c: _edit_json(p, lora_alpha="abc"))
_run_spec("vre/config.json", "vre-config-absurd", "checkpoint vre/config.json: n_embed 10^9, num_tokens 10^8",
          bomb=True)(lambda p, c: _edit_json(p, n_embed=10**9, num_tokens=10**8))
_run_spec("prompt_adapter/diffusion_pytorch_model.safetensors", "adapter-weights-truncated",
          "checkpoint prompt_adapter weights cut in half")(lambda p, c: _truncate(p))
_run_spec("config.yaml", "config-yaml-malformed", "checkpoint config.yaml: not YAML")(
    lambda p, c: p.write_text("model: {base_model: [\n"))
_run_spec("config.yaml", "config-yaml-python-tag", "checkpoint config.yaml: a !!python/object/apply:os.system tag")(
    lambda p, c: p.write_text(f"model: !!python/object/apply:os.system [\"touch '{c.marker}'\"]\n"))


_run_spec(f"unet_lora/{LORA_FILE}", "tampered-not-resealed",
          "checkpoint unet_lora weights NaN, manifest.json checksums left as they were (tampering shows)")(
    _unsealed(lambda p, c: _lora_nan(p, c)))
_run_spec("manifest.json", "manifest-malformed", "checkpoint manifest.json: not JSON")(
    _unsealed(lambda p, c: p.write_text('{"files": ')))


# ------------------------------------------------------------------ stage-2 run, resumed (--resume)
def _resume_spec(target, slug, description, **kw):
    return _spec("resume", f"run/{CKPT}/{target}", slug, description, **kw)


_resume_spec("accelerate_state/optimizer.bin", "optimizer-os-system",
             "accelerate_state/optimizer.bin: a pickle calling os.system")(
    lambda p, c: _torch_save(_RunsCode(c.marker), p))
_resume_spec("accelerate_state/model.safetensors", "trainables-empty", "accelerate_state/model.safetensors: 0 bytes")(
    lambda p, c: p.write_bytes(b""))
_resume_spec("accelerate_state/random_states_0.pkl", "rng-state-random-bytes",
             "accelerate_state/random_states_0.pkl: random bytes (a resume would silently lose determinism)")(
    lambda p, c: p.write_bytes(_random_bytes(999, c.seed + 3)))
_resume_spec("trainer_state.json", "trainer-state-malformed", "trainer_state.json: not JSON")(
    lambda p, c: p.write_text("{"))
_resume_spec("trainer_state.json", "trainer-state-wrong-types", 'trainer_state.json: "step": "x"')(
    lambda p, c: _edit_json(p, step="x"))
_resume_spec("accelerate_state/model.safetensors", "tampered-not-resealed",
             "accelerate_state/model.safetensors truncated, manifest.json checksums left as they were")(
    _unsealed(lambda p, c: _truncate(p)))


# ------------------------------------------------------- face-layer and metric weight files
#: File families: one model file read through one command-line option, relative to the case root
#: (and, for the valid original, to ``_pristine/``). The valid originals are real-architecture
#: state dicts of osdface's own classes with random weights (:func:`build_pristine_files`).
FILE_FAMILIES: dict[str, str] = {
    "retinaface": "face/detection_mobilenet0.25_Final.pth",  # --detector retinaface_mobile0.25
    "retinaface-r50": "face/detection_Resnet50_Final.pth",  # --detector retinaface_resnet50: refusals only
    "yunet": "face/face_detection_yunet_2023mar_int8bq.onnx",  # --detector yunet
    "parsing": "face/parsing_parsenet.pth",  # --parsing-model
    "bg-upsampler": "face/RealESRGAN_x2plus.pth",  # --upscale 2 --bg-upsampler
    "bg-upsampler-st": "face/RealESRGAN_x2plus.safetensors",
    "metric-lpips": "metrics/lpips_alex.safetensors",  # evaluate --metrics lpips --weights-dir
    "metric-ids": "metrics/arcface_resnet18.pth",  # --metrics ids
    "metric-facenet": "metrics/facenet_inception_resnet_v1.safetensors",  # --metrics ids_facenet
    "metric-niqe": "metrics/niqe_pris_params.npz",  # --metrics niqe
}
#: Families without a valid original (a RetinaFace-ResNet-50 file is ~105 MB): refusals only.
NO_PRISTINE = {"retinaface-r50"}
METRIC_OF = {"metric-lpips": "lpips", "metric-ids": "ids", "metric-facenet": "ids_facenet", "metric-niqe": "niqe"}
#: Metric weight files the corpus leaves out, and why.
SKIPPED_METRIC_FILES = {
    "lpips_vgg.safetensors, dists_vgg16.safetensors": "59 MB each; the same reader and strict check as "
                                                      "lpips_alex.safetensors (covered)",
    "musiq_koniq.pth": "~100 MB ViT checkpoint",
    "maniqa_*.pth": "ViT-B/8 checkpoints, hundreds of MB",
    "RN50.pt (clipiqa)": "~100 MB TorchScript archive",
    "alignment_WFLW_4HG.pth (lmd)": "97 MB, and a normal tiny lmd run takes ~25 s on CPU",
    "fid_inception_v3.safetensors / --fid-stats": "fid builds the 95 MB Inception before it reads --fid-stats "
                                                  "(which it reads only after computing the features)",
}
NIQE_KEYS = ("mu_pris_param", "cov_pris_param", "gaussian_window")


def _save_state_dict(path: Path, sd: dict) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        _torch_save(sd, path)


def _niqe_arrays(seed: int, n: int = 36) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, n))
    g = np.exp(-((np.arange(7) - 3.0) ** 2) / (2 * (7 / 6) ** 2))
    window = np.outer(g, g)
    return {"mu_pris_param": rng.normal(size=(1, n)), "cov_pris_param": a @ a.T / n + np.eye(n),
            "gaussian_window": window / window.sum()}


def build_pristine_files(root: Path, seed: int = 0) -> dict[str, dict]:
    """Write the valid original of every file family under ``root``; returns family -> state dict.

    Small real architectures (RetinaFace-MobileNet-0.25, an ×2 RRDBNet with 8 features, 1 block)
    and the fixed ones the loaders build (ParseNet 512, LPIPS-Alex, ArcFace ResNet-18, FaceNet),
    random weights; YuNet is the shipped ONNX file; NIQE parameters are a random SPD model.
    """
    import numpy as np
    import torch

    from osdface.face.background import RRDBNet
    from osdface.face.detection import find_yunet_model
    from osdface.face.parsing import ParseNet
    from osdface.face.retinaface import RetinaFaceNet
    from osdface.io.networks import build_lpips
    from osdface.models.identity import ArcFaceResNet, InceptionResnetV1

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        nets = {"retinaface": RetinaFaceNet("mobilenet0.25"), "parsing": ParseNet(),
                "bg-upsampler": RRDBNet(scale=2, num_feat=8, num_block=1, num_grow_ch=4),
                "metric-lpips": build_lpips("alex", pretrained=False), "metric-ids": ArcFaceResNet(),
                "metric-facenet": InceptionResnetV1()}
        sds = {f: {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()} for f, net in nets.items()}
    sds["bg-upsampler-st"] = sds["bg-upsampler"]
    for family, target in FILE_FAMILIES.items():
        (root / target).parent.mkdir(parents=True, exist_ok=True)
        if family in sds:
            _save_state_dict(root / target, sds[family])
    shutil.copyfile(find_yunet_model(), root / FILE_FAMILIES["yunet"])
    np.savez(root / FILE_FAMILIES["metric-niqe"], **_niqe_arrays(seed))
    return sds


def _half_of_pristine(p: Path, c: _Ctx) -> None:
    data = c.pristine.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _first_matrix_key(sd: dict) -> str:
    """The first conv / linear weight (>= 2 dimensions)."""
    return next(k for k, v in sd.items() if v.ndim >= 2 and k.endswith("weight"))


def _register_file_family(family: str, foreign: str | None = None) -> None:
    """The hostile variants of one face-layer or metric file (kind from its suffix)."""
    target = FILE_FAMILIES[family]
    file = Path(target).name
    kind = Path(target).suffix

    def spec(slug, description, **kw):
        return _spec(family, target, slug, f"{file}: {description}", **kw)

    spec("random-bytes", "4 KiB of random bytes")(lambda p, c: p.write_bytes(_random_bytes(4096, c.seed + 7)))
    spec("empty", "0 bytes")(lambda p, c: p.write_bytes(b""))
    spec("truncated", "the valid file cut in half")(_half_of_pristine)
    if kind == ".onnx":
        return

    def wrong_keys(p, c):
        if kind == ".npz":
            import numpy as np

            np.savez(p, mu=np.zeros(36), cov=np.eye(36))
        else:
            _save_state_dict(p, c.nets[foreign])

    def wrong_shape(p, c):
        import torch

        if kind == ".npz":
            import numpy as np

            arrays = _niqe_arrays(c.seed, n=3)
            np.savez(p, **{**arrays, "gaussian_window": _niqe_arrays(c.seed)["gaussian_window"]})
            return
        sd = dict(c.nets[family])
        key = _first_matrix_key(sd)
        shape = list(sd[key].shape)
        shape[-1] += 2
        sd[key] = torch.zeros(shape)
        _save_state_dict(p, sd)

    what_keys = "arrays mu and cov (not mu_pris_param, ...)" if kind == ".npz" else \
        f"the state dict of another network ({foreign})"
    spec("wrong-keys", what_keys)(wrong_keys)
    spec("wrong-shapes", "mu of 3 and cov of 3 x 3 (NIQE has 36 features)" if kind == ".npz" else "one tensor with a wrong shape")(wrong_shape)

    if kind == ".safetensors":
        spec("pickle-os-system", "a torch.save pickle calling os.system, named .safetensors")(
            lambda p, c: _torch_save(_RunsCode(c.marker), p))
        spec("header-huge-tensors", "a header claiming two 10^6 x 10^6 float32 tensors (4 TB) over 16 bytes")(
            lambda p, c: p.write_bytes(_safetensors_raw({
                k: {"dtype": "F32", "shape": [1000000, 1000000], "data_offsets": [i * 4 * 10**12, (i + 1) * 4 * 10**12]}
                for i, k in enumerate(list(c.nets[family])[:2])}, bytes(16))))
        spec("header-length-huge", "the header-length field claims 2^62 bytes")(
            lambda p, c: p.write_bytes(_safetensors_raw({}, bytes(16), length=1 << 62)))
        return

    if kind == ".npz":
        spec("pickle-os-system", "a pickle calling os.system, named .npz")(
            lambda p, c: p.write_bytes(pickle.dumps(_RunsCode(c.marker), protocol=2)))

        def object_array(p, c):
            import numpy as np

            arrays = _niqe_arrays(c.seed)
            arrays["mu_pris_param"] = np.array([_RunsCode(c.marker)], dtype=object)
            np.savez(p, **arrays)

        spec("object-array-os-system", "mu_pris_param is an object array whose pickle calls os.system")(object_array)

        def huge_shape(p, c):
            import numpy as np

            arrays = _niqe_arrays(c.seed)
            with zipfile.ZipFile(p, "w") as zf:
                for key in NIQE_KEYS:
                    buf = io.BytesIO()
                    np.lib.format.write_array(buf, arrays[key])
                    raw = buf.getvalue()
                    if key == "cov_pris_param":  # header of a 20000 x 20000 float64 array (3.2 GB), 64 bytes of data
                        h = io.BytesIO()
                        np.lib.format.write_array_header_1_0(
                            h, {"descr": "<f8", "fortran_order": False, "shape": (20000, 20000)})
                        raw = h.getvalue() + bytes(64)
                    zf.writestr(f"{key}.npy", raw)

        spec("npy-header-huge-shape", "cov_pris_param.npy's header claims 20000 x 20000 float64 (3.2 GB) over "
             "64 bytes", bomb=True)(huge_shape)
        return

    # .pth
    spec("zip-os-system", "zip checkpoint whose pickle calls os.system (touches a marker file)")(
        lambda p, c: _torch_save(_RunsCode(c.marker), p))
    spec("legacy-os-system", "legacy (non-zip) torch.save file whose pickle calls os.system")(
        lambda p, c: _torch_save(_RunsCode(c.marker), p, legacy=True))

    def bomb_base(c) -> dict:
        """The pristine state dict; of a large one (> 16 MB) only the bomb's key (keeps the corpus small;
        an unguarded loader materialises the bomb before any key check)."""
        sd = dict(c.nets[family])
        key = _first_matrix_key(sd)
        return sd if sum(v.numel() for v in sd.values()) * 4 <= 16 << 20 else {key: sd[key]}

    def stride0(p, c):
        import torch

        sd = bomb_base(c)
        key = _first_matrix_key(sd)
        rows = -(-STRIDE0_BYTES // (4 * sd[key][0].numel()))
        sd[key] = torch.full((1,) * sd[key].ndim, 0.5).expand(rows, *sd[key].shape[1:])
        _torch_save(sd, p)

    spec("stride0-huge", f"a stride-0 (expanded) first weight matrix claiming {STRIDE0_BYTES >> 30} GiB in a "
         "1-element storage", bomb=True)(stride0)
    spec("zip-bomb", f"a deflated storage record that inflates to {ZIP_BOMB_BYTES >> 30} GiB (~2 MB file)", bomb=True)(
        lambda p, c: write_zip_bomb_checkpoint(p, bomb_base(c), (list(bomb_base(c))[-1],)))


for _family, _foreign in (("retinaface", "bg-upsampler"), ("parsing", "retinaface"), ("bg-upsampler", "retinaface"),
                          ("bg-upsampler-st", "retinaface"), ("yunet", None), ("metric-lpips", "retinaface"),
                          ("metric-ids", "retinaface"), ("metric-facenet", "retinaface"), ("metric-niqe", None)):
    _register_file_family(_family, _foreign)

_R50 = FILE_FAMILIES["retinaface-r50"]
_spec("retinaface-r50", _R50, "mobilenet-weights",
      "detection_Resnet50_Final.pth: a valid RetinaFace-MobileNet-0.25 state dict (the other network)")(
    lambda p, c: _save_state_dict(p, c.nets["retinaface"]))
_spec("retinaface-r50", _R50, "zip-os-system", "detection_Resnet50_Final.pth: a pickle calling os.system")(
    lambda p, c: _torch_save(_RunsCode(c.marker), p))
_spec("retinaface-r50", _R50, "empty", "detection_Resnet50_Final.pth: 0 bytes")(lambda p, c: p.write_bytes(b""))


# ----------------------------------------------------------------------------------------- commands
def _official_model_args(case: Case) -> list[str]:
    return ["--base-model", str(case.base), "--weights", str(case.weights)]


def _model_args(case: Case) -> list[str]:
    return _official_model_args(case) if case.family == "official" else ["--model", str(case.model)]


def _face_args(case: Case) -> list[str]:
    """The face-layer option that reads the case's file (none for the model families)."""
    f = str(case.offending)
    retina = ["--detector-weights", f, "--det-threshold", "0", "--max-faces", "1"]  # random weights: take one box
    return {"retinaface": ["--detector", "retinaface_mobile0.25", *retina],
            "retinaface-r50": ["--detector", "retinaface_resnet50", *retina],
            "yunet": ["--detector", "yunet", "--detector-weights", f],
            "parsing": ["--parsing-model", f],
            "bg-upsampler": ["--upscale", "2", "--bg-upsampler", f],
            "bg-upsampler-st": ["--upscale", "2", "--bg-upsampler", f]}.get(case.family, [])


def _metric_args(case: Case) -> list[str]:
    return ["--metrics", METRIC_OF[case.family], "--weights-dir", str(case.offending.parent), "--device", "cpu",
            "--no-progress"]


def _argv_restore_aligned(case: Case, inputs: Path, out: Path) -> list[str]:
    return ["restore", str(inputs / "face.png"), "-o", str(out / "restored"), "--aligned", "--device", "cpu",
            *_model_args(case)]


def _argv_restore_photo(case: Case, inputs: Path, out: Path) -> list[str]:
    return ["restore", str(inputs / "photo.png"), "-o", str(out / "restored"), "--device", "cpu", *_model_args(case),
            *_face_args(case)]


def _argv_align(case: Case, inputs: Path, out: Path) -> list[str]:
    return ["align", str(inputs / "photo.png"), "-o", str(out / "aligned"), *_face_args(case)]


def _argv_evaluate(case: Case, inputs: Path, out: Path) -> list[str]:
    return ["evaluate", "--pred", str(inputs / "eval" / "pred"), "--gt", str(inputs / "eval" / "gt"),
            *_metric_args(case), "--out", str(out / "report" / "r.json")]


def _argv_benchmark_table(case: Case, inputs: Path, out: Path) -> list[str]:
    return ["benchmark-table", str(inputs / "eval" / "pred"), "--gt", str(inputs / "eval" / "gt"), *_metric_args(case),
            "--out", str(out / "report" / "table.md")]


def _argv_convert(case: Case, inputs: Path, out: Path) -> list[str]:
    return ["convert", *_official_model_args(case), "-o", str(out / "model")]


def _argv_train_generator(case: Case, inputs: Path, out: Path) -> list[str]:
    return ["train", "generator", "--config", str(TINY_GENERATOR_CONFIG), "--data", str(inputs / "faces"),
            *_official_model_args(case), "-o", str(out / "run"), "--max-steps", "1", "--cpu", "--set", *FAST_TRAIN]


def _argv_train_resume(case: Case, inputs: Path, out: Path) -> list[str]:
    """Resume the case's run (already at step 1, so a valid resume trains nothing); writes into the run."""
    return ["train", "generator", "--config", str(TINY_GENERATOR_CONFIG), "--data", str(inputs / "faces"),
            *_official_model_args(case), "-o", str(case.run), "--max-steps", "1", "--cpu", "--resume",
            "--set", *FAST_TRAIN]


def _argv_export(case: Case, inputs: Path, out: Path) -> list[str]:
    return ["export", str(case.run), "-o", str(out / "model")]


def _argv_export_official(case: Case, inputs: Path, out: Path) -> list[str]:
    return ["export", str(case.run), "--official-layout", str(out / "official")]


COMMANDS: dict[str, Callable[[Case, Path, Path], list[str]]] = {
    "restore-aligned": _argv_restore_aligned,
    "restore-photo": _argv_restore_photo,
    "convert": _argv_convert,
    "train-generator": _argv_train_generator,
    "export": _argv_export,
    "export-official": _argv_export_official,
    "train-resume": _argv_train_resume,
    "align": _argv_align,
    "evaluate": _argv_evaluate,
    "benchmark-table": _argv_benchmark_table,
}
FAMILY_COMMANDS = {
    "official": ("restore-aligned", "restore-photo", "convert", "train-generator"),
    "model": ("restore-aligned", "restore-photo"),
    "run": ("export", "export-official"),
    "resume": ("train-resume",),
    "retinaface": ("restore-photo", "align"),
    "retinaface-r50": ("restore-photo", "align"),
    "yunet": ("restore-photo", "align"),
    "parsing": ("restore-photo",),
    "bg-upsampler": ("restore-photo",),
    "bg-upsampler-st": ("restore-photo",),
    **{family: ("evaluate", "benchmark-table") for family in METRIC_OF},
}
#: Commands whose failure may be per input (exit 1).
PER_INPUT_COMMANDS = {"restore-aligned", "restore-photo"}


def argv_for(case: Case, command: str, inputs: Path, out: Path) -> list[str]:
    """The ``osdface`` argv of ``command`` on ``case``; everything it may write goes under ``out``."""
    return COMMANDS[command](case, inputs, out)


# ------------------------------------------------------------------------------------ building
def _load_good_ckpt(path: Path) -> dict:
    """Our own pristine associate_2.ckpt (tensors + an argparse.Namespace), without weights_only=False."""
    import torch

    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def build_pristine(root: Path, seed: int = 0) -> dict[str, Path]:
    """Tiny official layout, converted model folders (fused and --no-fuse-lora), a 1-step stage-2 run, inputs."""
    import numpy as np
    from PIL import Image

    from osdface.cli import main
    from osdface.testing import synthetic_faces, write_official_layout

    root.mkdir(parents=True, exist_ok=True)
    base, weights = write_official_layout(root / "official", seed=seed)
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet:
        for name, extra in (("model", []), ("model-nofuse", ["--no-fuse-lora"])):
            rc = main(["convert", "--base-model", str(base), "--weights", str(weights), "-o", str(root / name), *extra])
            if rc != 0:
                raise RuntimeError(f"building the pristine {name} folder failed (exit {rc})")
    inputs = root / "inputs"
    (inputs / "faces").mkdir(parents=True)
    faces = synthetic_faces(3, seed=seed + 1)
    Image.fromarray(faces[0]).save(inputs / "face.png")
    for i, f in enumerate(faces):
        Image.fromarray(f).save(inputs / "faces" / f"face{i}.png")
    for sub, seed_offset in (("pred", 2), ("gt", 3)):  # one 192 px pair (NIQE: >= 2 blocks of 96 px)
        (inputs / "eval" / sub).mkdir(parents=True)
        Image.fromarray(synthetic_faces(1, size=192, seed=seed + seed_offset)[0]).save(inputs / "eval" / sub / "e0.png")
    photo = Image.open(PHOTO_SOURCE).convert("RGB")
    photo.resize((photo.width // 4, photo.height // 4), Image.LANCZOS).save(inputs / "photo.png")  # YuNet finds it
    with quiet:
        rc = main(_argv_train_generator(Case("pristine", "official", "", "", base=base, weights=weights), inputs, root))
    if rc != 0:
        raise RuntimeError(f"building the pristine stage-2 run failed (exit {rc})")
    assert np.asarray(Image.open(inputs / "photo.png")).shape[2] == 3
    return {"base": base, "weights": weights, "model": root / "model", "model-nofuse": root / "model-nofuse",
            "run": root / "run", "inputs": inputs}


def build_corpus(root: str | os.PathLike, seed: int = 0, names: set[str] | None = None) -> list[Case]:
    """Write every case (or those in ``names``) under ``root``; returns the cases.

    ``root/_pristine`` holds the valid inputs the cases are made from and share (the SD base folder
    for cases that do not alter it, the face images).
    """
    root = Path(root)
    p = build_pristine(root / "_pristine", seed)
    import torch
    from safetensors.torch import load_file

    vre_ckpt = _load_good_ckpt(p["weights"] / VRE_FILE)
    adapter = torch.load(p["weights"] / ADAPTER_FILE, map_location="cpu", weights_only=True)
    lora = load_file(str(p["weights"] / LORA_FILE))
    selected = [s for s in SPECS if names is None or s.name in names]
    nets = build_pristine_files(root / "_pristine", seed) if any(s.family in FILE_FAMILIES for s in selected) else {}
    cases = []
    for spec in SPECS:
        if names is not None and spec.name not in names:
            continue
        case_root = root / spec.family / spec.slug
        case_root.mkdir(parents=True)
        case = Case(spec.name, spec.family, spec.target, spec.description, spec.expect, spec.bomb, case_root)
        if spec.family == "official":
            case.weights = case_root / WEIGHTS
            shutil.copytree(p["weights"], case.weights)
            if spec.target.startswith(BASE + "/"):
                case.base = case_root / BASE
                shutil.copytree(p["base"], case.base)
            else:
                case.base = p["base"]
                case.shared.append(p["base"])
        elif spec.family in FILE_FAMILIES:  # only the hostile file; the tiny model folder is shared
            case.offending.parent.mkdir(parents=True)
            if spec.family not in METRIC_OF:
                case.model = p["model"]
                case.shared.append(p["model"])
        elif spec.family == "model":
            case.model = case_root / "model"
            shutil.copytree(p["model-nofuse" if getattr(spec.make, "nofuse", False) else "model"], case.model)
        else:  # run, resume
            case.run = case_root / "run"
            shutil.copytree(p["run"], case.run)
            case.base, case.weights = p["base"], p["weights"]
            case.shared += [p["base"], p["weights"]]  # the run's config names them
        ctx = _Ctx(vre_ckpt, adapter, lora, case.marker, seed, nets, root / "_pristine" / spec.target)
        spec.make(case.offending, ctx)
        if case.run is not None and not getattr(spec.make, "unsealed", False):
            reseal_manifest(case.run / CKPT, p["run"] / CKPT)
        cases.append(case)
    return cases


def write_readme(root: Path, cases: list[Case]) -> Path:
    lines = ["# Hostile-input corpus (generated by tests/hostile/corpus.py)", "",
             "Each case is a pristine tiny model input with one hostile file (or folder): the diffusion model "
             "inputs (official layout, converted model folder, stage-2 run), the face-layer files of `restore` / "
             "`align` (`--detector-weights` RetinaFace .pth / YuNet .onnx, `--parsing-model`, `--bg-upsampler` "
             ".pth / .safetensors) and the metric weight files of `evaluate` / `benchmark-table` "
             "(`--weights-dir`). The valid originals are in `_pristine/` (face-layer and metric files: "
             "osdface's own networks with random weights). Expected: "
             f"`{REFUSE}` = exit 2, one `osdface: error:` line naming the file, nothing written, inputs "
             f"unchanged; `{REFUSE_OR_FAIL_INPUT}` = that, or exit 1 from restore reporting each input; "
             f"`{REFUSE_OR_ACCEPT}` = that or exit 0; `{ACCEPT}` = exit 0. `bomb` cases can make an "
             "unguarded loader allocate gigabytes: run them under a memory cap.", "",
             "| case | offending path | expect | bomb | subcommands | what |", "|---|---|---|---|---|---|"]
    for c in cases:
        lines.append(f"| {c.name} | {c.target} | {c.expect} | {'yes' if c.bomb else ''} | {', '.join(c.commands)} "
                     f"| {c.description} |")
    lines += ["", "Metric weight files not in the corpus:", ""]
    lines += [f"* {name}: {why}" for name, why in SKIPPED_METRIC_FILES.items()]
    lines += ["", "Command lines (INPUTS = _pristine/inputs, OUT = an empty folder):", ""]
    first = {}
    for c in cases:
        first.setdefault(c.family, c)
    for c in first.values():
        for cmd in c.commands:
            lines.append(f"    {c.name} / {cmd}: osdface {' '.join(argv_for(c, cmd, Path('INPUTS'), Path('OUT')))}")
    path = root / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------- running commands
def invoke(argv: list[str]) -> dict[str, Any]:
    """Run ``osdface.cli.main(argv)`` in this process; stderr captured, any escaping exception recorded."""
    from osdface.cli import main

    err, out = io.StringIO(), io.StringIO()
    result: dict[str, Any] = {"rc": None, "exception": None, "traceback": ""}
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            result["rc"] = main(argv)
        except BaseException as e:  # noqa: BLE001 - recording exactly what escaped is the point
            result["exception"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            result["traceback"] = traceback.format_exc()
    result["stderr"] = err.getvalue()
    return result


def vm_peak_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmPeak:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmPeak in /proc/self/status")


def run_capped(plan_file: str) -> None:
    """Child process: run the plan's control commands, cap RLIMIT_AS at their peak + margin, run the bombs.

    Results go to ``plan["results"]`` as JSON lines as they come, so a crash keeps the earlier ones.
    """
    import logging
    import resource

    import torch

    logging.basicConfig(level=logging.WARNING, stream=sys.__stderr__)
    torch.set_num_threads(1)  # runs beside the in-process tests on a 2-core machine
    plan = json.loads(Path(plan_file).read_text())
    results = Path(plan["results"])
    with results.open("w") as f:
        for argv in plan["controls"]:
            r = invoke(argv)
            f.write(json.dumps({"control": argv[0], **r}) + "\n")
            f.flush()
        peak = vm_peak_bytes()
        cap = peak + plan["margin"]
        resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
        f.write(json.dumps({"calibration": {"vm_peak": peak, "cap": cap}}) + "\n")
        f.flush()
        for item in plan["cases"]:
            r = invoke(item["argv"])
            f.write(json.dumps({"case": item["case"], "command": item["command"], **r}) + "\n")
            f.flush()


CONTROLS = [(family, command) for family, commands in FAMILY_COMMANDS.items() if family not in NO_PRISTINE
            for command in commands]
#: Controls the capped child runs to calibrate its cap: those of the families with bombs, less the
#: commands that read what another one reads (export-official, align, benchmark-table) and train-resume
#: (it would write into the pristine run).
CAPPED_CONTROLS = [(family, command) for family, command in CONTROLS
                   if command not in ("export-official", "train-resume", "align", "benchmark-table")
                   and any(s.bomb and s.family == family for s in SPECS)]
#: The folders of ``_pristine`` the controls read.
PRISTINE_DIRS = ("official", "model", "run", "inputs", "face", "metrics")


def pristine_case(pristine: Path, family: str) -> Case:
    """The valid originals of ``family`` as a case (expect: exit 0)."""
    if family in FILE_FAMILIES:
        return Case(f"{family}/pristine", family, FILE_FAMILIES[family], "the valid file", ACCEPT, root=pristine,
                    model=pristine / "model")
    case = Case(f"{family}/pristine", family, "", "the valid tiny inputs", ACCEPT, root=pristine / "control-root",
                base=pristine / "official" / BASE, weights=pristine / "official" / WEIGHTS,
                model=pristine / "model", run=pristine / "run")
    case.root.mkdir(exist_ok=True)
    return case


@dataclass
class CappedRun:
    """The child process running the bombs (started early; the in-process cases run meanwhile)."""

    proc: Any
    results: Path
    state: dict  # (case, command) -> (output folder, input roots, sha256 before)
    timeout_s: float
    ended: str = ""

    def collect(self) -> list[dict]:
        import subprocess

        if not self.ended:
            try:
                _, err = self.proc.communicate(timeout=self.timeout_s)
                self.ended = f"child exited with {self.proc.returncode}; stderr tail: {err[-600:]!r}"
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()
                self.ended = f"child timed out after {self.timeout_s} s"
        if not self.results.exists():
            return []
        return [json.loads(ln) for ln in self.results.read_text().splitlines() if ln.strip()]


def start_capped(cases: dict[str, Case], pristine: Path, work: Path, timeout_s: float = 240) -> CappedRun:
    """Start the child that runs the controls (uncapped, to calibrate) then every bomb x subcommand capped."""
    import subprocess

    inputs = pristine / "inputs"
    controls = []
    for family, command in CAPPED_CONTROLS:
        d = work / "controls" / f"{family}-{command}"
        d.mkdir(parents=True)
        controls.append(argv_for(pristine_case(pristine, family), command, inputs, d))
    items, state = [], {}
    for case in cases.values():
        if not case.bomb:
            continue
        for command in case.commands:
            out = work / "out" / case.name.replace("/", "__") / command
            out.mkdir(parents=True)
            roots = case.input_roots(inputs)
            state[(case.name, command)] = (out, roots, sha256_tree(roots))
            items.append({"case": case.name, "command": command, "argv": argv_for(case, command, inputs, out)})
    results, plan = work / "results.jsonl", work / "plan.json"
    plan.write_text(json.dumps({"controls": controls, "cases": items, "margin": CAP_MARGIN, "results": str(results)}))
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--run-capped", str(plan)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return CappedRun(proc, results, state, timeout_s)


def sha256_tree(roots: list[Path]) -> dict[str, str]:
    """sha256 of every file under ``roots`` (hidden ones included), keyed by path."""
    out = {}
    for r in roots:
        for p in sorted(r.rglob("*")) if r.is_dir() else [r]:
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write the hostile-input corpus and a README listing the cases.")
    ap.add_argument("out_dir", nargs="?")
    ap.add_argument("--run-capped", metavar="PLAN", help=argparse.SUPPRESS)  # internal: the tests' child process
    args = ap.parse_args(argv)
    if args.run_capped:
        run_capped(args.run_capped)
        return 0
    if not args.out_dir:
        ap.error("give OUT_DIR")
    out = Path(args.out_dir)
    if out.exists() and any(out.iterdir()):
        ap.error(f"{out} exists and is not empty")
    cases = build_corpus(out)
    print(write_readme(out, cases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
