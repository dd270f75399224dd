"""Cost model: estimated compute of one packed sequence from metadata only."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["CostModel"]


@dataclass(frozen=True)
class CostModel:
    """Estimated compute of one packed sequence: attention·L² + linear·L + per_image·images (hybrid VLM cost).

    The default ``linear = 8192`` makes the attention and linear terms equal at L = 8192, the
    usual regime of a transformer whose MLP width is a few times the model width.
    """

    attention: float = 1.0
    linear: float = 8192.0
    per_image: float = 0.0

    def __post_init__(self) -> None:
        for field in ("attention", "linear", "per_image"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"cost model {field} must be a finite number >= 0, got {value!r}")

    def __call__(self, tokens: np.ndarray, images: np.ndarray) -> np.ndarray:
        """float64 cost of each unit; vectorized over ``tokens`` and ``images``."""
        L = np.asarray(tokens, dtype=np.float64)
        n = np.asarray(images, dtype=np.float64)
        return self.attention * (L * L) + self.linear * L + self.per_image * n
