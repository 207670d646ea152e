"""The offline role-adherence judge (the default): a logistic model over a few transparent features.

``P(fully plays the role)`` = sigmoid(bias + Σ weight·feature) over the features of :mod:`personaxis.judges.features`.
The weights below were fitted by :func:`personaxis.judges.fit.fit_weights` on ``judges/data/offline_train.jsonl``
(hand-labelled answers of the embedded SmolLM2-135M-Instruct, on roles disjoint from the test set in
``tests/data/judge_labelled.jsonl``). A second set, without the embedding features, is used when the embedder is
unavailable. The 0-3 score:

- 3 if P >= 0.5 (fully plays the role);
- 0 if it refuses and speaks as an AI;
- 2 if P >= 0.25, or it speaks as an AI yet shows role cues (role words or role-play form);
- 1 otherwise (stays an assistant).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from personaxis.judges.base import JudgeItem, check_unique_keys
from personaxis.judges.embedder import Embedder, get_embedder
from personaxis.judges.features import feature_matrix
from personaxis.progress import progress_bar

log = logging.getLogger(__name__)

# Fitted weights (see the module docstring); regenerate with ``python -m personaxis.judges.fit``.
WEIGHTS_EMBEDDING: dict[str, float] = {
    "bias": -3.0822,
    "ai_self": -3.0625,
    "refusal": -3.0,  # hand-set: (almost) never fires in the training set
    "first_person": 1.7379,
    "second_person": -1.6794,
    "assistant_style": -0.988,
    "roleplay_markers": 1.6111,
    "role_words": 1.0707,
    "self_as_role": -0.919,
    "self_as_other": -1.2389,
    "voice_nonhuman": -2.659,
    "human_life_nonhuman": -1.6736,
    "emb_role": 4.9953,
    "role_specificity": 0.7879,
    "emb_assistant_vs_character": -5.9039,
}
WEIGHTS_LEXICAL: dict[str, float] = {
    "bias": -1.4275,
    "ai_self": -3.3472,
    "refusal": -3.0,  # hand-set: (almost) never fires in the training set
    "first_person": 1.7947,
    "second_person": -1.5675,
    "assistant_style": -2.5788,
    "roleplay_markers": 2.5582,
    "role_words": 2.9138,
    "self_as_role": 0.3909,
    "self_as_other": -0.6428,
    "voice_nonhuman": -2.0861,
    "human_life_nonhuman": -1.449,
}

FULLY_THRESHOLD = 0.5
PARTLY_THRESHOLD = 0.25


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))


def probability(features: np.ndarray, names: Sequence[str], weights: Mapping[str, float]) -> np.ndarray:
    """P(score 3) for each row of ``features`` (columns named by ``names``)."""
    w = np.array([weights.get(name, 0.0) for name in names], dtype=np.float64)
    return _sigmoid(features.astype(np.float64) @ w + weights.get("bias", 0.0))


def to_score(p: float, feats: Mapping[str, float]) -> int:
    if p >= FULLY_THRESHOLD:
        return 3
    if feats.get("refusal", 0.0) and feats.get("ai_self", 0.0):
        return 0
    role_cues = feats.get("role_words", 0.0) > 0 or feats.get("roleplay_markers", 0.0) > 0
    if p >= PARTLY_THRESHOLD or (feats.get("ai_self", 0.0) and role_cues):
        return 2
    return 1


class OfflineJudge:
    """Scores rollouts 0..3 with no network.

    Answers are embedded in batches; role texts (descriptions, system prompts, the catalogue's reference
    descriptions) are embedded once per process and memoised. On a 2-core CPU (shared with other work) a first call
    pays about 40 s of CPU for loading the embedder and the role texts; after that, 100 answers take about 4.5 s.
    Without the embedder (``use_embeddings=False`` or the package missing) 100 answers take about 0.03 s.
    """

    name = "offline-v1"

    def __init__(self, *, use_embeddings: bool = True, batch_size: int = 256) -> None:
        self.use_embeddings = use_embeddings
        self.batch_size = batch_size
        self._embedder: Embedder | None = None
        self._embedder_checked = False

    def __repr__(self) -> str:
        return f"OfflineJudge(name={self.name!r}, use_embeddings={self.use_embeddings})"

    def _get_embedder(self) -> Embedder | None:
        if not self._embedder_checked:
            self._embedder = get_embedder() if self.use_embeddings else None
            self._embedder_checked = True
        return self._embedder

    def probabilities(self, items: Sequence[JudgeItem]) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
        """``(P(fully), features, feature names)`` for ``items``."""
        embedder = self._get_embedder()
        features, names = feature_matrix(items, embedder)
        weights = WEIGHTS_EMBEDDING if embedder is not None else WEIGHTS_LEXICAL
        return probability(features, names, weights), features, names

    def score(self, items: Sequence[JudgeItem], *, show_progress: bool = False) -> dict[str, int | None]:
        check_unique_keys(items)
        scores: dict[str, int | None] = {}
        bar = progress_bar(total=len(items), desc="judge (offline)", unit="item", disable=not show_progress)
        try:
            for start in range(0, len(items), self.batch_size):
                batch = items[start : start + self.batch_size]
                probs, features, names = self.probabilities(batch)
                for item, p, row in zip(batch, probs, features, strict=True):
                    if not (item.answer or "").strip():
                        scores[item.key] = None  # nothing to judge
                        continue
                    scores[item.key] = to_score(float(p), dict(zip(names, row.tolist(), strict=True)))
                bar.update(len(batch))
        finally:
            bar.close()
        return scores
