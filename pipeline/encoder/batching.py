"""Token-budget batching: sort by length, cut batches by padded tokens, restore order.

A batch costs about rows x longest-row tokens (padding included), so batches
are bounded by that product (``token_budget``) and by a row cap, not by a row
count alone. Sorting by length keeps padding low; callers scatter each batch's
results back to the rows' original positions.
"""

from __future__ import annotations

import numpy as np


def plan_batches(lengths: np.ndarray, token_budget: int, max_rows: int) -> list[np.ndarray]:
    """Index arrays into ``lengths``, longest rows first, each within the budget.

    Longest first: the most memory-hungry batch runs first, so an out-of-memory
    shows up at once rather than at the end of a long run. Every row appears in
    exactly one batch; a single row longer than the budget gets a batch alone.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        return []
    order = np.argsort(-lengths, kind="stable")
    sorted_len = lengths[order]
    batches = []
    start, n = 0, len(order)
    while start < n:
        longest = max(int(sorted_len[start]), 1)
        rows = max(1, min(max_rows, token_budget // longest, n - start))
        batches.append(order[start:start + rows])
        start += rows
    return batches


def padded_tokens(lengths: np.ndarray, batches: list[np.ndarray]) -> int:
    """Tokens the padded batches hold: each batch's rows x its longest row."""
    return sum(int(lengths[idx].max()) * len(idx) for idx in batches if len(idx))


def padding_efficiency(lengths: np.ndarray, batches: list[np.ndarray]) -> float:
    """Real tokens / padded tokens over all batches (1.0 = no padding)."""
    real = sum(int(lengths[idx].sum()) for idx in batches)
    padded = padded_tokens(lengths, batches)
    return real / padded if padded else 1.0


def pad_batch(flat_ids: np.ndarray, offsets: np.ndarray, lengths: np.ndarray,
              idx: np.ndarray, pad_id: int, left: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Gather rows ``idx`` from a flat token buffer into a padded [B, T] matrix.

    Vectorised (no Python loop over rows): position t of row r reads
    flat_ids[offsets[r] + t] where t < length[r], else the pad id.
    """
    row_len = lengths[idx]
    width = int(row_len.max()) if len(idx) else 0
    pos = np.arange(width)[None, :]
    if left:
        shift = (width - row_len)[:, None]
        mask = pos >= shift
        src = offsets[idx][:, None] + (pos - shift)
    else:
        mask = pos < row_len[:, None]
        src = offsets[idx][:, None] + pos
    src = np.clip(src, 0, max(len(flat_ids) - 1, 0))
    ids = np.where(mask, flat_ids[src] if len(flat_ids) else pad_id, pad_id)
    return ids.astype(np.int64), mask.astype(np.int64)

