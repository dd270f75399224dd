"""Cost model: estimated compute of one packed sequence from metadata only."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["CostModel"]


@dataclass(frozen=True)
class CostModel:
    """Estimated compute of one sequence of ``L`` tokens with images of ``P_i`` patches each:

        attention·L² + linear·L + per_image·images + Σ_i (vision_attention·P_i² + vision_linear·P_i)

    The language model's attention grows with the square of the sequence; the vision encoder
    attends within each image, so its term is per image and quadratic in that image's patch
    count: a 4K screenshot weighs what it costs. ``P_i`` is the image's patch count in native
    mode and its token count in fixed mode.

    The default ``linear = 8192`` makes the attention and linear terms equal at L = 8192, the
    usual regime of a transformer whose MLP width is a few times the model width.
    """

    attention: float = 1.0
    linear: float = 8192.0
    per_image: float = 0.0
    vision_attention: float = 0.0
    vision_linear: float = 0.0

    def __post_init__(self) -> None:
        for field in ("attention", "linear", "per_image", "vision_attention", "vision_linear"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"cost model {field} must be a finite number >= 0, got {value!r}")

    def __call__(self, tokens: np.ndarray, images: np.ndarray, patches: np.ndarray | None = None,
                 patches_sq: np.ndarray | None = None) -> np.ndarray:
        """float64 cost of each unit; vectorized. ``patches`` / ``patches_sq``: per unit, the sum
        of its images' patch counts and of their squares (None: no vision terms)."""
        L = np.asarray(tokens, dtype=np.float64)
        n = np.asarray(images, dtype=np.float64)
        out = self.attention * (L * L) + self.linear * L + self.per_image * n
        if patches is not None and (self.vision_attention or self.vision_linear):
            out = out + self.vision_linear * np.asarray(patches, dtype=np.float64)
            out = out + self.vision_attention * np.asarray(patches_sq if patches_sq is not None else 0.0,
                                                           dtype=np.float64)
        return out
