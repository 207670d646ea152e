"""The derived stages of a run: vectors, axis and persona space, from the files of the stages before them.

Each function reads the run through its layout (:mod:`personaxis.io.run_layout`), calls the method's tensor
functions (:mod:`personaxis.vectors`, :mod:`personaxis.space`, :mod:`personaxis.traits`, :mod:`personaxis.capping`)
and writes the results through the I/O layer. :class:`personaxis.pipeline.Pipeline` calls them as its last stages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from personaxis.axis import Axis
from personaxis.capping import ORDINARY_KINDS, CappingError, rollout_projections
from personaxis.io.records import SummaryRecord, VectorIndex
from personaxis.io.tensor_files import (
    load_axis,
    load_default_vector,
    load_residual_norms,
    load_role_vectors,
    load_space_points,
    load_trait_vectors,
    read_vector_index,
    save_axis,
)
from personaxis.report import write_report
from personaxis.space import summarize
from personaxis.store import RunDirError, atomic_save_tensors, write_record
from personaxis.traits import rank_traits
from personaxis.vectors import axis_vectors, recipe_counts, role_vector_groups, trait_vector

if TYPE_CHECKING:
    from personaxis.pipeline import Pipeline


def _condition_rows(pipeline: Pipeline, name: str) -> tuple[Tensor, Tensor, list[int | None], list[str]]:
    """Stack a condition's rollout means ``[n, L, H]``, norms ``[n, L]``, judge scores and pair keys
    (``p<k>/q<id>``: the same for a trait's positive and negative answer to one question under one pair)."""
    means, norms, scores, keys = [], [], [], []
    for unit in pipeline.units:
        if unit.condition.name != name:
            continue
        ids, unit_means, unit_norms = pipeline.read_activations(unit)
        judged = pipeline.read_scores(unit) if pipeline.is_judged(unit.condition) else {}
        means.append(unit_means)
        norms.append(unit_norms)
        scores.extend(judged.get(i) for i in ids)
        keys.extend(f"p{unit.prompt_index}/{i.rsplit('/', 1)[-1]}" for i in ids)
    return torch.cat(means), torch.cat(norms), scores, keys


def compute_vectors(pipeline: Pipeline) -> VectorIndex:
    """Write the run's role, default and trait vectors, its residual norms and its vector index."""
    layout = pipeline.layout
    min_count = pipeline.settings.min_count
    recipe = pipeline.settings.vectors
    unjudged = pipeline.settings.judge == "none"
    index: dict[str, Any] = {"recipe": recipe, "min_count": min_count, "roles": [], "traits": []}
    all_norms: list[Tensor] = []
    trait_sides: dict[str, dict[str, tuple[Tensor, list[int | None], list[str]]]] = {}
    for condition in pipeline.conditions:
        means, norms, scores, keys = _condition_rows(pipeline, condition.name)
        all_norms.append(norms)
        if condition.kind == "default":
            if len(means) == 0:
                raise RuntimeError("no default rollout has an answer: the default vector cannot be computed")
            atomic_save_tensors(layout.default_vector, {"vector": means.mean(0)}, {"n_rollouts": str(len(means))})
            index["default"] = {"n_rollouts": len(means)}
            continue
        if condition.is_trait:
            trait_sides.setdefault(condition.trait or condition.name, {})[condition.kind] = (means, scores, keys)
            continue
        tensors, axis_group, space_groups, counts = role_vector_groups(
            means, scores, min_count=min_count, recipe=recipe, unjudged=unjudged
        )
        if tensors:
            atomic_save_tensors(layout.role_vectors(condition.name), tensors)
        source = axis_group or ("space only" if space_groups else "dropped")
        index["roles"].append(
            {
                "name": condition.name,
                "category": condition.category,
                "n_rollouts": len(scores),
                "judge_counts": {str(k): v for k, v in sorted(counts.items(), key=lambda kv: str(kv[0]))},
                "vector_source": source,
                "axis_vector": axis_group,
                "space_vectors": space_groups,
                "vectors": sorted(k for k in tensors if k != "used"),
            }
        )
    judged_traits = pipeline.settings.judges_traits
    index["trait_details"] = {}
    for trait, sides in trait_sides.items():
        if {"trait_pos", "trait_neg"} <= set(sides):
            vector, details = trait_vector(sides["trait_pos"], sides["trait_neg"], judged=judged_traits)
            index["trait_details"][trait] = details
            if vector is not None:
                atomic_save_tensors(layout.trait_vector(trait), {"vector": vector})
                index["traits"].append(trait)
    index["traits_dropped"] = sorted(set(index["trait_details"]) - set(index["traits"]))
    norms = torch.cat(all_norms)
    atomic_save_tensors(layout.residual_norms, {"norms": norms.mean(0)}, {"n_rollouts": str(len(norms))})
    index.update(recipe_counts(index["roles"]))
    record = VectorIndex.model_validate(index)
    write_record(layout.vector_index, record)
    return record


def compute_axis(pipeline: Pipeline) -> Axis:
    """Write the run's ``axis.safetensors``: the default vector minus the mean of the roles' axis vectors."""
    layout = pipeline.layout
    index = read_vector_index(layout)
    kept, role_vectors = load_role_vectors(layout, index)
    default = load_default_vector(layout)
    norms = load_residual_norms(layout)
    profile_target = pipeline.settings.target_layer
    axis = Axis(
        axis_vectors(default, role_vectors),
        model=pipeline.model_name,
        target_layer=profile_target if profile_target is not None else default.shape[0] // 2,
        residual_norms=norms,
        metadata={
            "made_by": "personaxis run",
            "preset": pipeline.settings.preset,
            "judge": pipeline.settings.judge,
            "n_roles": len(kept),
            "n_roles_dropped": index.n_roles_dropped,
            "n_roles_fell_back": index.n_roles_fell_back,
            "vector_recipe": index.recipe,
            "role_vector_sources": index.sources,
            "default_rollouts": index.default["n_rollouts"],
            "formula": "default - mean(role vectors)",
            **({} if norms is not None else {"residual_norms": "not measured"}),
        },
    )
    save_axis(axis, layout.axis)
    return axis


def write_space(pipeline: Pipeline) -> SummaryRecord:
    """``summary.json`` and ``report.html``: the PCA of the recipe's persona-space points (one per role, or with
    ``--vectors paper`` one per role and score group), the axis, and the traits along it."""
    layout = pipeline.layout
    axis = load_axis(layout.axis)
    index = read_vector_index(layout)
    points, point_vectors = load_space_points(layout, index)
    default = load_default_vector(layout)
    summary, space = summarize(axis, points, point_vectors, default, model=axis.model)
    summary["vector_recipe"] = index.recipe
    summary["dropped_roles"] = [r.to_json() for r in index.roles if r.vector_source == "dropped"]
    summary["role_vector_sources"] = index.sources
    for key in ("n_roles_kept", "n_roles_in_axis", "n_roles_fell_back", "n_roles_dropped", "n_space_vectors"):
        summary[key] = getattr(index, key)
    summary["min_count"] = index.min_count
    summary["default_rollouts"] = index.default["n_rollouts"]
    summary["traits"] = index.traits
    if index.traits:
        vectors = load_trait_vectors(layout, list(index.traits))
        summary["trait_space"] = rank_traits(list(index.traits), vectors, axis, details=index.trait_details)
    summary["settings"] = pipeline.settings.to_manifest()
    record = SummaryRecord.model_validate(summary)
    write_record(layout.summary, record)
    write_report(layout, record.to_json(), space)
    return record


def run_projections(
    pipeline: Pipeline, axis: Axis, kinds: Sequence[str] = ORDINARY_KINDS
) -> tuple[np.ndarray, dict[str, int]]:
    """Projections ``[n_rollouts, n_layers]`` (float64) of the mean response activations of a run's rollouts of the
    given condition kinds onto the unit axis, and the number of rollouts per kind."""
    units = [u for u in pipeline.units if u.condition.kind in kinds]
    missing = [pipeline.activation_path(u) for u in units if not pipeline.activation_path(u).is_file()]
    if missing:
        raise RunDirError(
            f"{len(missing)} unit(s) have no activations yet (e.g. {missing[0]}); "
            f"run `personaxis extract --out {pipeline.layout.root}` or `personaxis run` first"
        )
    rows: list[Tensor] = []
    counts: dict[str, int] = {}
    for unit in units:
        _, means, _ = pipeline.read_activations(unit)
        if means.shape[0] == 0:
            continue
        try:
            rows.append(rollout_projections(means, axis))
        except CappingError as exc:
            raise CappingError(f"{pipeline.activation_path(unit)}: {exc}") from None
        counts[unit.condition.kind] = counts.get(unit.condition.kind, 0) + int(means.shape[0])
    if not rows:
        raise CappingError(f"no rollout with an answer among the {', '.join(kinds)} rollouts of {pipeline.layout.root}")
    return torch.cat(rows).numpy(), counts
