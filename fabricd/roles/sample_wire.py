"""Loaded samples on the wire between a source loader and a data constructor.

A ``LoadReply`` carries the units of one request as ten flat frames (tokens, image starts,
pixels, image lengths, image grids and targets, each with its per-unit offsets where needed)
instead of one message per sample: one concatenation on the loader side, zero-copy
``np.frombuffer`` views on the constructor side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fabric_client import protocol
from fabric_client.errors import ProtocolError

from ..errors import SampleError
from ..images import ImageSpec
from ..sources.transform import SampleData

__all__ = ["encode_load_reply", "decode_load_reply", "pixel_shape", "MAX_REASON_CHARS"]

_FRAMES = 10
#: longest failure reason sent (the protocol's Text bound is 8192): one overlong reason must not
#: make the whole reply malformed
MAX_REASON_CHARS = 2000


def pixel_shape(images: ImageSpec) -> tuple[int, ...]:
    """The shape of one row of a unit's pixels: an image (fixed) or a patch (native)."""
    if images.mode == "native":
        return (images.patch_dim,)
    return (images.image_size, images.image_size, 3)


def _offsets(sizes: list[int]) -> np.ndarray:
    out = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(sizes, out=out[1:])
    return out


def encode_load_reply(
    request: protocol.LoadRequest, results: Sequence[SampleData | SampleError], images: ImageSpec
) -> list[Any]:
    """Frames of the ``LoadReply`` answering ``request`` with ``results`` (in request order)."""
    shape = pixel_shape(images)
    ok = [r for r in results if isinstance(r, SampleData)]
    errors = [[i, _short(r.reason)] for i, r in enumerate(results) if not isinstance(r, SampleData)]

    def sizes(f) -> list[int]:
        return [f(r) if isinstance(r, SampleData) else 0 for r in results]

    def cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
        return np.concatenate([np.asarray(p, dtype).reshape(-1) for p in parts]) if parts else np.zeros(0, dtype)

    def lengths(r: SampleData) -> np.ndarray:
        if r.image_lengths is not None:
            return r.image_lengths
        if images.mode == "native" and r.image_grid is not None:  # tokens = patches / merge²
            return (np.prod(r.image_grid, axis=1) // (images.merge_size ** 2)).astype(np.int32)
        return np.full(len(r.image_starts), images.image_tokens, np.int32)

    def grids(r: SampleData) -> np.ndarray:
        return r.image_grid if r.image_grid is not None else np.zeros((len(r.image_starts), 3), np.int32)

    reply = protocol.LoadReply(job=request.job, source=request.source, req_id=request.req_id, count=len(results),
                               pixel_shape=list(shape), errors=errors)
    with_targets = [r for r in ok if r.targets is not None]
    frames = (
        cat([r.input_ids for r in ok], np.int32), _offsets(sizes(lambda r: len(r.input_ids))),
        cat([r.image_starts for r in ok], np.int32), _offsets(sizes(lambda r: len(r.image_starts))),
        cat([r.pixels for r in ok], np.uint8), _offsets(sizes(lambda r: r.pixels.shape[0])),
        cat([lengths(r) for r in ok], np.int32), cat([grids(r) for r in ok], np.int32),
        cat([r.targets for r in with_targets], np.int32),
        _offsets(sizes(lambda r: len(r.targets) if r.targets is not None else 0)),
    )
    return protocol.encode(reply, frames)


def _short(reason: str) -> str:
    return reason if len(reason) <= MAX_REASON_CHARS else reason[:MAX_REASON_CHARS - 1] + "…"


def decode_load_reply(reply: protocol.LoadReply, frames: Sequence[Any]) -> list[SampleData | str]:
    """Per unit: a ``SampleData`` viewing the frames, or the reason it could not be loaded."""
    if len(frames) != _FRAMES:
        raise ProtocolError(protocol.ErrorCode.MALFORMED,
                            f"load_reply has {len(frames)} payload frames, expected {_FRAMES}")
    buf = [f.buffer if hasattr(f, "buffer") else f for f in frames]
    n = reply.count
    try:
        ids = np.frombuffer(buf[0], np.int32)
        tok_off = np.frombuffer(buf[1], np.int64)
        starts = np.frombuffer(buf[2], np.int32)
        img_off = np.frombuffer(buf[3], np.int64)
        shape = tuple(int(x) for x in reply.pixel_shape)
        if not shape or any(x <= 0 for x in shape):
            raise ValueError(f"pixel_shape {list(shape)}")
        px = np.frombuffer(buf[4], np.uint8).reshape(-1, *shape)
        px_off = np.frombuffer(buf[5], np.int64)
        img_len = np.frombuffer(buf[6], np.int32)
        grids = np.frombuffer(buf[7], np.int32).reshape(-1, 3)
        targets = np.frombuffer(buf[8], np.int32)
        tgt_off = np.frombuffer(buf[9], np.int64)
    except ValueError as e:
        raise ProtocolError(protocol.ErrorCode.MALFORMED, f"load_reply frames: {e}") from e
    offsets = ((tok_off, len(ids)), (img_off, len(starts)), (px_off, len(px)), (tgt_off, len(targets)))
    if (any(len(off) != n + 1 or off[0] != 0 or off[-1] != size or np.any(np.diff(off) < 0) for off, size in offsets)
            or len(img_len) != len(starts) or len(grids) != len(starts)):
        raise ProtocolError(protocol.ErrorCode.MALFORMED, "load_reply offsets do not match its frames")
    failed = {int(i): str(reason) for i, reason in reply.errors}
    native = len(shape) == 1

    def unit(i: int) -> SampleData:
        g0, g1 = tgt_off[i], tgt_off[i + 1]
        return SampleData(
            input_ids=ids[tok_off[i]:tok_off[i + 1]],
            image_starts=starts[img_off[i]:img_off[i + 1]],
            pixels=px[px_off[i]:px_off[i + 1]],
            image_lengths=img_len[img_off[i]:img_off[i + 1]],
            image_grid=grids[img_off[i]:img_off[i + 1]],
            targets=targets[g0:g1] if g1 != g0 else None,
        )

    bad = _first_inconsistent(n, failed, tok_off, tgt_off, img_off, px_off, starts, img_len, grids, native)
    if bad is not None:  # said as the per-unit check says it
        raise ProtocolError(protocol.ErrorCode.MALFORMED, f"load_reply unit {bad}: {_unit_problem(unit(bad), native)}")
    return [failed[i] if i in failed else unit(i) for i in range(n)]

def _first_inconsistent(n: int, failed: dict[int, str], tok_off: np.ndarray, tgt_off: np.ndarray,
                        img_off: np.ndarray, px_off: np.ndarray, starts: np.ndarray, img_len: np.ndarray,
                        grids: np.ndarray, native: bool) -> int | None:
    """The first unit (not a failed one) that is inconsistent in itself, or None: its targets are
    neither absent nor one per token, or :func:`_unit_problem` finds something. The checks of
    ``_unit_problem``, for every unit of the reply at once; the offsets are already checked."""
    if n == 0:
        return None
    tokens = np.diff(tok_off)
    own = np.diff(tgt_off)
    images = np.diff(img_off)
    owner = np.repeat(np.arange(n), images)  # the unit of each image
    if native:  # each unit's patches: its images' grids' products, summed in int64 as _unit_problem does
        per_image = np.zeros(len(grids) + 1, np.int64)
        np.cumsum(np.prod(grids, axis=1, dtype=np.int64), out=per_image[1:])
        rows = per_image[img_off[1:]] - per_image[img_off[:-1]]
    else:
        rows = images
    ends = starts.astype(np.int64) + img_len
    image_bad = (starts < 0) | (img_len < 0) | (ends > tokens[owner])
    bad = (((own != 0) & (own != tokens)) | (np.diff(px_off) != rows)
           | (np.bincount(owner, weights=image_bad, minlength=n) > 0))
    if failed:
        bad[[i for i in failed if 0 <= i < n]] = False
    hits = np.flatnonzero(bad)
    return int(hits[0]) if hits.size else None


def _unit_problem(unit: SampleData, native: bool) -> str | None:
    """Why one decoded unit is inconsistent in itself (what packing it would trip over), or None."""
    k, n = len(unit.image_starts), len(unit.input_ids)
    if unit.targets is not None and len(unit.targets) != n:
        return "targets do not match its tokens"
    rows = int(np.prod(unit.image_grid, axis=1, dtype=np.int64).sum()) if native else k
    if unit.pixels.shape[0] != rows:
        return f"{unit.pixels.shape[0]} pixel rows for {k} images ({rows} expected)"
    if k and (int(unit.image_starts.min()) < 0
              or int((unit.image_starts.astype(np.int64) + unit.image_lengths).max()) > n
              or int(unit.image_lengths.min()) < 0):
        return f"image blocks {unit.image_starts.tolist()} (+{unit.image_lengths.tolist()}) outside its {n} tokens"
    return None
