"""The pure statistics of distribution drift: numpy (and scipy) on two samples.

No Spark and no tables here: ``drift.py`` reads the samples and records the
results; this module only says how far apart two samples of one column are,
and which of the configured checks that trips.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from pipeline.config import DistributionConfig
from pipeline.encoder.splade import SparseRows


@dataclass(frozen=True, kw_only=True)
class ColumnDrift:
    """One column's drift statistics (this run's sample against the reference's)."""

    centroid_distance: float
    centroid_p_value: float
    mmd2: float
    mmd_p_value: float
    drifted_share: float
    norm_mean: float
    norm_std: float
    ref_norm_mean: float
    ref_norm_std: float
    n_current: int
    n_reference: int
    flags: list[str] = field(default_factory=list)  # the checks that tripped
    mean_tokens: float | None = None
    ref_mean_tokens: float | None = None
    truncation_rate: float | None = None
    ref_truncation_rate: float | None = None
    # sparse columns: mean active dimensions and L1 norm per row, and the overlap (Jaccard)
    # of the two samples' SPARSE_TOP_TOKENS most frequent active tokens
    active_mean: float | None = None
    ref_active_mean: float | None = None
    l1_mean: float | None = None
    ref_l1_mean: float | None = None
    top_token_overlap: float | None = None

    def with_text_stats(self, tokens: np.ndarray, ref_tokens: np.ndarray,
                        truncated: np.ndarray, ref_truncated: np.ndarray) -> ColumnDrift:
        return replace(self, mean_tokens=float(np.mean(tokens)),
                       ref_mean_tokens=float(np.mean(ref_tokens)),
                       truncation_rate=float(np.mean(truncated)),
                       ref_truncation_rate=float(np.mean(ref_truncated)))


def mmd_test(x: np.ndarray, y: np.ndarray, permutations: int,
             rng: np.random.Generator) -> tuple[float, float]:
    """Biased MMD^2 with an RBF kernel (median-distance bandwidth) and its
    permutation-test p-value. All permutations in one matrix product."""
    z = np.concatenate([x, y]).astype(np.float64)
    sq = (z * z).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0)
    upper = d2[np.triu_indices(len(z), k=1)]
    bandwidth = float(np.median(upper[upper > 0])) if (upper > 0).any() else 1.0
    k = np.exp(-d2 / bandwidth)
    n, m = len(x), len(y)
    base = np.concatenate([np.full(n, 1.0 / n), np.full(m, -1.0 / m)])
    w = np.stack([base] + [rng.permutation(base) for _ in range(permutations)], axis=1)
    stats = ((k @ w) * w).sum(axis=0)
    observed = float(stats[0])
    p_value = float((1 + (stats[1:] >= observed).sum()) / (1 + permutations))
    return observed, p_value


def centroid_test(x: np.ndarray, y: np.ndarray, permutations: int,
                  rng: np.random.Generator) -> tuple[float, float]:
    """1 - cos(mean x, mean y) and its permutation-test p-value: small samples have
    distant centroids by chance alone, and the p-value says how likely that is."""
    z = np.concatenate([x, y]).astype(np.float64)
    n, m = len(x), len(y)

    def distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return 1.0 - (a * b).sum(axis=0) / np.maximum(
            np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0), 1e-12)

    member = np.zeros((n + m, permutations + 1))
    member[:n, 0] = 1
    for j in range(1, permutations + 1):
        member[rng.permutation(n + m)[:n], j] = 1
    in_a = z.T @ member
    dists = distance(in_a / n, (z.sum(axis=0)[:, None] - in_a) / m)
    observed = float(dists[0])
    return observed, float((1 + (dists[1:] >= observed).sum()) / (1 + permutations))


def ks_pvalues(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Two-sample KS test of every dimension at once (asymptotic p-values, ties handled):
    one sort of the pooled sample instead of a Python loop over dimensions."""
    from scipy import stats

    n, m = len(x), len(y)
    pooled = np.concatenate([x, y])
    order = np.argsort(pooled, axis=0, kind="stable")
    values = np.take_along_axis(pooled, order, axis=0)
    cdf_gap = np.cumsum(np.where(order < n, 1.0 / n, -1.0 / m), axis=0)
    # only where a run of tied values ends is the gap between the two CDFs observed
    ends = np.ones_like(values, dtype=bool)
    ends[:-1] = values[:-1] != values[1:]
    d = np.abs(np.where(ends, cdf_gap, 0.0)).max(axis=0)
    return stats.kstwo.sf(d, np.round(n * m / (n + m)))


def drifted_share(x: np.ndarray, y: np.ndarray, alpha: float) -> float:
    """Share of dimensions whose two-sample KS test rejects at FDR ``alpha``
    (Benjamini-Hochberg)."""
    from scipy import stats

    p = np.nan_to_num(np.atleast_1d(ks_pvalues(x, y)), nan=1.0)
    adjusted = stats.false_discovery_control(p, method="bh")
    return float((adjusted < alpha).mean())


SPARSE_TOP_TOKENS = 100
# a sparse column breaches when its mean active dimensions or mean L1 norm moves by more
# than this share of the reference's, or its most frequent tokens overlap less than this
SPARSE_MAX_SHIFT = 0.25
SPARSE_MIN_OVERLAP = 0.5


def sparse_drift(cur: SparseRows, ref: SparseRows) -> ColumnDrift:
    """A sparse column's drift: how many dimensions rows use, how much weight they carry,
    and whether the same tokens are the frequent ones (dense-vector tests do not apply
    over a vocabulary-wide space: their p-values are left null)."""
    active = (cur.active().astype(float), ref.active().astype(float))
    l1 = tuple(np.add.reduceat(np.abs(x.values), x.offsets[:-1]) if len(x.values) else
               np.zeros(len(x)) for x in (cur, ref))
    l2 = tuple(np.sqrt(np.add.reduceat(x.values ** 2, x.offsets[:-1])) if len(x.values) else
               np.zeros(len(x)) for x in (cur, ref))
    tops = [set(np.argsort(-np.bincount(x.indices))[:SPARSE_TOP_TOKENS].tolist())
            if len(x.indices) else set() for x in (cur, ref)]
    overlap = len(tops[0] & tops[1]) / max(len(tops[0] | tops[1]), 1)
    flags = []
    for what, (a, b) in (("active dimensions", active), ("L1 norm", l1)):
        shift = abs(a.mean() - b.mean()) / max(b.mean(), 1e-12)
        if shift > SPARSE_MAX_SHIFT:
            flags.append(f"mean {what} {a.mean():.4g} vs {b.mean():.4g}: moved "
                         f"{shift:.0%} > {SPARSE_MAX_SHIFT:.0%}")
    if overlap < SPARSE_MIN_OVERLAP:
        flags.append(f"top-{SPARSE_TOP_TOKENS} token overlap {overlap:.3f} < "
                     f"{SPARSE_MIN_OVERLAP}")
    nan = float("nan")
    return ColumnDrift(centroid_distance=nan, centroid_p_value=nan, mmd2=nan, mmd_p_value=nan,
                       drifted_share=nan, norm_mean=float(l2[0].mean()),
                       norm_std=float(l2[0].std()), ref_norm_mean=float(l2[1].mean()),
                       ref_norm_std=float(l2[1].std()), n_current=len(cur),
                       n_reference=len(ref), flags=flags,
                       active_mean=float(active[0].mean()), ref_active_mean=float(active[1].mean()),
                       l1_mean=float(l1[0].mean()), ref_l1_mean=float(l1[1].mean()),
                       top_token_overlap=overlap)


def column_drift(cur: np.ndarray, ref: np.ndarray, cfg: DistributionConfig) -> ColumnDrift:
    """Drift statistics of one column and the checks it trips (``flags``)."""
    rng = np.random.default_rng(cfg.seed)
    centroid, centroid_p = centroid_test(cur, ref, cfg.permutations, rng)
    k = cfg.mmd_sample
    mmd2, p_value = mmd_test(cur[:k], ref[:k], cfg.permutations, rng)
    share = drifted_share(cur, ref, cfg.ks_alpha)
    norms_c, norms_r = np.linalg.norm(cur, axis=1), np.linalg.norm(ref, axis=1)
    flags = []
    if centroid > cfg.max_centroid_distance and centroid_p < cfg.mmd_alpha:
        flags.append(f"centroid_distance {centroid:.4f} > {cfg.max_centroid_distance} "
                     f"(permutation p {centroid_p:.4f})")
    if p_value < cfg.mmd_alpha:
        flags.append(f"mmd p-value {p_value:.4f} < {cfg.mmd_alpha}")
    if share > cfg.max_drifted_share:
        flags.append(f"drifted_share {share:.3f} > {cfg.max_drifted_share}")
    return ColumnDrift(centroid_distance=centroid, centroid_p_value=centroid_p, mmd2=mmd2,
                       mmd_p_value=p_value, drifted_share=share,
                       norm_mean=float(norms_c.mean()), norm_std=float(norms_c.std()),
                       ref_norm_mean=float(norms_r.mean()), ref_norm_std=float(norms_r.std()),
                       n_current=len(cur), n_reference=len(ref), flags=flags)
