"""Export an :class:`~osdface.pipelines.OSDFacePipeline` to four ONNX graphs plus a manifest.

The graphs are the four networks of the one-step restoration (docs/method.md §2); everything
between them stays in host code exactly as the pipeline does it (preprocessing, the x0 step in
float64, clamping and the conversion to uint8):

============================  ===========================================  ==================================
file                          inputs                                       outputs
============================  ===========================================  ==================================
``vae_encoder.onnx``          ``image`` (B, 3, R, R) in [-1, 1]            ``latent`` (B, 4, R/8, R/8): VAE
                                                                           posterior **mode** × scaling factor
``prompt_encoder.onnx``       ``image`` (B, 3, R, R) in [-1, 1]            ``prompt`` (B, 77, C) after the
                                                                           adapter; ``prompt_indices`` (B, 77)
                                                                           int64 (-1 = zero token)
``unet.onnx``                 ``latent``, ``prompt``                       ``noise_pred`` ε̂ at the fixed
                                                                           timestep (a constant in the graph)
``vae_decoder.onnx``          ``latent`` (scaled, i.e. ẑ_H)                ``image``: ``vae.decode(ẑ_H / sf)``,
                                                                           not yet clamped (nominally [-1, 1])
============================  ===========================================  ==================================

``manifest.json`` records the format and versions, the opset, every graph's file, size, sha256, input and
output names, shapes (``"batch"`` for a dynamic batch axis) and dtypes, and the constants the host
code needs: scaling factor, timestep, ᾱ_t (the float64 value the pipeline uses) and resolution.
The runner is :class:`osdface.runtime.onnx_runner.OnnxRuntimePipeline`.

Graphs whose weights exceed :data:`EXTERNAL_DATA_THRESHOLD` bytes (protobuf's 2 GB limit) keep them
in ``<file>.data`` beside the graph (ONNX external data), listed and hashed in the manifest too.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..errors import InvalidSettingError, ModelFileError, first_line
from ..io.onnx_format import FORMAT, FORMAT_VERSION, GRAPH_FILES, GRAPH_IO, MANIFEST_NAME
from ..utils.io import atomic_dir, sha256_file
from ..utils.logging import get_logger
from ..utils.optional import require_package

logger = get_logger(__name__)

#: the folder's format id/version, manifest and graph names: :mod:`osdface.io.onnx_format`
DEFAULT_OPSET = 17
#: name of the dynamic batch axis in the graphs and the manifest (``--dynamic-batch``)
BATCH_AXIS = "batch"
#: weights above this many bytes go to external data (protobuf refuses messages of 2 GiB and more)
EXTERNAL_DATA_THRESHOLD = 2_000_000_000


# ------------------------------------------------------------------------------ the graph modules
class VaeEncoderGraph(nn.Module):
    """``image`` in [-1, 1] → ``latent``: the VAE posterior mode × ``scaling_factor`` (pipeline step 3)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(image).latent_dist.mode() * self.scaling_factor


class PromptEncoderGraph(nn.Module):
    """``image`` in [-1, 1] → (``prompt``, ``prompt_indices``): VRE, token selection and adapter
    (pipeline step 4, :meth:`OSDFacePipeline.encode_prompt`)."""

    def __init__(self, vre, prompt_adapter):
        super().__init__()
        self.vre, self.prompt_adapter = vre, prompt_adapter

    def forward(self, image: torch.Tensor):
        tokens, idx = self.vre(image, return_indices=True)
        return self.prompt_adapter(tokens.to(image.dtype)), idx


class UNetGraph(nn.Module):
    """(``latent``, ``prompt``) → ``noise_pred``: one UNet call at the fixed timestep (step 5)."""

    def __init__(self, unet, timestep: int):
        super().__init__()
        self.unet, self.timestep = unet, int(timestep)

    def forward(self, latent: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        return self.unet(latent, self.timestep, encoder_hidden_states=prompt.to(latent.dtype)).sample


class VaeDecoderGraph(nn.Module):
    """``latent`` (scaled, ẑ_H) → ``image`` = ``vae.decode(ẑ_H / scaling_factor)``, unclamped (step 7;
    the host checks it for NaN/Inf and clamps, as :meth:`OSDFacePipeline.decode`)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent / self.scaling_factor).sample


def graph_modules(pipe) -> dict[str, nn.Module]:
    """The four graph modules of ``pipe`` (sharing its weights), by graph name."""
    return {
        "vae_encoder": VaeEncoderGraph(pipe.vae).eval(),
        "prompt_encoder": PromptEncoderGraph(pipe.vre, pipe.prompt_adapter).eval(),
        "unet": UNetGraph(pipe.unet, pipe.timestep).eval(),
        "vae_decoder": VaeDecoderGraph(pipe.vae).eval(),
    }


# ----------------------------------------------------------------------------------- helpers
def _require_onnx():
    return require_package("onnx", "onnx", "exporting to ONNX")


def _tensor_infos(names: Sequence[str], tensors: Sequence[torch.Tensor], dynamic_batch: bool) -> list[dict[str, Any]]:
    """``[{"name", "shape", "dtype"}]`` of example tensors (axis 0 is ``"batch"`` with a dynamic batch)."""
    out = []
    for n, t in zip(names, tensors, strict=True):
        shape: list[int | str] = list(t.shape)
        if dynamic_batch:
            shape[0] = BATCH_AXIS
        out.append({"name": n, "shape": shape, "dtype": str(t.dtype).removeprefix("torch.")})
    return out


def _check_graph_types(model, entry: dict[str, Any], file: str) -> None:
    """The dtypes the ONNX graph declares must be those of the manifest entry (the traced tensors)."""
    import numpy as np
    from onnx.helper import tensor_dtype_to_np_dtype

    for key, values in (("inputs", model.graph.input), ("outputs", model.graph.output)):
        declared = [(v.name, np.dtype(tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)).name) for v in values]
        if declared != [(v["name"], v["dtype"]) for v in entry[key]]:
            raise ModelFileError(f"{file}: exported {key} {declared} differ from the traced module's")


def _initializer_bytes(model) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def _finalize_graph(path: Path, external_data_threshold: int) -> str | None:
    """Re-save the graph at ``path`` (alone in its folder) with all its weights in ``<file>.data`` when
    they exceed the threshold or the exporter already wrote external tensors; returns the data file's
    name, or None when the graph keeps its weights inside."""
    onnx = _require_onnx()
    scattered = [f for f in path.parent.iterdir() if f != path]  # external tensors torch wrote (> 2 GB)
    model = onnx.load(str(path), load_external_data=True)
    if not scattered and _initializer_bytes(model) <= external_data_threshold:
        return None
    for f in scattered:
        f.unlink()
    data_name = path.name + ".data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=0, convert_attribute=False)
    return data_name


def _export_one(module: nn.Module, args: tuple, path: Path, names: tuple[Sequence[str], Sequence[str]],
                opset: int, dynamic_batch: bool) -> None:
    inputs, outputs = names
    dynamic_axes = {n: {0: BATCH_AXIS} for n in (*inputs, *outputs)} if dynamic_batch else None
    with warnings.catch_warnings():  # tracer warnings about Python control flow on shapes (all static here)
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=list(inputs), output_names=list(outputs),
                          dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True, dynamo=False)


# ------------------------------------------------------------------------------------- export
def export_onnx(pipe, output_dir: str | os.PathLike, *, opset: int = DEFAULT_OPSET, dynamic_batch: bool = False,
                graphs: Sequence[str] | None = None,
                external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> dict[str, Any]:
    """Export ``pipe`` (LoRA merged, in its own dtype and on its own device) into ``output_dir``.

    The folder is written into a temporary beside it and renamed at the end
    (:func:`osdface.utils.io.atomic_dir`): ``output_dir`` must not exist or be empty.

    Args:
        pipe: the :class:`~osdface.pipelines.OSDFacePipeline`; fp16 graphs come from an fp16 pipeline.
        opset: ONNX opset (TorchScript exporter; default 17).
        dynamic_batch: a symbolic batch axis (``"batch"``) on every input and output; otherwise
            the graphs take one image at a time.
        graphs: the graph names to export (default: all four; the runner needs all four).
        external_data_threshold: weights above this many bytes go to ``<file>.onnx.data``.

    Returns:
        The manifest (also written to ``manifest.json``).

    Raises:
        InvalidSettingError: ``onnx`` is not installed, an unknown graph name, an opset below 14.
        ModelFileError: ``torch.onnx.export`` failed for a graph (named).
    """
    onnx = _require_onnx()
    names = list(GRAPH_FILES) if graphs is None else list(graphs)
    unknown = [g for g in names if g not in GRAPH_FILES]
    if unknown:
        raise InvalidSettingError(f"unknown ONNX graph(s) {unknown}; choose from {list(GRAPH_FILES)}")
    if int(opset) < 14:
        raise InvalidSettingError(f"--opset {opset}: the graphs need opset 14 or newer (scaled dot-product attention)")
    modules = graph_modules(pipe)
    dtype = pipe.dtype
    # example inputs: the real intermediate values of one (or, for a dynamic batch, two) images
    gen = torch.Generator().manual_seed(0)
    batch = 2 if dynamic_batch else 1
    image = (torch.rand(batch, 3, pipe.resolution, pipe.resolution, generator=gen) * 2 - 1).to(pipe.device, dtype)
    with torch.no_grad():
        latent = modules["vae_encoder"](image)
        prompt, idx = modules["prompt_encoder"](image)
        eps = modules["unet"](latent, prompt)
        decoded = modules["vae_decoder"](latent)
    example = {"vae_encoder": ((image,), (latent,)), "prompt_encoder": ((image,), (prompt, idx)),
               "unet": ((latent, prompt), (eps,)), "vae_decoder": ((latent,), (decoded,))}
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "osdface_version": __version__,
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "opset": int(opset),
        "graph_format": "onnx",
        "weight_compression": None,
        "dtype": str(dtype).removeprefix("torch."),
        "dynamic_batch": bool(dynamic_batch),
        "resolution": int(pipe.resolution),
        "scaling_factor": float(pipe.vae.config.scaling_factor),
        "timestep": int(pipe.timestep),
        "alpha_cumprod": float(pipe.alpha_cumprod),  # float64 ᾱ_t (from the float32 cumprod), as the pipeline
        "graphs": {},
    }
    out = Path(output_dir)
    with atomic_dir(out) as tmp:
        for name in names:
            path = tmp / GRAPH_FILES[name]
            logger.info("exporting %s", path.name)
            with torch.no_grad():
                try:
                    # each graph in a folder of its own, so external tensors cannot mix
                    sub = tmp / f".{name}"
                    sub.mkdir()
                    _export_one(modules[name], example[name][0], sub / path.name, GRAPH_IO[name], int(opset),
                                dynamic_batch)
                except Exception as e:  # the exporter raises anything; name the graph and the reason
                    raise ModelFileError(f"{path.name}: torch.onnx.export failed ({type(e).__name__}: "
                                         f"{first_line(e)})") from e
            data_name = _finalize_graph(sub / path.name, external_data_threshold)
            for f in sub.iterdir():
                os.replace(f, tmp / f.name)
            sub.rmdir()
            inputs, outputs = GRAPH_IO[name]
            entry: dict[str, Any] = {
                "file": path.name,
                "sha256": sha256_file(path),
                "bytes": path.stat().st_size,
                "inputs": _tensor_infos(inputs, example[name][0], dynamic_batch),
                "outputs": _tensor_infos(outputs, example[name][1], dynamic_batch),
                "external_data": None,
            }
            _check_graph_types(onnx.load(str(path), load_external_data=False), entry, path.name)
            if data_name is not None:
                entry["external_data"] = {"file": data_name, "sha256": sha256_file(tmp / data_name),
                                          "bytes": (tmp / data_name).stat().st_size}
            manifest["graphs"][name] = entry
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote %s", out)
    return manifest
