"""Role, default and trait vectors from rollout means and judge scores, and the Assistant Axis from them.

Tensors in, tensors out: reading and writing a run's files is :mod:`personaxis.derive`'s job (with the I/O layer).

Per role, rollouts are grouped by judge score: ``fully`` (3) and ``somewhat`` (2); a group becomes a vector when it
has at least ``min_count`` rollouts. Which vectors stand for the role is the run's recipe (``settings.vectors``):

- ``reference``: the ``fully`` vector, else the role is dropped (the reference implementation);
- ``paper``: the ``fully`` and the ``somewhat`` vectors, each a point of the persona space; the axis from the
  ``fully`` ones (the paper);
- ``pooled``: the ``fully`` vector, else ``fully+somewhat`` (score >= 2: the role *fell back*), else dropped.

With no judge (``--judge none``) every rollout counts (``unjudged``). What each role used is recorded in
the run's vector index: ``axis_vector`` (the group in the axis, or null), ``space_vectors`` (the groups that are
points of the persona space) and ``vector_source`` (the axis group, ``space only`` or ``dropped``).

    axis[l] = default[l] − mean over the roles' axis vectors of role_vector[l]

Trait vectors are mean(positive) − mean(negative) answers; when the run judges traits (:mod:`personaxis.judges.traits`)
only the pairs whose scores differ by at least the margin count, and a trait needs enough of them.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import Tensor


class TooFewRolesError(ValueError):
    """Too few roles have vectors under the run's recipe to make an axis or a persona space."""


SCORE_GROUPS = {"fully": (3,), "somewhat": (2,), "fully+somewhat": (2, 3)}
# Judged trait vectors (the paper): a positive and a negative answer to one question under one instruction pair count
# when the trait judge's 0-100 scores differ by at least TRAIT_MARGIN; a trait needs TRAIT_MIN_PAIRS kept pairs.
TRAIT_MARGIN = 50
TRAIT_MIN_PAIRS = 10


def role_vector_groups(
    means: Tensor, scores: list[int | None], *, min_count: int, recipe: str, unjudged: bool
) -> tuple[dict[str, Tensor], str | None, list[str], Counter[int | str]]:
    """A role's vectors from its rollout means ``[n, L, H]`` and judge scores: ``all`` (every rollout), one per score
    group with at least ``min_count`` rollouts, and ``used`` (the group in the axis, when the recipe keeps one).
    Returns them with the axis group (or ``None``), the persona-space groups and the count of each score."""
    counts = Counter("unjudged" if s is None else int(s) for s in scores)
    tensors: dict[str, Tensor] = {}
    if len(means):
        tensors["all"] = means.mean(0)
    for group, allowed in SCORE_GROUPS.items():
        selected = torch.tensor([s in allowed for s in scores], dtype=torch.bool)
        if int(selected.sum()) >= min_count:
            tensors[group] = means[selected].mean(0)
    axis_group, space_groups = recipe_groups(recipe, tensors, len(means) >= min_count, unjudged)
    if axis_group is not None:
        tensors["used"] = tensors["all" if axis_group == "unjudged" else axis_group].clone()
    return tensors, axis_group, space_groups, counts


def axis_vectors(default: Tensor, role_vectors: Tensor) -> Tensor:
    """``default[l] − mean over roles of role_vectors[:, l]``: the Assistant Axis ``[L, H]`` from the default vector
    ``[L, H]`` and the roles' axis vectors ``[n_roles, L, H]``."""
    return default - role_vectors.mean(0)


def trait_vector(
    positive: tuple[Tensor, list[int | None], list[str]],
    negative: tuple[Tensor, list[int | None], list[str]],
    *,
    judged: bool,
) -> tuple[Tensor | None, dict[str, Any]]:
    """mean(positive answers) − mean(negative answers). Judged (the paper): only pairs whose 0-100 scores differ by
    at least ``TRAIT_MARGIN`` count, and the trait needs ``TRAIT_MIN_PAIRS`` of them (else ``None``)."""
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


def recipe_groups(
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


def group_tensor(tensors: dict[str, Tensor], group: str) -> Tensor:
    """The vector of a score group in a role's tensors (``unjudged``: every rollout's)."""
    return tensors["all" if group == "unjudged" else group]
