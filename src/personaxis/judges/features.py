"""The offline role-adherence judge's features: a handful of transparent numbers per (role, question, answer).

Lexical: AI self-reference, refusal, first- and second-person rates, helpful-assistant form, role-play form
(stage directions, dialect, personal memories), the role's own words (name, description, rubric signs) used in the
answer but not in the question, and human-life talk from a non-human role. Embedding (optional): similarity of the
answer to the role's description, and to an assistant-like minus a character-like prototype.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from personaxis.judges import lexicon as lx
from personaxis.judges.base import DEFAULT_ROLE, JudgeItem
from personaxis.judges.catalogue import RoleInfo, role_info
from personaxis.judges.embedder import Embedder

LEXICAL_FEATURES = (
    "ai_self",
    "refusal",
    "first_person",
    "second_person",
    "assistant_style",
    "roleplay_markers",
    "role_words",
    "human_life_nonhuman",
)
EMBEDDING_FEATURES = ("emb_role", "emb_assistant_vs_character")

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
    r"\b(?:i grew up|i was born|my (?:parents|mother|father|mom|dad|brother|sister|wife|husband|kids|children|"
    r"family|job|boss|career|office|house|apartment|car|school|college)|when i was (?:a )?(?:young|little|kid|child|"
    r"boy|girl|teenager)|(?:young|little) (?:boy|girl|man|woman)|years old)\b",
    re.IGNORECASE,
)


def role_text(info: RoleInfo) -> str:
    """The text the answer is compared with: the role's name, description and rubric signs."""
    if info.name == DEFAULT_ROLE:
        return " ".join(CHARACTER_PROTOTYPES)
    return f"I am the {info.name}. {info.description} {info.signs}".strip()


def role_stems(info: RoleInfo) -> set[str]:
    if info.name == DEFAULT_ROLE:
        return set()
    return {lx.stem(w) for w in lx.content_words(f"{info.name} {info.description} {info.signs}")}


def lexical_features(item: JudgeItem, info: RoleInfo) -> dict[str, float]:
    answer = item.answer or ""
    tokens = lx.words(answer)
    n = max(1, len(tokens))
    question_stems = {lx.stem(w) for w in lx.content_words(item.question)}
    answer_stems = {lx.stem(w) for w in lx.content_words(answer)}
    shared = (role_stems(info) & answer_stems) - question_stems
    return {
        "ai_self": float(lx.count(lx.AI_SELF, answer) > 0),
        "refusal": float(lx.count(lx.REFUSAL, answer) > 0),
        "first_person": min(2.0, 10.0 * sum(1 for t in tokens if lx.FIRST_PERSON.fullmatch(t)) / n),
        "second_person": min(2.0, 10.0 * sum(1 for t in tokens if lx.SECOND_PERSON.fullmatch(t)) / n),
        "assistant_style": min(4, lx.count(lx.ASSISTANT_STYLE, answer)) / 4.0,
        "roleplay_markers": min(4, lx.count(lx.ROLEPLAY_MARKERS, answer)) / 4.0,
        "role_words": min(4, len(shared)) / 4.0,
        "human_life_nonhuman": float(info.nonhuman) * min(3, lx.count(HUMAN_LIFE, answer)) / 3.0,
    }


def feature_matrix(items: Sequence[JudgeItem], embedder: Embedder | None) -> tuple[np.ndarray, tuple[str, ...]]:
    """Features of every item, ``[n_items, n_features]``, and their names (embedding ones only with an embedder)."""
    infos = [role_info(item.role, item.rubric) for item in items]
    lexical = np.array(
        [[feats[name] for name in LEXICAL_FEATURES] for feats in (lexical_features(i, r) for i, r in zip(items, infos,
                                                                                                           strict=True))],
        dtype=np.float32,
    ).reshape(len(items), len(LEXICAL_FEATURES))
    if embedder is None:
        return lexical, LEXICAL_FEATURES
    answers = embedder.encode([item.answer or "" for item in items])
    roles = embedder.encode([role_text(info) for info in infos], memo=True)
    assistant = embedder.encode(list(ASSISTANT_PROTOTYPES), memo=True).mean(axis=0)
    character = embedder.encode(list(CHARACTER_PROTOTYPES), memo=True).mean(axis=0)
    emb_role = np.sum(answers * roles, axis=1)
    emb_axis = answers @ assistant - answers @ character
    embedded = np.stack([emb_role, emb_axis], axis=1).astype(np.float32)
    return np.concatenate([lexical, embedded], axis=1), LEXICAL_FEATURES + EMBEDDING_FEATURES
