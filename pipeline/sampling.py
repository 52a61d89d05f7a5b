"""Seeded samples that cost a scan, not a sort of the whole table.

A sample is the ``size`` rows with the smallest ``sha2("<seed>:" + content_hash)``:
the same data and seed give the same rows on every run and every machine. A
full sort for that is O(n log n) over every row; instead each row's order key
is compared with a threshold that lets through about ``oversample(size) x size``
rows (the key is uniform), and only those are sorted: one scan, a small sort.
The rows kept are exactly the ones the full sort would keep whenever at least
``size`` pass the threshold; the expected count is at least 64 more than
``size`` and many times it, so fewer pass with a probability below e^-32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame

_PREFIX_HEX = 8  # compare the first 8 hex digits (32 bits) of the key


def oversample(size: int) -> float:
    return max(4.0, 64.0 / max(size, 1))


def order_key(seed: int, hash_column: str = "content_hash") -> Column:
    from pyspark.sql import functions as F

    return F.sha2(F.concat(F.lit(f"{seed}:"), F.col(hash_column)), 256)


def threshold(size: int, total: int) -> str | None:
    """The key prefix below which about ``oversample(size) x size`` of ``total`` rows
    fall (None: keep every row)."""
    expected = oversample(size) * size
    if total <= expected:
        return None
    limit = int(16 ** _PREFIX_HEX * expected / total)
    return format(limit, f"0{_PREFIX_HEX}x")


def seeded_sample(df: DataFrame, seed: int, size: int, total: int) -> DataFrame:
    """The ``size`` rows of ``df`` (``total`` rows, about) first in the seeded order."""
    from pyspark.sql import functions as F

    key = order_key(seed)
    cut = threshold(size, total)
    if cut is None:
        return df.orderBy(key).limit(size)
    return (df.filter(F.substring(key, 1, _PREFIX_HEX) < F.lit(cut))
            .orderBy(key).limit(size))
