"""Confidence intervals the benchmark reports share."""
from __future__ import annotations

import math


def wilson(correct: int, total: int) -> list[float]:
    """95% Wilson score interval of a proportion (sound at small counts and at 0% or 100%)."""
    if total == 0:
        return [float("nan"), float("nan")]
    z, p = 1.96, correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return [max(0.0, centre - half), min(1.0, centre + half)]
