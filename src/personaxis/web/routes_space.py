"""The persona-space page's API: the run's summary (PCA per layer, roles in PC1–PC3) and one role's details."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from personaxis.web import schemas
from personaxis.web.state import WebState, get_state

router = APIRouter(prefix="/api", tags=["persona space"])


@router.get(
    "/space",
    response_model=schemas.SpaceResponse,
    responses=schemas.ERROR_RESPONSES,
    summary="Roles in PC1–PC3 at the target layer, variance explained and cos(PC1, axis) per layer",
)
def space(state: WebState = Depends(get_state)) -> dict[str, Any]:
    summary = state.run.require_summary()
    roles = [r for r in summary["roles"] if isinstance(r.get("pc"), list) and r.get("projection") is not None]
    return {
        "model": summary.get("model", state.model_id),
        "n_layers": summary.get("n_layers", len(summary.get("layers", []))),
        "target_layer": summary.get("target_layer", state.service.axis.target_layer),
        "layers": [
            {k: layer.get(k) for k in ("layer", "cos_pc1_axis", "pc1_explained_variance", "explained_variance")}
            for layer in summary.get("layers", [])
        ],
        "roles": roles,
        "default_projection": summary.get("default_projection"),
        "default_position": summary.get("default_position") or {},
        "target": summary.get("target") or {},
    }


@router.get(
    "/roles/{name}",
    response_model=schemas.RoleDetail,
    responses=schemas.ERROR_RESPONSES,
    summary="A role's system prompts and sample answers from the run",
)
def role(name: str, state: WebState = Depends(get_state)) -> dict[str, Any]:
    return state.run.role_detail(name)
