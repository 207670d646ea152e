"""Typed records of a run directory's JSON files (pydantic), read and written through one place.

Field order is file order: :func:`personaxis.store.write_record` writes a record exactly as the files have always been written
(``json.dumps(indent=1, ensure_ascii=False)`` plus a newline), so runs stay byte-identical across versions.
:func:`personaxis.store.read_record` validates what it reads; a file that does not fit its record is reported as damaged.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, PrivateAttr, model_validator

Score = int | float | None


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to disk (fields in declaration order; optional fields left unset omitted)."""
        return self.model_dump(mode="json", exclude_unset=True)


class _OpenRecord(_Record):
    """A record whose files may carry fields of other versions: they are kept and written back after the known ones."""

    model_config = ConfigDict(extra="allow")


class ManifestRecord(_OpenRecord):
    """``manifest.json``: the settings a run was started with."""

    format: str = "personaxis.run/1"
    settings: dict[str, Any] = {}
    conditions: list[str] = []
    questions: list[int | str] = []
    created: str = ""


class Rollout(_OpenRecord):
    id: str
    question_id: int | str | None = None
    question: str
    answer: str
    new_tokens: int | None = None
    stopped: bool | None = None  # ended on an end-of-turn token (False: cut at max_new_tokens)


class RolloutsRecord(_OpenRecord):
    """``rollouts/<condition>/p<k>.json``: one unit's questions and answers."""

    condition: str
    kind: str
    prompt_index: int
    system_prompt: str | None
    rollouts: list[Rollout]


class JudgmentsRecord(_Record):
    """``judgments/<condition>/p<k>.json``: the judge and its score per rollout id (``None``: not scored)."""

    judge: str
    scores: dict[str, Score]


class VectorIndexRole(_OpenRecord):
    name: str
    category: str
    n_rollouts: int
    judge_counts: dict[str, int]
    vector_source: str
    axis_vector: str | None
    space_vectors: list[str]
    vectors: list[str]


class VectorIndex(_OpenRecord):
    """``vectors/index.json``: the vector recipe and what each role and trait used."""

    recipe: str
    min_count: int
    roles: list[VectorIndexRole]
    traits: list[str]
    default: dict[str, int] = {}
    trait_details: dict[str, dict[str, Any]] = {}
    traits_dropped: list[str] = []
    n_roles_kept: int = 0
    n_roles_in_axis: int = 0
    n_roles_fell_back: int = 0
    n_roles_dropped: int = 0
    n_space_vectors: int = 0
    sources: dict[str, int] = {}


class LayerStats(_Record):
    layer: int
    cos_pc1_axis: float
    pc1_explained_variance: float
    explained_variance: list[float]
    components_for_70: int
    components_for_80: int
    components_for_90: int


class SummaryRole(VectorIndexRole):
    """A point of the persona space: a role (with ``--vectors paper``, a role and score ``group``)."""

    group: str | None = None
    projection: float
    pc: list[float]


class SummaryRecord(_OpenRecord):
    """``summary.json``: the persona space of a run."""

    model: str
    n_layers: int
    hidden_size: int
    target_layer: int
    layers: list[LayerStats]
    roles: list[SummaryRole]
    default_projection: float
    default_position: dict[str, Any]
    target: dict[str, float]
    vector_recipe: str = "pooled"
    dropped_roles: list[VectorIndexRole] = []
    role_vector_sources: dict[str, int] = {}
    n_roles_kept: int = 0
    n_roles_in_axis: int = 0
    n_roles_fell_back: int = 0
    n_roles_dropped: int = 0
    n_space_vectors: int = 0
    min_count: int = 0
    default_rollouts: int = 0
    traits: list[str] = []
    trait_space: dict[str, Any] | None = None
    settings: dict[str, Any] = {}


class EvaluationRecord(_OpenRecord):
    """``OUT/<eval>.json`` of an evaluation: provenance, settings, raw labelled items and metrics. An evaluation's own
    top-level fields (``extra``) sit between ``sizes`` and ``metrics``; a record read from a file is written back in
    that file's order."""

    _order: list[str] = PrivateAttr(default_factory=list)

    format: str
    eval: str
    created: str
    git: dict[str, Any]
    model: dict[str, Any] | None
    axis: dict[str, Any] | None = None
    judge: str | None = None
    settings: Any = None
    sizes: dict[str, Any] = {}
    metrics: dict[str, Any]
    items: list[Any]

    @model_validator(mode="wrap")
    @classmethod
    def _keep_order(cls, data: Any, handler: Any) -> EvaluationRecord:
        record = handler(data)
        if isinstance(data, dict):
            record._order = list(data)
        return record

    def to_json(self) -> dict[str, Any]:
        data = super().to_json()
        if self._order:
            return {**{k: data.pop(k) for k in self._order if k in data}, **data}
        last = {key: data.pop(key) for key in ("metrics", "items") if key in data}
        return {**data, **last}


Record = _Record
RecordT = TypeVar("RecordT", bound=_Record)
