"""Run settings and presets, and the conditions (roles, default, traits) a run generates for."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from personaxis.data import DATA_VERSION, Question, load_default, load_questions, load_roles, load_traits

# 31 roles spanning the persona space from clearly assistant-like professions to clearly non-assistant beings,
# with a few human roles and temperaments between them.
QUICK_ROLES = (
    "analyst", "librarian", "consultant", "tutor", "reviewer", "accountant", "researcher", "editor", "translator",
    "parent", "exile", "smuggler", "detective", "cynic", "optimist", "zealot",
    "bard", "jester", "poet", "playwright", "novelist", "comedian",
    "ghost", "oracle", "demon", "angel", "guru", "witch", "golem", "coral reef", "leviathan",
)
# The former quick preset's roles (kept by the quick-openings preset).
OPENINGS_ROLES = (
    "analyst", "librarian", "consultant", "tutor", "reviewer", "accountant", "researcher", "editor", "translator",
    "parent", "exile", "gambler", "sailor", "cynic", "optimist", "zealot",
    "bard", "jester", "poet", "playwright", "opera singer", "mime",
    "ghost", "oracle", "demon", "angel", "guru", "wizard", "hive mind", "coral reef", "leviathan",
)
# Questions every role answers on the same topic: three explanations (search engines, compound interest, inflation),
# two on principles and one request for help (ids in data/questions.jsonl). Chosen by how well each one alone lines
# PC1 up with the axis (explanations and principles best, opinions about people worst); the 6 were picked from 8
# on the same run, so the figures below are in-sample (results/catalogue_comparison.md).
QUICK_QUESTION_IDS = (264, 54, 244, 263, 232, 267)

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's method at CPU scale: whole answers (64 new tokens, every answer token averaged) to questions whose
    # topic is the same for every role, so that what differs between role vectors is how much each answer plays its
    # role. cos(PC1, axis) 0.81 at layer 15 (0.76-0.93 every third layer), the default beyond every role along PC1
    # (results/catalogue_comparison.md). Questions about the speaker ("Tell me about yourself") make each role talk
    # about its own world instead, and that topic spreads the roles over many directions (0.61 with 64 tokens).
    # No judge: in whole answers to such questions SmolLM2-135M plays a role in its tone more than in what it says,
    # which the offline judge does not see (it scores most answers 1, keeps 11-28 of 31 roles, cos falls to 0.03-0.34).
    "quick": dict(
        n_roles=31, prompts_per_role=2, n_questions=6, persona_questions_only=False, n_traits=4, pairs_per_trait=1,
        max_new_tokens=64, min_count=3, role_names=QUICK_ROLES, question_ids=QUICK_QUESTION_IDS, judge="none",
    ),
    # The former quick preset: the first 8 tokens of answers to 12 self-descriptive questions. In SmolLM2-135M who
    # is speaking shows in the opening of such an answer ("As an AI…", "I am a ghost…") and the later tokens add each
    # role's own topic (cos(PC1, axis) at layer 15: 0.71 with 8 tokens, 0.53 with 64). The offline judge sees little.
    "quick-openings": dict(
        n_roles=31, prompts_per_role=5, n_questions=12, persona_questions_only=True, n_traits=4, pairs_per_trait=1,
        max_new_tokens=8, min_count=3, role_names=OPENINGS_ROLES,
        question_ids=(178, 179, 180, 182, 192, 219, 181, 183, 184, 187, 198, 215),
    ),
    # The paper's scale: every role, 5 prompts, 240 questions (for GPUs).
    "paper": dict(
        n_roles=None, prompts_per_role=5, n_questions=240, persona_questions_only=False, n_traits=240,
        pairs_per_trait=5, max_new_tokens=512, min_count=10,
    ),
    # For tests and smoke runs.
    "tiny": dict(
        n_roles=4, prompts_per_role=1, n_questions=2, persona_questions_only=True, n_traits=1, pairs_per_trait=1,
        max_new_tokens=12, min_count=1,
    ),
}


@dataclass(frozen=True)
class RunSettings:
    model: str = "embedded"
    preset: str = "quick"
    n_roles: int | None = 31
    role_names: tuple[str, ...] | None = None
    prompts_per_role: int = 2
    n_questions: int = 6
    persona_questions_only: bool = True
    question_ids: tuple[int, ...] | None = None
    n_traits: int = 4
    pairs_per_trait: int = 1
    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0
    judge: str = "offline"
    min_count: int = 3
    target_layer: int | None = None
    roles_dir: str | None = None
    questions_path: str | None = None
    store_dtype: str = "float32"
    data_version: str = DATA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> RunSettings:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        values = {**PRESETS[preset], **given}
        # The preset's own role list gives way to the user's choice of roles: named roles set the count, a
        # roles folder or a count beyond the list draws from the whole catalogue (or folder).
        if "role_names" in given and "n_roles" not in given:
            values["n_roles"] = len(given["role_names"])
        elif "role_names" not in given and PRESETS[preset].get("role_names") is not None:
            names = PRESETS[preset]["role_names"]
            if "roles_dir" in given or given.get("n_roles", 0) > len(names):
                values["role_names"] = None
        settings = cls(preset=preset, **values)
        settings.validate()
        return settings

    def validate(self) -> None:
        for name in ("prompts_per_role", "n_questions", "max_new_tokens", "min_count", "pairs_per_trait"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.n_roles is not None and self.n_roles < 2:
            raise ValueError(f"a persona space needs at least 2 roles, got {self.n_roles}")
        if self.n_traits < 0:
            raise ValueError(f"traits must be >= 0, got {self.n_traits}")
        if self.prompts_per_role > 5 or self.pairs_per_trait > 5:
            raise ValueError("the catalogue has 5 system prompts per role and 5 pairs per trait")
        if self.store_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"store dtype must be float32, float16 or bfloat16, got {self.store_dtype!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")

    def to_manifest(self) -> dict[str, Any]:
        data = asdict(self)
        data["role_names"] = list(self.role_names) if self.role_names is not None else None
        data["question_ids"] = list(self.question_ids) if self.question_ids is not None else None
        return data

    @classmethod
    def from_manifest(cls, data: dict[str, Any]) -> RunSettings:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for key in ("role_names", "question_ids"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)

    def with_(self, **changes: Any) -> RunSettings:
        return replace(self, **changes)


@dataclass(frozen=True)
class Condition:
    """One thing the model is prompted as: a role, the default, or one side of a trait."""

    name: str
    kind: str  # "role", "default", "trait_pos", "trait_neg"
    system_prompts: tuple[str, ...]
    category: str = ""
    rubric: str = ""
    trait: str | None = None

    @property
    def judged(self) -> bool:
        return self.kind == "role"


def build_conditions(settings: RunSettings, model_name: str) -> list[Condition]:
    roles = load_roles(settings.roles_dir, names=settings.role_names, limit=settings.n_roles)
    if len(roles) < 2:
        raise ValueError(f"a persona space needs at least 2 roles; the selection has {len(roles)}")
    conditions = [
        Condition(
            name=role.name, kind="role", system_prompts=tuple(role.system_prompts[: settings.prompts_per_role]),
            category=role.category, rubric=role.rubric,
        )
        for role in roles
    ]
    default = load_default(settings.roles_dir)
    conditions.append(Condition(name="default", kind="default", system_prompts=tuple(default.filled(model_name)), category="default"))
    if settings.n_traits:
        for trait in load_traits(limit=settings.n_traits):
            pairs = trait.pairs[: settings.pairs_per_trait]
            conditions.append(Condition(f"trait-{trait.name}-pos", "trait_pos", tuple(p.pos for p in pairs), trait.category, trait=trait.name))
            conditions.append(Condition(f"trait-{trait.name}-neg", "trait_neg", tuple(p.neg for p in pairs), trait.category, trait=trait.name))
    names = [c.name for c in conditions]
    if len(set(names)) != len(names):
        raise ValueError("role names collide with the reserved names 'default' or 'trait-…'")
    return conditions


def build_questions(settings: RunSettings) -> list[Question]:
    if settings.question_ids is not None and settings.questions_path is None:
        by_id = {q.id: q for q in load_questions()}
        missing = [i for i in settings.question_ids if i not in by_id]
        if missing:
            raise ValueError(f"unknown question id(s): {missing}")
        picked = [by_id[i] for i in settings.question_ids][: settings.n_questions]
        if len(picked) < settings.n_questions:  # top up with persona questions
            extra = [q for q in load_questions(persona_only=True) if q.id not in settings.question_ids]
            picked += extra[: settings.n_questions - len(picked)]
        return picked
    return load_questions(settings.questions_path, persona_only=settings.persona_questions_only and settings.questions_path is None,
                          limit=settings.n_questions)
