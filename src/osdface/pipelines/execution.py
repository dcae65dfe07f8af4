"""How :class:`~osdface.pipelines.OSDFacePipeline` runs its math: one execution-plan object.

The restoration math (docs/method.md §2) is fixed; *how* it is executed is not. Every speed or memory
choice lives in one :class:`ExecutionPlan` held by the pipeline (``pipe.plan``) and set through the
pipeline's documented methods (``set_lean_decode``, ``set_heap_trimming``, ``enable_encoder_overlap``,
``enable_channels_last``, ``set_vae_batch_size``, ``compile``). The pipeline consults the plan only in
its encode and decode helpers; the plan owns the machinery those choices need (the CUDA side stream
of the encoder overlap, the ``malloc_trim`` calls of heap trimming, the choice between the lean and
the plain VAE decode).

No setting changes results beyond float summation order (channels-last, VAE chunking); the lean
decode, heap trimming and the encoder overlap leave them bit-identical. "Auto" settings (``None``)
are resolved per device by :meth:`ExecutionPlan.resolve`:

================  ==========================================  =====================================
setting           default                                     effect
================  ==========================================  =====================================
lean_decode       ``None``: on for CPU tensors                :func:`~osdface.models.lean_decode.lean_vae_decode`
lean_band_mb      32 MiB                                      working set of one convolution band
heap_trimming     ``None``: on for CPU, never under autograd  :func:`~osdface.utils.memory.trim_heap` between stages
encoder_overlap   off; CUDA only, never under autograd        VRE + adapter on a side stream while the VAE encodes
channels_last     off                                         VAE inputs in channels-last memory format
vae_batch_size    ``None``: the whole batch                   VAE encoder/decoder ``n`` images at a time
compile_mode      ``None``: not compiled                      recorded by ``pipe.compile()``
offload_device    ``None``: no offload                        model CPU offload: each stage's modules
                                                              on this device only while it runs
================  ==========================================  =====================================
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..models.lean_decode import DEFAULT_BAND_MB, lean_vae_decode
from ..utils.memory import trim_heap


@dataclass(frozen=True)
class ResolvedPlan:
    """An :class:`ExecutionPlan` with its automatic settings decided for one device (and the current
    autograd mode): what the pipeline will actually do."""

    lean_decode: bool
    lean_band_mb: float
    heap_trimming: bool
    encoder_overlap: bool
    channels_last: bool
    vae_batch_size: int | None
    compile_mode: str | None
    offload_device: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ExecutionPlan:
    """The pipeline's execution settings (see the module table); a value: change it with :meth:`replace`.

    Args:
        lean_decode: ``True``/``False``, or ``None`` = on for CPU tensors (resident memory is the
            limit there), off on accelerators.
        lean_band_mb: working-set budget of one lean-decode convolution band, MiB (> 0).
        heap_trimming: ``True``/``False``, or ``None`` = on for CPU inference; never under autograd.
        encoder_overlap: run the VRE + prompt adapter on a CUDA side stream while the VAE encodes
            (CUDA only, never under autograd).
        channels_last: feed the VAE channels-last inputs (set together with the modules' format by
            ``pipe.enable_channels_last()``).
        vae_batch_size: VAE encoder/decoder chunk size (>= 1), ``None`` = the whole batch.
        compile_mode: the ``torch.compile`` mode ``pipe.compile()`` used, ``None`` when not compiled.
        offload_device: model CPU offload (``pipe.enable_model_cpu_offload()``): the modules live on
            the CPU and each stage's modules are moved to this device only while the stage runs
            (:meth:`placed`); ``None`` = no offload.

    Raises:
        ValueError: ``lean_band_mb <= 0`` or ``vae_batch_size < 1``.
    """

    lean_decode: bool | None = None
    lean_band_mb: float = DEFAULT_BAND_MB
    heap_trimming: bool | None = None
    encoder_overlap: bool = False
    channels_last: bool = False
    vae_batch_size: int | None = None
    compile_mode: str | None = None
    offload_device: torch.device | None = None
    #: one CUDA side stream per device for the encoder overlap, made on first use
    _side_streams: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.lean_band_mb <= 0:
            raise ValueError("band_mb must be > 0")
        if self.vae_batch_size is not None and self.vae_batch_size < 1:
            raise ValueError("VAE batch size must be >= 1 or None")

    def replace(self, **changes) -> ExecutionPlan:
        """A copy with ``changes`` applied (validated; side streams are made again when needed)."""
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------------- resolution
    def resolve(self, device: str | torch.device, grad_enabled: bool | None = None) -> ResolvedPlan:
        """The settings as they apply to tensors on ``device`` (``grad_enabled``: default the current mode)."""
        device = torch.device(device)
        grad = torch.is_grad_enabled() if grad_enabled is None else grad_enabled
        cpu = device.type == "cpu"
        return ResolvedPlan(
            lean_decode=self.lean_decode if self.lean_decode is not None else cpu,
            lean_band_mb=self.lean_band_mb,
            heap_trimming=(self.heap_trimming if self.heap_trimming is not None else cpu) and not grad,
            encoder_overlap=self.encoder_overlap and device.type == "cuda" and not grad,
            channels_last=self.channels_last,
            vae_batch_size=self.vae_batch_size,
            compile_mode=self.compile_mode,
            offload_device=None if self.offload_device is None else str(self.offload_device),
        )

    # ------------------------------------------------------------------------------ machinery
    @contextlib.contextmanager
    def placed(self, *modules: torch.nn.Module | None) -> Iterator[None]:
        """Model CPU offload of one stage: ``modules`` on :attr:`offload_device` while the ``with``
        body runs, back on the CPU after it (also on error). Without offload: nothing.

        The same weights, moved: results are those of the modules resident on that device. The
        pattern of diffusers' ``enable_model_cpu_offload`` (one model on the accelerator at a
        time), made explicit per stage so that it also covers ``vae.encode``/``vae.decode`` and the
        lean decode, which do not go through the modules' ``forward``.
        """
        mods = [m for m in modules if m is not None]
        if self.offload_device is None or not mods:
            yield
            return
        for m in mods:
            m.to(self.offload_device)
        try:
            yield
        finally:
            for m in mods:
                m.to("cpu")

    def between_stages(self, x: torch.Tensor) -> None:
        """Heap trimming: give free heap pages back to the OS after a stage that produced ``x``
        (glibc ``malloc_trim``; touches no live data), when the plan says so for ``x``'s device."""
        if self.resolve(x.device).heap_trimming:
            trim_heap()

    def vae_chunks(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``x`` (channels-last when planned) split into VAE batches of ``vae_batch_size``."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.split(self.vae_batch_size or len(x))

    def vae_decode(self, vae, z: torch.Tensor) -> torch.Tensor:
        """``vae.decode(z).sample`` chunk by chunk, through the lean decode when planned (same results)."""
        plan = self.resolve(z.device)
        parts = [lean_vae_decode(vae, c, plan.lean_band_mb) if plan.lean_decode else vae.decode(c).sample
                 for c in self.vae_chunks(z)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def run_encoders(self, lq: torch.Tensor, visual_prompt: Callable[[], tuple[torch.Tensor, ...]],
                     lq_latent: Callable[[], torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """``(visual_prompt(), lq_latent())``: the two independent encoders of the same ``lq``.

        With the encoder overlap resolved on (CUDA, no autograd) ``visual_prompt`` runs on this
        plan's side stream of ``lq``'s device while ``lq_latent`` runs on the current stream; both
        only read ``lq`` and the current stream waits for the side stream before returning. Same
        operations, same results.
        """
        if not self.resolve(lq.device).encoder_overlap:
            prompt = visual_prompt()
            return prompt, lq_latent()
        main = torch.cuda.current_stream(lq.device)
        side = self._side_streams.get(lq.device)
        if side is None:  # one side stream per device, made once
            side = self._side_streams[lq.device] = torch.cuda.Stream(device=lq.device)
        side.wait_stream(main)  # lq is complete before the side stream reads it
        with torch.cuda.stream(side):
            prompt = visual_prompt()
        z = lq_latent()
        main.wait_stream(side)
        # the caching allocator must not hand these blocks out again while the other stream uses them
        lq.record_stream(side)
        for t in prompt:
            if t.is_cuda:
                t.record_stream(main)
        return prompt, z
