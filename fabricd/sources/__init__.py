"""Data sources: indexing, random-access reading and transforming samples into training units.

Source schema
=============

A *source* is one dataset: a directory (every data file of its format below it, recursively,
sorted by relative path; hidden paths and paths starting with ``_`` are ignored) or a single
file. The format is inferred from the extensions (a directory mixing formats is refused) or set
by the job spec. Each format is one module of :mod:`fabricd.sources.formats` (``parquet``,
``parquet-tokens``, ``jsonl``, ``megatron``, ``webdataset``); the two text formats are described
here, the others in their modules.

Parquet
-------
* ``text`` (string, required): the sample's text. A row whose text is null is skipped and counted.
* ``images`` (``list<binary>``, optional): the sample's images as encoded JPEG/PNG bytes (any
  format Pillow decodes works). ``list<struct<bytes: binary, path: string>>``, as Hugging Face
  ``datasets`` writes images, is accepted too.
* Any other column is ignored and never read.

JSONL
-----
One JSON object per line: ``{"text": "...", "images": ["pages/0001.png", ...]}``. ``images`` is
optional and holds paths relative to the JSONL file. Other keys are ignored, blank lines are
ignored, and a malformed line (bad JSON, no string ``text``, ``images`` not a list of strings)
is skipped and counted when the source is indexed, never an error. An image path must resolve
(symlinks followed) inside the source's directory (the source itself, or a single-file
source's directory): an absolute path elsewhere, a ``..`` climbing out or a symlink leading out
makes that sample a per-sample error, skipped and counted like an unreadable image, online and
in ``fabricctl expect`` alike.

Where data may be read from
---------------------------
A daemon reads sources only below its node's ``[node] data_roots`` (default
``/var/lib/fabricd/data``), paths compared after resolving symlinks; see
:mod:`fabricd.sources.roots`.

Images and text
---------------
Each ``<image>`` in the text marks where the next image goes, in order: placeholder ``i`` takes
image ``i``. If the text has fewer placeholders than images, the images left over go *first*,
before the text, in their list order (so a caption dataset needs no placeholder at all).
Placeholders beyond the number of images are removed. Text is tokenized by the job's tokenizer
(:mod:`fabricd.text`; one token per UTF-8 byte by default), between an optional BOS and an EOS;
each image becomes a block of image tokens as long as its geometry says (:mod:`fabricd.images`:
a fixed count, or its native-resolution patch count). Samples longer than the context are split
into context-sized pieces (text only) or truncated, as the job spec says.

Converting your own data
------------------------
.. code-block:: python

    import pyarrow as pa, pyarrow.parquet as pq

    def encoded(path):                      # keep images encoded: never store pixels
        with open(path, "rb") as f:
            return f.read()

    table = pa.table({
        "text": pa.array(["<image> a red bicycle against a wall", "a text-only document ..."]),
        "images": pa.array([[encoded("bike.jpg")], []], type=pa.list_(pa.binary())),
    })
    # Small row groups: samples are read at random, and a read decodes a whole row group.
    pq.write_table(table, "mydata/part-00000.parquet", row_group_size=128, compression="zstd")

Keep row groups small (a few MB, e.g. 64-256 rows of multimodal data): every random read of
one sample reads and decompresses its whole row group. Split a large dataset into many files
of a few hundred MB each.

Index
-----
The first time a source is opened under a tokenizer, fabricd indexes it (every sample's token
count, and per image its size, header dimensions and place among the text, in bounded memory)
and stores the index next to it, in ``<dir>/.fabricd-index/`` for a directory or
``<file>.fabricd-index[-<tokenizer tag>].parquet`` for a single file (or under the node's index
directory when the source is read-only). The index is reused until a data file is added,
removed or rewritten or the tokenizer changes; a source that changes under a running job is
refused until it is re-indexed explicitly. A sample id is a sample's position in the index.

A file that cannot be indexed (not Parquet, no ``text`` column, ``text`` not a string column,
``images`` not ``list<binary>``) is skipped and its reason kept in the index
(``files_skipped``): ``fabricctl status`` lists the first reasons per source, and a job whose
weighted source ends up with no usable sample fails with those reasons quoted. What can be seen
without reading data (a missing path, a file that is not its format by its magic bytes) is
refused when the job is submitted (:mod:`fabricd.admission`).

Public API
----------
:func:`open_index` builds or reuses a :class:`SourceIndex`; :class:`SourceReader` reads raw
samples by id; :class:`SampleLoader` reads, decodes and transforms units by
``(sample id, piece)`` under a :class:`TransformSpec`, following the length rule documented in
:mod:`fabricd.sources.transform`.
"""

from fabricd.sources.formats import FORMAT_NAMES, REGISTRY, RawSample, SourceFormat
from fabricd.sources.index import INDEX_VERSION, SourceIndex, open_index, require_samples, skip_reasons, source_fingerprint
from fabricd.sources.reader import SourceReader
from fabricd.sources.transform import (
    SampleData,
    SampleLoader,
    TransformSpec,
    decode_image,
    image_tokens_per_sample,
    num_pieces,
    transform,
    unit_lengths,
)

__all__ = [
    "FORMAT_NAMES",
    "REGISTRY",
    "SourceFormat",
    "INDEX_VERSION",
    "SourceIndex",
    "open_index",
    "require_samples",
    "skip_reasons",
    "source_fingerprint",
    "RawSample",
    "SourceReader",
    "TransformSpec",
    "SampleData",
    "SampleLoader",
    "transform",
    "decode_image",
    "image_tokens_per_sample",
    "num_pieces",
    "unit_lengths",
]
