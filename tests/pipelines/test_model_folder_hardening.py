"""Hostile or broken model folders: a clear one-line error naming the file, exit 2, nothing written,
nothing modified; NaN weights are an error, not a black image (issue 12).

Every case starts from a tiny model folder written by ``osdface convert`` (fused, and unfused with
``unet_lora/``), copies it, breaks one thing, then runs ``OSDFacePipeline.from_pretrained`` and
``osdface restore --aligned --model``.
"""

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from osdface.cli import main
from osdface.errors import ModelFileError, NonFiniteOutputError, OSDFaceError, WeightsNotFoundError
from osdface.model_limits import LIMITS, check_model_folder_configs
from osdface.models.lora import LoraFormatError
from osdface.pipelines import OSDFacePipeline

LORA_FILE = "unet_lora/pytorch_lora_weights.safetensors"
LORA_CFG = "unet_lora/adapter_config.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _snapshot(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def folders(official_layout, tmp_path_factory):
    """{"fused": model folder, "lora": model folder with unet_lora/} written by ``osdface convert``."""
    base, weights = official_layout
    root = tmp_path_factory.mktemp("models")
    out = {"fused": root / "fused", "lora": root / "lora"}
    assert main(["convert", "--base-model", str(base), "--weights", str(weights), "-o", str(out["fused"])]) == 0
    assert main(["convert", "--base-model", str(base), "--weights", str(weights), "-o", str(out["lora"]),
                 "--no-fuse-lora"]) == 0
    assert (out["lora"] / LORA_FILE).is_file()
    return out


@pytest.fixture()
def face_png(tmp_path, faces):
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(faces[0]).save(d / "face0.png")
    return d / "face0.png"


# ------------------------------------------------------------------------------- mutations
def _edit_json(rel, **changes):
    def apply(d):
        p = d / rel
        cfg = json.loads(p.read_text())
        for k, v in changes.items():
            if v is _DELETE:
                del cfg[k]
            else:
                cfg[k] = v
        p.write_text(json.dumps(cfg))
    return apply


_DELETE = object()


def _write(rel, data: bytes):
    def apply(d):
        (d / rel).write_bytes(data)
    return apply


def _edit_tensors(rel, fn):
    def apply(d):
        sd = dict(load_file(str(d / rel)))
        save_file(fn(sd), str(d / rel))
    return apply


def _nan_first(sd):
    k = sorted(sd)[0]
    sd[k] = sd[k].clone()
    sd[k].view(-1)[0] = float("nan")
    return sd


def _rename_keys(sd):
    return {k.replace("unet.", "unet.no_such_block."): v for k, v in sd.items()}


def _wrong_rank(sd):
    k = next(k for k in sorted(sd) if k.endswith("lora_A.weight") and sd[k].ndim == 2)
    sd[k] = torch.zeros(sd[k].shape[0] + 1, sd[k].shape[1])
    return sd


def _truncate(rel):
    def apply(d):
        data = (d / rel).read_bytes()
        (d / rel).write_bytes(data[: len(data) // 2])
    return apply


# (id, folder kind, mutation, exception type, file named in the message, substrings of the message)
CASES = [
    # 1. absurd sizes, refused before anything is built
    ("unet_channels_1e6", "fused", _edit_json("unet/config.json", block_out_channels=[1_000_000, 64]),
     ModelFileError, "unet/config.json", ["block_out_channels[0] = 1000000", "[1, 4096]"]),
    ("unet_bigger_than_its_file", "fused", _edit_json("unet/config.json", block_out_channels=[4096, 4096]),
     ModelFileError, "unet/config.json", ["declares a UNet of", "MiB of weights"]),
    ("vae_channels", "fused", _edit_json("vae/config.json", block_out_channels=[8, 8, 16, 100_000]),
     ModelFileError, "vae/config.json", ["block_out_channels[3] = 100000"]),
    ("vre_codebook", "fused", _edit_json("vre/config.json", n_embed=10**9),
     ModelFileError, "vre/config.json", ["n_embed = 1000000000", "[1, 65536]"]),
    ("vre_resolution_not_divisible", "fused", _edit_json("vre/config.json", resolution=66),
     ModelFileError, "vre/config.json", ["resolution = 66", "downsampling"]),
    ("index_resolution_3000", "fused", _edit_json("model_index.json", resolution=3000),
     ModelFileError, "model_index.json", ["resolution = 3000", "[8, 2048]"]),
    ("index_resolution_not_vre", "fused", _edit_json("model_index.json", resolution=128),
     ModelFileError, "model_index.json", ["resolution = 128", "VRE's resolution = 64"]),
    ("index_timestep_out_of_range", "fused", _edit_json("model_index.json", timestep=1000),
     ModelFileError, "model_index.json", ["timestep = 1000", "[0, 999]", "scheduler_config.json"]),
    ("unet_cross_attention_vs_adapter", "fused", _edit_json("unet/config.json", cross_attention_dim=64),
     ModelFileError, "unet/config.json", ["cross_attention_dim = 64", "out_channels = 32"]),
    ("vae_latent_vs_unet", "fused", _edit_json("vae/config.json", latent_channels=8),
     ModelFileError, "unet/config.json", ["in_channels = 4", "latent_channels = 8", "vae/config.json"]),
    ("adapter_vs_vre", "fused", _edit_json("prompt_adapter/config.json", in_channels=64),
     ModelFileError, "prompt_adapter/config.json", ["in_channels = 64", "embed_dim = 32"]),
    # 3. malformed JSON, wrong types, missing keys
    ("index_malformed", "fused", _write("model_index.json", b"{"), ModelFileError, "model_index.json", ["malformed"]),
    ("index_not_object", "fused", _write("model_index.json", b"[1, 2]"),
     ModelFileError, "model_index.json", ["JSON object"]),
    ("index_other_pipeline", "fused", _edit_json("model_index.json", _class_name="StableDiffusionPipeline"),
     ModelFileError, "model_index.json", ["StableDiffusionPipeline", "--base-model"]),
    ("index_resolution_type", "fused", _edit_json("model_index.json", resolution="512"),
     ModelFileError, "model_index.json", ["resolution must be an integer"]),
    ("unet_config_malformed", "fused", _write("unet/config.json", b"{oops"),
     ModelFileError, "unet/config.json", ["malformed UNet config"]),
    ("unet_config_missing_key", "fused", _edit_json("unet/config.json", block_out_channels=_DELETE),
     ModelFileError, "unet/config.json", ["missing required field", "block_out_channels"]),
    ("vre_config_wrong_type", "fused", _edit_json("vre/config.json", ch_mult=[1, "2", 2]),
     ModelFileError, "vre/config.json", ["ch_mult[1] must be an integer"]),
    ("unet_act_fn_not_a_name", "fused", _edit_json("unet/config.json", act_fn=True),  # AttributeError in diffusers
     ModelFileError, "unet/config.json", ["cannot build the UNet from it"]),
    ("vre_channel_null", "fused", _edit_json("vre/config.json", ch=None),
     ModelFileError, "vre/config.json", ["ch must not be null"]),
    ("adapter_width_list", "fused", _edit_json("prompt_adapter/config.json", out_channels=[]),
     ModelFileError, "prompt_adapter/config.json", ["out_channels must be a single number"]),
    ("scheduler_wrong_type", "fused", _edit_json("scheduler/scheduler_config.json", num_train_timesteps="1000"),
     ModelFileError, "scheduler/scheduler_config.json", ["num_train_timesteps must be an integer"]),
    ("scheduler_unknown_schedule", "fused", _edit_json("scheduler/scheduler_config.json", beta_schedule="cosine"),
     ModelFileError, "scheduler/scheduler_config.json", ["beta_schedule"]),
    ("vre_config_missing", "fused", lambda d: (d / "vre/config.json").unlink(),
     WeightsNotFoundError, ".", ["model folder is incomplete, missing vre/config.json"]),
    ("unet_weights_empty", "fused", _write(f"unet/{WEIGHTS}", b""),
     ModelFileError, f"unet/{WEIGHTS}", ["not a valid safetensors file"]),
    ("unet_weights_truncated", "fused", _truncate(f"unet/{WEIGHTS}"),
     ModelFileError, f"unet/{WEIGHTS}", ["not a valid safetensors file"]),
    ("adapter_weights_empty", "fused", _write(f"prompt_adapter/{WEIGHTS}", b""),
     ModelFileError, f"prompt_adapter/{WEIGHTS}", ["not a valid safetensors file"]),
    ("unet_layers_mismatch_file", "fused", _edit_json("unet/config.json", layers_per_block=2),
     ModelFileError, "unet", ["cannot load the UNet"]),
    ("vre_weights_nan", "fused", _edit_tensors(f"vre/{WEIGHTS}", _nan_first),
     ModelFileError, f"vre/{WEIGHTS}", ["NaN or Inf"]),
    # LoRA folder
    ("lora_alpha_not_numeric", "lora", _edit_json(LORA_CFG, lora_alpha="sixteen"),
     ModelFileError, LORA_CFG, ["lora_alpha must be a finite number", "'sixteen'"]),
    ("lora_alpha_huge", "lora", _edit_json(LORA_CFG, lora_alpha=1e30),
     ModelFileError, LORA_CFG, ["lora_alpha = 1e+30"]),
    ("lora_config_malformed", "lora", _write(LORA_CFG, b"r: 4"), ModelFileError, LORA_CFG, ["malformed"]),
    ("lora_config_missing", "lora", lambda d: (d / LORA_CFG).unlink(),
     WeightsNotFoundError, "unet_lora", ["adapter_config.json"]),
    ("lora_weights_empty", "lora", _write(LORA_FILE, b""), ModelFileError, LORA_FILE, ["not a valid safetensors"]),
    ("lora_weights_garbage", "lora", _write(LORA_FILE, b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}xx"),
     ModelFileError, LORA_FILE, ["not a valid safetensors"]),
    ("lora_keys_match_nothing", "lora", _edit_tensors(LORA_FILE, _rename_keys),
     LoraFormatError, LORA_FILE, ["no matching module", "no_such_block"]),
    ("lora_wrong_shapes", "lora", _edit_tensors(LORA_FILE, _wrong_rank),
     LoraFormatError, LORA_FILE, ["not a rank-r pair"]),
    ("lora_nan", "lora", _edit_tensors(LORA_FILE, _nan_first),
     ModelFileError, LORA_FILE, ["contains NaN or Inf"]),
]


@pytest.fixture(params=CASES, ids=[c[0] for c in CASES])
def broken(request, folders, tmp_path):
    """A copy of a converted model folder with one thing broken, and the expectations."""
    name, kind, mutate, exc, rel, parts = request.param
    d = tmp_path / f"model_{name}"
    shutil.copytree(folders[kind], d)
    mutate(d)
    return d, exc, str(d / rel), parts


def test_from_pretrained_raises_named_error(broken):
    d, exc, named, parts = broken
    before = _snapshot(d)
    with pytest.raises(exc) as e:
        OSDFacePipeline.from_pretrained(d)
    msg = str(e.value)
    assert isinstance(e.value, OSDFaceError)
    assert msg.startswith(named) or named in msg, msg
    assert "\n" not in msg
    for p in parts:
        assert p in msg, msg
    assert _snapshot(d) == before


def test_cli_restore_exits_2_with_one_line(broken, face_png, tmp_path, capsys):
    d, _, named, parts = broken
    before_model, before_in = _snapshot(d), _snapshot(face_png.parent)
    out = tmp_path / "out"
    code = main(["restore", "--aligned", str(face_png), "-o", str(out), "--model", str(d)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("osdface: error:")]
    assert code == 2, err
    assert len(errors) == 1 and named in errors[0], err
    assert all(p in errors[0] for p in parts), err
    assert "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())
    assert _snapshot(d) == before_model and _snapshot(face_png.parent) == before_in


# ------------------------------------------------------------------------- non-finite outputs
def test_nan_unet_weights_fail_each_input_with_exit_1(folders, face_png, tmp_path, capsys):
    """NaN in the (large, unchecked at load) UNet weights: per-input failure naming the model folder."""
    d = tmp_path / "nan_unet"
    shutil.copytree(folders["fused"], d)
    _edit_tensors(f"unet/{WEIGHTS}", lambda sd: {**sd, "conv_out.bias": torch.full_like(sd["conv_out.bias"],
                                                                                         float("nan"))})(d)
    pipe = OSDFacePipeline.from_pretrained(d)  # loads: the UNet is too large to scan at load time
    with pytest.raises(NonFiniteOutputError, match="predicted latent") as e:
        pipe(np.asarray(Image.open(face_png)))
    assert str(d) in str(e.value)

    before_model, before_in = _snapshot(d), _snapshot(face_png.parent)
    out = tmp_path / "out"
    code = main(["restore", "--aligned", str(face_png), "-o", str(out), "--model", str(d)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("osdface: error:")]
    assert code == 1, err
    assert len(errors) == 1 and str(face_png) in errors[0] and str(d) in errors[0] and "NaN/Inf" in errors[0], err
    assert not out.exists() or not any(out.iterdir())  # no black image written
    assert _snapshot(d) == before_model and _snapshot(face_png.parent) == before_in


def test_inf_in_decoder_is_caught_before_the_clamp(faces):
    """±Inf in the decoder output would be clamped into a plausible image; it is an error instead."""
    from osdface.testing import tiny_pipeline

    pipe = tiny_pipeline(seed=0, with_lora=False)
    ok = pipe(faces[:1]).images
    assert torch.isfinite(ok).all()
    with torch.no_grad():
        pipe.vae.decoder.conv_out.bias.fill_(float("inf"))
    with pytest.raises(NonFiniteOutputError, match="VAE decoder output") as e:
        pipe(faces[:1])
    assert "built in memory" in str(e.value)


# ------------------------------------------------------------------------------ memory bombs
_BOMB_CHILD = textwrap.dedent("""
    import json, resource, sys
    import torch
    torch.set_num_threads(1)
    from osdface.cli import main
    import diffusers, osdface.pipelines  # imports first: they need address space of their own
    size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    limit = size + (1 << 30)  # 1 GiB above what the imports took
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    face, runs = sys.argv[1], json.loads(sys.argv[2])
    codes = []
    for out, model in runs:
        print("=== run", file=sys.stderr, flush=True)
        codes.append(main(["restore", "--aligned", face, "-o", out, "--model", model, "--device", "cpu"]))
    print(json.dumps(codes))
""")

BOMBS = {
    "valid_control": None,  # the valid folder restores under the same limit: the limit leaves room for real work
    "unet_4096_channels": _edit_json("unet/config.json", block_out_channels=[4096, 4096]),  # in bounds; ~3 GB
    "vre_codebook_1e8": _edit_json("vre/config.json", n_embed=10**8),  # a 12 GB codebook
}


def test_memory_bomb_configs_refused_under_an_address_space_limit(folders, face_png, tmp_path):
    """Before the checks, the bombs reached the allocator (a traceback under this limit); now each
    is refused with one line and exit 2, in one child process (one import of torch)."""
    runs, snapshots = [], []
    for name, mutate in BOMBS.items():
        d = tmp_path / name
        shutil.copytree(folders["fused"], d)
        if mutate is not None:
            mutate(d)
        snapshots.append(_snapshot(d))
        runs.append((str(tmp_path / f"out_{name}"), str(d)))
    r = subprocess.run([sys.executable, "-c", _BOMB_CHILD, str(face_png), json.dumps(runs)],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    codes = json.loads(r.stdout.strip().splitlines()[-1])
    logs = r.stderr.split("=== run\n")[1:]
    assert len(codes) == len(logs) == len(BOMBS)
    for (name, mutate), code, log, (_, d), before in zip(BOMBS.items(), codes, logs, runs, snapshots):
        out = tmp_path / f"out_{name}"
        if mutate is None:
            assert code == 0 and (out / "face0.png").is_file(), log
            continue
        errors = [line for line in log.splitlines() if line.startswith("osdface: error:")]
        assert code == 2, (name, log)
        assert len(errors) == 1 and d in errors[0], (name, log)
        assert "Traceback" not in log and "allocate" not in log
        assert not out.exists() or not any(out.iterdir())
        assert _snapshot(tmp_path / name) == before


# ---------------------------------------------------------------- the official layout (--base-model)
OFFICIAL_CASES = [
    ("sd_unet_channels", _edit_json("stable-diffusion-2-1-base/unet/config.json", block_out_channels=[10**6, 64]),
     "stable-diffusion-2-1-base/unet/config.json", "block_out_channels[0] = 1000000"),
    ("sd_vae_latent_vs_unet", _edit_json("stable-diffusion-2-1-base/vae/config.json", latent_channels=8),
     "stable-diffusion-2-1-base/unet/config.json", "latent_channels = 8"),
    ("sd_scheduler_too_short", _edit_json("stable-diffusion-2-1-base/scheduler/scheduler_config.json",
                                          num_train_timesteps=100),
     "stable-diffusion-2-1-base/scheduler/scheduler_config.json", "timestep 399"),
    ("sd_unet_weights_empty", _write(f"stable-diffusion-2-1-base/unet/{WEIGHTS}", b""),
     f"stable-diffusion-2-1-base/unet/{WEIGHTS}", "not a valid safetensors file"),
    ("official_lora_nan", _edit_tensors("OSDFace/pytorch_lora_weights.safetensors", _nan_first),
     "OSDFace/pytorch_lora_weights.safetensors", "NaN or Inf"),
]


@pytest.mark.parametrize("case", OFFICIAL_CASES, ids=[c[0] for c in OFFICIAL_CASES])
def test_official_layout_problems_are_named(case, official_layout, face_png, tmp_path, capsys):
    """The same checks guard ``--base-model SD_DIR --weights OSDFACE_DIR`` (``from_official``)."""
    _, mutate, rel, part = case
    root = tmp_path / "official"
    base, weights = official_layout
    shutil.copytree(base, root / base.name)
    shutil.copytree(weights, root / weights.name)
    mutate(root)
    before_model, before_in = _snapshot(root), _snapshot(face_png.parent)
    with pytest.raises(ModelFileError) as e:
        OSDFacePipeline.from_official(root / base.name, root / weights.name)
    assert str(root / rel) in str(e.value) and part in str(e.value), str(e.value)
    out = tmp_path / "out"
    code = main(["restore", "--aligned", str(face_png), "-o", str(out), "--base-model", str(root / base.name),
                 "--weights", str(root / weights.name)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("osdface: error:")]
    assert code == 2 and len(errors) == 1 and str(root / rel) in errors[0], err
    assert not out.exists() or not any(out.iterdir())
    assert _snapshot(root) == before_model and _snapshot(face_png.parent) == before_in


# ------------------------------------------------------------------------------- the bounds
def test_sd21_and_release_configs_are_inside_the_bounds():
    from osdface.models.prompt_encoder import PromptAdapter, VisualPromptEncoder
    from osdface.testing import SD21_SCHEDULER_CONFIG, SD21_UNET_CONFIG, SD21_VAE_CONFIG

    def plain(cfg):
        return json.loads(json.dumps(dict(cfg)))  # tuples → lists, as read back from JSON

    configs = {"unet": ("unet/config.json", plain(SD21_UNET_CONFIG)), "vae": ("vae/config.json", plain(SD21_VAE_CONFIG)),
               "vre": ("vre/config.json", plain(VisualPromptEncoder().config)),
               "prompt_adapter": ("prompt_adapter/config.json", plain(PromptAdapter().config)),
               "scheduler": ("scheduler/scheduler_config.json", SD21_SCHEDULER_CONFIG)}
    assert check_model_folder_configs({"timestep": 399, "resolution": 512}, "model_index.json", configs) == (399, 512)
    assert check_model_folder_configs({}, "model_index.json", configs) == (399, 512)  # defaults
    assert LIMITS["unet"]["block_out_channels"].high >= 1280 and LIMITS["vre"]["n_embed"].high >= 1024


def test_valid_folders_load_and_match(folders, faces):
    """The checks change nothing for valid folders: fused and unfused give the same images, and
    the pipeline remembers where it came from."""
    a = OSDFacePipeline.from_pretrained(folders["fused"])
    b = OSDFacePipeline.from_pretrained(folders["lora"])
    assert a.source == str(folders["fused"]) and b.source == str(folders["lora"])
    ia, ib = a(faces[:1]).images, b(faces[:1]).images
    assert torch.allclose(ia, ib, atol=1e-4)
