"""Images and masks to the model's S×S geometry (plain resize, no crop: masks keep their alignment).

``max_pixels`` (the worker's MASKINV_MAX_IMAGE_PIXELS, ``worker.settings``, set once by ``worker.jobs.regions`` with
:func:`set_default_max_pixels`) is checked from the header before decoding; this module reads no environment.
"""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps


ImageLike = Image.Image | bytes


class RegionError(ValueError):
    """A single region cannot be processed (the other regions of the image still are)."""


#: largest image :func:`open_image` decodes by default (MASKINV_MAX_IMAGE_PIXELS's default)
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
_default_max_pixels = DEFAULT_MAX_IMAGE_PIXELS


def open_image(image: ImageLike, max_pixels: int | None = None) -> tuple[Image.Image, str]:
    """Decode to RGB with EXIF orientation applied (what the annotator saw); return ``(image, sha256)``.

    For bytes the hash is of the bytes; for a PIL image, of its decoded pixels. Encoded images of more than
    ``max_pixels`` pixels (None: the process default, :func:`set_default_max_pixels`) are refused from their
    header, before decoding.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        digest = hashlib.sha256(data).hexdigest()
        limit = _default_max_pixels if max_pixels is None else max_pixels
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img: Image.Image = Image.open(io.BytesIO(data))
                if img.width * img.height > limit:
                    raise ValueError(f"image is {img.width}x{img.height} pixels, more than the limit of {limit} "
                                     "(MASKINV_MAX_IMAGE_PIXELS)")
                img.load()
        except ValueError:
            raise
        except Exception as exc:  # PIL raises several types for bad or truncated data
            raise ValueError(f"cannot decode image ({len(data)} bytes): {exc}") from exc
    elif isinstance(image, Image.Image):
        img = image
        h = hashlib.sha256(f"{img.mode}:{img.size}".encode())
        h.update(img.tobytes())
        digest = "pixels:" + h.hexdigest()
    else:
        raise TypeError(f"expected PIL image or encoded bytes, got {type(image).__name__}")
    img = ImageOps.exif_transpose(img)
    return to_rgb(img), digest


def set_default_max_pixels(max_pixels: int) -> None:
    """Set the limit :func:`open_image` applies when called without one (``worker.jobs.regions`` sets it once, from the
    worker's settings, where the runtime is built; the engine calls ``open_image(image)``)."""
    global _default_max_pixels
    if int(max_pixels) < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    _default_max_pixels = int(max_pixels)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB view of any PIL mode: 16-bit greyscale rescaled, alpha composited on black, CMYK/palette converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(canvas, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def image_to_tensor(img: Image.Image, size: int, mean: tuple[float, ...], std: tuple[float, ...],
                    device: torch.device) -> torch.Tensor:
    """RGB image -> normalised pixels ``[1, 3, S, S]`` (bicubic resize to S×S)."""
    arr = np.asarray(img.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    t = torch.from_numpy(arr).permute(2, 0, 1)
    t = (t - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    return t[None].to(device)


def binarize(mask: np.ndarray) -> np.ndarray:
    """``[H, W]`` bool from a bool/int/float mask (threshold 0.5); NaN counts as outside."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise RegionError(f"mask must be 2-D [H, W], got shape {m.shape}")
    if m.dtype == bool:
        return m
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(m.astype(np.float32), nan=0.0) > 0.5


def mask_to_target(mask: np.ndarray, size: int) -> np.ndarray:
    """Binary mask ``[H, W]`` -> soft target ``[S, S]`` float32 in [0, 1] (bilinear area coverage)."""
    m = binarize(mask)
    if not m.any():
        raise RegionError("empty mask: the region covers no pixel")
    pil = Image.fromarray(m.astype(np.uint8) * 255, mode="L").resize((size, size), Image.Resampling.BILINEAR)
    target = np.asarray(pil, dtype=np.float32) / 255.0
    if not target.any():
        raise RegionError(f"mask vanishes at input size {size}")
    return target


def mask_box(mask: np.ndarray, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Bounding box ``(left, top, right, bottom)`` of a mask in the pixels of an image of ``(W, H)``."""
    m = binarize(mask)
    ys, xs = np.nonzero(m)
    if len(xs) == 0:
        raise RegionError("empty mask: the region covers no pixel")
    sx, sy = image_size[0] / m.shape[1], image_size[1] / m.shape[0]
    left, top = int(np.floor(xs.min() * sx)), int(np.floor(ys.min() * sy))
    right, bottom = int(np.ceil((xs.max() + 1) * sx)), int(np.ceil((ys.max() + 1) * sy))
    return left, top, max(right, left + 1), max(bottom, top + 1)


def masked_crop(img: Image.Image, mask: np.ndarray, fill: tuple[int, int, int]) -> Image.Image:
    """Crop of the mask's box with pixels outside the mask set to ``fill``."""
    m = binarize(mask)
    m_img = Image.fromarray(m.astype(np.uint8) * 255, mode="L")
    if m_img.size != img.size:
        m_img = m_img.resize(img.size, Image.Resampling.NEAREST)
    canvas = Image.new("RGB", img.size, fill)
    canvas.paste(img, mask=m_img)
    return canvas.crop(mask_box(mask, img.size))
