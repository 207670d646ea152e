"""Run settings and presets, and the conditions (roles, default, traits) a run generates for."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from personaxis.data import (
    DATA_VERSION,
    Question,
    load_default,
    load_questions,
    load_roles,
    load_traits,
    reference_data_paths,
)
from personaxis.io.run_layout import check_folder_names, check_role_name

# How role vectors are made from judged rollouts (``--vectors``), and the fewest rollouts each recipe's vectors need
# unless ``--min-count`` says otherwise:
# - reference: the reference implementation's: fully played (score 3) rollouts only, at least 50, else the role is dropped;
# - paper: the paper's: fully (3) and somewhat (2) role-playing vectors kept separately, at least 10 rollouts each,
#   both points of the persona space; the axis from the fully role-playing ones;
# - pooled: fully played if there are enough, else score 2 and 3 pooled, else dropped (for small runs).
VECTOR_RECIPES = ("reference", "paper", "pooled")
RECIPE_MIN_COUNT = {"reference": 50, "paper": 10}
# Traits as the paper (``--judge-traits``, on in the paper preset): see personaxis.vectors.TRAIT_MARGIN.

# 31 roles spanning the persona space from clearly assistant-like professions to clearly non-assistant beings,
# with a few human roles and temperaments between them.
QUICK_ROLES = (
    "analyst",
    "librarian",
    "consultant",
    "tutor",
    "reviewer",
    "accountant",
    "researcher",
    "editor",
    "translator",
    "parent",
    "exile",
    "smuggler",
    "detective",
    "cynic",
    "optimist",
    "zealot",
    "bard",
    "jester",
    "poet",
    "playwright",
    "novelist",
    "comedian",
    "ghost",
    "oracle",
    "demon",
    "angel",
    "guru",
    "witch",
    "golem",
    "coral reef",
    "leviathan",
)
# The former quick preset's roles (kept by the quick-openings preset).
OPENINGS_ROLES = (
    "analyst",
    "librarian",
    "consultant",
    "tutor",
    "reviewer",
    "accountant",
    "researcher",
    "editor",
    "translator",
    "parent",
    "exile",
    "gambler",
    "sailor",
    "cynic",
    "optimist",
    "zealot",
    "bard",
    "jester",
    "poet",
    "playwright",
    "opera singer",
    "mime",
    "ghost",
    "oracle",
    "demon",
    "angel",
    "guru",
    "wizard",
    "hive mind",
    "coral reef",
    "leviathan",
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
        n_roles=31,
        prompts_per_role=2,
        n_questions=6,
        persona_questions_only=False,
        n_traits=4,
        pairs_per_trait=1,
        max_new_tokens=64,
        min_count=3,
        role_names=QUICK_ROLES,
        question_ids=QUICK_QUESTION_IDS,
        judge="none",
        vectors="reference",  # the recipe of a judged rerun (`--judge offline`); with no judge every rollout counts
    ),
    # The former quick preset: the first 8 tokens of answers to 12 self-descriptive questions. In SmolLM2-135M who
    # is speaking shows in the opening of such an answer ("As an AI…", "I am a ghost…") and the later tokens add each
    # role's own topic (cos(PC1, axis) at layer 15: 0.71 with 8 tokens, 0.53 with 64). The offline judge sees little.
    "quick-openings": dict(
        n_roles=31,
        prompts_per_role=5,
        n_questions=12,
        persona_questions_only=True,
        n_traits=4,
        pairs_per_trait=1,
        max_new_tokens=8,
        min_count=3,
        role_names=OPENINGS_ROLES,
        question_ids=(178, 179, 180, 182, 192, 219, 181, 183, 184, 187, 198, 215),
        # The reference's rule (fully played rollouts only) at this preset's scale: at least 3 of a role's 60. Every
        # role of the preset has them (20-55 each), so no role falls back and the results are those of the pooled
        # recipe of earlier versions; the reference's own count, 50, would keep 2 of the 31 roles.
        vectors="reference",
    ),
    # The paper's scale and the reference's recipe: every role, 5 prompts, 240 questions, sampled at temperature
    # 0.7 and top-p 0.9, answers up to 512 tokens, role vectors from at least 50 fully played rollouts (for GPUs).
    "paper": dict(
        n_roles=None,
        prompts_per_role=5,
        n_questions=240,
        persona_questions_only=False,
        n_traits=240,
        pairs_per_trait=5,
        max_new_tokens=512,
        min_count=50,
        vectors="reference",
        temperature=0.7,
        top_p=0.9,
        judge_traits=True,
    ),
    # For tests and smoke runs (pooled: a handful of rollouts per role).
    "tiny": dict(
        n_roles=4,
        prompts_per_role=1,
        n_questions=2,
        persona_questions_only=True,
        n_traits=1,
        pairs_per_trait=1,
        max_new_tokens=12,
        min_count=1,
        vectors="pooled",
    ),
}


@dataclass(frozen=True)
class RunSettings:
    """What a run generates and how: recorded in the run's manifest, so a resumed run uses the same settings.

    Attributes:
        model: the model (``"embedded"``, a Hugging Face id or a folder).
        preset: the preset the settings came from (``"quick"``, ``"paper"``, ...).
        n_roles: how many roles of the catalogue (or of ``roles_dir``); ``None`` for all.
        role_names: the roles by name, or ``None``.
        prompts_per_role: system prompts per role and condition (1-5).
        n_questions: questions each system prompt is asked.
        persona_questions_only: draw the questions from the persona questions of the catalogue only.
        question_ids: the questions by id (topped up with persona questions to ``n_questions``), or ``None``.
        n_traits: how many traits get positive/negative vectors (0 for none).
        pairs_per_trait: system prompt pairs per trait (1-5).
        max_new_tokens: the longest answer, in tokens.
        temperature: sampling temperature (0: greedy).
        top_p: nucleus sampling mass, in ``(0, 1]``.
        seed: the sampling seed.
        judge: the role-adherence judge: ``"offline"``, ``"openai:MODEL"`` or ``"none"``.
        min_count: the fewest judged rollouts a role vector needs.
        vectors: the role vector recipe: ``"reference"``, ``"paper"`` or ``"pooled"``.
        judge_traits: judge trait rollouts 0-100 and keep only clear pairs (the paper's traits).
        target_layer: the axis' default layer (zero-based block index), or ``None`` for ``n_layers // 2``.
        roles_dir: a folder of role definitions replacing the catalogue's, or ``None``.
        questions_path: a questions file replacing the catalogue's, or ``None``.
        traits_dir: a folder of trait definitions replacing the catalogue's, or ``None``.
        store_dtype: the dtype activation means are stored in (``"float32"``, ``"float16"`` or ``"bfloat16"``).
        data_version: the version of the packaged role, question and trait catalogue.
        extra: other recorded options (backend, batch size, an imported run's description, ...).
    """

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
    top_p: float = 1.0
    seed: int = 0
    judge: str = "offline"
    min_count: int = 3
    vectors: str = "pooled"
    judge_traits: bool = False
    target_layer: int | None = None
    roles_dir: str | None = None
    questions_path: str | None = None
    traits_dir: str | None = None
    store_dtype: str = "float32"
    data_version: str = DATA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> RunSettings:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        data_dir = given.pop("data_dir", None)
        if data_dir is not None:  # the reference's data/ folder as published
            if "roles_dir" in given or "questions_path" in given:
                raise ValueError("--data names the roles and questions: leave out --roles-dir and --questions-file")
            paths = reference_data_paths(data_dir)
            given.update(roles_dir=paths.roles_dir, questions_path=paths.questions_path)
            if paths.traits_dir is not None:
                given["traits_dir"] = paths.traits_dir
            given.setdefault("persona_questions_only", False)
        values = {**PRESETS[preset], **given}
        if "vectors" in given and "min_count" not in given and given["vectors"] in RECIPE_MIN_COUNT:
            values["min_count"] = RECIPE_MIN_COUNT[given["vectors"]]
        if preset == "paper" and "judge" not in given and not _is_embedded(str(values.get("model", "embedded"))):
            raise ValueError(
                "the offline judge was fitted on answers of the embedded model (SmolLM2-135M) only: for --preset paper "
                "on another model pass --judge openai:MODEL (the reference's LLM judge), or --judge offline to use it anyway"
            )
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
        from personaxis.validate import check, check_all

        check_all(temperature=self.temperature, max_new_tokens=self.max_new_tokens, seed=self.seed)
        check("layer", self.target_layer)
        check("batch_size", self.extra.get("batch_size"))
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.vectors not in VECTOR_RECIPES:
            raise ValueError(f"unknown vector recipe {self.vectors!r}; choose one of: {', '.join(VECTOR_RECIPES)}")

    @property
    def judges_traits(self) -> bool:
        """Whether trait rollouts are judged 0-100 and only clear pairs kept (the paper's traits; paper preset)."""
        return self.judge_traits and self.judge != "none"

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
    system_prompts: tuple[str | None, ...]  # None: no system prompt at all
    category: str = ""
    rubric: str = ""
    trait: str | None = None
    eval_prompt: str = ""  # the reference's judge prompt ({question}, {answer}); empty for our own catalogue

    @property
    def judged(self) -> bool:
        return self.kind == "role"

    @property
    def is_trait(self) -> bool:
        return self.kind in ("trait_pos", "trait_neg")


_FAMILIES = ("gemma", "qwen", "llama", "mistral")


def family_name(model: str) -> str:
    """The short name the reference puts in its default prompt "You are {model_name}.": the model family (Gemma,
    Qwen, Llama, Mistral), else the first word of the model's last path component."""
    lowered = model.lower()
    for family in _FAMILIES:
        if family in lowered:
            return family.capitalize()
    return model.rstrip("/").split("/")[-1].split("-")[0] or model


def _is_embedded(model: str) -> bool:
    from personaxis.models import EMBEDDED_ALIASES

    return model.lower() in EMBEDDED_ALIASES


def _imported_conditions(layout: dict[str, Any]) -> list[Condition]:
    """The conditions of a run imported from the reference pipeline's outputs (:mod:`personaxis.reference_run`):
    its prompt texts are not part of those outputs, so units carry placeholders (they are never generated again)."""

    def prompts(n: int) -> tuple[str, ...]:
        return tuple(f"(imported system prompt {k})" for k in range(n))

    conditions = [
        Condition(name=name, kind="role", system_prompts=prompts(n), category="custom")
        for name, n in layout["roles"].items()
    ]
    conditions.append(
        Condition(name="default", kind="default", system_prompts=prompts(layout["default_prompts"]), category="default")
    )
    return conditions


def build_conditions(settings: RunSettings, model_name: str) -> list[Condition]:
    imported = settings.extra.get("imported")
    if isinstance(imported, dict):
        return _imported_conditions(imported)
    roles = load_roles(settings.roles_dir, names=settings.role_names, limit=settings.n_roles)
    if len(roles) < 2:
        raise ValueError(f"a persona space needs at least 2 roles; the selection has {len(roles)}")
    conditions = [
        Condition(
            name=role.name,
            kind="role",
            system_prompts=tuple(role.system_prompts[: settings.prompts_per_role]),
            category=role.category,
            rubric=role.rubric,
            eval_prompt=role.eval_prompt,
        )
        for role in roles
    ]
    default = load_default(settings.roles_dir)
    # A roles folder's default.json (the reference's) names the model as the reference does: by its family.
    filled_name = (
        family_name(model_name)
        if settings.roles_dir and (Path(settings.roles_dir) / "default.json").is_file()
        else model_name
    )
    conditions.append(
        Condition(name="default", kind="default", system_prompts=tuple(default.filled(filled_name)), category="default")
    )
    if settings.n_traits:
        for trait in load_traits(settings.traits_dir, limit=settings.n_traits):
            pairs = trait.pairs[: settings.pairs_per_trait]
            for side, prompts in (("pos", tuple(p.pos for p in pairs)), ("neg", tuple(p.neg for p in pairs))):
                conditions.append(
                    Condition(
                        f"trait-{trait.name}-{side}",
                        f"trait_{side}",
                        prompts,
                        trait.category,
                        rubric=trait.rubric or trait.description,
                        trait=trait.name,
                        eval_prompt=trait.eval_prompt,
                    )
                )
    for role in roles:
        check_role_name(role.name)
    check_folder_names([c.name for c in conditions], what="role and condition")
    return conditions


def build_questions(settings: RunSettings) -> list[Question]:
    imported = settings.extra.get("imported")
    if isinstance(imported, dict):
        return [Question(id=i, question=f"(imported question {i})") for i in imported["question_ids"]]
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
    return load_questions(
        settings.questions_path,
        persona_only=settings.persona_questions_only and settings.questions_path is None,
        limit=settings.n_questions,
    )
