"""Request and response bodies of the app's JSON API (they make the OpenAPI schema at ``/openapi.json``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from personaxis.validate import field


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(description="The message text (an empty user message is refused).")


class Treatment(BaseModel):
    cap: str | None = Field(
        None,
        description='Capping experiment id (see /api/info), "auto" for guard mode (capping '
        "only while the projection drifts below the calibrated floor), or null for no capping.",
    )
    alpha: float = field(
        "alpha", 0.0, description="Steering coefficient in units of the layer's mean residual norm (0: none)."
    )


class ChatRequest(Treatment):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "messages": [{"role": "user", "content": "Who are you?"}],
                "cap": None,
                "alpha": 0.0,
                "max_tokens": 64,
            }
        }
    )

    messages: list[Message] = Field(min_length=1, description="The conversation so far, ending with a user message.")
    max_tokens: int | None = field(
        "max_new_tokens",
        None,
        description="Longest answer, in tokens (default 128, or the server's upper limit when lower).",
    )
    temperature: float = field("temperature", 0.0, le=2.0, description="0 = greedy.")
    top_p: float = field("top_p", 1.0)
    seed: int | None = field("seed", 0, description="Seed for sampled answers.")


class ChatResponse(BaseModel):
    text: str
    prompt_tokens: int
    new_tokens: int
    stopped: bool = Field(description="True when the answer ended by itself (False: cut at max_tokens).")
    projection: float | None = Field(description="This answer's mean projection on the axis at `layer`.")
    projections: list[float | None] = Field(description="Every assistant turn of the conversation, this answer last.")
    layer: int
    cap: str | None
    alpha: float
    floor: float | None = Field(description="The calibrated floor at `layer` for the capping experiment, if any.")
    capped_tokens: int = Field(0, description="Tokens generated while a cap acted on this answer.")
    guard_switches: list[dict[str, Any]] = Field(
        default_factory=list, description="Guard mode's switches: {capping, n_tokens, projection}."
    )


class ProjectRequest(Treatment):
    messages: list[Message] = Field(min_length=1, description="A conversation with at least one assistant turn.")


class ProjectResponse(BaseModel):
    projections: list[float | None]
    layer: int
    cap: str | None
    alpha: float


class Experiment(BaseModel):
    id: str
    layers: list[int]
    floor: float | None = Field(description="Calibrated floor at the monitored layer for this experiment's percentile.")


class Reference(BaseModel):
    """Where the run's default condition and roles fall on the axis (from summary.json), to read a trajectory by."""

    default_projection: float | None = None
    role_min: float | None = None
    role_max: float | None = None
    role_min_name: str | None = None
    role_max_name: str | None = None


class LimitsInfo(BaseModel):
    max_body_bytes: int
    max_message_chars: int
    max_messages: int
    max_new_tokens: int
    max_transcripts: int
    max_request_tokens: int


class GuardInfo(BaseModel):
    experiment: str = Field(description="The capping experiment guard mode switches on.")
    threshold: float = Field(description="Capping switches on when the window's mean projection falls below this.")
    window: int = Field(description="Tokens whose mean projection guard mode watches.")
    hysteresis: float = Field(description="Capping switches off again above threshold + hysteresis.")


class InfoResponse(BaseModel):
    model: str
    n_layers: int
    hidden_size: int
    layer: int = Field(description="The monitored layer (the axis' target layer unless set).")
    steer_layer: int
    axis_model: str
    run_dir: str | None
    has_summary: bool
    experiments: list[Experiment]
    default_cap: str | None
    default_alpha: float
    raw_alpha: bool = Field(
        False,
        description="α is the reference's coefficient of the stored axis row (serve --raw), "
        "not a fraction of the residual norm.",
    )
    guard: GuardInfo | None = Field(None, description='Guard mode (`cap: "auto"`), if this server can guard.')
    floor: float | None = Field(description="The 25th-percentile floor at the monitored layer, if calibrated.")
    reference: Reference
    limits: LimitsInfo


class LayerStat(BaseModel):
    layer: int
    cos_pc1_axis: float
    pc1_explained_variance: float
    explained_variance: list[float]


class RoleStat(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    category: str = "custom"
    projection: float
    pc: list[float]
    n_rollouts: int | None = None
    vector_source: str | None = None


class SpaceResponse(BaseModel):
    model: str
    n_layers: int
    target_layer: int
    layers: list[LayerStat]
    roles: list[RoleStat]
    default_projection: float | None = None
    default_position: dict[str, Any] = Field(default_factory=dict)
    target: dict[str, Any] = Field(default_factory=dict)


class Sample(BaseModel):
    prompt_index: int
    system_prompt: str | None
    question: str
    answer: str


class RoleDetail(BaseModel):
    name: str
    category: str
    description: str
    system_prompts: list[str]
    samples: list[Sample]
    projection: float | None
    pc: list[float]


class TranscriptInfo(BaseModel):
    name: str
    messages: int
    assistant_turns: int
    meta: dict[str, Any]


class TranscriptList(BaseModel):
    transcripts: list[TranscriptInfo]
    folder: str | None


class TranscriptUpload(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    data: Any = Field(description='The transcript: {"conversation": [{"role", "content"}, ...], ...} or a list.')


class TranscriptProjectRequest(Treatment):
    transcripts: list[TranscriptUpload] = Field(min_length=1)


class TurnPoint(BaseModel):
    turn: int
    message_index: int
    projection: float
    truncated: bool
    user: str = Field(description="The user message before this turn (shortened).")
    assistant: str = Field(description="This assistant turn (shortened).")


class Trajectory(BaseModel):
    name: str
    meta: dict[str, Any]
    turns: list[TurnPoint]


class TranscriptProjectResponse(BaseModel):
    layer: int
    cap: str | None
    alpha: float
    floor: float | None
    trajectories: list[Trajectory]


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: int
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (400, "Unknown capping experiment or bad option"),
        (404, "Not found"),
        (413, "Request body too large"),
        (422, "Malformed or oversized request"),
    )
}
