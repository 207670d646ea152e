"""The persona space: PCA of mean-centred role vectors per layer, PC1 oriented toward the default.

Plain tensors in, arrays and a JSON-ready summary out; :func:`personaxis.derive.write_space` writes a run's summary
and report from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from personaxis.axis import Axis


@dataclass
class LayerSpace:
    layer: int
    components: np.ndarray  # [k, hidden], PC1 oriented so that the default projects positive
    explained_variance_ratio: np.ndarray  # [k]
    role_coords: np.ndarray  # [n_roles, k]
    default_coords: np.ndarray  # [k]
    cos_pc1_axis: float

    def n_components_for(self, fraction: float) -> int:
        return int(np.searchsorted(np.cumsum(self.explained_variance_ratio), fraction - 1e-9) + 1)


def layer_space(role_vectors: Tensor, default: Tensor, axis_vector: Tensor, layer: int) -> LayerSpace:
    """PCA of ``role_vectors [n_roles, hidden]`` at one layer."""
    from sklearn.decomposition import PCA

    x = role_vectors.to(torch.float64).numpy()
    if x.shape[0] < 2:
        raise ValueError("PCA needs at least 2 role vectors")
    mean = x.mean(0)
    pca = PCA(n_components=min(x.shape[0], x.shape[1]), svd_solver="full").fit(x - mean)
    components = pca.components_.copy()
    default_centred = default.to(torch.float64).numpy() - mean
    if default_centred @ components[0] < 0:
        components[0] = -components[0]
    coords = (x - mean) @ components.T
    default_coords = default_centred @ components.T
    a = axis_vector.to(torch.float64).numpy()
    cos = float(components[0] @ a / (np.linalg.norm(components[0]) * np.linalg.norm(a)))
    return LayerSpace(layer, components, pca.explained_variance_ratio_, coords, default_coords, cos)


def position_in_range(value: float, values: np.ndarray) -> float:
    """Where ``value`` falls in the range of ``values``: 0 at the minimum, 1 at the maximum (beyond: outside)."""
    low, high = float(values.min()), float(values.max())
    return (value - low) / (high - low) if high > low else 0.5


def summarize(
    axis: Axis, roles: list[dict[str, Any]], role_vectors: Tensor, default: Tensor, *, model: str
) -> tuple[dict[str, Any], LayerSpace]:
    """Per-layer PCA statistics and per-role projections, as a JSON-ready dict, plus the target layer's space."""
    layers = []
    target_space: LayerSpace | None = None
    for layer in range(axis.n_layers):
        space = layer_space(role_vectors[:, layer], default[layer], axis.vectors[layer], layer)
        ratios = space.explained_variance_ratio
        layers.append(
            {
                "layer": layer,
                "cos_pc1_axis": round(space.cos_pc1_axis, 6),
                "pc1_explained_variance": round(float(ratios[0]), 6),
                "explained_variance": [round(float(r), 6) for r in ratios[:10]],
                "components_for_70": space.n_components_for(0.7),
                "components_for_80": space.n_components_for(0.8),
                "components_for_90": space.n_components_for(0.9),
            }
        )
        if layer == axis.target_layer:
            target_space = space
    assert target_space is not None
    t = axis.target_layer
    role_proj = axis.project(role_vectors[:, t], layer=t).numpy()
    default_proj = float(axis.project(default[t], layer=t))
    pc1 = target_space.role_coords[:, 0]
    summary_roles = []
    for i, role in enumerate(roles):  # roles or, with the paper's recipe, (role, score group) points
        summary_roles.append(
            {
                **role,
                "projection": round(float(role_proj[i]), 6),
                "pc": [round(float(v), 6) for v in target_space.role_coords[i, :3]],
            }
        )
    summary = {
        "model": model,
        "n_layers": axis.n_layers,
        "hidden_size": axis.hidden_size,
        "target_layer": t,
        "layers": layers,
        "roles": summary_roles,
        "default_projection": round(default_proj, 6),
        "default_position": {
            "pc1_fraction": round(position_in_range(float(target_space.default_coords[0]), pc1), 6),
            "axis_fraction": round(position_in_range(default_proj, role_proj), 6),
            "pc1": round(float(target_space.default_coords[0]), 6),
            "note": "0 = at the role-playing end of the role range, 1 = at the Assistant end, >1 beyond every role",
        },
        "target": {
            "cos_pc1_axis": layers[t]["cos_pc1_axis"],
            "pc1_explained_variance": layers[t]["pc1_explained_variance"],
            "min_cos_pc1_axis": min(layer["cos_pc1_axis"] for layer in layers),
        },
    }
    return summary, target_space
