"""The baseline of the end-to-end benchmark: one ``torch.utils.data.DataLoader`` per DP rank.

Map-style dataset plus a per-rank batch sampler, not an ``IterableDataset``: PyTorch's data
documentation has the main process of a map-style loader run the sampler and hand each index
batch to a worker, so sampling stays per rank and every worker serves that rank's batches with
no sharding logic, where an iterable dataset is replicated into every worker and each replica
must be split by hand with ``get_worker_info()``. The sampler (:class:`PackingBatchSampler`)
draws units per rank from the mixture and packs them greedily to the token budget
(:mod:`e2e_sampler`); a batch is one packed sequence of at most ``rank_tokens`` tokens.

Loading is fabricd's own code, so both sides do the same work per sample: each worker opens a
``SampleLoader`` (reader + transform, default cache) per source, lazily, in the worker
(``fabricd.job.job_tokenizer`` with ``parallel=False``, as a source-loader process does), and the
collate function packs with ``fabricd.pack.pack_micro_batch`` into the fabric's batch layout and
returns tensors. The indexes and unit lengths are read once in the rank's main process before the
workers fork (copy-on-write), as a dataset's metadata usually is.

DataLoader settings are the documented ones for this: ``num_workers=W``,
``persistent_workers=True``, ``prefetch_factor=2``, ``pin_memory=False`` (CPU), default start
method (fork on Linux).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from e2e_sampler import RankStream
from e2e_setup import job_spec, job_units
from fabricd.config import JobSpec
from fabricd.job import job_tokenizer, open_sources, transform_spec
from fabricd.pack import pack_micro_batch
from fabricd.sources.transform import SampleData, SampleLoader

__all__ = ["UnitDataset", "PackingBatchSampler", "baseline_loader"]

Key = tuple[int, int]  # (source index, unit index)


class UnitDataset(Dataset):
    """Item ``(source index, unit index)`` → the loaded unit; ``__getitems__`` loads a batch,
    grouped by source (as a source loader serves a request)."""

    def __init__(self, spec: JobSpec, indexes: dict, sample_ids: list[np.ndarray], pieces: list[np.ndarray]) -> None:
        self.spec = spec
        self.indexes = indexes  # metadata only: no file is opened before the workers start
        self.sample_ids, self.pieces = sample_ids, pieces
        self._loaders: list[SampleLoader] | None = None

    def _open(self) -> list[SampleLoader]:
        if self._loaders is None:  # in the worker: its own files, caches and tokenizer
            tok = job_tokenizer(self.spec, parallel=False)
            self._loaders = [SampleLoader(self.indexes[s.name], transform_spec(self.spec, s.name), tokenizer=tok)
                             for s in self.spec.sources]
        return self._loaders

    def __len__(self) -> int:
        return int(sum(len(s) for s in self.sample_ids))

    def __getitem__(self, key: Key):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[Key]) -> list[tuple[int, int, int, SampleData | Exception]]:
        loaders = self._open()
        out: list = [None] * len(keys)
        src = np.array([k[0] for k in keys], np.int64)
        unit = np.array([k[1] for k in keys], np.int64)
        for j in np.unique(src).tolist():
            pos = np.flatnonzero(src == j)
            sids, pcs = self.sample_ids[j][unit[pos]], self.pieces[j][unit[pos]]
            for p, sid, pc, got in zip(pos.tolist(), sids.tolist(), pcs.tolist(), loaders[j].load(sids, pcs)):
                out[p] = (j, sid, pc, got)
        return out


class PackingBatchSampler(Sampler):
    """This rank's batches, forever: per-rank draws from the step's mixture, packed greedily to
    the token budget. ``weights_at(step)``: the mixture of a step (read when the batch is drawn,
    a few batches ahead of the trainer)."""

    def __init__(self, unit_tokens: list[np.ndarray], budget: int, *, seed: int, rank: int,
                 weights_at: Callable[[int], np.ndarray]) -> None:
        self.stream = RankStream(unit_tokens, budget, seed=seed, rank=rank, weights_at=weights_at)

    def __iter__(self) -> Iterator[list[Key]]:
        step = 0
        while True:
            yield self.stream.batch(step)
            step += 1


class Collate:
    """Pack one batch's loaded units into the fabric's micro-batch layout, as tensors (units that
    failed to load are left out, as a DataLoader pipeline drops them)."""

    def __init__(self, spec: JobSpec) -> None:
        self.images = spec.images

    def __call__(self, items: list[tuple[int, int, int, SampleData | Exception]]) -> dict[str, torch.Tensor]:
        kept = [it for it in items if isinstance(it[3], SampleData)]
        arrays = pack_micro_batch([it[3] for it in kept], source_ids=np.array([it[0] for it in kept]),
                                  sample_ids=np.array([it[1] for it in kept]), pieces=np.array([it[2] for it in kept]),
                                  images=self.images)
        return {k: torch.from_numpy(v) for k, v in arrays.items()}


def baseline_loader(spec_path: str, *, rank: int, seed: int, budget: int, workers: int, prefetch_factor: int,
                    weights_at: Callable[[int], np.ndarray]) -> Iterator[dict[str, torch.Tensor]]:
    """The rank's DataLoader iterator (its workers start now)."""
    from pathlib import Path

    spec = job_spec(Path(spec_path))
    indexes = open_sources(spec, tokenizer=job_tokenizer(spec, parallel=False))
    units = job_units(spec, indexes)
    dataset = UnitDataset(spec, indexes, [u.sample_id for u in units], [u.piece for u in units])
    sampler = PackingBatchSampler([u.tokens for u in units], budget, seed=seed, rank=rank, weights_at=weights_at)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=Collate(spec),
                        persistent_workers=True, prefetch_factor=prefetch_factor, pin_memory=False)
    return iter(loader)
