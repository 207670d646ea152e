"""The persona catalogue: roles, default prompts, extraction questions, traits and evaluation prompts.

Everything loads through one typed schema (pydantic), from the package data or from a user folder. A folder in the
reference layout (``<role>.json`` files holding ``{"instruction": [{"pos": ...}], "eval_prompt": ..., "questions":
[...]}`` plus ``default.json``, and a JSONL of ``{"question", "id"}``) loads too, and so does the reference's whole
``data/`` folder as published (:func:`reference_data_paths`): ``roles/instructions/*.json``,
``extraction_questions.jsonl`` and ``traits/instructions/*.json`` (``{"instruction": [{"pos", "neg"}], ...}``).
A reference role keeps its ``eval_prompt`` (a judge prompt with ``{question}`` and ``{answer}`` placeholders) as
given; an empty system prompt in the reference ``default.json`` means "no system prompt" and is kept as ``None``. Bad files raise
:class:`CatalogueError` naming the file, the entry and what is wrong; nothing is skipped silently.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DATA_VERSION = "1"
ROLE_CATEGORIES = (
    "assistant_like",
    "human_roles",
    "temperaments",
    "performers_artists",
    "fantastical_spiritual",
    "nonhuman_collective",
)


class CatalogueError(ValueError):
    """A catalogue file is missing or malformed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _non_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


class Role(_Strict):
    name: str = Field(min_length=1)
    description: str = ""
    category: str = "custom"
    system_prompts: tuple[str, ...] = Field(min_length=1)
    rubric: str = ""
    questions: tuple[str, ...] = ()
    # The reference's judge prompt, with {question} and {answer} placeholders (reference-layout roles only).
    eval_prompt: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _non_blank(value).strip()

    @field_validator("system_prompts")
    @classmethod
    def _prompts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for i, prompt in enumerate(value):
            if len(prompt.split()) < 3:
                raise ValueError(f"system prompt {i} is empty or too short: {prompt!r}")
        if len(set(value)) != len(value):
            raise ValueError("system prompts repeat")
        return value


class DefaultCondition(_Strict):
    """The default condition's system prompts; ``None`` means no system prompt at all (the reference's ``""``)."""

    description: str = ""
    system_prompts: tuple[str | None, ...] = Field(min_length=1)

    def filled(self, model_name: str) -> list[str | None]:
        return [None if p is None else p.replace("{model_name}", model_name) for p in self.system_prompts]


class Question(_Strict):
    id: int
    question: str
    kind: str = "task"
    elicits_persona: bool = False

    @field_validator("question")
    @classmethod
    def _question(cls, value: str) -> str:
        return _non_blank(value)


class TraitPair(_Strict):
    pos: str
    neg: str

    @field_validator("pos", "neg")
    @classmethod
    def _prompt(cls, value: str) -> str:
        return _non_blank(value)


class Trait(_Strict):
    name: str
    description: str = ""
    category: str = "custom"
    opposite: str = ""
    pairs: tuple[TraitPair, ...] = Field(min_length=1)
    rubric: str = ""
    # The reference's 0-100 judge prompt, with {question} and {answer} placeholders (reference-layout traits only).
    eval_prompt: str = ""


class SusceptibilityRole(_Strict):
    name: str
    description: str = ""
    system_prompts: tuple[str, ...] = Field(min_length=1)


class Jailbreak(_Strict):
    id: str
    category: str
    persona_prompt: str
    request: str


class DriftConversation(_Strict):
    persona: int
    topic: int
    user_turns: tuple[str, ...] = Field(min_length=1)


class DriftDomain(_Strict):
    description: str = ""
    user_personas: tuple[str, ...]
    topics: tuple[str, ...]
    conversations: tuple[DriftConversation, ...]


class ArithmeticItem(_Strict):
    id: str
    question: str
    answer: int


class InstructionItem(_Strict):
    id: str
    prompt: str
    check: dict[str, Any]


class CapabilitySet(_Strict):
    arithmetic: tuple[ArithmeticItem, ...]
    instructions: tuple[InstructionItem, ...]


M = TypeVar("M", bound=BaseModel)


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CatalogueError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise CatalogueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise CatalogueError(f"{path}: file is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CatalogueError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise CatalogueError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise CatalogueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise CatalogueError(f"{path}: line {number}: invalid JSON: {exc.msg}") from None
    if not rows:
        raise CatalogueError(f"{path}: file is empty")
    return rows


def _validate(model: type[M], raw: Any, where: str) -> M:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'entry'}: {e['msg']}" for e in exc.errors())
        raise CatalogueError(f"{where}: {problems}") from None


def _entry_name(raw: Any, index: int) -> str:
    name = raw.get("name") if isinstance(raw, dict) else None
    return f"entry {index}" + (f" ({name!r})" if isinstance(name, str) else "")


def package_data_dir() -> Path:
    return Path(str(resources.files("personaxis") / "data"))


def _check_unique(names: Iterable[str], what: str, where: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise CatalogueError(f"{where}: duplicate {what} name {name!r}")
        seen.add(name)


# ---------------------------------------------------------------------------------------------------------- roles


def _is_reference_role(raw: Any) -> bool:
    return isinstance(raw, dict) and "instruction" in raw


def _eval_prompt(raw: dict[str, Any], where: str) -> str:
    """A reference file's judge prompt, checked to fill as the reference fills it (``str.format`` with ``question``
    and ``answer``)."""
    eval_prompt = raw.get("eval_prompt", "")
    if not isinstance(eval_prompt, str):
        raise CatalogueError(f"{where}: 'eval_prompt' must be a string")
    if eval_prompt:
        try:
            eval_prompt.format(question="", answer="")
        except (KeyError, IndexError, ValueError) as exc:
            raise CatalogueError(
                f"{where}: 'eval_prompt' cannot be filled with {{question}} and {{answer}}: {exc!r}"
            ) from None
    return eval_prompt


def _reference_role(raw: dict[str, Any], name: str, where: str, description: str = "") -> Role:
    instructions = raw.get("instruction")
    if not isinstance(instructions, list) or not instructions:
        raise CatalogueError(f"{where}: 'instruction' must be a non-empty list of {{'pos': ...}} objects")
    prompts = []
    for i, item in enumerate(instructions):
        if not isinstance(item, dict) or not isinstance(item.get("pos"), str):
            raise CatalogueError(f"{where}: instruction {i} has no 'pos' text")
        prompts.append(item["pos"])
    questions = raw.get("questions") or []
    if not isinstance(questions, list) or not all(isinstance(q, str) for q in questions):
        raise CatalogueError(f"{where}: 'questions' must be a list of strings")
    eval_prompt = _eval_prompt(raw, where)
    return _validate(
        Role,
        {
            "name": name,
            "category": "custom",
            "system_prompts": prompts,
            "rubric": eval_prompt,
            "questions": questions,
            "eval_prompt": eval_prompt,
            "description": description,
        },
        where,
    )


def _reference_descriptions(path: Path) -> dict[str, str]:
    """``{name: description}`` from the reference's ``role_list.json`` / ``trait_list.json`` beside a folder, if any."""
    if not path.is_file():
        return {}
    raw = _read_json(path)
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise CatalogueError(f"{path}: expected an object of {{name: description}} strings")
    return raw


def _roles_from_folder(folder: Path) -> list[Role]:
    if not folder.is_dir():
        raise CatalogueError(f"{folder}: roles folder not found")
    files = sorted(p for p in folder.glob("*.json") if p.stem != "default")
    if not files:
        raise CatalogueError(f"{folder}: no role files (*.json) found")
    roles: list[Role] = []
    origin: dict[str, str] = {}
    descriptions = _reference_descriptions(folder.parent / "role_list.json")
    for path in files:
        raw = _read_json(path)
        if _is_reference_role(raw):
            found = [(str(path), _reference_role(raw, path.stem, str(path), descriptions.get(path.stem, "")))]
        elif isinstance(raw, list):
            found = [
                (f"{path}: {_entry_name(e, i)}", _validate(Role, e, f"{path}: {_entry_name(e, i)}"))
                for i, e in enumerate(raw)
            ]
        elif isinstance(raw, dict):
            found = [(str(path), _validate(Role, raw, str(path)))]
        else:
            raise CatalogueError(f"{path}: expected a role object or a list of roles, got {type(raw).__name__}")
        for where, role in found:
            if role.name in origin:
                raise CatalogueError(f"{where}: duplicate role name {role.name!r} (first in {origin[role.name]})")
            origin[role.name] = where
            roles.append(role)
    return roles


@cache
def _package_roles() -> tuple[Role, ...]:
    return tuple(_roles_from_folder(package_data_dir() / "roles"))


def load_roles(
    folder: str | Path | None = None,
    *,
    names: Sequence[str] | None = None,
    categories: Sequence[str] | None = None,
    limit: int | None = None,
) -> list[Role]:
    """Roles from the package catalogue or ``folder``; filter by names, categories and count.

    With ``limit``, roles are taken round-robin across categories so small presets still span the persona space.
    """
    roles = list(_package_roles()) if folder is None else _roles_from_folder(Path(folder))
    if names is not None:
        known = {r.name: r for r in roles}
        missing = [n for n in names if n not in known]
        if missing:
            raise CatalogueError(f"unknown role(s): {', '.join(missing)}")
        roles = [known[n] for n in names]
    if categories is not None:
        present = {r.category for r in roles}
        unknown = [c for c in categories if c not in present]
        if unknown:
            raise CatalogueError(f"unknown role categories: {', '.join(unknown)} (known: {', '.join(sorted(present))})")
        roles = [r for r in roles if r.category in categories]
    if limit is not None:
        if limit < 1:
            raise CatalogueError(f"role limit must be at least 1, got {limit}")
        by_category: dict[str, list[Role]] = {}
        for role in roles:
            by_category.setdefault(role.category, []).append(role)
        picked: list[Role] = []
        queues = list(by_category.values())
        while len(picked) < limit and any(queues):
            for queue in queues:
                if queue and len(picked) < limit:
                    picked.append(queue.pop(0))
        roles = picked
    return roles


def load_default(folder: str | Path | None = None) -> DefaultCondition:
    """The default condition's system prompts (package data, or ``default.json`` of a reference folder)."""
    if folder is None:
        path = package_data_dir() / "default.json"
    else:
        path = Path(folder) / "default.json"
        if not path.exists():
            return load_default()
    raw = _read_json(path)
    if _is_reference_role(raw):
        return _reference_default(raw, str(path))
    return _validate(DefaultCondition, raw, str(path))


def _reference_default(raw: dict[str, Any], where: str) -> DefaultCondition:
    """The reference ``default.json``: its prompts as given, an empty one meaning no system prompt (``None``)."""
    instructions = raw.get("instruction")
    if not isinstance(instructions, list) or not instructions:
        raise CatalogueError(f"{where}: 'instruction' must be a non-empty list of {{'pos': ...}} objects")
    prompts: list[str | None] = []
    for i, item in enumerate(instructions):
        if not isinstance(item, dict) or not isinstance(item.get("pos"), str):
            raise CatalogueError(f"{where}: instruction {i} has no 'pos' text")
        prompts.append(item["pos"] if item["pos"].strip() else None)
    if len(set(prompts)) != len(prompts):
        raise CatalogueError(f"{where}: system prompts repeat")
    return DefaultCondition(description="default condition from a reference folder", system_prompts=tuple(prompts))


# ------------------------------------------------------------------------------------------- the reference's data/


class DataPaths(BaseModel):
    """Where a data folder in the reference's published layout keeps roles, questions and traits."""

    model_config = ConfigDict(frozen=True)
    roles_dir: str
    questions_path: str
    traits_dir: str | None = None


def reference_data_paths(folder: str | Path) -> DataPaths:
    """The parts of the reference's ``data/`` folder: ``roles/instructions/`` (with ``default.json``),
    ``extraction_questions.jsonl`` and, where present, ``traits/instructions/``."""
    root = Path(folder)
    if not root.is_dir():
        raise CatalogueError(f"{root}: data folder not found")
    roles = root / "roles" / "instructions"
    questions = root / "extraction_questions.jsonl"
    traits = root / "traits" / "instructions"
    if not roles.is_dir():
        raise CatalogueError(f"{root}: no roles/instructions/ folder (the reference's data layout)")
    if not questions.is_file():
        raise CatalogueError(f"{root}: no extraction_questions.jsonl (the reference's data layout)")
    return DataPaths(
        roles_dir=str(roles),
        questions_path=str(questions),
        traits_dir=str(traits) if traits.is_dir() and any(traits.glob("*.json")) else None,
    )


# ------------------------------------------------------------------------------------------------------ questions


def load_questions(
    path: str | Path | None = None,
    *,
    persona_only: bool = False,
    kinds: Sequence[str] | None = None,
    limit: int | None = None,
) -> list[Question]:
    """Extraction questions (package JSONL or a user JSONL of ``{"question", "id"}``)."""
    source = Path(path) if path is not None else package_data_dir() / "questions.jsonl"
    questions = [_validate(Question, raw, f"{source}: line {n}") for n, raw in _read_jsonl(source)]
    ids = [q.id for q in questions]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise CatalogueError(f"{source}: duplicate question id {dup}")
    if persona_only:
        questions = [q for q in questions if q.elicits_persona]
    if kinds is not None:
        questions = [q for q in questions if q.kind in kinds]
    if limit is not None:
        questions = questions[:limit]
    if not questions:
        raise CatalogueError(f"{source}: no questions left after filtering")
    return questions


# ---------------------------------------------------------------------------------------------------- traits, evals


def _load_list(path: Path, model: type[M]) -> list[M]:
    raw = _read_json(path)
    if not isinstance(raw, list):
        raise CatalogueError(f"{path}: expected a JSON list")
    return [_validate(model, entry, f"{path}: {_entry_name(entry, i)}") for i, entry in enumerate(raw)]


def _reference_trait(raw: dict[str, Any], name: str, where: str, description: str = "") -> Trait:
    """A reference trait file: ``{"instruction": [{"pos", "neg"}], "eval_prompt": ..., "questions": [...]}``."""
    instructions = raw.get("instruction")
    if not isinstance(instructions, list) or not instructions:
        raise CatalogueError(f"{where}: 'instruction' must be a non-empty list of {{'pos': ..., 'neg': ...}} objects")
    eval_prompt = _eval_prompt(raw, where)
    return _validate(
        Trait,
        {
            "name": name,
            "description": description,
            "pairs": instructions,
            "rubric": eval_prompt,
            "eval_prompt": eval_prompt,
        },
        where,
    )


def load_traits(
    folder: str | Path | None = None, *, names: Sequence[str] | None = None, limit: int | None = None
) -> list[Trait]:
    """Traits from the package catalogue or ``folder`` (lists of our traits, or the reference's one file per trait)."""
    source = Path(folder) if folder is not None else package_data_dir() / "traits"
    files = sorted(source.glob("*.json"))
    if not files:
        raise CatalogueError(f"{source}: no trait files found")
    descriptions = _reference_descriptions(source.parent / "trait_list.json") if folder is not None else {}
    traits: list[Trait] = []
    for path in files:
        raw = _read_json(path)
        if _is_reference_role(raw):
            traits.append(_reference_trait(raw, path.stem, str(path), descriptions.get(path.stem, "")))
        else:
            traits.extend(_load_list(path, Trait))
    _check_unique((t.name for t in traits), "trait", str(source))
    if names is not None:
        known = {t.name: t for t in traits}
        missing = [n for n in names if n not in known]
        if missing:
            raise CatalogueError(f"unknown trait(s): {', '.join(missing)}")
        traits = [known[n] for n in names]
    return traits[:limit] if limit is not None else traits


def _eval_path(name: str) -> Path:
    return package_data_dir() / "eval" / name


def load_identity_questions() -> list[str]:
    raw = _read_json(_eval_path("identity.json"))
    questions = raw.get("questions") if isinstance(raw, dict) else None
    if not isinstance(questions, list) or not all(isinstance(q, str) and q.strip() for q in questions):
        raise CatalogueError(f"{_eval_path('identity.json')}: 'questions' must be a list of non-empty strings")
    return questions


def load_susceptibility_roles() -> list[SusceptibilityRole]:
    return _load_list(_eval_path("susceptibility_roles.json"), SusceptibilityRole)


def load_jailbreaks(categories: Sequence[str] | None = None, limit: int | None = None) -> list[Jailbreak]:
    items = _load_list(_eval_path("jailbreaks.json"), Jailbreak)
    if categories is not None:
        items = [j for j in items if j.category in categories]
    return items[:limit] if limit is not None else items


def load_drift_domains() -> dict[str, DriftDomain]:
    path = _eval_path("drift.json")
    raw = _read_json(path)
    domains = raw.get("domains") if isinstance(raw, dict) else None
    if not isinstance(domains, dict) or not domains:
        raise CatalogueError(f"{path}: expected an object with 'domains'")
    out = {name: _validate(DriftDomain, value, f"{path}: domain {name!r}") for name, value in domains.items()}
    for name, domain in out.items():
        for i, conv in enumerate(domain.conversations):
            if not (0 <= conv.persona < len(domain.user_personas) and 0 <= conv.topic < len(domain.topics)):
                raise CatalogueError(f"{path}: domain {name!r} conversation {i}: persona or topic index out of range")
    return out


def load_capability_set() -> CapabilitySet:
    path = _eval_path("capability.json")
    return _validate(CapabilitySet, _read_json(path), str(path))
