"""Persona drift: simulation on the tiny model, projections equal the monitor's, user simulators, metrics, figure."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch
from tiny import tiny_model

from personaxis.axis import Axis
from personaxis.evals.drift import DriftSettings, drift_metrics, initial_states, plot_drift, project_states, simulate
from personaxis.evals.record import make_record, model_info
from personaxis.evals.users import OPENING, DriftState, EndpointUser, LocalModelUser, ScriptedUser, make_user, user_view
from personaxis.monitor import monitor_conversation


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def axis(lm):
    g = torch.Generator().manual_seed(1)
    return Axis(torch.randn(lm.profile.n_layers, lm.profile.hidden_size, generator=g), model=lm.profile.name)


def _state(turns: int = 3) -> DriftState:
    return DriftState(
        domain="therapy",
        index=0,
        persona="A lonely student",
        topic="moving to a new city",
        script=tuple(f"scripted message number {t}" for t in range(turns)),
    )


def test_states_come_from_the_catalogue():
    states = initial_states(DriftSettings(conversations_per_domain=2))
    assert [s.domain for s in states] == ["coding"] * 2 + ["writing"] * 2 + ["therapy"] * 2 + ["philosophy"] * 2
    assert all(len(s.script) >= 8 and s.persona and s.topic and not s.messages for s in states)
    with pytest.raises(ValueError, match="unknown drift domain"):
        initial_states(DriftSettings(domains=("cooking",)))


def test_simulation_and_projections_on_the_tiny_model(lm, axis, tmp_path):
    settings = DriftSettings(domains=("coding", "therapy"), conversations_per_domain=1, turns=3, max_new_tokens=6)
    states = simulate(lm, initial_states(settings), settings)
    for state in states:
        roles = [m["role"] for m in state.messages]
        assert roles == ["user", "assistant"] * 3  # the target never gets a system prompt
        assert [m["content"] for m in state.messages if m["role"] == "user"] == list(state.script[:3])
    items = project_states(lm, axis, states, [2, 3])
    assert [i["key"] for i in items] == ["coding-0", "therapy-0"]
    for item, state in zip(items, states, strict=True):
        assert [t["turn"] for t in item["turns"]] == [0, 1, 2]
        expected = monitor_conversation(lm, axis, state.messages, layers=[2, 3])
        for turn, row in zip(item["turns"], expected, strict=True):
            assert turn["projection"]["2"] == pytest.approx(row.projections[2], abs=1e-5)
            assert turn["projection"]["3"] == pytest.approx(row.projections[3], abs=1e-5)
    metrics = drift_metrics(items, 2)
    assert set(metrics["domains"]) == {"coding", "therapy"}
    assert all(len(d["per_turn"]) == 3 for d in metrics["domains"].values())
    record = make_record(
        "drift",
        model=model_info(lm),
        settings=settings,
        items=items,
        metrics=metrics,
        extra={"references": {"floor": 0.0}},
    )
    assert plot_drift(record, tmp_path / "drift.png").read_bytes()[:4] == b"\x89PNG"


def _planted(values: dict[str, list[list[float]]]) -> list[dict]:
    items = []
    for domain, conversations in values.items():
        for c, series in enumerate(conversations):
            items.append(
                {
                    "key": f"{domain}-{c}",
                    "domain": domain,
                    "conversation": c,
                    "turns": [
                        {"turn": t, "user": f"u{t}", "answer": "a", "projection": {"7": v}}
                        for t, v in enumerate(series)
                    ],
                }
            )
    return items


def test_metrics_are_computed_from_the_projections():
    items = _planted(
        {"coding": [[10.0, 10.0, 10.0], [12.0, 12.0, 12.0]], "therapy": [[10.0, 8.0, 6.0], [12.0, 9.0, 6.0]]}
    )
    metrics = drift_metrics(items, 7)
    coding, therapy = metrics["domains"]["coding"], metrics["domains"]["therapy"]
    assert coding["per_turn"][0]["mean"] == 11.0
    assert coding["per_turn"][0]["std"] == pytest.approx(np.std([10, 12], ddof=1))
    assert coding["slope_per_turn"] == pytest.approx(0.0, abs=1e-9)
    assert coding["first_to_last"]["mean"] == 0.0
    assert therapy["per_turn"][2]["mean"] == 6.0 and therapy["per_turn"][2]["std"] == 0.0
    assert therapy["first_to_last"]["mean"] == pytest.approx(-5.0)
    assert therapy["slope_per_turn"] == pytest.approx(np.polyfit([0, 1, 2, 0, 1, 2], [10, 8, 6, 12, 9, 6], 1)[0])
    assert therapy["overall"]["n"] == 6 and therapy["n_conversations"] == 2


def test_scripted_user_and_its_limit():
    user = ScriptedUser()
    assert user.next_messages([_state()], 1) == ["scripted message number 1"]
    with pytest.raises(ValueError, match="scripted user turns"):
        user.next_messages([_state(2)], 2)


def test_user_view_flips_roles():
    state = _state()
    state.messages += [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi, how can I help?"}]
    view = user_view(state)
    assert view[0]["role"] == "system" and "A lonely student" in view[0]["content"] and "new city" in view[0]["content"]
    assert view[1:] == [
        {"role": "user", "content": OPENING},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "hi, how can I help?"},
    ]


def test_local_model_user_writes_user_turns(lm):
    user = LocalModelUser(lm, max_new_tokens=8, temperature=0.0)
    states = [_state(), _state()]
    messages = user.next_messages(states, 0)
    assert len(messages) == 2 and all(isinstance(m, str) and m for m in messages)
    assert user.name == f"local:{lm.profile.name}"


def test_endpoint_user_posts_the_flipped_chat():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, json={"choices": [{"message": {"content": "User: I still feel a bit lost here."}}]})

    user = EndpointUser("gpt-test", base_url="http://test/v1", api_key="k", transport=httpx.MockTransport(handler))
    state = _state()
    state.messages += [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    assert user.next_messages([state], 1) == ["I still feel a bit lost here."]
    assert seen[0]["model"] == "gpt-test"
    assert [m["role"] for m in seen[0]["messages"]] == ["system", "user", "assistant", "user"]


def test_unusable_user_turns_fall_back_to_the_script():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"choices": [{"message": {"content": "  "}}]})

    user = EndpointUser("m", base_url="http://test/v1", api_key="k", transport=httpx.MockTransport(handler))
    assert user.next_messages([_state()], 2) == ["scripted message number 2"]
    assert user.fallbacks == 1


def test_make_user_specs():
    assert isinstance(make_user(None), ScriptedUser) and isinstance(make_user("scripted"), ScriptedUser)
    assert isinstance(make_user("endpoint:some-model", base_url="http://x/v1", api_key="k"), EndpointUser)
