"""Loaded samples on the wire between a source loader and a data constructor.

A ``LoadReply`` carries the units of one request as five flat frames (token ids, token offsets,
image starts, image offsets, pixels) instead of one message per sample: one concatenation on
the loader side, zero-copy ``np.frombuffer`` views on the constructor side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fabric_client import protocol
from fabric_client.errors import ProtocolError

from ..errors import SampleError
from ..sources.transform import SampleData

__all__ = ["encode_load_reply", "decode_load_reply"]


def encode_load_reply(
    request: protocol.LoadRequest, results: Sequence[SampleData | SampleError], image_size: int
) -> list[Any]:
    """Frames of the ``LoadReply`` answering ``request`` with ``results`` (in request order)."""
    n = len(results)
    tok_off = np.zeros(n + 1, np.int64)
    img_off = np.zeros(n + 1, np.int64)
    ids, starts, pixels, errors = [], [], [], []
    for i, r in enumerate(results):
        if isinstance(r, SampleData):
            ids.append(r.input_ids)
            starts.append(r.image_starts)
            pixels.append(r.pixels)
            tok_off[i + 1] = len(r.input_ids)
            img_off[i + 1] = len(r.image_starts)
        else:
            errors.append([i, r.reason])
    np.cumsum(tok_off, out=tok_off)
    np.cumsum(img_off, out=img_off)
    cat = lambda parts, dtype: np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)  # noqa: E731
    reply = protocol.LoadReply(job=request.job, source=request.source, req_id=request.req_id, count=n,
                               image_size=image_size, errors=errors)
    px = np.concatenate([p.reshape(-1) for p in pixels]) if pixels else np.zeros(0, np.uint8)
    return protocol.encode(reply, (cat(ids, np.int32), tok_off, cat(starts, np.int32), img_off, px))


def decode_load_reply(reply: protocol.LoadReply, frames: Sequence[Any]) -> list[SampleData | str]:
    """Per unit: a ``SampleData`` viewing the frames, or the reason it could not be loaded."""
    if len(frames) != 5:
        raise ProtocolError(protocol.ErrorCode.MALFORMED, f"load_reply has {len(frames)} payload frames, expected 5")
    buf = [f.buffer if hasattr(f, "buffer") else f for f in frames]
    try:
        ids = np.frombuffer(buf[0], np.int32)
        tok_off = np.frombuffer(buf[1], np.int64)
        starts = np.frombuffer(buf[2], np.int32)
        img_off = np.frombuffer(buf[3], np.int64)
        s = reply.image_size
        px = np.frombuffer(buf[4], np.uint8).reshape(-1, s, s, 3)
    except ValueError as e:
        raise ProtocolError(protocol.ErrorCode.MALFORMED, f"load_reply frames: {e}") from e
    n = reply.count
    if len(tok_off) != n + 1 or len(img_off) != n + 1 or tok_off[-1] != len(ids) or img_off[-1] != len(px):
        raise ProtocolError(protocol.ErrorCode.MALFORMED, "load_reply offsets do not match its frames")
    out: list[SampleData | str] = []
    failed = {int(i): str(reason) for i, reason in reply.errors}
    for i in range(n):
        if i in failed:
            out.append(failed[i])
            continue
        out.append(SampleData(
            input_ids=ids[tok_off[i]:tok_off[i + 1]],
            image_starts=starts[img_off[i]:img_off[i + 1]],
            pixels=px[img_off[i]:img_off[i + 1]],
        ))
    return out
