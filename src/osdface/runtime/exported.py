"""What every runner of an exported folder (:mod:`osdface.export.onnx`) shares, whatever engine runs the graphs.

* :func:`~osdface.io.onnx_format.read_manifest` (re-exported here): the folder check, before any graph
  is loaded;
* :class:`ExportedPipeline`: the call contract of :class:`~osdface.pipelines.OSDFacePipeline` and its host
  code (preprocessing, the float64 x0 step, the NaN/Inf checks, the output conversion). A subclass only
  opens the four graphs (:meth:`ExportedPipeline._open_graphs`) and runs one (:meth:`ExportedPipeline._run_graph`).

The engines: :mod:`osdface.runtime.onnx_runner` (ONNX Runtime), :mod:`osdface.runtime.openvino_runner`
(OpenVINO, reading the same ONNX files).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..errors import InvalidSettingError, ModelFileError, first_line
from ..image import from_model_range
from ..io.onnx_format import (  # noqa: F401 - VERIFY_MODES and read_manifest re-exported
    DTYPE_NAMES,
    GRAPH_IO,
    MANIFEST_NAME,
    VERIFY_MODES,
    read_manifest,
)
from ..pipelines.pipeline_osdface import (
    OSDFacePipeline,
    blend_fidelity,
    check_fidelity,
    check_latent_strength,
)

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # the export dtypes as torch dtypes


#: opens one graph file → (engine handle, the names of each input, the names of each output); may raise
#: anything. A port may carry several names (OpenVINO keeps a tensor's aliases): one of them must match.
GraphOpener = Callable[[Path], tuple[Any, list[set[str]], list[set[str]]]]


def _names_match(ports: list[set[str]], expected: tuple[str, ...]) -> bool:
    return len(ports) == len(expected) and all(e in names for names, e in zip(ports, expected))


class ExportedPipeline(ABC):
    """OSDFace restoration with the four graphs of an ONNX export, on any engine.

    Same call contract as :class:`~osdface.pipelines.OSDFacePipeline` — for aligned crops directly and,
    through :class:`~osdface.face.FaceRestorer`, for whole photos and videos — with ``latent="mode"``
    only (the exported encoder returns the posterior mode). Host code runs on the CPU in torch, with
    the pipeline's own functions: :meth:`preprocess`, :meth:`predict_x0` (float64),
    :meth:`check_finite`, and its output conversion. :attr:`device` is therefore always the CPU
    (where inputs go and where a detector or parser beside it runs), whatever runs the graphs.

    Subclasses set :attr:`engine` and implement :meth:`_run_graph`; their ``from_folder`` checks the
    folder and opens the graphs with :meth:`_open_graphs`.
    """

    #: the engine's name, as messages show it
    engine = "?"

    # the pipeline's host code, reused as is: it reads device, dtype, resolution, alpha_cumprod, source
    preprocess = OSDFacePipeline.preprocess
    predict_x0 = OSDFacePipeline.predict_x0
    check_finite = OSDFacePipeline.check_finite

    def __init__(self, folder: Path, manifest: dict[str, Any], graphs: dict[str, Any]):
        self.manifest, self.graphs = manifest, graphs
        self.source = str(folder)
        self.device = torch.device("cpu")
        self.dtype = DTYPES[manifest["dtype"]]
        self.resolution = int(manifest["resolution"])
        self.timestep = int(manifest["timestep"])
        self.scaling_factor = float(manifest["scaling_factor"])
        self.batch_size = None if manifest["dynamic_batch"] else 1

    @property
    def alpha_cumprod(self) -> torch.Tensor:
        """ᾱ_t as recorded by the exporter (float64, the value the torch pipeline uses)."""
        return torch.tensor(self.manifest["alpha_cumprod"], dtype=torch.float64)

    def _alpha_at(self, timestep: int | None) -> torch.Tensor:
        """ᾱ_t for :meth:`predict_x0`: the export's own timestep only (its UNet graph has it built in).

        Raises:
            InvalidSettingError: another ``timestep`` (the torch pipeline takes any; an export does not).
        """
        if timestep is not None and timestep != self.timestep:
            raise InvalidSettingError(f"timestep {timestep!r}: this export runs t = {self.timestep} only (the UNet "
                                      "graph has it built in); use the torch backend for other timesteps")
        return self.alpha_cumprod

    @classmethod
    def _open_graphs(cls, folder: Path, manifest: dict[str, Any], open_graph: GraphOpener) -> dict[str, Any]:
        """Open the four graphs of a checked folder with ``open_graph``; check their input/output names.

        Raises:
            ModelFileError: the engine cannot load a graph, or its inputs/outputs differ from the
                manifest (one line naming the file).
        """
        graphs = {}
        for name in GRAPH_IO:
            path = folder / manifest["graphs"][name]["file"]
            try:
                handle, inputs, outputs = open_graph(path)
            except Exception as e:  # noqa: BLE001 - engines raise their own exception types
                raise ModelFileError(f"{path}: {cls.engine} cannot load the graph ({first_line(e)})") from None
            expected_in, expected_out = GRAPH_IO[name]
            if not (_names_match(inputs, expected_in) and _names_match(outputs, expected_out)):
                raise ModelFileError(f"{path}: graph inputs/outputs differ from {MANIFEST_NAME}")
            graphs[name] = handle
        return graphs

    @abstractmethod
    def _run_graph(self, handle: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run one opened graph on ``feed`` (input name → contiguous array); its outputs in manifest order."""

    def _run(self, name: str, **inputs: torch.Tensor) -> list[torch.Tensor]:
        feed = {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in inputs.items()}
        return [torch.from_numpy(np.asarray(a)) for a in self._run_graph(self.graphs[name], feed)]

    def restore_tensor(self, lq: torch.Tensor, latent: Literal["mode"] = "mode",
                       generator: torch.Generator | None = None, return_indices: bool = False,
                       check_finite: bool = True, fidelity: float = 0.0, timestep: int | None = None,
                       latent_strength: float = 1.0):
        """Steps 3–8 (docs/method.md §2) on a model-space batch ``(B, 3, R, R)`` in [-1, 1]: the graphs,
        the float64 x0 step between them, the fidelity blend; returns ``(B, 3, R, R)`` float in [0, 1]
        (and the indices). The keywords are :meth:`OSDFacePipeline.restore_tensor`'s; ``generator`` is
        ignored (the posterior mode involves no randomness).

        Raises:
            InvalidSettingError: ``latent`` other than ``"mode"``, a ``timestep`` other than the export's,
                ``fidelity`` or ``latent_strength`` out of range.
        """
        if latent != "mode":
            raise InvalidSettingError(f"latent={latent!r}: an ONNX export encodes the posterior mode only "
                                      "(use latent='mode', or the torch pipeline for 'sample')")
        fidelity = check_fidelity(fidelity)
        latent_strength = check_latent_strength(latent_strength)
        self._alpha_at(timestep)  # refuses another timestep before any graph runs
        step = self.batch_size or lq.shape[0]
        outs, idxs = [], []
        for chunk in lq.split(step):
            (z,) = self._run("vae_encoder", image=chunk)
            prompt, idx = self._run("prompt_encoder", image=chunk)
            (eps,) = self._run("unet", latent=z, prompt=prompt.to(z.dtype))
            x0 = self.predict_x0(z, eps, timestep, latent_strength)
            if check_finite:
                self.check_finite(x0, "predicted latent (VAE encoder, prompt or UNet)")
            (img,) = self._run("vae_decoder", latent=x0.to(self.dtype))
            if check_finite:
                self.check_finite(img, "VAE decoder output")
            outs.append(from_model_range(img.clamp(-1, 1)).clamp(0.0, 1.0))
            idxs.append(idx.long())
        out, idx = torch.cat(outs), torch.cat(idxs)
        out = blend_fidelity(out, from_model_range(lq), fidelity)
        return (out, idx) if return_indices else out

    #: the pipeline's call, as is (diffusers conventions, output types, the knobs): it runs
    #: :meth:`preprocess` and this class's :meth:`restore_tensor`
    __call__ = OSDFacePipeline.__call__
