"""Small statistics shared by the evaluations: Wilson intervals, label shares, spreads, McNemar, Pareto, ridge R².

Everything here is a pure function of labels or numbers, so every reported metric can be recomputed from the raw
labelled answers an evaluation writes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

Z95 = 1.959963984540054  # two-sided 95 % normal quantile


@dataclass(frozen=True)
class Rate:
    """``k`` of ``n`` with a Wilson score interval; ``unjudged`` items (label ``None``) are not in ``n``."""

    k: int
    n: int
    rate: float | None
    low: float | None
    high: float | None
    unjudged: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self, digits: int = 0) -> str:
        if self.rate is None or self.low is None or self.high is None:
            return f"n/a (0 of {self.n})"
        pct = f"{{:.{digits}f}}"
        return (
            f"{pct.format(100 * self.rate)} % ({self.k}/{self.n}; 95 % CI {pct.format(100 * self.low)}–"
            f"{pct.format(100 * self.high)} %)"
        )


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for ``k`` successes in ``n`` trials (``(0, 1)`` when ``n == 0``)."""
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


def rate_of(labels: Iterable[str | None], positive: str | Sequence[str]) -> Rate:
    """The share of judged labels in ``positive`` (one label or several), with its Wilson 95 % interval."""
    wanted = {positive} if isinstance(positive, str) else set(positive)
    values = list(labels)
    judged = [v for v in values if v is not None]
    k = sum(1 for v in judged if v in wanted)
    n = len(judged)
    if n == 0:
        return Rate(0, 0, None, None, None, unjudged=len(values))
    low, high = wilson_interval(k, n)
    return Rate(k, n, k / n, low, high, unjudged=len(values) - n)


def success_rate(outcomes: Iterable[bool | None]) -> Rate:
    """The share of ``True`` among judged outcomes (``None`` = could not be scored)."""
    return rate_of(["yes" if o else "no" if o is not None else None for o in outcomes], "yes")


def label_shares(labels: Iterable[str | None], categories: Sequence[str]) -> dict[str, Any]:
    """Counts and shares (of judged labels) for each category, plus ``n`` and ``unjudged``."""
    values = list(labels)
    judged = [v for v in values if v is not None]
    unknown = sorted({v for v in judged if v not in categories})
    if unknown:
        raise ValueError(f"labels outside the categories {list(categories)}: {unknown}")
    n = len(judged)
    counts = {c: sum(1 for v in judged if v == c) for c in categories}
    shares = {c: (counts[c] / n if n else None) for c in categories}
    return {"n": n, "unjudged": len(values) - n, "counts": counts, "shares": shares}


def spread(values: Iterable[float]) -> dict[str, Any]:
    """Mean, standard deviation (ddof 1), standard error, min and max of finite values."""
    xs = np.array([float(v) for v in values if v is not None and math.isfinite(float(v))], dtype=np.float64)
    n = int(xs.size)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "sem": None, "min": None, "max": None}
    std = float(xs.std(ddof=1)) if n > 1 else 0.0
    return {
        "n": n,
        "mean": float(xs.mean()),
        "std": std,
        "sem": std / math.sqrt(n),
        "min": float(xs.min()),
        "max": float(xs.max()),
    }


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs (a binomial test at 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For points ``(harm, gain)``: ``True`` where no other point has harm ≤ and gain ≥ with one strictly better.

    Lower harm and higher gain are better (harmful rate against capability change).
    """
    marks = []
    for i, (hi, gi) in enumerate(points):
        dominated = any(hj <= hi and gj >= gi and (hj < hi or gj > gi) for j, (hj, gj) in enumerate(points) if j != i)
        marks.append(not dominated)
    return marks


def ridge_cv_r2(
    features: np.ndarray,
    target: np.ndarray,
    *,
    groups: Sequence[Any] | None = None,
    folds: int = 5,
    alphas: Sequence[float] = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0),
    seed: int = 0,
    return_predictions: bool = False,
) -> dict[str, Any]:
    """Out-of-fold R² of a ridge regression (its penalty chosen inside each training fold by RidgeCV).

    With ``groups`` (e.g. the conversation of each row), folds never split a group (GroupKFold), so a model is never
    scored on turns of a conversation it was trained on. R² is computed once over all out-of-fold predictions.
    """
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.model_selection import GroupKFold, KFold, cross_val_predict

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"need features [n, d] and a target [n], got {x.shape} and {y.shape}")
    n_groups = len(set(groups)) if groups is not None else x.shape[0]
    k = min(folds, n_groups)
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 groups/rows, got {n_groups}")
    model = RidgeCV(alphas=tuple(alphas))
    if groups is not None:
        splitter: Any = GroupKFold(n_splits=k)
        predicted = cross_val_predict(model, x, y, groups=list(groups), cv=splitter)
    else:
        splitter = KFold(n_splits=k, shuffle=True, random_state=seed)
        predicted = cross_val_predict(model, x, y, cv=splitter)
    fitted = RidgeCV(alphas=tuple(alphas)).fit(x, y)
    extra = {"predicted": [float(v) for v in predicted]} if return_predictions else {}
    return {
        "r2": float(r2_score(y, predicted)),
        "n": int(x.shape[0]),
        "dim": int(x.shape[1]),
        "folds": k,
        "grouped": groups is not None,
        "alpha_full_fit": float(fitted.alpha_),
        "target_std": float(y.std()),
        **extra,
    }


def evenly_spaced(n_total: int, n: int | None) -> list[int]:
    """``n`` indices spread evenly over ``range(n_total)`` (all of them when ``n`` is ``None`` or too large)."""
    if n is None or n >= n_total:
        return list(range(n_total))
    if n <= 0:
        return []
    return sorted({int(i * n_total / n) for i in range(n)})
