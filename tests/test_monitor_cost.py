"""Monitoring long transcripts costs what the transcript holds: planning is linear in the number of messages (each
candidate slice rendered once, bounded by the context) and the default chunked windows project at most about twice
the conversation's tokens, every turn with at least the longest history that fits in half the context, and its exact
projection for the history it saw."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from personaxis import monitor
from personaxis.activations import extract_turn_means
from personaxis.axis import Axis
from personaxis.chat import render_chat
from personaxis.monitor import monitor_conversation, plan_windows


def _axis(lm) -> Axis:
    g = torch.Generator().manual_seed(0)
    return Axis(torch.randn(lm.profile.n_layers, lm.profile.hidden_size, generator=g), model=lm.profile.name)


def _conversation(n_turns: int, system: str | None = "You are a pirate.") -> list[dict[str, str]]:
    conv = [{"role": "system", "content": system}] if system else []
    for i in range(n_turns):
        conv.append({"role": "user", "content": f"Question {i}: who are you?" + " Why?" * (i % 4)})
        conv.append({"role": "assistant", "content": f"Answer {i}: arr, matey! " * (1 + i % 3)})
    return conv


def _with_context(lm, limit: int):
    return dataclasses.replace(lm, profile=dataclasses.replace(lm.profile, max_context=limit))


@pytest.mark.parametrize("mode", ["chunked", "longest"])
def test_planning_renders_a_bounded_number_of_slices_per_message(tiny_llama, monkeypatch, mode):
    """Each message costs a few slice renders whatever the conversation's length (linear planning)."""
    lm = _with_context(tiny_llama, 200)
    counts = {}
    for n_turns in (20, 80):
        calls = []
        original = monitor._response_end

        def counting(*args, original=original, calls=calls, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        monkeypatch.setattr(monitor, "_response_end", counting)
        conv = _conversation(n_turns)
        windows = plan_windows(lm, conv, mode=mode)
        monkeypatch.undo()
        assert sorted(t for w in windows for t in w.turns) == list(range(n_turns))
        counts[n_turns] = len(calls)
        assert len(calls) <= 3 * len(conv) + 5, (n_turns, len(calls))
    assert counts[80] <= 4.5 * counts[20]  # linear: four times the messages, about four times the renders


@pytest.mark.parametrize("system", ["You are a pirate.", None])
def test_chunked_windows_project_each_turn_exactly_with_at_least_half_a_context(tiny_llama, system):
    limit = 200
    lm = _with_context(tiny_llama, limit)
    axis = _axis(lm)
    conv = _conversation(40, system=system)
    windows = plan_windows(lm, conv)
    whole = render_chat(lm.tokenizer, conv, lm.profile)
    total = whole.spans[-1].end
    projected = sum(len(w.rendered.input_ids) for w in windows)
    assert all(len(w.rendered.input_ids) <= limit for w in windows)
    assert projected <= 2 * total + limit  # cost proportional to the transcript
    longest = plan_windows(lm, conv, mode="longest")
    assert projected < sum(len(w.rendered.input_ids) for w in longest)  # and less than the exact longest histories
    rows = monitor_conversation(lm, axis, conv, layers=[1, 3])
    assert [r.turn for r in rows] == list(range(40))
    first = 1 if system else 0
    for row in rows:
        window = next(w for w in windows if row.turn in w.turns)
        history = (conv[:first] if not window.system_dropped else []) + conv[window.start : row.message_index + 1]
        assert row.context_tokens == render_chat(lm.tokenizer, history, lm.profile).spans[-1].end
        if row.truncated and not window.clipped:  # at least the longest history that fits in half the context
            prefix = conv[:first] if not window.system_dropped else []
            longer = prefix + conv[window.start - 2 : row.message_index + 1]
            assert render_chat(lm.tokenizer, longer, lm.profile).spans[-1].end > limit // 2, row
    for row in rows[::7]:  # exact: the projection equals the turn's own pass over the history it saw
        window = next(w for w in windows if row.turn in w.turns)
        history = (conv[:first] if not window.system_dropped else []) + conv[window.start : row.message_index + 1]
        acts = extract_turn_means(lm, [history], layers=[1, 3])[0]
        expected = (acts.means[-1] * axis.unit()[[1, 3]]).sum(-1)
        torch.testing.assert_close(
            torch.tensor([row.projections[1], row.projections[3]]), expected, atol=1e-5, rtol=1e-4
        )


def test_short_conversations_are_one_window_in_both_modes(tiny_llama):
    conv = _conversation(3)
    for mode in ("chunked", "longest"):
        (window,) = plan_windows(tiny_llama, conv, mode=mode)
        assert window.turns == [0, 1, 2] and window.dropped == 0
