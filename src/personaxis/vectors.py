"""Role, default and trait vectors from a run's activations and judgments, and the Assistant Axis from them.

Per role, rollouts are grouped by judge score: ``fully`` (3) and ``somewhat`` (2); a group becomes a vector when it
has at least ``min_count`` rollouts. The vector that stands for the role in the axis and the persona space is the
``fully`` one; where the judge found too few fully played rollouts, ``fully+somewhat`` (score ≥ 2); else the role is
dropped. With no judge (``--judge none``) every rollout counts (``unjudged``). What each role used is recorded.

    axis[l] = default[l] − mean over kept roles of role_vector[l]
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from personaxis.axis import Axis
from personaxis.store import atomic_save_tensors, atomic_write_json, load_tensors, read_json, slug

if TYPE_CHECKING:
    from personaxis.pipeline import Pipeline

SCORE_GROUPS = {"fully": (3,), "somewhat": (2,), "fully+somewhat": (2, 3)}


def _condition_rows(pipeline: Pipeline, name: str) -> tuple[Tensor, Tensor, list[int | None]]:
    """Stack a condition's rollout means ``[n, L, H]``, norms ``[n, L]`` and judge scores."""
    means, norms, scores = [], [], []
    for unit in pipeline.units:
        if unit.condition.name != name:
            continue
        ids, unit_means, unit_norms = pipeline.read_activations(unit)
        judged = read_json(pipeline.judgment_path(unit))["scores"] if unit.condition.judged else {}
        means.append(unit_means)
        norms.append(unit_norms)
        scores.extend(judged.get(i) for i in ids)
    return torch.cat(means), torch.cat(norms), scores


def compute_vectors(pipeline: Pipeline) -> dict[str, Any]:
    """Write ``vectors/roles/*``, ``vectors/default.safetensors``, ``vectors/traits/*`` and ``vectors/index.json``."""
    root = pipeline.store.root / "vectors"
    min_count = pipeline.settings.min_count
    unjudged = pipeline.settings.judge == "none"
    index: dict[str, Any] = {"min_count": min_count, "roles": [], "traits": []}
    all_norms: list[Tensor] = []
    trait_sides: dict[str, dict[str, Tensor]] = {}
    for condition in pipeline.conditions:
        means, norms, scores = _condition_rows(pipeline, condition.name)
        all_norms.append(norms)
        if condition.kind == "default":
            if len(means) == 0:
                raise RuntimeError("no default rollout has an answer: the default vector cannot be computed")
            atomic_save_tensors(root / "default.safetensors", {"vector": means.mean(0)}, {"n_rollouts": str(len(means))})
            index["default"] = {"n_rollouts": len(means)}
            continue
        if condition.kind in ("trait_pos", "trait_neg"):
            if len(means):
                trait_sides.setdefault(condition.trait or condition.name, {})[condition.kind] = means.mean(0)
            continue
        counts = Counter("unjudged" if s is None else int(s) for s in scores)
        tensors: dict[str, Tensor] = {}
        if len(means):
            tensors["all"] = means.mean(0)
        for group, allowed in SCORE_GROUPS.items():
            selected = torch.tensor([s in allowed for s in scores], dtype=torch.bool)
            if int(selected.sum()) >= min_count:
                tensors[group] = means[selected].mean(0)
        if unjudged:
            source = "unjudged" if len(means) >= min_count else None
        else:
            source = next((g for g in ("fully", "fully+somewhat") if g in tensors), None)
        if source == "unjudged":
            tensors["used"] = tensors["all"].clone()
        elif source is not None:
            tensors["used"] = tensors[source].clone()
        if tensors:
            atomic_save_tensors(root / "roles" / f"{slug(condition.name)}.safetensors", tensors)
        index["roles"].append({
            "name": condition.name, "category": condition.category, "n_rollouts": len(scores),
            "judge_counts": {str(k): v for k, v in sorted(counts.items(), key=lambda kv: str(kv[0]))},
            "vector_source": source or "dropped", "vectors": sorted(k for k in tensors if k != "used"),
        })
    for trait, sides in trait_sides.items():
        if {"trait_pos", "trait_neg"} <= set(sides):
            atomic_save_tensors(root / "traits" / f"{slug(trait)}.safetensors",
                                {"vector": sides["trait_pos"] - sides["trait_neg"]})
            index["traits"].append(trait)
    norms = torch.cat(all_norms)
    atomic_save_tensors(root / "residual_norms.safetensors", {"norms": norms.mean(0)}, {"n_rollouts": str(len(norms))})
    kept = [r for r in index["roles"] if r["vector_source"] != "dropped"]
    index["n_roles_kept"] = len(kept)
    index["n_roles_dropped"] = len(index["roles"]) - len(kept)
    index["sources"] = dict(Counter(r["vector_source"] for r in index["roles"]))
    atomic_write_json(root / "index.json", index)
    return index


def load_role_vectors(pipeline: Pipeline) -> tuple[list[dict[str, Any]], Tensor]:
    """The kept roles' index entries and their ``used`` vectors ``[n_roles, L, H]``."""
    root = pipeline.store.root / "vectors"
    index = read_json(root / "index.json")
    kept = [r for r in index["roles"] if r["vector_source"] != "dropped"]
    vectors = [load_tensors(root / "roles" / f"{slug(r['name'])}.safetensors")["used"] for r in kept]
    if len(vectors) < 2:
        raise RuntimeError(
            f"only {len(vectors)} role(s) have at least {index['min_count']} rollouts the judge scored as role play; "
            "lower --min-count, add prompts or questions, or use --judge none"
        )
    return kept, torch.stack(vectors)


def compute_axis(pipeline: Pipeline) -> Axis:
    root = pipeline.store.root
    kept, role_vectors = load_role_vectors(pipeline)
    default = load_tensors(root / "vectors" / "default.safetensors")["vector"]
    norms = load_tensors(root / "vectors" / "residual_norms.safetensors")["norms"]
    index = read_json(root / "vectors" / "index.json")
    profile_target = pipeline.settings.target_layer
    axis = Axis(
        default - role_vectors.mean(0),
        model=pipeline.lm.profile.name if pipeline._lm is not None else pipeline._model_display_name(),
        target_layer=profile_target if profile_target is not None else default.shape[0] // 2,
        residual_norms=norms,
        metadata={
            "made_by": "personaxis run",
            "preset": pipeline.settings.preset,
            "judge": pipeline.settings.judge,
            "n_roles": len(kept),
            "n_roles_dropped": index["n_roles_dropped"],
            "role_vector_sources": index["sources"],
            "default_rollouts": index["default"]["n_rollouts"],
            "formula": "default - mean(role vectors)",
        },
    )
    axis.save(root / "axis.safetensors")
    return axis
