"""Image geometry (``fabricd.images``): the native-resolution resize rule, token and patch counts,
the merge-window patch order of ``decode_native``, input modes, and ``ImageSpec`` validation.

Expected values are computed by hand (in comments) or by slow, obviously-correct references
written here from the module docstring, never by calling the formula under test."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile

from fabricd.images import IMAGE_MODES, ImageSpec, decode_fixed, decode_native, open_checked

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

NATIVE = ImageSpec(mode="native")  # p = 14, m = 2, f = 28, min 3136, max 1_003_520
F = 28
MIN_PX = 56 * 56                   # 3_136
MAX_PX = 28 * 28 * 1280            # 1_003_520


def _ref_resized(h: int, w: int, p: int = 14, m: int = 2, lo: int = MIN_PX, hi: int = MAX_PX) -> tuple[int, int]:
    """The module docstring's rule, one image at a time, with Python's scalar math (``round`` is
    round-half-to-even, like ``numpy.round``)."""
    if h <= 0 or w <= 0:
        return 0, 0
    f = p * m
    H = max(f, round(h / f) * f)
    W = max(f, round(w / f) * f)
    if H * W > hi:
        b = math.sqrt(h * w / hi)
        H = max(f, math.floor(h / b / f) * f)
        W = max(f, math.floor(w / b / f) * f)
        if H * W > hi:  # too thin to fit at all: refused
            return 0, 0
    elif H * W < lo:
        b = math.sqrt(lo / (h * w))
        H = math.ceil(h * b / f) * f
        W = math.ceil(w * b / f) * f
    return H, W


def _one(spec: ImageSpec, h: int, w: int) -> tuple[int, int]:
    H, W = spec.resized(np.array([h]), np.array([w]))
    return int(H[0]), int(W[0])


def _encode(arr: np.ndarray, fmt: str = "PNG", mode: str | None = None, **kw) -> bytes:
    img = Image.fromarray(arr)
    if mode is not None:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _position_image(h: int, w: int) -> np.ndarray:
    """uint8[h, w, 3] whose pixel (r, c) is (r % 256, c % 256, (r // 256) * 16 + c // 256)."""
    r = np.arange(h)[:, None]
    c = np.arange(w)[None, :]
    out = np.empty((h, w, 3), np.uint8)
    out[..., 0] = r % 256
    out[..., 1] = c % 256
    out[..., 2] = (r // 256) * 16 + c // 256
    return out


def _pixel(r: int, c: int, ch: int) -> int:
    return (r % 256, c % 256, (r // 256) * 16 + c // 256)[ch]


# ------------------------------------------------------------------------------------------
# resized: hand-computed cases


def test_resized_480x640_rounds_each_side_to_a_multiple_of_28() -> None:
    # h = 480: 480 / 28 = 17.14 -> round 17 -> 476; w = 640: 640 / 28 = 22.86 -> 23 -> 644.
    # 476 * 644 = 306_544, inside [3_136, 1_003_520]: no scaling.
    assert _one(NATIVE, 480, 640) == (476, 644)
    # and the transposed image is the transposed result
    assert _one(NATIVE, 640, 480) == (644, 476)


def test_resized_exact_multiples_and_half_way_rounding() -> None:
    assert _one(NATIVE, 56, 84) == (56, 84)          # already aligned, 4_704 px: unchanged
    # 98 / 28 = 3.5 -> half to even: 4 -> 112 ; 70 / 28 = 2.5 -> half to even: 2 -> 56
    # 112 * 56 = 6_272 >= 3_136: no scaling
    assert _one(NATIVE, 98, 70) == (112, 56)
    # 126 / 28 = 4.5 -> 4 -> 112 ; 154 / 28 = 5.5 -> 6 -> 168
    assert _one(NATIVE, 126, 154) == (112, 168)


def test_resized_4k_image_is_scaled_below_max_pixels() -> None:
    # h = 2160, w = 3840: rounded 2156 x 3836 = 8_270_416 > 1_003_520, so
    # b = sqrt(2160 * 3840 / 1_003_520) = sqrt(8.2653...) = 2.87494...
    # H = 28 * floor(2160 / 2.87494 / 28) = 28 * floor(26.83) = 728
    # W = 28 * floor(3840 / 2.87494 / 28) = 28 * floor(47.70) = 1316
    H, W = _one(NATIVE, 2160, 3840)
    assert (H, W) == (728, 1316)
    assert H * W == 958_048 <= MAX_PX
    # aspect ratio kept within one factor: both sides scaled by the same 1/b, each floored by < 28
    b = math.sqrt(2160 * 3840 / MAX_PX)
    assert 0 <= 2160 / b - H < F and 0 <= 3840 / b - W < F
    assert abs(H / W - 2160 / 3840) < F / W + F / H


def test_resized_tiny_image_is_scaled_up_to_min_pixels() -> None:
    # 10 x 10: rounded to max(28, 0) = 28 each; 784 < 3_136, so b = sqrt(3_136 / 100) = 5.6 and
    # H = W = 28 * ceil(10 * 5.6 / 28) = 28 * ceil(2.0) = 56
    assert _one(NATIVE, 10, 10) == (56, 56)
    # 1 x 1: b = 56, H = W = 28 * ceil(56 / 28) = 56
    assert _one(NATIVE, 1, 1) == (56, 56)
    # 20 x 30: rounded 28 x 28 = 784 < 3_136; b = sqrt(3136 / 600) = 2.2862
    # H = 28 * ceil(45.72 / 28) = 28 * 2 = 56 ; W = 28 * ceil(68.59 / 28) = 28 * 3 = 84
    H, W = _one(NATIVE, 20, 30)
    assert (H, W) == (56, 84)
    assert H * W >= MIN_PX


def test_resized_extreme_aspect_ratios_below_the_max_pixels_regime() -> None:
    # 1 x 10_000: rounded max(28, 0) = 28 by 28 * round(357.14) = 9_996 -> 279_888 px: in range
    assert _one(NATIVE, 1, 10_000) == (28, 9_996)
    assert _one(NATIVE, 10_000, 1) == (9_996, 28)
    # 30 x 3000: 28 x 2996 = 83_888 px
    assert _one(NATIVE, 30, 3000) == (28, 2996)
    # 100 x 20_000: rounded 112 x 20_000 = 2_240_000 > max; b = sqrt(2e6 / 1_003_520) = 1.41173
    # H = 28 * floor(70.84 / 28) = 56 ; W = 28 * floor(14_167.2 / 28) = 28 * 505 = 14_140
    H, W = _one(NATIVE, 100, 20_000)
    assert (H, W) == (56, 14_140)
    assert H * W <= MAX_PX


def test_a_strip_too_thin_for_max_pixels_is_refused_never_oversized() -> None:
    assert _one(NATIVE, 1, 1_000_000) == (0, 0)  # 28 x 1_001_756 would be 28 M pixels
    assert NATIVE.tokens(np.array([1]), np.array([1_000_000])).tolist() == [0]
    with pytest.raises(ValueError, match="aspect ratio"):
        decode_native(_encode(np.zeros((1, 40_000, 3), np.uint8)), ImageSpec(mode="native", max_pixels=28 * 28 * 4),
                      (1, 40_000))


def test_resized_unreadable_dimensions_give_zero() -> None:
    h = np.array([0, -1, 5, 0, -1, 480])
    w = np.array([5, 5, 0, 0, -7, 640])
    H, W = NATIVE.resized(h, w)
    assert H.dtype == np.int64 and W.dtype == np.int64
    np.testing.assert_array_equal(H, [0, 0, 0, 0, 0, 476])
    np.testing.assert_array_equal(W, [0, 0, 0, 0, 0, 644])
    np.testing.assert_array_equal(NATIVE.tokens(h, w), [0, 0, 0, 0, 0, (476 // 14) * (644 // 14) // 4])
    np.testing.assert_array_equal(NATIVE.patches(h, w), [0, 0, 0, 0, 0, 34 * 46])


# ------------------------------------------------------------------------------------------
# resized: properties over many random sizes


SPECS = [
    NATIVE,
    ImageSpec(mode="native", patch_size=16, merge_size=2, min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 256),
    ImageSpec(mode="native", patch_size=3, merge_size=1, min_pixels=10, max_pixels=3000),
    ImageSpec(mode="native", patch_size=2, merge_size=3, min_pixels=36 * 5, max_pixels=36 * 40),
]


def _random_sizes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    # log-uniform over 1 .. 6000 px per side, plus a few exact multiples and tiny values
    h = np.exp(rng.uniform(0, math.log(6000), n)).astype(np.int64)
    w = np.exp(rng.uniform(0, math.log(6000), n)).astype(np.int64)
    h[:20] = np.arange(1, 21)
    w[20:40] = 28 * np.arange(1, 21)
    return h, w


@pytest.mark.parametrize("k", range(len(SPECS)))
def test_resized_vectorized_equals_the_scalar_rule(k: int) -> None:
    spec = SPECS[k]
    rng = np.random.default_rng(100 + k)
    h, w = _random_sizes(rng, 1500)
    H, W = spec.resized(h, w)
    for i in range(h.shape[0]):
        ref = _ref_resized(int(h[i]), int(w[i]), spec.patch_size, spec.merge_size, spec.min_pixels, spec.max_pixels)
        assert (int(H[i]), int(W[i])) == ref, (int(h[i]), int(w[i]))
        if i % 97 == 0:  # element-by-element calls give what the vectorized call gave
            assert _one(spec, int(h[i]), int(w[i])) == ref


@pytest.mark.parametrize("k", range(len(SPECS)))
def test_resized_properties(k: int) -> None:
    spec = SPECS[k]
    f = spec.patch_size * spec.merge_size
    rng = np.random.default_rng(k)
    h, w = _random_sizes(rng, 4000)
    H, W = spec.resized(h, w)
    assert np.all(H % f == 0) and np.all(W % f == 0)
    refused = H == 0
    assert np.array_equal(refused, W == 0)
    # only strips thinner than max_pixels / f² allows are refused
    assert np.all(np.maximum(h, w)[refused] / np.minimum(h, w)[refused] > spec.max_pixels / (f * f))
    h, w, H, W = h[~refused], w[~refused], H[~refused], W[~refused]
    assert np.all(H >= f) and np.all(W >= f)
    area = H * W
    assert np.all(area <= spec.max_pixels) or spec.min_pixels > spec.max_pixels // 2
    # the per-side "at least f" clamp of the max branch can only bite past this aspect ratio
    tame = np.maximum(h, w) / np.minimum(h, w) < spec.max_pixels / (f * f)
    # max_pixels holds, unless min_pixels' ceiling forced more (only when min is near max)
    grown = (np.maximum(f, np.round(h / f) * f) * np.maximum(f, np.round(w / f) * f)) < spec.min_pixels
    assert np.all(area[tame & ~grown] <= spec.max_pixels)
    assert np.all(area[grown] >= spec.min_pixels)
    # aspect ratio: both sides are within one factor of the same scaling of the original
    for i in np.flatnonzero(tame)[:800]:
        hi, wi, Hi, Wi = float(h[i]), float(w[i]), int(H[i]), int(W[i])
        rh = round(hi / f) * f
        rw = round(wi / f) * f
        if max(f, rh) * max(f, rw) > spec.max_pixels:
            s = math.sqrt(spec.max_pixels / (hi * wi))
            assert 0 <= hi * s - Hi < f + 1e-9 and 0 <= wi * s - Wi < f + 1e-9
        elif max(f, rh) * max(f, rw) < spec.min_pixels:
            s = math.sqrt(spec.min_pixels / (hi * wi))
            assert 0 <= Hi - hi * s < f + 1e-9 and 0 <= Wi - wi * s < f + 1e-9
        else:
            assert abs(Hi - hi) <= f / 2 or Hi == f
            assert abs(Wi - wi) <= f / 2 or Wi == f


def test_resized_accepts_shapes_and_scalars() -> None:
    h = np.array([[480, 10], [2160, 56]])
    w = np.array([[640, 10], [3840, 84]])
    H, W = NATIVE.resized(h, w)
    assert H.shape == (2, 2) and W.shape == (2, 2)
    np.testing.assert_array_equal(H, [[476, 56], [728, 56]])
    np.testing.assert_array_equal(W, [[644, 56], [1316, 84]])
    H0, W0 = NATIVE.resized(480, 640)
    assert (int(H0), int(W0)) == (476, 644)
    e = NATIVE.resized(np.zeros(0, np.int32), np.zeros(0, np.int32))
    assert e[0].shape == (0,) and e[1].shape == (0,)


# ------------------------------------------------------------------------------------------
# tokens and patches


def test_native_tokens_and_patches_hand_computed() -> None:
    h = np.array([480, 2160, 10, 56])
    w = np.array([640, 3840, 10, 84])
    # resized: 476x644, 728x1316, 56x56, 56x84 ; patches of 14: 34x46, 52x94, 4x4, 4x6
    np.testing.assert_array_equal(NATIVE.patches(h, w), [34 * 46, 52 * 94, 16, 24])
    # tokens: patches / 2**2
    np.testing.assert_array_equal(NATIVE.tokens(h, w), [391, 1222, 4, 6])
    assert NATIVE.tokens(h, w).dtype == np.int64 and NATIVE.patches(h, w).dtype == np.int64
    assert NATIVE.patch_dim == 3 * 14 * 14


@pytest.mark.parametrize("k", range(len(SPECS)))
def test_native_tokens_equal_grid_over_merge_squared(k: int) -> None:
    spec = SPECS[k]
    rng = np.random.default_rng(7 + k)
    h, w = _random_sizes(rng, 500)
    H, W = spec.resized(h, w)
    p, m = spec.patch_size, spec.merge_size
    np.testing.assert_array_equal(spec.patches(h, w), (H // p) * (W // p))
    tok = spec.tokens(h, w)
    np.testing.assert_array_equal(tok * m * m, (H // p) * (W // p))  # exact: H/p and W/p are multiples of m
    assert np.all(tok[H > 0] >= 1) and np.all(tok[H == 0] == 0)  # 0: a strip too thin, refused


def test_fixed_mode_every_image_takes_image_tokens() -> None:
    spec = ImageSpec(mode="fixed", image_tokens=37, image_size=32)
    h = np.array([1, 480, 0, -1, 100_000])
    w = np.array([1, 640, 5, 3, 2])
    np.testing.assert_array_equal(spec.tokens(h, w), [37] * 5)
    np.testing.assert_array_equal(spec.patches(h, w), [37] * 5)
    assert spec.tokens(h, w).dtype == np.int64
    assert spec.tokens(np.zeros((2, 3)), np.zeros((2, 3))).shape == (2, 3)
    assert ImageSpec().mode == "fixed" and ImageSpec().tokens(np.array([9]), np.array([9]))[0] == 64


# ------------------------------------------------------------------------------------------
# decode_native: the merge-window patch order, pixel for pixel


def _expected_patches(h: int, w: int, p: int, m: int) -> np.ndarray:
    """Slow reference: windows of m x m patches row by row, patches row by row within a window,
    each patch [3, p, p] flattened, pixel values from the position code."""
    gh, gw = h // p, w // p
    out = np.zeros((gh * gw, 3 * p * p), np.uint8)
    k = 0
    for wr in range(gh // m):
        for wc in range(gw // m):
            for pr in range(m):
                for pc in range(m):
                    row0, col0 = (wr * m + pr) * p, (wc * m + pc) * p
                    v = 0
                    for ch in range(3):
                        for y in range(p):
                            for x in range(p):
                                out[k, v] = _pixel(row0 + y, col0 + x, ch)
                                v += 1
                    k += 1
    return out


@pytest.mark.parametrize(("spec", "h", "w"), [
    (NATIVE, 56, 84),                 # grid 4 x 6: 6 windows of 2 x 2
    (NATIVE, 280, 308),               # rows and columns past 255: the blue channel counts them
    (ImageSpec(mode="native", patch_size=3, merge_size=2, min_pixels=36, max_pixels=10_000), 12, 18),
    (ImageSpec(mode="native", patch_size=4, merge_size=1, min_pixels=16, max_pixels=10_000), 8, 20),
    (ImageSpec(mode="native", patch_size=2, merge_size=3, min_pixels=36, max_pixels=10_000), 6, 12),
])
def test_decode_native_patch_order_pixel_for_pixel(spec: ImageSpec, h: int, w: int) -> None:
    assert _one(spec, h, w) == (h, w)  # aligned and in range: no resampling
    data = _encode(_position_image(h, w))
    px, grid = decode_native(data, spec, (h, w))
    p, m = spec.patch_size, spec.merge_size
    assert grid == (1, h // p, w // p)
    assert px.dtype == np.uint8 and px.shape == (grid[0] * grid[1] * grid[2], 3 * p * p)
    assert px.flags.c_contiguous
    np.testing.assert_array_equal(px, _expected_patches(h, w, p, m))


def test_decode_native_first_window_by_hand() -> None:
    """p = 1, m = 2 on a 2 x 4 image: window 0 is pixels (0,0) (0,1) (1,0) (1,1), window 1 is
    (0,2) (0,3) (1,2) (1,3); a patch is its pixel's (R, G, B)."""
    spec = ImageSpec(mode="native", patch_size=1, merge_size=2, min_pixels=1, max_pixels=100)
    px, grid = decode_native(_encode(_position_image(2, 4)), spec, (2, 4))
    assert grid == (1, 2, 4)
    np.testing.assert_array_equal(px, [[0, 0, 0], [0, 1, 0], [1, 0, 0], [1, 1, 0],
                                       [0, 2, 0], [0, 3, 0], [1, 2, 0], [1, 3, 0]])


def test_decode_native_resizes_to_the_planned_grid() -> None:
    # 480 x 640 -> 476 x 644 (see above): grid 34 x 46
    arr = np.zeros((480, 640, 3), np.uint8)
    arr[:240] = (200, 10, 30)
    arr[240:] = (5, 250, 120)
    px, grid = decode_native(_encode(arr), NATIVE, (480, 640))
    assert grid == (1, 34, 46)
    assert px.shape == (34 * 46, 588)
    assert grid[1] * grid[2] // 4 == int(NATIVE.tokens(np.array([480]), np.array([640]))[0])
    # the very first patch is well inside the top half, the very last inside the bottom half
    first = px[0].reshape(3, 14, 14)
    last = px[-1].reshape(3, 14, 14)
    np.testing.assert_array_equal(first[:, 0, 0], (200, 10, 30))
    np.testing.assert_array_equal(last[:, -1, -1], (5, 250, 120))


def test_decode_native_tiny_image_is_upscaled() -> None:
    px, grid = decode_native(_encode(np.full((10, 10, 3), 77, np.uint8)), NATIVE, (10, 10))
    assert grid == (1, 4, 4) and px.shape == (16, 588)
    assert np.all(px == 77)  # a constant image stays constant under resampling


# ------------------------------------------------------------------------------------------
# decode_native: input formats and modes


def test_decode_native_jpeg_and_webp() -> None:
    arr = np.zeros((56, 84, 3), np.uint8)
    arr[...] = (180, 60, 20)
    for fmt, kw in (("JPEG", {"quality": 95}), ("WEBP", {"quality": 95})):
        px, grid = decode_native(_encode(arr, fmt, **kw), NATIVE, (56, 84))
        assert grid == (1, 4, 6) and px.shape == (24, 588) and px.dtype == np.uint8, fmt
        got = px.reshape(24, 3, 14 * 14).mean(axis=(0, 2))
        np.testing.assert_allclose(got, (180, 60, 20), atol=6, err_msg=fmt)
    # a large JPEG goes through the DCT-domain draft and still lands on the planned grid
    big = np.zeros((2160, 3840, 3), np.uint8)
    big[:, :1920] = (250, 0, 0)
    big[:, 1920:] = (0, 0, 250)
    px, grid = decode_native(_encode(big, "JPEG", quality=90), NATIVE, (2160, 3840))
    assert grid == (1, 728 // 14, 1316 // 14) and px.shape == (52 * 94, 588)
    first = px[0].reshape(3, 14, 14).astype(int)
    assert first[0].mean() > 220 and first[2].mean() < 30


def test_decode_native_gray_rgba_palette_become_rgb() -> None:
    gray = (np.arange(56 * 56).reshape(56, 56) % 251).astype(np.uint8)
    px, grid = decode_native(_encode(gray), NATIVE, (56, 56))
    assert grid == (1, 4, 4) and px.shape == (16, 588)
    ch = px.reshape(16, 3, 196)
    np.testing.assert_array_equal(ch[:, 0], ch[:, 1])
    np.testing.assert_array_equal(ch[:, 0], ch[:, 2])
    assert int(ch[0, 0, 0]) == int(gray[0, 0]) and int(ch[0, 0, 15]) == int(gray[1, 1])

    rgba = np.zeros((56, 56, 4), np.uint8)
    rgba[...] = (10, 20, 30, 0)     # fully transparent: alpha is dropped, colour kept
    px, _ = decode_native(_encode(rgba), NATIVE, (56, 56))
    assert px.shape == (16, 588)
    np.testing.assert_array_equal(px.reshape(16, 3, 196)[:, :, 0], [[10, 20, 30]] * 16)

    pal = Image.new("P", (56, 56), 3)
    pal.putpalette([0, 0, 0, 1, 1, 1, 2, 2, 2, 9, 99, 199] + [0] * (768 - 12))
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    px, _ = decode_native(buf.getvalue(), NATIVE, (56, 56))
    assert px.shape == (16, 588)
    assert np.all(px.reshape(16, 3, 196)[:, 0] == 9) and np.all(px.reshape(16, 3, 196)[:, 2] == 199)

    # gray, and a non-aligned size: resized, still 3 equal channels
    px, grid = decode_native(_encode(np.full((50, 60), 123, np.uint8)), NATIVE, (50, 60))
    assert grid == (1, 4, 4) and np.all(px == 123)


def test_decode_native_refuses_changed_dimensions() -> None:
    data = _encode(_position_image(56, 84))
    with pytest.raises(ValueError, match="56x84"):
        decode_native(data, NATIVE, (84, 56))    # (h, w) swapped
    with pytest.raises(ValueError):
        decode_native(data, NATIVE, (56, 85))


class _LoadSpy:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = ImageFile.ImageFile.load

        def load(img, *a, **kw):
            self.calls += 1
            return original(img, *a, **kw)

        monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_decompression_bomb_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _encode(_position_image(56, 84))           # 4_704 pixels
    spy = _LoadSpy(monkeypatch)
    # above the limit but below Pillow's own 2x hard limit: open_checked refuses it
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ValueError, match="decompression-bomb"):
            decode_native(data, NATIVE, (56, 84))
        with pytest.raises(ValueError, match="decompression-bomb"):
            decode_fixed(data, 32)
        with pytest.raises(ValueError, match="decompression-bomb"):
            open_checked(data)
    # far above: refused too (Pillow's own error or ours), never decoded
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises((ValueError, Image.DecompressionBombError)):
        decode_native(data, NATIVE, (56, 84))
    assert spy.calls == 0
    # at the limit: decoded
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4_704)
    px, grid = decode_native(data, NATIVE, (56, 84))
    assert grid == (1, 4, 6) and spy.calls >= 1


def test_decode_fixed_shape() -> None:
    out = decode_fixed(_encode(np.full((50, 60), 9, np.uint8)), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8 and np.all(out == 9)


def test_corrupt_bytes_raise() -> None:
    with pytest.raises(Exception):
        decode_native(b"not an image at all", NATIVE, (56, 84))
    truncated = _encode(_position_image(56, 84))[:60]
    with pytest.raises(Exception):
        decode_native(truncated, NATIVE, (56, 84))


# ------------------------------------------------------------------------------------------
# ImageSpec validation


def test_image_spec_defaults() -> None:
    assert IMAGE_MODES == ("fixed", "native")
    s = ImageSpec(mode="native")
    assert (s.patch_size, s.merge_size, s.min_pixels, s.max_pixels) == (14, 2, 3136, 1_003_520)


@pytest.mark.parametrize("kwargs", [
    {"mode": "native", "min_pixels": 10_000, "max_pixels": 9_999},        # max < min
    {"mode": "native", "min_pixels": 1, "max_pixels": 27 * 27},           # max < f*f (f = 28)
    {"mode": "native", "patch_size": 0},
    {"mode": "native", "merge_size": -1},
    {"mode": "native", "min_pixels": 0},
    {"mode": "native", "max_pixels": -5},
    {"mode": "fixed", "image_tokens": 0},
    {"mode": "fixed", "image_size": -224},
    {"mode": "native", "patch_size": True},                               # a bool is not an int
    {"mode": "native", "patch_size": 14.0},
    {"mode": "native", "max_pixels": "1000000"},
    {"mode": "dynamic"},
    {"mode": "Native"},
    {"mode": ""},
])
def test_image_spec_rejects(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ImageSpec(**kwargs)


def test_image_spec_error_names_the_bad_value() -> None:
    with pytest.raises(ValueError, match="max_pixels"):
        ImageSpec(mode="native", min_pixels=10_000, max_pixels=9_999)
    with pytest.raises(ValueError, match="patch_size"):
        ImageSpec(mode="native", patch_size=0)
    with pytest.raises(ValueError, match="'dynamic'"):
        ImageSpec(mode="dynamic")


def test_image_spec_accepts_edge_values() -> None:
    ImageSpec(mode="native", min_pixels=784, max_pixels=784)               # min == max == f*f
    ImageSpec(mode="native", patch_size=1, merge_size=1, min_pixels=1, max_pixels=1)
