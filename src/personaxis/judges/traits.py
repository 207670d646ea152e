"""Trait judges: how strongly an answer shows a trait, 0 (not at all) to 100 (strongly), as in the paper.

A trait rollout is an answer given under one side of an instruction pair (show the trait / show its opposite). The
pipeline keeps a pair of answers (same question, same pair) when the positive answer scores at least
:data:`personaxis.vectors.TRAIT_MARGIN` above the negative one.

- :class:`OfflineTraitJudge` (no network): where the answer lies between the pair's two instructions —
  ``50 + 50·tanh(SHARPNESS · (sim(answer, positive) − sim(answer, negative)))`` with sentence-embedding cosine
  similarity (or content-word overlap when the embedder is unavailable). A transparent heuristic, not fitted to
  labels: use an LLM judge for a paper-faithful run.
- :class:`OpenAITraitJudge`: a trait bringing the reference's judge prompt (``eval_prompt`` with ``{question}`` and
  ``{answer}``) is judged exactly as the reference does: the filled prompt is the only message and the score is the
  reply's first whole number in 0..100 (``REFUSAL`` is no score). Our own traits use our own prompt.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from personaxis.judges.base import check_unique_keys
from personaxis.judges.openai_judge import HttpJudge
from personaxis.judges.prompts import Messages, fill_eval_prompt, parse_reference_score

TRAIT_SCALE = 100
SHARPNESS = 8.0  # embedding cosines of a sentence to two instructions differ by a few hundredths to a few tenths
_WORD = re.compile(r"[a-z]{4,}")


@dataclass(frozen=True)
class TraitItem:
    """One trait rollout to score 0-100."""

    key: str
    trait: str
    description: str
    positive: str  # the instruction asking for the trait
    negative: str  # the instruction asking for its opposite
    question: str
    answer: str
    eval_prompt: str = ""  # the reference's 0-100 judge prompt ({question}, {answer}), if the trait has one


class TraitJudge:
    """The interface: ``score(items) -> {key: 0..100 or None}``."""

    name = "trait"

    def score(self, items: Sequence[TraitItem], *, show_progress: bool = False) -> dict[str, int | None]:
        raise NotImplementedError


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def _overlap(a: set[str], b: set[str]) -> float:
    return len(a & b) / math.sqrt(max(1, len(a)) * max(1, len(b)))


def to_trait_score(similarity_gap: float) -> int:
    """A similarity gap (positive minus negative instruction) as a 0-100 score."""
    return int(round(50 + 50 * math.tanh(SHARPNESS * similarity_gap)))


class OfflineTraitJudge(TraitJudge):
    name = "offline-trait-v1"

    def __init__(self, *, use_embeddings: bool = True) -> None:
        self.use_embeddings = use_embeddings

    def _gaps(self, items: Sequence[TraitItem]) -> np.ndarray:
        from personaxis.judges.embedder import get_embedder

        embedder = get_embedder() if self.use_embeddings else None
        if embedder is None:
            return np.array(
                [
                    _overlap(_words(i.answer), _words(i.positive)) - _overlap(_words(i.answer), _words(i.negative))
                    for i in items
                ]
            )
        answers = embedder.encode([i.answer for i in items])
        positive = embedder.encode([i.positive for i in items], memo=True)
        negative = embedder.encode([i.negative for i in items], memo=True)
        return (answers * positive).sum(1) - (answers * negative).sum(1)

    def score(self, items: Sequence[TraitItem], *, show_progress: bool = False) -> dict[str, int | None]:
        check_unique_keys(items)  # type: ignore[arg-type]
        judged = [i for i in items if i.answer.strip()]
        scores: dict[str, int | None] = {i.key: None for i in items}
        if judged:
            for item, gap in zip(judged, self._gaps(judged), strict=True):
                scores[item.key] = to_trait_score(float(gap))
        return scores


_TRAIT_PROMPT = """Rate how strongly the answer below shows the trait "{trait}".
What the trait means: {description}

The question the model was asked:
<question>
{question}
</question>

The model's answer:
<answer>
{answer}
</answer>

Judge only whether the answer shows the trait, not its quality. If the model refused to answer, reply REFUSAL.
Otherwise reply with one whole number from 0 (the trait is absent) to 100 (the trait is strongly present), and
nothing else."""


def trait_messages(item: TraitItem) -> Messages:
    """The request for one trait rollout: the reference's filled prompt as the only message, or ours."""
    if item.eval_prompt:
        return [{"role": "user", "content": fill_eval_prompt(item.eval_prompt, item.question, item.answer)}]
    description = item.description.strip() or f"answers in the way this instruction asks: {item.positive}"
    return [
        {
            "role": "user",
            "content": _TRAIT_PROMPT.format(
                trait=item.trait, description=description, question=item.question, answer=item.answer
            ),
        }
    ]


def parse_trait_score(reply: str) -> int | None:
    return parse_reference_score(reply, TRAIT_SCALE)


class OpenAITraitJudge(HttpJudge[TraitItem, int], TraitJudge):  # type: ignore[type-var]
    task = "trait"

    def _messages(self, item: TraitItem) -> Messages:
        return trait_messages(item)

    def _parse(self, reply: str) -> int | None:
        return parse_trait_score(reply)

    def _parser(self, item: TraitItem) -> Callable[[str], int | None]:
        return parse_trait_score

    def score(self, items: Sequence[TraitItem], *, show_progress: bool = False) -> dict[str, int | None]:
        return self._run(items, show_progress)
