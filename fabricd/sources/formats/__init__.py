"""Source formats: one module per format, each a :class:`~fabricd.sources.formats.base.SourceFormat`.

=================  ===================  ==================================================
``format``         files                a sample is
=================  ===================  ==================================================
``parquet``        ``*.parquet``        a row: ``text`` (+ ``images``, encoded bytes)
``parquet-tokens`` ``*.parquet``        a row: ``input_ids`` (+ ``labels`` or ``loss_mask``)
``jsonl``          ``*.jsonl``          a line: ``{"text": ..., "images": [paths]}``
``megatron``       ``PREFIX.idx``       a document of a Megatron-LM indexed dataset (token
                   (+ ``PREFIX.bin``)   ids, as stored)
``webdataset``     ``*.tar``            the members sharing a key: ``txt`` or ``json`` text
                                        (+ ``jpg``/``jpeg``/``png``/``webp`` images)
=================  ===================  ==================================================

``format = "auto"`` (the default) tells them apart by extension; among ``.parquet`` files, a
first file with an ``input_ids`` column and no ``text`` column makes ``parquet-tokens``.
"""

from __future__ import annotations

from fabricd.sources.formats.base import FileIndex, FormatReader, IndexContext, RawSample, ReadRequest, SourceFormat
from fabricd.sources.formats.jsonl import Jsonl
from fabricd.sources.formats.megatron import Megatron
from fabricd.sources.formats.parquet import ParquetText, ParquetTokens
from fabricd.sources.formats.webdataset import WebDataset

__all__ = ["REGISTRY", "BY_EXTENSION", "FORMAT_NAMES", "get_format", "FileIndex", "FormatReader", "IndexContext",
           "RawSample", "ReadRequest", "SourceFormat"]

#: every format, by the name a job spec uses
REGISTRY: dict[str, SourceFormat] = {f.name: f for f in (ParquetText(), ParquetTokens(), Jsonl(), Megatron(),
                                                         WebDataset())}
#: the format an extension means when a spec says ``format = "auto"``
BY_EXTENSION: dict[str, str] = {".parquet": "parquet", ".jsonl": "jsonl", ".idx": "megatron", ".tar": "webdataset"}
FORMAT_NAMES: tuple[str, ...] = tuple(REGISTRY)


def get_format(name: str) -> SourceFormat:
    """The format called ``name``; KeyError for an unknown one."""
    return REGISTRY[name]
