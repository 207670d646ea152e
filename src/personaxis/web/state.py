"""What every route needs: the model service, the run's data and the limits (kept on ``app.state.px``)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from personaxis.web.engine import ModelService
from personaxis.web.limits import Limits
from personaxis.web.run_data import RunData


@dataclass
class WebState:
    service: ModelService
    run: RunData
    limits: Limits
    model_id: str
    created: int


def get_state(request: Request) -> WebState:
    return request.app.state.px
