"""What predicts drift: rows from a drift record, R² on synthetic data with a known relation, the real encoder."""

from __future__ import annotations

import numpy as np
import pytest

from personaxis.evals.drift_predict import embed_texts, plot_prediction, prediction_metrics, prediction_rows
from personaxis.evals.record import make_record


def _drift_items(n_conv: int, n_turns: int, rng: np.random.Generator, projection) -> list[dict]:
    items = []
    for c in range(n_conv):
        domain = ("coding", "therapy")[c % 2]
        turns = [
            {
                "turn": t,
                "user": f"conversation {c} message {t}",
                "answer": "...",
                "projection": {"5": float(projection(c, t, rng))},
            }
            for t in range(n_turns)
        ]
        items.append({"key": f"{domain}-{c}", "domain": domain, "conversation": c, "turns": turns})
    return items


def test_rows_pair_each_turn_with_its_user_message_and_previous_turn():
    rng = np.random.default_rng(0)
    items = _drift_items(3, 4, rng, lambda c, t, r: 10 * c + t * t)
    rows = prediction_rows(items, 5)
    assert len(rows) == 3 * 3  # turns 1..3 of each conversation
    first = rows[0]
    assert first["user"] == "conversation 0 message 1" and first["turn"] == 1
    assert first["next_projection"] == 1.0 and first["change"] == 1.0
    third = rows[2]
    assert third["next_projection"] == 9.0 and third["change"] == 5.0
    assert {r["group"] for r in rows} == {"coding-0", "therapy-1", "coding-2"}


def test_r2_on_synthetic_embeddings_with_a_known_relation(tmp_path):
    rng = np.random.default_rng(3)
    n_conv, n_turns, dim = 40, 9, 16
    items = _drift_items(n_conv, n_turns, rng, lambda c, t, r: 0.0)
    rows = prediction_rows(items, 5)
    x = rng.normal(size=(len(rows), dim))
    w = rng.normal(size=dim)
    signal = x @ w
    # next projection = signal + noise with variance signal/3 → R² ≈ 0.75; change = pure noise → R² ≈ 0
    for row, s in zip(rows, signal, strict=True):
        row["next_projection"] = float(s + rng.normal(scale=np.sqrt(signal.var() / 3)))
        row["change"] = float(rng.normal())
    metrics = prediction_metrics(rows, x, folds=5)
    assert metrics["next_projection"]["r2"] == pytest.approx(0.75, abs=0.07)
    assert metrics["change"]["r2"] < 0.05
    assert metrics["n_rows"] == len(rows) == n_conv * (n_turns - 1)
    assert metrics["n_conversations"] == n_conv
    assert metrics["next_projection"]["domain_only_r2"] is not None
    assert len(metrics["change"]["predicted"]) == len(rows)
    record = make_record("drift_predict", model={"name": "m"}, settings={}, items=rows, metrics=metrics)
    assert plot_prediction(record, tmp_path / "p.png").is_file()
    with pytest.raises(ValueError):
        prediction_metrics(rows, x[:-1])


def test_domain_only_baseline_explains_domain_offsets():
    rng = np.random.default_rng(5)
    items = _drift_items(20, 5, rng, lambda c, t, r: (5.0 if c % 2 else -5.0) + r.normal(scale=0.1))
    rows = prediction_rows(items, 5)
    metrics = prediction_metrics(rows, rng.normal(size=(len(rows), 8)), folds=4)
    assert metrics["next_projection"]["domain_only_r2"] > 0.95


def test_offline_encoder_embeds_user_messages():
    vectors = embed_texts(
        [
            "I feel so alone since I moved here.",
            "How do I reverse a list in Python?",
            "I have felt lonely ever since I moved to this city.",
        ]
    )
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert vectors[0] @ vectors[2] > vectors[0] @ vectors[1]
