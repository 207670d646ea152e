"""Traits along the Assistant Axis: the trait vectors' PCA and which traits lie at either end of the axis.

A trait vector is mean(answers showing the trait) − mean(answers showing its opposite) (:mod:`personaxis.vectors`).
At the axis's target layer each trait is placed by the cosine of its vector with the axis: positive cosines point
toward the Assistant end (the axis points from role play toward the default Assistant), negative ones toward the far,
role-playing end. The PCA of the trait vectors says how much of their spread one direction explains and how that
direction lines up with the axis.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from personaxis.axis import Axis

N_ENDS = 5  # traits named at each end of the axis


def rank_traits(
    names: list[str], vectors: Tensor, axis: Axis, *, details: dict[str, Any] | None = None, n_ends: int = N_ENDS
) -> dict[str, Any]:
    """Traits ranked along ``axis`` at its target layer (``vectors``: ``[n_traits, L, H]``), JSON-ready."""
    if len(names) != len(vectors):
        raise ValueError(f"{len(names)} trait names for {len(vectors)} trait vectors")
    t = axis.target_layer
    x = vectors[:, t].to(torch.float64)
    direction = axis.vectors[t].to(torch.float64)
    direction = direction / direction.norm()
    norms = x.norm(dim=1).clamp_min(1e-12)
    cosines = (x @ direction) / norms
    projections = x @ direction
    ranked: list[dict[str, Any]] = []
    pca: dict[str, Any] | None = None
    coords = np.zeros((len(names), 0))
    if len(names) >= 2:
        from sklearn.decomposition import PCA

        arr = x.numpy()
        centred = arr - arr.mean(0)
        fit = PCA(n_components=min(arr.shape), svd_solver="full").fit(centred)
        components = fit.components_.copy()
        if components[0] @ direction.numpy() < 0:  # PC1 oriented toward the Assistant end
            components[0] = -components[0]
        coords = centred @ components[:3].T
        pc1 = components[0]
        pca = {
            "explained_variance": [round(float(r), 6) for r in fit.explained_variance_ratio_[:10]],
            "cos_pc1_axis": round(float(pc1 @ direction.numpy() / np.linalg.norm(pc1)), 6),
        }
    for i, name in enumerate(names):
        entry: dict[str, Any] = {
            "name": name,
            "cos_axis": round(float(cosines[i]), 6),
            "projection": round(float(projections[i]), 6),
        }
        if coords.shape[1]:
            entry["pc"] = [round(float(v), 6) for v in coords[i]]
        if details and name in details:
            entry.update({k: v for k, v in details[name].items() if k.startswith("n_")})
        ranked.append(entry)
    ranked.sort(key=lambda e: -e["cos_axis"])
    k = min(n_ends, len(ranked) // 2) if len(ranked) > 1 else len(ranked)
    return {
        "layer": t,
        "n_traits": len(names),
        "traits": ranked,
        "assistant_end": [e["name"] for e in ranked[:k] if e["cos_axis"] > 0],
        "far_end": [e["name"] for e in reversed(ranked[len(ranked) - k :]) if e["cos_axis"] < 0],
        "pca": pca,
        "note": "cos_axis > 0: the trait's vector points toward the Assistant end of the axis; < 0: toward role play",
    }
