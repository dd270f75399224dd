"""Image geometry: how many tokens an image takes, and its pixels as a trainer receives them.

Two modes (``[images] mode`` in a job spec):

``fixed``
    Every image is resized to ``image_size`` × ``image_size`` RGB and takes ``image_tokens``
    tokens. A batch carries ``pixel_values`` ``uint8[K, S, S, 3]``.

``native``
    Every image keeps its aspect ratio, as the vision encoders of Qwen2-VL and Seed1.5-VL expect.
    With ``f = patch_size * merge_size``, an ``h`` × ``w`` image is resized to ``H`` × ``W``:

    * ``H = f * round(h / f)`` and ``W = f * round(w / f)`` (each at least ``f``);
    * if ``H * W > max_pixels``: with ``b = sqrt(h * w / max_pixels)``,
      ``H = f * floor(h / b / f)``, ``W = f * floor(w / b / f)`` (each at least ``f``);
    * else if ``H * W < min_pixels``: with ``b = sqrt(min_pixels / (h * w))``,
      ``H = f * ceil(h * b / f)``, ``W = f * ceil(w * b / f)``;
    * an image so thin that even this exceeds ``max_pixels`` (aspect ratio above
      ``max_pixels / f²``, 1280:1 by default) is refused: its sample fails when loaded.

    It is then cut into ``(H/p) * (W/p)`` patches of ``p = patch_size`` pixels and takes
    ``(H/p) * (W/p) / merge_size**2`` tokens. A batch carries ``pixel_values``
    ``uint8[N_patches, 3 * p * p]`` (each patch channel-first, ``[3, p, p]`` flattened) and
    ``image_grid_thw`` ``int32[N_images, 3]`` = ``(1, H/p, W/p)``. Patches are in *merge-window
    order*: the ``merge_size`` × ``merge_size`` patches a vision merger fuses into one token are
    consecutive (windows row by row, patches row by row within a window), as Qwen2-VL's processor
    orders them.

Pixels are taken as stored: an EXIF orientation tag is not applied (the header's width and
height are the index's, and rotating would swap them). Round half to even (``numpy.round``) is
the rounding; the one vectorized implementation
(:meth:`ImageSpec.resized`) serves the planner (from header dimensions in the index) and the
loader alike, so the planner's token counts are exactly the loader's. Pixels are not normalized:
the trainer does that on its device.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ["IMAGE_MODES", "ImageSpec", "decode_fixed", "decode_native", "open_checked"]

IMAGE_MODES = ("fixed", "native")


@dataclass(frozen=True)
class ImageSpec:
    """``[images]`` of a job spec (see the module docstring)."""

    mode: str = "fixed"
    image_tokens: int = 64        # fixed
    image_size: int = 224         # fixed
    patch_size: int = 14          # native
    merge_size: int = 2           # native
    min_pixels: int = 56 * 56     # native
    max_pixels: int = 28 * 28 * 1280  # native

    def __post_init__(self) -> None:
        if self.mode not in IMAGE_MODES:
            raise ValueError(f"images mode must be one of {IMAGE_MODES}, got {self.mode!r}")
        for name in ("image_tokens", "image_size", "patch_size", "merge_size", "min_pixels", "max_pixels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"images {name} must be a positive int, got {v!r}")
        f = self.patch_size * self.merge_size
        if self.mode == "native" and self.max_pixels < max(self.min_pixels, f * f):
            raise ValueError(f"images max_pixels ({self.max_pixels}) must be >= min_pixels ({self.min_pixels}) "
                             f"and >= (patch_size*merge_size)**2 ({f * f})")

    @property
    def patch_dim(self) -> int:
        """Values per patch row of ``pixel_values`` in native mode: ``3 * p * p``."""
        return 3 * self.patch_size * self.patch_size

    def resized(self, h: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """int64 ``(H, W)`` each ``h`` × ``w`` image is resized to (native mode; 0 where a
        dimension is not positive, i.e. the header was unreadable). Vectorized."""
        h = np.asarray(h, dtype=np.float64)
        w = np.asarray(w, dtype=np.float64)
        ok = (h > 0) & (w > 0)
        h = np.where(ok, h, 1.0)
        w = np.where(ok, w, 1.0)
        f = float(self.patch_size * self.merge_size)
        H = np.maximum(f, np.round(h / f) * f)
        W = np.maximum(f, np.round(w / f) * f)
        big = H * W > self.max_pixels
        small = ~big & (H * W < self.min_pixels)
        b = np.sqrt(h * w / self.max_pixels)
        H = np.where(big, np.maximum(f, np.floor(h / b / f) * f), H)
        W = np.where(big, np.maximum(f, np.floor(w / b / f) * f), W)
        b = np.sqrt(self.min_pixels / (h * w))
        H = np.where(small, np.ceil(h * b / f) * f, H)
        W = np.where(small, np.ceil(w * b / f) * f, W)
        # a strip thinner than max_pixels / f² allows (1280:1 by default) cannot fit at all: it is
        # refused like an unreadable one (its sample fails when loaded), never sized past the bound
        ok &= (H * W <= self.max_pixels) | small
        return np.where(ok, H, 0).astype(np.int64), np.where(ok, W, 0).astype(np.int64)

    def patches(self, h: np.ndarray, w: np.ndarray) -> np.ndarray:
        """int64: patches of each image (native), or ``image_tokens`` (fixed: an image's vision
        work is taken to grow with its token count)."""
        if self.mode == "fixed":
            return np.full(np.shape(h), self.image_tokens, np.int64)
        H, W = self.resized(h, w)
        return (H // self.patch_size) * (W // self.patch_size)

    def tokens(self, h: np.ndarray, w: np.ndarray) -> np.ndarray:
        """int64: tokens each image takes in the sequence (0 for an unreadable native image,
        whose sample fails when it is loaded)."""
        if self.mode == "fixed":
            return np.full(np.shape(h), self.image_tokens, np.int64)
        return self.patches(h, w) // (self.merge_size * self.merge_size)


def open_checked(data: bytes) -> Image.Image:
    """Open encoded bytes with Pillow, refusing a decompression bomb before decoding."""
    img = Image.open(io.BytesIO(data))
    w, h = img.size
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and w * h > limit:
        img.close()
        raise ValueError(f"image of {w}x{h} pixels exceeds the decompression-bomb limit of {limit}")
    return img


def _rgb_resized(img: Image.Image, W: int, H: int, resample: int) -> np.ndarray:
    if img.format == "JPEG":
        img.draft("RGB", (W, H))  # DCT-domain downscale: never below the requested size
    out = img if img.mode in ("RGB", "L") else img.convert("RGB")
    if out.size != (W, H):
        out = out.resize((W, H), resample)  # gray is resized before it is widened
    if out.mode != "RGB":
        out = out.convert("RGB")
    return np.asarray(out, dtype=np.uint8)


def decode_fixed(data: bytes, size: int) -> np.ndarray:
    """Decode encoded image bytes to ``uint8[size, size, 3]`` RGB (BILINEAR resize)."""
    with open_checked(data) as img:
        return _rgb_resized(img, size, size, Image.BILINEAR)


def decode_native(data: bytes, spec: ImageSpec, expect_hw: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Decode to native-resolution patches: ``(uint8[N, 3*p*p], (1, H/p, W/p))`` (module
    docstring). ``expect_hw`` is the ``(h, w)`` the index read from the header; an image that no
    longer has it raises ValueError (its token count would no longer be the planner's)."""
    with open_checked(data) as img:
        w, h = img.size
        if (h, w) != tuple(expect_hw):
            raise ValueError(f"image is {h}x{w} (h x w) but was {expect_hw[0]}x{expect_hw[1]} when indexed")
        Hs, Ws = spec.resized(np.array([h]), np.array([w]))
        H, W = int(Hs[0]), int(Ws[0])
        if H == 0 or W == 0:
            raise ValueError(f"image of {h}x{w} (h x w) cannot be resized within max_pixels = {spec.max_pixels} "
                             "(aspect ratio too extreme)")
        px = _rgb_resized(img, W, H, Image.BICUBIC)
    p, m = spec.patch_size, spec.merge_size
    gh, gw = H // p, W // p
    # [gh/m, m, p, gw/m, m, p, 3] -> [gh/m, gw/m, m, m, 3, p, p]: merge windows, then patches, channel-first
    x = px.reshape(gh // m, m, p, gw // m, m, p, 3).transpose(0, 3, 1, 4, 6, 2, 5)
    return np.ascontiguousarray(x.reshape(gh * gw, 3 * p * p)), (1, gh, gw)
