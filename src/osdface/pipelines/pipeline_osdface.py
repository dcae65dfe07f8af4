"""OSDFacePipeline: aligned LQ face crops → restored crops in one UNet step (docs/method.md §2).

Reading order of :meth:`OSDFacePipeline.__call__`:

1. check inputs (RGB, [0, 1], square) and move them to the pipeline's device/dtype
2. preprocess to [-1, 1]; square inputs are resized to the model resolution (bilinear,
   ``align_corners=True``, as the official script)
3. encode the LQ latent: VAE posterior **mode** by default (deterministic); ``latent="sample"``
   draws from it with ``generator`` as the official script does
4. visual prompt: VRE tokens (77 × 512) → prompt adapter (77 × 1024)
5. one UNet step at ``t = 399``: ε̂ = UNet(z_L, 399, prompt)
6. x0 recovery in float64: ẑ = (z_L − √(1−ᾱ)·ε̂) / √ᾱ
7. decode ẑ / scaling_factor, clamp to [-1, 1], map to [0, 1]

Steps 1–2 are :meth:`~OSDFacePipeline.preprocess`, steps 3–7 :meth:`~OSDFacePipeline.restore_tensor`.
Speed and memory settings never enter the math: they live in one
:class:`~osdface.pipelines.execution.ExecutionPlan` (``pipe.plan``), consulted only by the encode and
decode helpers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ..constants import TIMESTEP
from ..errors import DeviceError, InvalidSettingError, NonFiniteOutputError
from ..image import ImageError, from_model_range, to_model_range, to_pil, to_tensor, to_uint8
from ..io.model_folders import (
    apply_lora,
    check_base_model,
    read_lora_file,
    read_model_folder,
    read_official_adapter,
    write_model_folder,
)
from ..io.names import LORA_SUBFOLDER as LORA_SUBFOLDER  # re-exported: the old home of the name
from ..io.names import LORA_WEIGHTS_NAME as LORA_WEIGHTS_NAME
from ..io.names import PROMPT_ADAPTER, SCHEDULER, UNET, VAE, VRE
from ..models.lean_decode import DEFAULT_BAND_MB
from ..models.prompt_encoder import PromptAdapter, VisualPromptEncoder
from ..utils.logging import get_logger
from ..weights import check_base_model_dir, find_official_files, load_official_vre
from .execution import ExecutionPlan
from .output import OSDFacePipelineOutput

logger = get_logger(__name__)

OutputType = Literal["pt", "np", "uint8", "pil"]
LatentMode = Literal["mode", "sample"]



def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"fp32" | "fp16" | "bf16"`` (or a torch dtype, or None) → torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; choose from fp32, fp16, bf16")
    return table[dtype]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` → cuda, else mps, else cpu. Explicit devices are checked for availability."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise DeviceError(f"device {str(device)!r}: {e}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device 'cuda' requested but CUDA is not available in this PyTorch build/machine")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError("device 'mps' requested but MPS is not available on this machine")
    return device


def check_fidelity(fidelity: float) -> float:
    """``fidelity`` as a float in [0, 1] (:class:`InvalidSettingError` otherwise)."""
    try:
        w = float(fidelity)
    except (TypeError, ValueError):
        raise InvalidSettingError(f"fidelity must be a number in [0, 1], got {fidelity!r}") from None
    if not 0.0 <= w <= 1.0:  # also refuses NaN
        raise InvalidSettingError(f"fidelity must be in [0, 1] (0 = the model's output, 1 = the input), got {fidelity!r}")
    return w


def check_latent_strength(strength: float) -> float:
    """``latent_strength`` as a finite float ≥ 0 (:class:`InvalidSettingError` otherwise)."""
    try:
        s = float(strength)
    except (TypeError, ValueError):
        raise InvalidSettingError(f"latent_strength must be a number >= 0, got {strength!r}") from None
    if not 0.0 <= s < float("inf"):
        raise InvalidSettingError(f"latent_strength must be a finite number >= 0, got {strength!r}")
    return s


def blend_fidelity(restored: torch.Tensor, lq: torch.Tensor, fidelity: float) -> torch.Tensor:
    """The fidelity knob (docs/fidelity.md): ``(1 − W)·restored + W·lq``, both ``(B, 3, R, R)`` in [0, 1].

    ``W = 0`` returns ``restored`` itself (the official output, bit for bit); ``W = 1`` the LQ
    input at the model resolution. The distance to the LQ shrinks as ``(1 − W)``, so the PSNR to
    the LQ rises monotonically with W for any weights (a latent interpolation toward z_L does not
    guarantee that: the VAE reconstruction D(E(x)) is not x).
    """
    if fidelity == 0.0:
        return restored
    lq = lq.to(restored.device, restored.dtype)
    return torch.lerp(restored, lq, float(fidelity)).clamp(0.0, 1.0)


def _convert_output(out: torch.Tensor, output_type: OutputType, rounding: Literal["round", "truncate"]) -> Any:
    """``(B, 3, H, W)`` float in [0, 1] → the requested output type (``"pt"``: ``out`` itself).

    ``"np"`` follows diffusers (``VaeImageProcessor.pt_to_numpy``): float32 ``(B, H, W, 3)`` in
    [0, 1], no rounding; ``"uint8"`` and ``"pil"`` are rounded as ``rounding`` says.
    """
    if output_type == "np":
        return out.detach().float().clamp(0.0, 1.0).permute(0, 2, 3, 1).contiguous().cpu().numpy()
    if output_type == "uint8":
        return to_uint8(out, rounding)
    if output_type == "pil":
        return to_pil(out, rounding)
    if output_type == "pt":
        return out
    raise ValueError(f"output_type must be 'pt', 'np', 'uint8' or 'pil', got {output_type!r}")


class OSDFacePipeline:
    """OSDFace one-step restoration of aligned face crops.

    Args:
        vae: SD 2.1-base ``AutoencoderKL`` (frozen).
        unet: SD 2.1-base ``UNet2DConditionModel`` with the OSDFace LoRA merged (or attached via peft).
        vre: :class:`VisualPromptEncoder`.
        prompt_adapter: :class:`PromptAdapter`.
        scheduler: any diffusers scheduler exposing ``alphas_cumprod`` (only that is used).
        timestep: the fixed UNet timestep (399).
        resolution: side the crops are processed at (default: the VRE's resolution, 512 for the release).

    Attributes:
        source: where the weights were loaded from (a model folder, or the SD 2.1-base folder + the
            official weights folder); named by :class:`~osdface.errors.NonFiniteOutputError`.
            ``None`` for a pipeline built from modules in memory.
        plan: the :class:`~osdface.pipelines.execution.ExecutionPlan` (speed and memory settings;
            never the math), set through :meth:`set_lean_decode`, :meth:`set_heap_trimming`,
            :meth:`enable_encoder_overlap`, :meth:`enable_channels_last`, :meth:`set_vae_batch_size`,
            :meth:`enable_model_cpu_offload` and :meth:`compile`.
    """

    def __init__(self, vae, unet, vre: VisualPromptEncoder, prompt_adapter: PromptAdapter, scheduler,
                 timestep: int = TIMESTEP, resolution: int | None = None):
        self.vae, self.unet, self.vre, self.prompt_adapter, self.scheduler = vae, unet, vre, prompt_adapter, scheduler
        self.timestep = int(timestep)
        self.resolution = int(resolution if resolution is not None else vre.config.resolution)
        self.plan = ExecutionPlan()
        self.source: str | None = None
        for m in self.modules().values():
            m.eval()
            m.requires_grad_(False)
        n_alpha = len(scheduler.alphas_cumprod)
        if not 0 <= self.timestep < n_alpha:
            raise ValueError(f"timestep {timestep} outside the scheduler's range [0, {n_alpha})")

    # ------------------------------------------------------------------ components and placement
    def modules(self) -> dict[str, torch.nn.Module]:
        return {"vae": self.vae, "unet": self.unet, "vre": self.vre, "prompt_adapter": self.prompt_adapter}

    @property
    def components(self) -> dict[str, Any]:
        return {**self.modules(), "scheduler": self.scheduler}

    @property
    def device(self) -> torch.device:
        """Where inputs go and the model runs: the UNet's device, or the offload device after
        :meth:`enable_model_cpu_offload` (the modules then rest on the CPU)."""
        if self.plan.offload_device is not None:
            return self.plan.offload_device
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> OSDFacePipeline:
        """Move every module to ``device`` (``"auto"`` allowed) and/or cast to ``dtype``."""
        dev = resolve_device(device) if device is not None else None
        dt = parse_dtype(dtype)
        if dev is not None and dev.type != "cpu" and self.plan.offload_device is not None:
            raise InvalidSettingError(
                f"pipe.to({str(device)!r}) after enable_model_cpu_offload(): the offload moves each module to "
                f"{self.plan.offload_device} while it runs; call disable_model_cpu_offload() first to keep "
                "every module on the device")
        for m in self.modules().values():
            p = next(m.parameters(), None)
            if p is None or (dev in (None, p.device) and dt in (None, p.dtype)):
                continue  # nothing to do (and no diffusers cast warning)
            m.to(device=dev, dtype=dt)
        return self

    # ------------------------------------------------- execution plan (speed and memory; never the math)
    def enable_channels_last(self) -> OSDFacePipeline:
        """Use the channels-last memory format for the conv-heavy modules (VAE, UNet, VRE encoder)
        and for the VAE's inputs (``plan.channels_last``).

        Same math; on GPUs with tensor cores (and some CPUs) the convolutions run faster. Results
        differ from contiguous NCHW only by float summation order.
        """
        for m in (self.vae, self.unet, self.vre):
            m.to(memory_format=torch.channels_last)
        self.plan = self.plan.replace(channels_last=True)
        return self

    def compile(self, mode: str | None = "max-autotune-no-cudagraphs", **kwargs) -> OSDFacePipeline:
        """``torch.compile`` the UNet and the VAE encoder/decoder (first call is slow; then faster).

        ``kwargs`` go to ``torch.compile`` (e.g. ``dynamic=False``, ``fullgraph=False``). The mode is
        recorded in ``plan.compile_mode``; a compiled decoder is decoded by ``vae.decode`` (the lean
        decode's documented fallback).
        """
        self.unet = torch.compile(self.unet, mode=mode, **kwargs)
        self.vae.encoder = torch.compile(self.vae.encoder, mode=mode, **kwargs)
        self.vae.decoder = torch.compile(self.vae.decoder, mode=mode, **kwargs)
        self.plan = self.plan.replace(compile_mode=mode or "default")  # torch.compile: None = "default"
        return self

    def set_vae_batch_size(self, n: int | None) -> OSDFacePipeline:
        """Run the VAE encoder/decoder ``n`` images at a time (bounds activation memory for large
        batches; ``None`` = the whole batch at once). ``plan.vae_batch_size``.

        Raises:
            ValueError: ``n < 1``.
        """
        self.plan = self.plan.replace(vae_batch_size=n)
        return self

    def set_lean_decode(self, enabled: bool | None = None, band_mb: float = DEFAULT_BAND_MB) -> OSDFacePipeline:
        """Decode with :func:`osdface.models.lean_decode.lean_vae_decode`: same operations, lower
        peak memory (banded high-resolution convolutions, in-place activations). ``plan.lean_decode``
        and ``plan.lean_band_mb``.

        A decoder structure the lean decode does not recognise is decoded by ``vae.decode`` after
        one logged warning; autograd, the VAE's own tiling/slicing and a compiled decoder also use
        ``vae.decode`` (documented fallbacks). Results are the same either way.

        Args:
            enabled: ``True``/``False``, or ``None`` (default) = on when decoding on the CPU, where
                resident memory is the limit; off on accelerators.
            band_mb: working-set budget of one convolution band in MiB.

        Raises:
            ValueError: ``band_mb <= 0``.
        """
        self.plan = self.plan.replace(lean_decode=enabled, lean_band_mb=float(band_mb))
        return self

    def set_heap_trimming(self, enabled: bool | None = None) -> OSDFacePipeline:
        """Return free heap memory to the OS between stages (:func:`osdface.utils.memory.trim_heap`).
        ``plan.heap_trimming``.

        ``None`` (default) = on for CPU inference (lower resident peak, results unchanged), off on
        accelerators and under autograd.
        """
        self.plan = self.plan.replace(heap_trimming=enabled)
        return self

    def enable_encoder_overlap(self, enabled: bool = True) -> OSDFacePipeline:
        """On CUDA, run the VRE + adapter on a side stream while the VAE encoder runs on the current
        stream (both only read ``lq``; the UNet waits for both). Same math and results; no effect
        on other devices or under autograd. ``plan.encoder_overlap``.
        """
        self.plan = self.plan.replace(encoder_overlap=bool(enabled))
        return self

    def offload_stages(self) -> dict[str, list[torch.nn.Module]]:
        """The modules of each stage, in the order they run (what model CPU offload moves together):
        ``visual_prompt`` (VRE + prompt adapter), ``vae_encoder`` (encoder + ``quant_conv``),
        ``unet``, ``vae_decoder`` (``post_quant_conv`` + decoder). Together they hold every weight
        of the pipeline once."""
        vae = self.vae
        return {
            "visual_prompt": [self.vre, self.prompt_adapter],
            "vae_encoder": [m for m in (vae.encoder, getattr(vae, "quant_conv", None)) if m is not None],
            "unet": [self.unet],
            "vae_decoder": [m for m in (getattr(vae, "post_quant_conv", None), vae.decoder) if m is not None],
        }

    def enable_model_cpu_offload(self, gpu_id: int | None = None,
                                 device: str | torch.device | None = None) -> OSDFacePipeline:
        """Model CPU offload for small GPUs (diffusers' convention): the modules rest on the CPU and each
        stage's modules (:meth:`offload_stages`) are on the accelerator only while that stage runs, so
        the GPU holds the largest stage (the UNet) instead of the whole model. Same results as the
        pipeline on that device; slower by the weight transfers of every call. ``plan.offload_device``.

        Args:
            gpu_id: accelerator index (default: the one in ``device``, else 0).
            device: the accelerator (default: CUDA, else MPS). ``"cpu"`` is accepted (the stages then
                run where they rest; used to test the mechanism).

        Raises:
            DeviceError: ``device`` not given and no accelerator here (as diffusers, which raises
                ``RuntimeError: enable_model_cpu_offload requires accelerator``), or ``device``
                not available.
            InvalidSettingError: ``gpu_id`` and an index in ``device`` both given.
        """
        if device is None:
            dev = resolve_device("auto")
            if dev.type == "cpu":
                raise DeviceError("enable_model_cpu_offload() needs an accelerator (CUDA or MPS) and none is "
                                  "available here; on the CPU the pipeline runs without offload")
        else:
            dev = resolve_device(device)
        if gpu_id is not None and dev.index is not None:
            raise InvalidSettingError(f"enable_model_cpu_offload: pass gpu_id={gpu_id} or an index in "
                                      f"device={str(device)!r}, not both")
        if dev.type != "cpu":
            dev = resolve_device(torch.device(dev.type, gpu_id if gpu_id is not None else dev.index or 0))
        self.plan = self.plan.replace(offload_device=None)
        self.to("cpu")
        self.plan = self.plan.replace(offload_device=dev)
        return self

    def disable_model_cpu_offload(self) -> OSDFacePipeline:
        """Stop the offload: the modules stay on the CPU (move them with :meth:`to`)."""
        self.plan = self.plan.replace(offload_device=None)
        return self

    # --------------------------------------------- stage helpers: the only places the plan is consulted
    def _encode(self, lq: torch.Tensor, latent: LatentMode, generator: torch.Generator | None):
        """Steps 3–4 of :meth:`restore_tensor`: ``(z_L, prompt, indices)`` from the same ``lq``.

        The two encoders are independent; the plan may run the visual prompt on a CUDA side stream
        while the VAE encodes (:meth:`ExecutionPlan.run_encoders`), then trims the heap. Under model
        CPU offload each encoder's modules are on the device only while it runs (:meth:`ExecutionPlan.placed`).
        """
        stages = self.offload_stages()

        def visual_prompt():
            with self.plan.placed(*stages["visual_prompt"]):
                return self.encode_prompt(lq, return_indices=True)

        def lq_latent():
            with self.plan.placed(*stages["vae_encoder"]):
                return self.encode_latent(lq, latent=latent, generator=generator)

        (prompt, idx), z = self.plan.run_encoders(lq, visual_prompt=visual_prompt, lq_latent=lq_latent)
        self.plan.between_stages(z)
        return z, prompt, idx

    def _decode(self, x0: torch.Tensor, check_finite: bool) -> torch.Tensor:
        """Step 7 of :meth:`restore_tensor`: :meth:`decode`, with the heap trimmed before (the UNet's
        freed activations) and after, as the plan says."""
        self.plan.between_stages(x0)
        with self.plan.placed(*self.offload_stages()["vae_decoder"]):
            out = self.decode(x0, check_finite=check_finite)
        self.plan.between_stages(out)
        return out

    @property
    def alpha_cumprod(self) -> torch.Tensor:
        """ᾱ_t at the pipeline timestep, float64 (from the float32 cumprod, as the official code)."""
        return torch.as_tensor(self.scheduler.alphas_cumprod)[self.timestep].double()

    # ------------------------------------------------------------------------------- the math
    def preprocess(self, images) -> torch.Tensor:
        """Inputs → ``(B, 3, R, R)`` in [-1, 1] on the pipeline device/dtype (steps 1–2)."""
        x = to_tensor(images)
        h, w = x.shape[-2:]
        if h != w:
            raise ImageError(
                f"aligned mode needs square face crops (got {w}x{h}); align photos first "
                "(osdface restore without --aligned detects and aligns faces)"
            )
        x = x.to(self.device, non_blocking=x.device.type == "cpu" and x.is_pinned())
        x = to_model_range(x.to(dtype=self.dtype))
        if h != self.resolution:
            # official: bilinear, align_corners=True, no antialias (applied in model space)
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=True)
        return x

    def encode_prompt(self, lq: torch.Tensor, return_indices: bool = False):
        """``(B, 3, R, R)`` in [-1, 1] → prompt ``(B, T, cross_attention_dim)`` (step 4)."""
        tokens, idx = self.vre(lq, return_indices=True)
        prompt = self.prompt_adapter(tokens.to(lq.dtype))
        return (prompt, idx) if return_indices else prompt

    def encode_latent(self, lq: torch.Tensor, latent: LatentMode = "mode", generator: torch.Generator | None = None):
        """``(B, 3, R, R)`` in [-1, 1] → ``z_L`` ``(B, 4, R/8, R/8)``, scaled by ``scaling_factor`` (step 3).

        The VAE runs on the plan's chunks (:meth:`ExecutionPlan.vae_chunks`)."""
        if latent not in ("mode", "sample"):
            raise ValueError(f"latent must be 'mode' or 'sample', got {latent!r}")
        zs = []
        for chunk in self.plan.vae_chunks(lq):
            dist = self.vae.encode(chunk).latent_dist
            zs.append(dist.mode() if latent == "mode" else dist.sample(generator=generator))
        return torch.cat(zs) * self.vae.config.scaling_factor

    def predict_x0(self, z_lq: torch.Tensor, eps: torch.Tensor, timestep: int | None = None,
                   latent_strength: float = 1.0) -> torch.Tensor:
        """ẑ_H = (z_L − √(1−ᾱ_t)·ε̂)/√ᾱ_t in float64, returned as float32 (step 6).

        ``timestep`` (default: the pipeline's) selects ᾱ_t. ``latent_strength`` s moves the result
        along the model's own update, ẑ = z_L + s·(ẑ_H − z_L) (float64): 1 (default, the official
        output: the line is skipped), 0 = the LQ latent, between = part of the update
        (docs/fidelity.md). Devices without float64 (MPS) do this on the CPU; the tensors are tiny.
        """
        dev = z_lq.device
        calc = torch.device("cpu") if dev.type == "mps" else dev
        alpha = self._alpha_at(timestep).to(calc)
        beta = 1 - alpha
        z = z_lq.to(calc).double()
        x0 = (z - beta**0.5 * eps.to(calc).double()) / alpha**0.5
        if latent_strength != 1.0:
            x0 = z + float(latent_strength) * (x0 - z)
        return x0.float().to(dev)

    def _alpha_at(self, timestep: int | None) -> torch.Tensor:
        """ᾱ_t (float64) at ``timestep`` (``None``: the pipeline's); checks the range."""
        if timestep is None:
            return self.alpha_cumprod
        return torch.as_tensor(self.scheduler.alphas_cumprod)[self._check_timestep(timestep)].double()

    def _check_timestep(self, timestep: int | None) -> int:
        """``timestep`` (``None``: the pipeline's) as an int inside the scheduler's range."""
        if timestep is None:
            return self.timestep
        n_alpha = len(self.scheduler.alphas_cumprod)
        if isinstance(timestep, bool) or int(timestep) != timestep or not 0 <= int(timestep) < n_alpha:
            raise InvalidSettingError(f"timestep must be an integer in [0, {n_alpha}), got {timestep!r}")
        return int(timestep)

    def decode(self, x0: torch.Tensor, check_finite: bool = False) -> torch.Tensor:
        """Latent → image in [0, 1] (step 7); ``check_finite`` checks the decoder output before
        the clamp (which would hide ±Inf) and raises :class:`NonFiniteOutputError`.

        The VAE decodes as the plan says (:meth:`ExecutionPlan.vae_decode`: chunks, lean decode);
        the results are those of ``vae.decode``."""
        z = x0.to(self.dtype) / self.vae.config.scaling_factor
        img = self.plan.vae_decode(self.vae, z)
        if check_finite:
            self.check_finite(img, "VAE decoder output")
        return from_model_range(img.clamp(-1, 1)).clamp(0.0, 1.0)

    def check_finite(self, x: torch.Tensor, stage: str) -> None:
        """Raise :class:`NonFiniteOutputError` if ``x`` holds NaN/Inf (one reduction, one sync).

        The message names the files the pipeline was loaded from (:attr:`source`) and the stage;
        NaN weights would otherwise turn every output into a silent all-black image.
        """
        if bool(torch.isfinite(x).all()):
            return
        where = self.source if self.source is not None else "the pipeline's weights (built in memory)"
        hint = " or overflow in this precision (try float32: --dtype fp32)" if x.dtype != torch.float32 else ""
        raise NonFiniteOutputError(
            f"{where}: the {stage} contains NaN/Inf values: the model weights are broken{hint}"
        )

    def restore_tensor(self, lq: torch.Tensor, latent: LatentMode = "mode",
                       generator: torch.Generator | None = None, return_indices: bool = False,
                       check_finite: bool = False, fidelity: float = 0.0, timestep: int | None = None,
                       latent_strength: float = 1.0):
        """Steps 3–7 (docs/method.md §2) on a model-space batch; differentiable (no ``no_grad`` here;
        training reuses it).

        Steps 1–2 (check the inputs, preprocess to [-1, 1]) are :meth:`preprocess`, run by the caller
        (:meth:`__call__`; training builds its model-space batches itself). How the steps execute
        (chunks, lean decode, heap trimming, encoder overlap) is :attr:`plan`'s business, inside
        :meth:`_encode` and :meth:`_decode`; the math below does not depend on it.

        Args:
            lq: ``(B, 3, R, R)`` in [-1, 1].
            check_finite: raise :class:`NonFiniteOutputError` when the predicted latent ẑ or the
                decoder output holds NaN/Inf (two reductions; :meth:`__call__` turns it on).
            fidelity: W in [0, 1]; the output is ``(1 − W)·restored + W·lq`` in [0, 1]
                (:func:`blend_fidelity`, docs/fidelity.md). 0 (default) = the official output.
            timestep: UNet timestep of the one step (advanced; default: :attr:`timestep`, 399).
            latent_strength: s in ẑ = z_L + s·(ẑ_H − z_L) (advanced; default 1 = the official ẑ_H;
                :meth:`predict_x0`).

        Returns:
            ``(B, 3, R, R)`` float in [0, 1] (and the prompt indices when asked).
        """
        fidelity = check_fidelity(fidelity)
        latent_strength = check_latent_strength(latent_strength)
        t = self._check_timestep(timestep)
        # 3–4. LQ latent z_L (VAE posterior mode, or a sample) and the visual prompt (VRE → adapter)
        z, prompt, idx = self._encode(lq, latent, generator)
        # 5. one UNet step at t, no noise added: ε̂ = UNet(z_L, t, prompt)
        with self.plan.placed(self.unet):  # model CPU offload: the UNet on the device for this step only
            eps = self.unet(z, t, encoder_hidden_states=prompt.to(z.dtype)).sample
        # 6. x0 in closed form, float64: ẑ_H = (z_L − √(1−ᾱ_t)·ε̂) / √ᾱ_t (then z_L + s·(ẑ_H − z_L))
        x0 = self.predict_x0(z, eps, timestep, latent_strength)
        if check_finite:
            self.check_finite(x0, "predicted latent (VAE encoder, prompt or UNet)")
        # 7. decode ẑ_H / scaling_factor, clamp to [-1, 1], map to [0, 1]
        out = self._decode(x0, check_finite)
        # 8. fidelity: blend toward the LQ input (skipped at W = 0: the official output bit for bit)
        out = blend_fidelity(out, from_model_range(lq), fidelity)
        return (out, idx) if return_indices else out

    @torch.inference_mode()
    def __call__(self, image=None, output_type: OutputType = "pt", latent: LatentMode = "mode",
                 generator: torch.Generator | None = None, rounding: Literal["round", "truncate"] = "round",
                 return_dict: bool = True, fidelity: float = 0.0, timestep: int | None = None,
                 latent_strength: float = 1.0, images=None):
        """Restore aligned RGB face crops.

        Called as a diffusers pipeline: ``pipe(image=crops)``; ``return_dict=False`` gives a tuple
        ``(images,)``.

        Args:
            image: a ``(B, 3, H, W)`` float tensor in [0, 1], a PIL image, a uint8 ``(H, W, 3)``
                array, or a list of those; square, any size (resized to ``resolution``).
                ``images=`` is accepted as the old name.
            output_type: ``"pt"`` (float tensor ``(B, 3, H, W)`` in [0, 1], on the pipeline device),
                ``"np"`` (float32 array ``(B, H, W, 3)`` in [0, 1], as diffusers), ``"uint8"`` (uint8
                array ``(B, H, W, 3)``) or ``"pil"`` (list of RGB images). Changed in issue 17:
                ``"np"`` used to return the uint8 array; code that wants bytes asks for ``"uint8"``.
            latent: ``"mode"`` (deterministic) or ``"sample"`` (official behaviour; use ``generator``).
            generator: RNG for ``latent="sample"``.
            rounding: float → uint8 for ``"uint8"``/``"pil"``: ``"round"`` or ``"truncate"`` (official).
            return_dict: ``True``: an :class:`OSDFacePipelineOutput`; ``False``: the tuple ``(images,)``.
            fidelity: W in [0, 1]: 0 (default) the model's output, bit for bit; 1 the input
                (docs/fidelity.md).
            timestep: the UNet timestep (advanced; default 399, the one the model was trained at).
            latent_strength: how much of the model's latent update to apply (advanced; default 1).

        Raises:
            ImageError: inputs that are not RGB images in [0, 1] or not square.
            InvalidSettingError: ``fidelity``, ``timestep`` or ``latent_strength`` out of range,
                or both ``image`` and ``images`` given.
            NonFiniteOutputError: the model produced NaN/Inf (broken weights); names :attr:`source`.
        """
        if images is not None:
            if image is not None:
                raise InvalidSettingError("pass the crops as image= (or the old images=), not both")
            image = images
        if image is None:
            raise InvalidSettingError("no input: pass the aligned face crops as image=")
        lq = self.preprocess(image)  # 1–2
        out, idx = self.restore_tensor(lq, latent=latent, generator=generator, return_indices=True,
                                       check_finite=True, fidelity=fidelity, timestep=timestep,
                                       latent_strength=latent_strength)  # 3–8
        result = _convert_output(out.float(), output_type, rounding)
        if not return_dict:
            return (result,)
        return OSDFacePipelineOutput(images=result, prompt_indices=idx)

    # ------------------------------------------------------------------------------- loading
    @classmethod
    def from_official(cls, base_model: str | os.PathLike, weights: str | os.PathLike,
                      torch_dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
                      fuse_lora: bool = True, lora_alpha: float | None = None,
                      vre_config: dict | None = None) -> OSDFacePipeline:
        """Load the official release: an SD 2.1-base diffusers folder + the OSDFace weights folder.

        Reading and checking is :mod:`osdface.io.model_folders`' (:func:`~osdface.io.model_folders.check_base_model`,
        :func:`~osdface.io.model_folders.read_official_adapter`, :func:`~osdface.io.model_folders.apply_lora`).

        Args:
            base_model: folder with ``scheduler/``, ``unet/``, ``vae/``.
            weights: folder with ``associate_2.ckpt``, ``embedding_change_weights.pth``,
                ``pytorch_lora_weights.safetensors``.
            torch_dtype: run dtype (default float32). The LoRA is merged in float32 first.
            device: where to put the modules (default: stay on the CPU).
            fuse_lora: merge the LoRA into the UNet weights (fast, default) or attach it via peft.
            lora_alpha: LoRA alpha when the file carries none (default: = rank, scale 1.0).
            vre_config: VRE architecture (default: read from the checkpoint's tensor shapes, which
                gives the released architecture for the released file).

        Raises:
            WeightsNotFoundError: a folder or file is missing.
            ModelFileError: a base-model config is malformed or outside :data:`osdface.model_limits.LIMITS`,
                diffusers cannot load ``unet/``, ``vae/`` or ``scheduler/`` (named), or the LoRA file
                is malformed or holds NaN/Inf.
            LoraFormatError: the LoRA's keys or shapes do not fit the UNet (naming the file).
            ValueError: an official checkpoint does not match the model (from :mod:`osdface.weights`).
            UnsafeCheckpointError: an official checkpoint references code.
            DeviceError: ``device`` is not available here.
        """
        base = check_base_model_dir(base_model)
        files = find_official_files(weights)
        sd_base = check_base_model(base, safetensors_only=False, timestep=TIMESTEP)
        vre = load_official_vre(files.vre, vre_config)
        unet = sd_base.load(UNET)
        adapter = read_official_adapter(files.adapter, vre.config.embed_dim, unet.config.cross_attention_dim)
        apply_lora(unet, read_lora_file(files.lora, lora_alpha), fuse_lora)
        pipe = cls(sd_base.load(VAE), unet, vre, adapter, sd_base.load(SCHEDULER))
        pipe.source = f"{base} + {files.lora.parent}"
        if device is not None or torch_dtype is not None:
            pipe.to(device, torch_dtype)
        return pipe

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, torch_dtype: str | torch.dtype | None = None,
                        device: str | torch.device | None = None, fuse_lora: bool = True) -> OSDFacePipeline:
        """Load a model folder written by :meth:`save_pretrained` / ``osdface convert``.

        Everything cheap is checked before anything is built (:func:`osdface.io.model_folders.read_model_folder`):
        every JSON config is parsed and checked against :data:`osdface.model_limits.LIMITS` and
        against the others (latent channels, cross-attention width, token width, resolution,
        timestep); each component's declared size (built on the ``meta`` device) must fit in its
        weights file; each safetensors header must parse; the LoRA is checked for NaN/Inf. After
        loading, the VRE and prompt adapter are checked for NaN/Inf. Only safetensors files are ever read.

        Raises:
            WeightsNotFoundError: no ``model_index.json``, or a component folder, config or
                weights file is missing.
            ModelFileError: a config is malformed, has wrong types, misses a field, is outside
                the bounds or inconsistent with another config; a weights file is not valid
                safetensors, is too small for its config, holds NaN/Inf (small weights), or
                diffusers cannot load it (size mismatch, ...). The message names the file.
            LoraFormatError: the LoRA's keys or shapes do not fit the UNet (naming the file).
            DeviceError: ``device`` is not available here.
            ValueError: ``torch_dtype`` is not a known dtype name.
        """
        folder = read_model_folder(path)
        unet = folder.load(UNET)
        if folder.lora is not None:
            apply_lora(unet, folder.lora, fuse_lora)
        vre, adapter = folder.load(VRE), folder.load(PROMPT_ADAPTER)
        pipe = cls(folder.load(VAE), unet, vre, adapter, folder.load(SCHEDULER), timestep=folder.timestep,
                   resolution=folder.resolution)
        pipe.source = str(folder.root)
        if device is not None or torch_dtype is not None:
            pipe.to(device, torch_dtype)
        return pipe

    def save_pretrained(self, path: str | os.PathLike, fuse_lora: bool = True) -> Path:
        """Write a self-contained model folder (safetensors + JSON only; :func:`osdface.io.model_folders.write_model_folder`).

        With an unmerged (peft) LoRA on the UNet, ``fuse_lora=True`` writes merged UNet weights;
        ``fuse_lora=False`` writes the base UNet plus ``unet_lora/`` (adapter + its config).
        """
        return write_model_folder(path, vae=self.vae, unet=self.unet, vre=self.vre,
                                  prompt_adapter=self.prompt_adapter, scheduler=self.scheduler,
                                  timestep=self.timestep, resolution=self.resolution, fuse_lora=fuse_lora)
