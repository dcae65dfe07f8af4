"""The one place where images change representation.

Public convention everywhere else in the package: **RGB, float32 in [0, 1], NCHW** tensors
(``lq``, ``pred``, ``gt``). Model space is [-1, 1]. PIL images, uint8 ``H×W×3`` arrays, BGR
(OpenCV), 16-bit and other awkward file modes are converted here and only here.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .constants import MAX_IMAGE_PIXELS
from .errors import OSDFaceError
from .utils.io import atomic_path

ImageLike = Union["Image.Image", np.ndarray, "torch.Tensor"]  # noqa: F821
Rounding = Literal["round", "truncate"]


class ImageError(OSDFaceError, ValueError):
    """An input image could not be used; the message names the file (if any) and the problem."""


@dataclass
class LoadedImage:
    """A decoded image file.

    Attributes:
        rgb: ``(H, W, 3)`` uint8 RGB pixels, EXIF orientation applied.
        alpha: ``(H, W)`` uint8 alpha channel when the file had one, else ``None``.
        path: where it came from.
    """

    rgb: np.ndarray
    alpha: np.ndarray | None
    path: Path | None = None


def _to_uint8_array(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Convert any PIL mode to (RGB uint8, optional alpha uint8)."""
    alpha = None
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img)
        # 16-bit grayscale (PNG "I;16") or 32-bit int: scale the full range to 8 bits.
        maxval = 65535.0 if arr.max(initial=0) > 255 or mode.startswith("I;16") else 255.0
        gray = np.clip(np.round(arr.astype(np.float64) * (255.0 / maxval)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2), None
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scale = 255.0 if hi <= 1.0 and lo >= 0.0 else 1.0
        gray = np.clip(np.round(np.nan_to_num(arr) * scale), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2), None
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        arr = np.asarray(rgba)
        return np.ascontiguousarray(arr[..., :3]), np.ascontiguousarray(arr[..., 3])
    if mode == "CMYK":
        return np.asarray(img.convert("RGB")), None
    if mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img), alpha


def read_image(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> LoadedImage:
    """Decode an image file to RGB uint8 (+ alpha), applying EXIF orientation.

    Handles grayscale, palette, RGBA/LA, CMYK and 16-bit files. Refuses images larger than
    ``max_pixels`` (decompression bombs) before decoding the pixel data.

    Raises:
        ImageError: missing, unreadable, truncated, too large or otherwise unusable file.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    rgb, alpha = _decode(path, str(path), max_pixels, None)
    return LoadedImage(rgb=rgb, alpha=alpha, path=path)


class ImageTooLargeError(ImageError):
    """The image declares more pixels than allowed (a possible decompression bomb); nothing was decoded."""


class ImageFormatError(ImageError):
    """The image is in a format the caller does not accept (e.g. GIF where PNG/JPEG/WebP are allowed)."""


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS, formats: Sequence[str] | None = None,
                 name: str = "image") -> LoadedImage:
    """Decode an encoded image held in memory (an upload) like :func:`read_image` decodes a file.

    The format and the size are read from the header first; an image of another format than
    ``formats`` (PIL names: ``"PNG"``, ``"JPEG"``, ``"WEBP"``...) or of more than ``max_pixels``
    pixels is refused before any pixel data is decoded or allocated. Nothing touches the file system.

    Args:
        data: the encoded bytes.
        max_pixels: largest accepted ``width * height`` (as declared in the header).
        formats: accepted PIL format names (upper case); ``None`` accepts any format PIL reads.
        name: how messages name the image.

    Raises:
        ImageTooLargeError: more than ``max_pixels`` pixels.
        ImageFormatError: a format outside ``formats``.
        ImageError: not an image, truncated or otherwise undecodable.
    """
    import io

    rgb, alpha = _decode(io.BytesIO(data), name, max_pixels, formats)
    return LoadedImage(rgb=rgb, alpha=alpha, path=None)


def _decode(source, label: str, max_pixels: int, formats: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Open ``source`` (path or file object), check format and header size, then decode (shared by the readers)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                if formats is not None and img.format not in formats:
                    raise ImageFormatError(
                        f"{label}: {img.format or 'unknown'} images are not accepted; send one of {', '.join(formats)}"
                    )
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageTooLargeError(
                        f"{label}: image is {w}x{h} = {w * h / 1e6:.0f} MP, above the limit of "
                        f"{max_pixels / 1e6:.0f} MP (possible decompression bomb); refusing to decode it"
                    )
                img.load()
                img = ImageOps.exif_transpose(img)
                rgb, alpha = _to_uint8_array(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLargeError(f"{label}: refused as a possible decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{label}: cannot decode image (not a known image format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{label}: cannot decode image ({e})") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageError(f"{label}: unsupported image layout {rgb.shape}")
    return np.ascontiguousarray(rgb), alpha


def save_image(
    path: str | os.PathLike, rgb: np.ndarray, alpha: np.ndarray | None = None, jpeg_quality: int = 95
) -> Path:
    """Write ``(H, W, 3)`` uint8 RGB (+ optional ``(H, W)`` alpha) atomically; format from the suffix.

    Alpha is kept for PNG/WebP/TIFF and dropped for JPEG/BMP.
    """
    path = Path(path)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ImageError(f"{path}: save_image expects (H, W, 3) uint8, got {rgb.dtype} {rgb.shape}")
    suffix = path.suffix.lower()
    keep_alpha = alpha is not None and suffix in (".png", ".webp", ".tif", ".tiff")
    img = Image.fromarray(np.dstack([rgb, alpha]) if keep_alpha else rgb, "RGBA" if keep_alpha else "RGB")
    kwargs = {"quality": jpeg_quality} if suffix in (".jpg", ".jpeg", ".webp") else {}
    fmt = Image.registered_extensions().get(suffix)
    if fmt is None:
        raise ImageError(f"{path}: unknown image extension {suffix!r}")
    with atomic_path(path) as tmp:
        img.save(tmp, format=fmt, **kwargs)
    return path


#: output formats of :func:`encode_image` → (PIL format, keeps alpha)
ENCODE_FORMATS = {"png": ("PNG", True), "jpeg": ("JPEG", False), "webp": ("WEBP", True)}


def encode_image(rgb: np.ndarray, alpha: np.ndarray | None = None, fmt: str = "png", quality: int = 95) -> bytes:
    """Encode ``(H, W, 3)`` uint8 RGB (+ optional ``(H, W)`` alpha) to bytes in memory (see :data:`ENCODE_FORMATS`).

    Alpha is kept for PNG and WebP and dropped for JPEG, as :func:`save_image` does.
    """
    import io

    if fmt not in ENCODE_FORMATS:
        raise ImageError(f"unknown output format {fmt!r}; choose from {', '.join(ENCODE_FORMATS)}")
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ImageError(f"encode_image expects (H, W, 3) uint8, got {rgb.dtype} {rgb.shape}")
    pil_format, keeps_alpha = ENCODE_FORMATS[fmt]
    keep_alpha = alpha is not None and keeps_alpha
    img = Image.fromarray(np.dstack([rgb, alpha]) if keep_alpha else rgb, "RGBA" if keep_alpha else "RGB")
    buf = io.BytesIO()
    img.save(buf, format=pil_format, **({"quality": quality} if fmt in ("jpeg", "webp") else {}))
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# Tensor conversions
# ----------------------------------------------------------------------------------------------


def to_tensor(images: ImageLike | Sequence[ImageLike], name: str = "images"):
    """Convert aligned RGB images to a float32 ``(B, 3, H, W)`` tensor in [0, 1].

    Accepts a PIL image, a uint8 ``(H, W, 3)`` or ``(B, H, W, 3)`` array, a float array in [0, 1], a ``(3, H, W)`` or
    ``(B, 3, H, W)`` float tensor in [0, 1], or a list of any of these (all the same size).
    Grayscale PIL inputs are converted to RGB. uint8 → float uses ``x / 255`` exactly like
    torchvision's ``to_tensor``.

    Raises:
        ImageError: wrong channel count, range, dtype, or mixed sizes.
    """
    import torch

    if isinstance(images, torch.Tensor):
        t = images
        if t.ndim == 3:
            t = t.unsqueeze(0)
        if t.ndim != 4 or t.shape[1] != 3:
            raise ImageError(f"{name}: expected a (B, 3, H, W) RGB tensor, got shape {tuple(images.shape)}")
        if t.dtype == torch.uint8:
            return t.float() / 255.0
        if not t.is_floating_point():
            raise ImageError(f"{name}: expected a float tensor in [0, 1], got dtype {t.dtype}")
        if t.numel() and (t.min() < -1e-6 or t.max() > 1 + 1e-6):
            raise ImageError(
                f"{name}: tensor values must be in [0, 1] (got [{t.min().item():.3f}, {t.max().item():.3f}]); "
                "the public API takes RGB in [0, 1], not [-1, 1] or [0, 255]"
            )
        # contiguous NCHW: a permuted NHWC view would select channels-last kernels and change rounding
        return t.contiguous()
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)  # (B, H, W, 3) batch
    elif isinstance(images, (Image.Image, np.ndarray)):
        images = [images]
    tensors = []
    for i, img in enumerate(images):
        if isinstance(img, Image.Image):
            img = np.asarray(img.convert("RGB"))
        if isinstance(img, torch.Tensor):
            tensors.append(to_tensor(img, name=f"{name}[{i}]"))
            continue
        if not isinstance(img, np.ndarray):
            raise ImageError(f"{name}[{i}]: unsupported image type {type(img).__name__}")
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        if img.ndim != 3 or img.shape[2] != 3:
            raise ImageError(f"{name}[{i}]: expected an (H, W, 3) RGB array, got shape {img.shape}")
        if not img.flags.writeable:
            img = img.copy()
        if img.dtype == np.uint8:
            t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div(255.0)
        elif np.issubdtype(img.dtype, np.floating):
            if img.size and (img.min() < -1e-6 or img.max() > 1 + 1e-6):
                raise ImageError(f"{name}[{i}]: float arrays must be in [0, 1]")
            t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1)
        else:
            raise ImageError(f"{name}[{i}]: unsupported dtype {img.dtype} (use uint8 or float in [0, 1])")
        tensors.append(t.unsqueeze(0))
    if not tensors:
        raise ImageError(f"{name}: no images given")
    sizes = {tuple(t.shape[-2:]) for t in tensors}
    if len(sizes) > 1:
        raise ImageError(f"{name}: all images in a batch must have the same size, got {sorted(sizes)}")
    return torch.cat(tensors, dim=0)


def to_model_range(x):
    """[0, 1] → [-1, 1] (model space), as ``x * 2 - 1``."""
    return x * 2 - 1


def from_model_range(x):
    """[-1, 1] → [0, 1], as ``x * 0.5 + 0.5``."""
    return x * 0.5 + 0.5


def to_uint8(x, rounding: Rounding = "round") -> np.ndarray:
    """``(B, 3, H, W)`` float tensor in [0, 1] → ``(B, H, W, 3)`` uint8 array.

    ``rounding="round"`` (default) rounds to the nearest level. ``"truncate"`` reproduces
    torchvision's ``ToPILImage`` (``x * 255`` then cast), which the official OSDFace script uses;
    it biases every pixel down by half a level on average.
    """
    import torch

    x = x.detach().float().clamp(0, 1) * 255.0
    x = x.round() if rounding == "round" else x.floor()
    # convert and reorder on the tensor's device, then move 1 byte per value to the host
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def to_pil(x, rounding: Rounding = "round") -> list[Image.Image]:
    """``(B, 3, H, W)`` float tensor in [0, 1] → list of RGB PIL images."""
    return [Image.fromarray(a, "RGB") for a in to_uint8(x, rounding)]


def rgb_to_bgr(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB ``(H, W, 3)`` → BGR for OpenCV calls (the only sanctioned BGR conversion)."""
    return np.ascontiguousarray(rgb[..., ::-1])


def bgr_to_rgb(bgr: np.ndarray) -> np.ndarray:
    """uint8 BGR ``(H, W, 3)`` from OpenCV → RGB."""
    return np.ascontiguousarray(bgr[..., ::-1])
