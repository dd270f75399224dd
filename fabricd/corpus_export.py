"""Write the demo corpus (or any samples) in the other source formats: WebDataset shards,
Megatron-LM indexed datasets, pre-tokenized Parquet.

Tests and examples use these to serve the very same content through every format; they are also
a compact reference of each layout:

* :func:`write_webdataset` — plain tar shards; sample ``k`` is ``KEY.txt`` plus ``KEY.N.png`` /
  ``.jpg`` / ``.webp`` for its images (``KEY`` = ``s%07d``).
* :func:`write_megatron` — ``PREFIX.bin`` (the token ids, back to back) and ``PREFIX.idx``
  (``MMIDIDX\\x00\\x00``, version 1, dtype code, sequence count, document count + 1, int32
  sequence lengths, int64 byte pointers, int64 document indices), one sequence per document.
* :func:`write_token_parquet` — ``input_ids`` (``list<int32>``) and optionally ``loss_mask``.
"""

from __future__ import annotations

import io
import struct
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

__all__ = ["write_webdataset", "write_megatron", "write_token_parquet", "MEGATRON_DTYPE_CODES"]

#: Megatron's dtype codes (``indexed_dataset.DType``)
MEGATRON_DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
                        np.dtype(np.int64): 5, np.dtype(np.float64): 6, np.dtype(np.float32): 7,
                        np.dtype(np.uint16): 8}
_MAGIC = b"MMIDIDX\x00\x00"


def _image_ext(data: bytes) -> str:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(img.format or "", "png")
    except Exception:  # noqa: BLE001 - a corrupt image stays corrupt (its sample is skipped when loaded)
        return "png"


def write_webdataset(out: Path, samples: Iterable[tuple[str, Sequence[bytes]]], *, per_shard: int = 200) -> list[Path]:
    """Write ``(text, images)`` samples as WebDataset shards ``out/shard-%05d.tar``."""
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    tf = None

    def add(name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        tf.addfile(info, io.BytesIO(data))

    try:
        for k, (text, images) in enumerate(samples):
            if k % per_shard == 0:
                if tf is not None:
                    tf.close()
                paths.append(out / f"shard-{len(paths):05d}.tar")
                tf = tarfile.open(paths[-1], "w", format=tarfile.GNU_FORMAT)
            key = f"s{k:07d}"
            add(f"{key}.txt", text.encode("utf-8"))
            for i, data in enumerate(images):
                add(f"{key}.{i}.{_image_ext(data)}", data)
    finally:
        if tf is not None:
            tf.close()
    return paths


def write_megatron(prefix: Path, docs: Iterable[np.ndarray], dtype: type = np.int32) -> tuple[Path, Path]:
    """Write ``docs`` (token id arrays) as ``prefix.bin`` + ``prefix.idx`` (one sequence each)."""
    dt = np.dtype(dtype)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    sizes: list[int] = []
    bin_path, idx_path = prefix.with_suffix(".bin"), prefix.with_suffix(".idx")
    with open(bin_path, "wb") as f:
        for d in docs:
            arr = np.asarray(d).astype(dt)
            f.write(arr.tobytes())
            sizes.append(arr.shape[0])
    n = len(sizes)
    lengths = np.asarray(sizes, np.int32)
    pointers = np.zeros(n, np.int64)
    if n:
        pointers[1:] = np.cumsum(lengths[:-1].astype(np.int64)) * dt.itemsize
    with open(idx_path, "wb") as f:
        f.write(_MAGIC)
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", MEGATRON_DTYPE_CODES[dt]))
        f.write(struct.pack("<Q", n))
        f.write(struct.pack("<Q", n + 1))
        f.write(lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(np.arange(n + 1, dtype=np.int64).tobytes())
    return bin_path, idx_path


def write_token_parquet(path: Path, docs: Sequence[np.ndarray], loss_masks: Sequence[np.ndarray] | None = None,
                        *, row_group_size: int = 128) -> Path:
    """Write pre-tokenized samples (``input_ids`` and optionally ``loss_mask``) to ``path``."""
    cols = {"input_ids": pa.array([np.asarray(d, np.int32) for d in docs], type=pa.list_(pa.int32()))}
    if loss_masks is not None:
        cols["loss_mask"] = pa.array([np.asarray(m, np.int8) for m in loss_masks], type=pa.list_(pa.int8()))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)
    return path
