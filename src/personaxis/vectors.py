"""Role, default and trait vectors from a run's activations and judgments, and the Assistant Axis from them.

Per role, rollouts are grouped by judge score: ``fully`` (3) and ``somewhat`` (2); a group becomes a vector when it
has at least ``min_count`` rollouts. Which vectors stand for the role is the run's recipe (``settings.vectors``):

- ``reference``: the ``fully`` vector, else the role is dropped (the reference implementation);
- ``paper``: the ``fully`` and the ``somewhat`` vectors, each a point of the persona space; the axis from the
  ``fully`` ones (the paper);
- ``pooled``: the ``fully`` vector, else ``fully+somewhat`` (score >= 2: the role *fell back*), else dropped.

With no judge (``--judge none``) every rollout counts (``unjudged``). What each role used is recorded in
``vectors/index.json``: ``axis_vector`` (the group in the axis, or null), ``space_vectors`` (the groups that are
points of the persona space) and ``vector_source`` (the axis group, ``space only`` or ``dropped``).

    axis[l] = default[l] − mean over the roles' axis vectors of role_vector[l]

Trait vectors are mean(positive) − mean(negative) answers; when the run judges traits (:mod:`personaxis.judges.traits`)
only the pairs whose scores differ by at least the margin count, and a trait needs enough of them.
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


class TooFewRolesError(ValueError):
    """Too few roles have vectors under the run's recipe to make an axis or a persona space."""


SCORE_GROUPS = {"fully": (3,), "somewhat": (2,), "fully+somewhat": (2, 3)}


def _condition_rows(pipeline: Pipeline, name: str) -> tuple[Tensor, Tensor, list[int | None], list[str]]:
    """Stack a condition's rollout means ``[n, L, H]``, norms ``[n, L]``, judge scores and pair keys
    (``p<k>/q<id>``: the same for a trait's positive and negative answer to one question under one pair)."""
    means, norms, scores, keys = [], [], [], []
    for unit in pipeline.units:
        if unit.condition.name != name:
            continue
        ids, unit_means, unit_norms = pipeline.read_activations(unit)
        judged = read_json(pipeline.judgment_path(unit))["scores"] if pipeline.is_judged(unit.condition) else {}
        means.append(unit_means)
        norms.append(unit_norms)
        scores.extend(judged.get(i) for i in ids)
        keys.extend(f"p{unit.prompt_index}/{i.rsplit('/', 1)[-1]}" for i in ids)
    return torch.cat(means), torch.cat(norms), scores, keys


def compute_vectors(pipeline: Pipeline) -> dict[str, Any]:
    """Write ``vectors/roles/*``, ``vectors/default.safetensors``, ``vectors/traits/*`` and ``vectors/index.json``."""
    root = pipeline.store.root / "vectors"
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
            atomic_save_tensors(
                root / "default.safetensors", {"vector": means.mean(0)}, {"n_rollouts": str(len(means))}
            )
            index["default"] = {"n_rollouts": len(means)}
            continue
        if condition.is_trait:
            trait_sides.setdefault(condition.trait or condition.name, {})[condition.kind] = (means, scores, keys)
            continue
        counts = Counter("unjudged" if s is None else int(s) for s in scores)
        tensors: dict[str, Tensor] = {}
        if len(means):
            tensors["all"] = means.mean(0)
        for group, allowed in SCORE_GROUPS.items():
            selected = torch.tensor([s in allowed for s in scores], dtype=torch.bool)
            if int(selected.sum()) >= min_count:
                tensors[group] = means[selected].mean(0)
        axis_group, space_groups = _recipe_groups(recipe, tensors, len(means) >= min_count, unjudged)
        if axis_group is not None:
            tensors["used"] = tensors["all" if axis_group == "unjudged" else axis_group].clone()
        if tensors:
            atomic_save_tensors(root / "roles" / f"{slug(condition.name)}.safetensors", tensors)
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
                atomic_save_tensors(root / "traits" / f"{slug(trait)}.safetensors", {"vector": vector})
                index["traits"].append(trait)
    index["traits_dropped"] = sorted(set(index["trait_details"]) - set(index["traits"]))
    norms = torch.cat(all_norms)
    atomic_save_tensors(root / "residual_norms.safetensors", {"norms": norms.mean(0)}, {"n_rollouts": str(len(norms))})
    index.update(recipe_counts(index["roles"]))
    atomic_write_json(root / "index.json", index)
    return index


def trait_vector(
    positive: tuple[Tensor, list[int | None], list[str]],
    negative: tuple[Tensor, list[int | None], list[str]],
    *,
    judged: bool,
) -> tuple[Tensor | None, dict[str, Any]]:
    """mean(positive answers) − mean(negative answers). Judged (the paper): only pairs whose 0-100 scores differ by
    at least ``TRAIT_MARGIN`` count, and the trait needs ``TRAIT_MIN_PAIRS`` of them (else ``None``)."""
    from personaxis.settings import TRAIT_MARGIN, TRAIT_MIN_PAIRS

    pos_means, pos_scores, pos_keys = positive
    neg_means, neg_scores, neg_keys = negative
    neg_row = {k: i for i, k in enumerate(neg_keys)}
    pairs = [(i, neg_row[k]) for i, k in enumerate(pos_keys) if k in neg_row]
    details: dict[str, Any] = {"n_pairs": len(pairs)}
    if judged:
        kept = [
            (i, j)
            for i, j in pairs
            if pos_scores[i] is not None and neg_scores[j] is not None and pos_scores[i] - neg_scores[j] >= TRAIT_MARGIN
        ]
        details.update(n_pairs_kept=len(kept), margin=TRAIT_MARGIN, min_pairs=TRAIT_MIN_PAIRS)
        if len(kept) < TRAIT_MIN_PAIRS:
            return None, details
        rows_pos = torch.tensor([i for i, _ in kept])
        rows_neg = torch.tensor([j for _, j in kept])
        return pos_means[rows_pos].mean(0) - neg_means[rows_neg].mean(0), details
    if len(pos_means) == 0 or len(neg_means) == 0:
        return None, details
    return pos_means.mean(0) - neg_means.mean(0), details


def _recipe_groups(
    recipe: str, tensors: dict[str, Tensor], enough: bool, unjudged: bool
) -> tuple[str | None, list[str]]:
    """The group a role's axis vector comes from (or ``None``) and the groups that are its persona-space points."""
    if unjudged:
        return ("unjudged", ["unjudged"]) if enough else (None, [])
    if recipe == "paper":
        return ("fully" if "fully" in tensors else None), [g for g in ("fully", "somewhat") if g in tensors]
    if recipe == "reference":
        return ("fully", ["fully"]) if "fully" in tensors else (None, [])
    group = next((g for g in ("fully", "fully+somewhat") if g in tensors), None)
    return group, [group] if group else []


def recipe_counts(roles: list[dict[str, Any]]) -> dict[str, Any]:
    """How the recipe treated the roles: kept, in the axis, fell back to pooled scores, dropped; space points."""
    kept = [r for r in roles if r["vector_source"] != "dropped"]
    return {
        "n_roles_kept": len(kept),
        "n_roles_in_axis": sum(1 for r in roles if r.get("axis_vector")),
        "n_roles_fell_back": sum(1 for r in roles if r["vector_source"] == "fully+somewhat"),
        "n_roles_dropped": len(roles) - len(kept),
        "n_space_vectors": sum(len(r.get("space_vectors", [])) for r in roles),
        "sources": dict(Counter(r["vector_source"] for r in roles)),
    }


def _group_tensor(tensors: dict[str, Tensor], group: str) -> Tensor:
    return tensors["all" if group == "unjudged" else group]


def load_role_vectors(pipeline: Pipeline) -> tuple[list[dict[str, Any]], Tensor]:
    """The index entries of the roles in the axis and their axis vectors ``[n_roles, L, H]``."""
    root = pipeline.store.root / "vectors"
    index = read_json(root / "index.json")
    kept = [r for r in index["roles"] if r.get("axis_vector")]
    vectors = [load_tensors(root / "roles" / f"{slug(r['name'])}.safetensors")["used"] for r in kept]
    recipe = index.get("recipe", "pooled")
    if len(vectors) < 2:
        raise TooFewRolesError(
            f"only {len(vectors)} role(s) have at least {index['min_count']} rollouts the judge scored as role play "
            f"(recipe {recipe!r}); lower --min-count, add prompts or questions, "
            + ("use --vectors pooled, " if recipe != "pooled" else "")
            + "or use --judge none"
        )
    return kept, torch.stack(vectors)


def load_space_points(pipeline: Pipeline) -> tuple[list[dict[str, Any]], Tensor]:
    """The persona space's points — one per role and score group the recipe keeps (``group`` says which) — and
    their vectors ``[n_points, L, H]``."""
    root = pipeline.store.root / "vectors"
    index = read_json(root / "index.json")
    points: list[dict[str, Any]] = []
    vectors: list[Tensor] = []
    for role in index["roles"]:
        if not role.get("space_vectors"):
            continue
        tensors = load_tensors(root / "roles" / f"{slug(role['name'])}.safetensors")
        for group in role["space_vectors"]:
            points.append({**role, "group": group})
            vectors.append(_group_tensor(tensors, group))
    if len(vectors) < 2:
        raise TooFewRolesError(f"the persona space needs at least 2 role vectors, the run has {len(vectors)}")
    return points, torch.stack(vectors)


def compute_axis(pipeline: Pipeline) -> Axis:
    root = pipeline.store.root
    kept, role_vectors = load_role_vectors(pipeline)
    default = load_tensors(root / "vectors" / "default.safetensors")["vector"]
    norms: Tensor | None = load_tensors(root / "vectors" / "residual_norms.safetensors")["norms"]
    if norms is not None and not (torch.isfinite(norms).all() and (norms > 0).all()):
        norms = None  # not measured (a run imported from the reference's outputs, which keep none)
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
            "n_roles_fell_back": index["n_roles_fell_back"],
            "vector_recipe": index["recipe"],
            "role_vector_sources": index["sources"],
            "default_rollouts": index["default"]["n_rollouts"],
            "formula": "default - mean(role vectors)",
            **({} if norms is not None else {"residual_norms": "not measured"}),
        },
    )
    axis.save(root / "axis.safetensors")
    return axis
