"""How a kernel launch splits a length into pieces of whole tiles across programs.

Why a module of its own: the decode attention (keys per split), the prefill mass op's log-sum-exp
kernel (keys per split) and its mass kernel (query rows per split) all take the same rule.
"""
from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def whole_tile_splits(total: int, tile: int, most: int, least: int) -> tuple[int, int]:
    """``(splits, length)``: at most ``most`` splits (at least one) of ``total``, each at least
    about ``least`` long and a whole number of ``tile``s; fewer when rounding up to tiles covers
    ``total`` with fewer."""
    splits = max(1, min(most, cdiv(total, least)))
    length = cdiv(cdiv(total, splits), tile) * tile
    return cdiv(total, length), length
