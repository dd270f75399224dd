"""Errors raised by the fabricd daemon package.

Every error that reaches an operator names what was wrong: the file, the key and the value for
configuration, the source and sample for data.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "FabricdError",
    "ConfigError",
    "SourceError",
    "SampleError",
    "PlanError",
]


class FabricdError(Exception):
    """Base class of every error fabricd raises on purpose."""


class ConfigError(FabricdError):
    """An invalid node config or job spec. Names the file, the key and the bad value."""

    def __init__(self, file: str, key: str, value: Any, reason: str) -> None:
        self.file = str(file)
        self.key = key
        self.value = value
        self.reason = reason
        super().__init__(f"{self.file}: {key} = {value!r}: {reason}")


class SourceError(FabricdError):
    """A data source that cannot be used as a whole (missing, unreadable, changed under a job)."""


class SampleError(FabricdError):
    """One sample that cannot be read or decoded. Never fatal: the sample is skipped and counted."""

    def __init__(self, source: str, sample_id: int, reason: str) -> None:
        self.source = source
        self.sample_id = int(sample_id)
        self.reason = reason
        super().__init__(f"source {source!r} sample {self.sample_id}: {reason}")


class PlanError(FabricdError):
    """A plan that cannot be made from the job spec (e.g. a source with weight but no samples)."""
