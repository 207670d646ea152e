"""Traits as the paper: 0-100 trait judges, pairs kept by margin, trait vectors ranked along the axis."""

from __future__ import annotations

import pytest
import torch
from test_judges_http import FAST, SECRET, serve  # noqa: F401  (fixture)

from personaxis.axis import Axis
from personaxis.judges import make_trait_judge
from personaxis.judges.traits import OfflineTraitJudge, TraitItem, parse_trait_score, to_trait_score, trait_messages
from personaxis.traits import rank_traits
from personaxis.vectors import TRAIT_MARGIN, TRAIT_MIN_PAIRS, trait_vector


def _side(values: list[float], scores: list[int | None]) -> tuple[torch.Tensor, list[int | None], list[str]]:
    means = torch.tensor(values, dtype=torch.float32).reshape(-1, 1, 1)
    return means, scores, [f"p0/q{i}" for i in range(len(values))]


def test_pairs_kept_by_margin_and_count():
    n = TRAIT_MIN_PAIRS + 2
    pos_scores = [90] * n
    neg_scores = [90 - TRAIT_MARGIN] * (n - 2) + [90 - TRAIT_MARGIN + 1, None]  # the last two pairs fall short
    vector, details = trait_vector(
        _side([1.0] * (n - 2) + [100.0, 100.0], pos_scores), _side([0.0] * n, neg_scores), judged=True
    )
    assert details == {"n_pairs": n, "n_pairs_kept": n - 2, "margin": TRAIT_MARGIN, "min_pairs": TRAIT_MIN_PAIRS}
    assert vector is not None and float(vector) == 1.0  # the two outlying positive answers were not kept
    fewer = trait_vector(_side([1.0] * 3, [90] * 3), _side([0.0] * 3, [0] * 3), judged=True)
    assert fewer[0] is None and fewer[1]["n_pairs_kept"] == 3
    unjudged, _ = trait_vector(_side([1.0, 3.0], [None, None]), _side([0.0, 0.0], [None, None]), judged=False)
    assert float(unjudged) == 2.0


def test_traits_ranked_along_the_axis():
    hidden = 6
    direction = torch.zeros(2, hidden)
    direction[:, 0] = 1.0
    axis = Axis(direction, model="m", target_layer=1)
    vectors = torch.zeros(3, 2, hidden)
    vectors[0, 1, 0], vectors[0, 1, 1] = 2.0, 1.0  # mostly along the axis: the Assistant end
    vectors[1, 1, 0], vectors[1, 1, 2] = -3.0, 1.0  # against it: the far end
    vectors[2, 1, 3] = 1.0  # orthogonal
    ranked = rank_traits(["measured", "theatrical", "other"], vectors, axis, details={"measured": {"n_pairs_kept": 12}})
    assert [t["name"] for t in ranked["traits"]] == ["measured", "other", "theatrical"]
    assert ranked["assistant_end"] == ["measured"] and ranked["far_end"] == ["theatrical"]
    assert ranked["traits"][0]["n_pairs_kept"] == 12
    assert ranked["traits"][0]["cos_axis"] == pytest.approx(2 / 5**0.5, abs=1e-6)
    assert ranked["pca"] is not None and len(ranked["traits"][0]["pc"]) == 3


def _item(key: str, answer: str, eval_prompt: str = "") -> TraitItem:
    return TraitItem(
        key=key,
        trait="patient",
        description="takes time and stays calm",
        positive="Answer slowly and patiently, taking your time with every careful detail.",
        negative="Answer hastily and impatiently, rushing and skipping every detail.",
        question="How do I learn piano?",
        answer=answer,
        eval_prompt=eval_prompt,
    )


def test_offline_trait_judge_scores_toward_the_side_the_answer_follows():
    judge = OfflineTraitJudge(use_embeddings=False)
    scores = judge.score(
        [
            _item("a", "Take your time, slowly and patiently, every careful detail matters."),
            _item("b", "Rushing is fine, skipping every detail, hastily."),
            _item("c", "   "),
        ]
    )
    assert scores["a"] > 50 > scores["b"] and scores["c"] is None
    assert to_trait_score(0.0) == 50 and 0 <= to_trait_score(-5) <= to_trait_score(5) <= 100
    assert make_trait_judge("offline").name == "offline-trait-v1"


def test_llm_trait_judge_prompt_and_parse(serve, tmp_path):  # noqa: F811
    template = "TRAIT patient? <<{question}>> <<{answer}>> 0-100 or REFUSAL"
    reference = trait_messages(_item("x", "Slowly.", eval_prompt=template))
    assert reference == [
        {"role": "user", "content": "TRAIT patient? <<How do I learn piano?>> <<Slowly.>> 0-100 or REFUSAL"}
    ]
    ours = trait_messages(_item("y", "Slowly."))
    assert len(ours) == 1 and "patient" in ours[0]["content"] and "Slowly." in ours[0]["content"]
    assert parse_trait_score("85") == 85 and parse_trait_score("REFUSAL") is None and parse_trait_score("150") is None
    fake = serve(reply="72")
    judge = make_trait_judge(
        "openai:m", base_url=fake.base_url, api_key=SECRET, cache_dir=tmp_path, requests_per_minute=None, **FAST
    )
    assert judge.score([_item("ITEMz", "Slowly ITEMz.", eval_prompt=template)]) == {"ITEMz": 72}


@pytest.mark.slow
def test_offline_trait_judge_with_sentence_embeddings():
    judge = OfflineTraitJudge()
    scores = judge.score(
        [
            _item("a", "There is no hurry. Practise a little each day, slowly and patiently, and be kind to yourself."),
            _item("b", "Just hurry up and skip the boring parts, rush through it fast."),
        ]
    )
    assert scores["a"] > scores["b"]
