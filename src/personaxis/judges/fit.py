"""Fit the offline judge's logistic weights on a labelled JSON-lines file.

    python -m personaxis.judges.fit [LABELLED.jsonl]      (default: the shipped judges/data/offline_train.jsonl)

Each line is ``{"role", "rubric", "question", "answer", "label"}`` with ``label`` in 0..3; the model predicts
``label == 3``. Prints both weight sets (with and without embedding features) as Python to paste into
:mod:`personaxis.judges.offline` (the shipped sets use C = 10, with the ``refusal`` weight then hand-set to -3
because refusals almost never occur in the training set), with cross-validated and training balanced accuracy.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from personaxis.judges.base import DEFAULT_RUBRIC, FULLY, JudgeItem
from personaxis.judges.embedder import get_embedder
from personaxis.judges.features import feature_matrix

TRAINING_SET = Path(__file__).parent / "data" / "offline_train.jsonl"


def load_labelled(path: Path) -> tuple[list[JudgeItem], np.ndarray]:
    items, labels = [], []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        items.append(
            JudgeItem(
                key=str(n),
                role=row["role"],
                rubric=row.get("rubric") or DEFAULT_RUBRIC,
                question=row["question"],
                answer=row["answer"],
            )
        )
        labels.append(int(row["label"]))
    return items, np.array(labels)


def fit_weights(features: np.ndarray, names: tuple[str, ...], fully: np.ndarray, c: float = 10.0) -> dict[str, float]:
    """L2-regularised logistic regression (class-balanced) of ``fully`` on ``features``."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000)
    model.fit(features, fully)
    weights = {"bias": round(float(model.intercept_[0]), 4)}
    weights.update({name: round(float(w), 4) for name, w in zip(names, model.coef_[0], strict=True)})
    return weights


def balanced_accuracy(truth: np.ndarray, predicted: np.ndarray) -> float:
    truth, predicted = truth.astype(bool), predicted.astype(bool)
    tpr = (truth & predicted).sum() / max(1, truth.sum())
    tnr = (~truth & ~predicted).sum() / max(1, (~truth).sum())
    return float((tpr + tnr) / 2)


def cross_validated_accuracy(features: np.ndarray, fully: np.ndarray, c: float = 10.0, repeats: int = 5) -> float:
    """Mean balanced accuracy of 5-fold cross-validation, over ``repeats`` shuffles."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    scores = []
    for seed in range(repeats):
        model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000)
        folds = StratifiedKFold(5, shuffle=True, random_state=seed)
        scores.append(balanced_accuracy(fully, cross_val_predict(model, features, fully, cv=folds)))
    return float(np.mean(scores))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else TRAINING_SET
    items, labels = load_labelled(path)
    fully = (labels == FULLY).astype(int)
    print(f"# {len(items)} items, {fully.sum()} fully (3), {len(items) - fully.sum()} not")
    for title, embedder in (("WEIGHTS_EMBEDDING", get_embedder()), ("WEIGHTS_LEXICAL", None)):
        if title == "WEIGHTS_EMBEDDING" and embedder is None:
            print("# no embedder: skipping WEIGHTS_EMBEDDING")
            continue
        features, names = feature_matrix(items, embedder)
        for c in (3.0, 10.0, 30.0):
            print(f"# C={c}: cross-validated balanced accuracy {cross_validated_accuracy(features, fully, c):.3f}")
        weights = fit_weights(features, names, fully)
        w = np.array([weights[n] for n in names])
        predicted = (features @ w + weights["bias"]) >= 0
        print(f"# training balanced accuracy {balanced_accuracy(fully, predicted):.3f}")
        print(f"{title}: dict[str, float] = {{")
        for name, value in weights.items():
            print(f'    "{name}": {value},')
        print("}")


if __name__ == "__main__":
    main()
