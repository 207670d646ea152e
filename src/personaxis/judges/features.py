"""The offline role-adherence judge's features: a handful of transparent numbers per (role, question, answer).

Lexical: AI self-reference, refusal, first- and second-person rates, helpful-assistant form, role-play form
(stage directions, dialect, personal memories), the role's distinctive words (from its name, description, rubric
signs and system prompts) used in the answer but not in the question, the answer naming itself as the role or as
something else, and a first-person or human-life voice from a non-human role. Embedding (optional): the answer's
best similarity to the role's description and system prompts, how specific that similarity is among all catalogue
roles (a z-score), and its similarity to assistant-like minus character-like prototypes.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from personaxis.judges import lexicon as lx
from personaxis.judges.base import DEFAULT_ROLE, JudgeItem
from personaxis.judges.catalogue import RoleInfo, catalogue_roles, role_info
from personaxis.judges.embedder import Embedder

LEXICAL_FEATURES = (
    "ai_self",
    "refusal",
    "first_person",
    "second_person",
    "assistant_style",
    "roleplay_markers",
    "role_words",
    "self_as_role",
    "self_as_other",
    "voice_nonhuman",
    "human_life_nonhuman",
)
EMBEDDING_FEATURES = ("emb_role", "role_specificity", "emb_assistant_vs_character")

ASSISTANT_PROTOTYPES = (
    "As an AI language model, I don't have personal experiences, but I can help you with that.",
    "Here are some tips that can help you: first, consider your goals, then make a plan and stick to it.",
    "This is a complex question with many perspectives. On the one hand, some argue it is beneficial; on the other "
    "hand, there are risks.",
    "The process works in several steps: it involves a number of factors that scientists have studied in detail.",
    "I'm a helpful AI assistant. How can I help you today?",
)
CHARACTER_PROTOTYPES = (
    "I remember the day I left my village; my mother cried and my father said nothing at all.",
    "Ah, traveler, sit by the fire and I will tell you of my long years on the road.",
    "I have lived here for centuries, watching the seasons turn and the people come and go.",
    "My hands are rough from years of hard work, and every scar tells a story of my life.",
    "We are many, and we have always been here, since long before you came.",
)

HUMAN_LIFE = re.compile(
    r"\b(?:i grew up|i was born|as a grown-up|my (?:parents|mother|father|mom|dad|brother|sister|wife|husband|kids|"
    r"children|family|friends?|job|boss|career|office|house|apartment|car|school|college|team|clients?|colleagues)|"
    r"when i was (?:a )?(?:young|little|kid|child|boy|girl|teenager)|i was an? (?:young |little )?(?:\w+ )?(?:boy|girl|"
    r"man|woman|kid|child|student|scientist|engineer|guard|cop|driver|teacher|doctor|nurse|individual|person)|"
    r"(?:young|little) (?:boy|girl|man|woman)|years old|day of work|i've got a)\b",
    re.IGNORECASE,
)
# "I am a X" / "I was a X" / "I used to be a X": the answer names who is speaking.
SELF_ID = re.compile(
    r"\b(?:i am|i'm|i was|i've been|i have been|i used to be)\s+(?:not\s+)?(?:just\s+|only\s+|simply\s+|also\s+)?"
    r"(?:a|an|the)\s+([a-z' -]{2,60}?)(?=[,.;:!?\n]|\s+(?:who|and|that|with|of|in|at|for|but|from|to)\b|$)",
    re.IGNORECASE,
)
_SELF_GENERIC = ("bit", "lot", "fan", "part", "kind", "sort", "believer", "mix", "little")


def role_text(info: RoleInfo) -> str:
    """The role's description as one sentence (the default condition: a generic character)."""
    if info.name == DEFAULT_ROLE:
        return " ".join(CHARACTER_PROTOTYPES)
    return f"I am the {info.name}. {info.description} {info.signs}".strip()


def role_texts(info: RoleInfo) -> list[str]:
    """Texts the answer may resemble when it plays the role: the description and each system prompt."""
    return [role_text(info), *info.prompts]


def role_stems(info: RoleInfo) -> set[str]:
    if info.name == DEFAULT_ROLE:
        return set()
    return {lx.stem(w) for w in lx.content_words(" ".join([info.name, info.description, info.signs, *info.prompts]))}


@lru_cache(maxsize=1)
def _stem_document_frequency() -> tuple[dict[str, int], int]:
    roles = catalogue_roles()
    df: Counter[str] = Counter()
    for info in roles:
        df.update(role_stems(info))
    return dict(df), len(roles)


def distinctive_stems(info: RoleInfo) -> set[str]:
    """The role's stems that few other catalogue roles share (drops "answer", "voice", "life" ...)."""
    df, n_roles = _stem_document_frequency()
    limit = max(3, int(0.03 * n_roles))
    return {s for s in role_stems(info) if df.get(s, 0) <= limit}


def self_identification(answer: str, info: RoleInfo) -> tuple[int, int]:
    """How often the answer names itself as the role, and as something else ("I'm a librarian" from an old library)."""
    stems = role_stems(info) | {lx.stem(w) for w in lx.words(info.name)}
    as_role = as_other = 0
    for match in SELF_ID.finditer(answer):
        phrase = match.group(1).lower()
        if any(phrase.startswith(g) or g in phrase.split() for g in _SELF_GENERIC):
            continue
        named = {lx.stem(w) for w in lx.content_words(phrase)}
        if not named:
            continue
        if named & stems:
            as_role += 1
        else:
            as_other += 1
    return as_role, as_other


def lexical_features(item: JudgeItem, info: RoleInfo) -> dict[str, float]:
    answer = item.answer or ""
    tokens = lx.words(answer)
    n = max(1, len(tokens))
    question_stems = {lx.stem(w) for w in lx.content_words(item.question)}
    answer_stems = {lx.stem(w) for w in lx.content_words(answer)}
    shared = (distinctive_stems(info) & answer_stems) - question_stems
    first_person = min(2.0, 10.0 * sum(1 for t in tokens if lx.FIRST_PERSON.fullmatch(t)) / n)
    as_role, as_other = self_identification(answer, info) if info.name != DEFAULT_ROLE else (0, 0)
    return {
        "ai_self": float(lx.count(lx.AI_SELF, answer) > 0),
        "refusal": float(lx.count(lx.REFUSAL, answer) > 0),
        "first_person": first_person,
        "second_person": min(2.0, 10.0 * sum(1 for t in tokens if lx.SECOND_PERSON.fullmatch(t)) / n),
        "assistant_style": min(4, lx.count(lx.ASSISTANT_STYLE, answer)) / 4.0,
        "roleplay_markers": min(4, lx.count(lx.ROLEPLAY_MARKERS, answer)) / 4.0,
        "role_words": min(4, len(shared)) / 4.0,
        "self_as_role": min(2, as_role) / 2.0,
        "self_as_other": min(2, as_other) / 2.0,
        "voice_nonhuman": float(info.nonhuman) * min(1.5, first_person),
        "human_life_nonhuman": float(info.nonhuman) * min(3, lx.count(HUMAN_LIFE, answer)) / 3.0,
    }


def feature_matrix(items: Sequence[JudgeItem], embedder: Embedder | None) -> tuple[np.ndarray, tuple[str, ...]]:
    """Features of every item, ``[n_items, n_features]``, and their names (embedding ones only with an embedder)."""
    infos = [role_info(item.role, item.rubric) for item in items]
    rows = [lexical_features(item, info) for item, info in zip(items, infos, strict=True)]
    lexical = np.array([[row[name] for name in LEXICAL_FEATURES] for row in rows], dtype=np.float32)
    lexical = lexical.reshape(len(items), len(LEXICAL_FEATURES))
    if embedder is None:
        return lexical, LEXICAL_FEATURES
    answers = embedder.encode([item.answer or "" for item in items])
    assistant = embedder.encode(list(ASSISTANT_PROTOTYPES), memo=True).mean(axis=0)
    character = embedder.encode(list(CHARACTER_PROTOTYPES), memo=True).mean(axis=0)
    reference = embedder.encode([role_text(info) for info in catalogue_roles()], memo=True)
    emb_role = np.zeros(len(items), dtype=np.float32)
    specificity = np.zeros(len(items), dtype=np.float32)
    for i, (vector, info) in enumerate(zip(answers, infos, strict=True)):
        texts = role_texts(info)
        emb_role[i] = float(np.max(embedder.encode(texts, memo=True) @ vector))
        if info.name != DEFAULT_ROLE and len(reference) > 1:
            own = float(embedder.encode([texts[0]], memo=True)[0] @ vector)
            sims = reference @ vector
            specificity[i] = (own - float(sims.mean())) / max(1e-6, float(sims.std()))
    emb_axis = answers @ assistant - answers @ character
    embedded = np.stack([emb_role, specificity / 4.0, emb_axis], axis=1).astype(np.float32)
    return np.concatenate([lexical, embedded], axis=1), LEXICAL_FEATURES + EMBEDDING_FEATURES
