"""Statistics of the evaluations: Wilson intervals, rates, shares, McNemar, Pareto marks, cross-validated ridge R²."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from personaxis.evals.stats import (
    evenly_spaced,
    label_shares,
    mcnemar_exact,
    pareto_front,
    rate_of,
    ridge_cv_r2,
    spread,
    success_rate,
    wilson_interval,
)


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        (0, 10, 0.0, 0.27753),  # published Wilson values (e.g. statsmodels proportion_confint(method="wilson"))
        (5, 10, 0.23659, 0.76341),
        (10, 10, 0.72247, 1.0),
        (1, 40, 0.00443, 0.12882),
        (12, 40, 0.18075, 0.45430),
    ],
)
def test_wilson_interval_matches_known_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=2e-5)
    assert hi == pytest.approx(high, abs=2e-5)


@given(st.integers(min_value=1, max_value=500), st.data())
def test_wilson_interval_contains_the_rate_and_stays_in_bounds(n, data):
    k = data.draw(st.integers(min_value=0, max_value=n))
    lo, hi = wilson_interval(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_wilson_bad_input_and_empty():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_rate_counts_only_judged_labels():
    labels = ["harmful", "refusal", None, "harmful", "redirect", None]
    r = rate_of(labels, "harmful")
    assert (r.k, r.n, r.unjudged) == (2, 4, 2)
    assert r.rate == 0.5
    assert (r.low, r.high) == wilson_interval(2, 4)
    assert rate_of([None, None], "harmful").rate is None
    several = rate_of(["a", "b", "c", "a"], ["a", "b"])
    assert (several.k, several.n) == (3, 4)
    assert success_rate([True, False, None, True]).to_dict()["k"] == 2


def test_label_shares_and_unknown_labels():
    shares = label_shares(["x", "y", "x", None], ["x", "y", "z"])
    assert shares["n"] == 3 and shares["unjudged"] == 1
    assert shares["counts"] == {"x": 2, "y": 1, "z": 0}
    assert shares["shares"]["x"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="outside"):
        label_shares(["w"], ["x"])


def test_spread():
    s = spread([1.0, 2.0, 3.0, 4.0])
    assert s["mean"] == 2.5 and s["std"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert s["sem"] == pytest.approx(s["std"] / 2)
    assert spread([])["mean"] is None
    assert spread([5.0])["std"] == 0.0


def test_mcnemar_exact():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(1, 9) == pytest.approx(2 * (1 + 10) / 1024)


def test_pareto_front_on_a_planted_grid():
    # (harm, gain): lower harm and higher gain are better.
    points = [
        (0.50, 0.00),  # reference: dominated by (0.30, 0.00)
        (0.30, 0.00),  # front
        (0.10, -0.20),  # front (lowest harm)
        (0.30, -0.05),  # dominated by (0.30, 0.00)
        (0.40, 0.05),  # front (highest gain)
        (0.20, -0.10),  # front
        (0.20, -0.15),  # dominated by (0.20, -0.10)
    ]
    assert pareto_front(points) == [False, True, True, False, True, True, False]
    assert pareto_front([(0.1, 0.1), (0.1, 0.1)]) == [True, True]  # ties dominate nobody


def test_ridge_r2_recovers_a_known_relation():
    rng = np.random.default_rng(0)
    n, d = 600, 12
    x = rng.normal(size=(n, d))
    w = rng.normal(size=d)
    signal = x @ w
    noise = rng.normal(scale=math.sqrt(signal.var() / 4), size=n)  # R² = 1 / (1 + 1/4) = 0.8
    result = ridge_cv_r2(x, signal + noise, folds=5)
    assert result["r2"] == pytest.approx(0.8, abs=0.05)
    assert result["n"] == n and result["dim"] == d and result["folds"] == 5
    pure_noise = ridge_cv_r2(x, rng.normal(size=n), folds=5)
    assert pure_noise["r2"] < 0.03


def test_grouped_folds_do_not_leak_within_a_group():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(30), 8)
    # Each group has its own random offset that the features identify perfectly: with ungrouped folds the model
    # learns a group's offset from its other rows; grouped folds must not see them.
    group_codes = rng.normal(size=(30, 20))
    x = group_codes[groups] + 0.01 * rng.normal(size=(len(groups), 20))
    y = rng.normal(size=30)[groups]
    leaky = ridge_cv_r2(x, y, folds=5)
    grouped = ridge_cv_r2(x, y, groups=groups.tolist(), folds=5, return_predictions=True)
    assert leaky["r2"] > 0.6
    assert grouped["r2"] < 0.3
    assert grouped["grouped"] and len(grouped["predicted"]) == len(y)
    with pytest.raises(ValueError):
        ridge_cv_r2(x[:, :1].ravel(), y)


def test_evenly_spaced():
    assert evenly_spaced(10, None) == list(range(10))
    assert evenly_spaced(10, 20) == list(range(10))
    assert evenly_spaced(10, 5) == [0, 2, 4, 6, 8]
    assert evenly_spaced(62, 10)[:3] == [0, 6, 12]
    assert evenly_spaced(10, 0) == []
