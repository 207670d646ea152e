"""Monitoring: one pass equals per-prefix projections, windows for long conversations, inputs and outputs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from personaxis.activations import extract_turn_means
from personaxis.axis import Axis, AxisError
from personaxis.chat import render_chat
from personaxis.io.projection_files import plot_trajectories, write_table
from personaxis.monitor import (
    MonitorError,
    load_transcript,
    load_transcripts,
    monitor_conversation,
    monitor_transcripts,
    plan_windows,
    transcript_from_data,
)


def _axis(lm, seed: int = 0) -> Axis:
    g = torch.Generator().manual_seed(seed)
    return Axis(torch.randn(lm.profile.n_layers, lm.profile.hidden_size, generator=g), model=lm.profile.name)


def _conversation(n_turns: int, system: str | None = "You are a pirate.") -> list[dict[str, str]]:
    conv = [{"role": "system", "content": system}] if system else []
    for i in range(n_turns):
        conv.append({"role": "user", "content": f"Question {i}: who are you, and what do you fear?"})
        conv.append(
            {"role": "assistant", "content": f"Answer {i}: arr, I am the ghost of the sea, matey! " * (1 + i % 3)}
        )
    return conv


def _exact(lm, axis, messages, layers):
    """Projection of the last assistant turn of ``messages``, from its own forward pass."""
    acts = extract_turn_means(lm, [messages], layers=layers)[0]
    return (acts.means[-1] * axis.unit()[layers]).sum(-1)


def _count_forwards(lm):
    calls = []
    handle = lm.base_model.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls, handle


def test_one_pass_equals_each_prefix(tiny_lm):
    axis = _axis(tiny_lm)
    conv = _conversation(4)
    calls, handle = _count_forwards(tiny_lm)
    try:
        rows = monitor_conversation(tiny_lm, axis, conv, layers="all")
    finally:
        handle.remove()
    assert len(calls) == 1
    layers = list(range(tiny_lm.profile.n_layers))
    assert [r.turn for r in rows] == [0, 1, 2, 3] and [r.message_index for r in rows] == [2, 4, 6, 8]
    for row in rows:
        expected = _exact(tiny_lm, axis, conv[: row.message_index + 1], layers)
        got = torch.tensor([row.projections[layer] for layer in layers])
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)
        assert not row.truncated and row.dropped_messages == 0


def test_target_layer_by_default_and_layer_subset(tiny_llama):
    axis = _axis(tiny_llama)
    conv = _conversation(2, system=None)
    assert list(monitor_conversation(tiny_llama, axis, conv)[0].projections) == [axis.target_layer]
    full = monitor_conversation(tiny_llama, axis, conv, layers="all")
    part = monitor_conversation(tiny_llama, axis, conv, layers=[3, 0])
    assert list(part[1].projections) == [3, 0]
    assert part[1].projections[3] == pytest.approx(full[1].projections[3], abs=1e-6)
    with pytest.raises(IndexError):
        monitor_conversation(tiny_llama, axis, conv, layers=[7])


@pytest.mark.parametrize("system", ["You are a pirate.", None, "You are a pirate of the seven seas. " * 10])
def test_long_conversation_windows(tiny_llama, system):
    lm = dataclasses.replace(tiny_llama, profile=dataclasses.replace(tiny_llama.profile, max_context=260))
    axis = _axis(lm)
    conv = _conversation(8, system=system)
    layers = [0, 2, 3]
    windows = plan_windows(lm, conv, mode="longest")
    assert 1 < len(windows) <= 8
    assert all(len(w.rendered.input_ids) <= 260 for w in windows)
    assert sorted(t for w in windows for t in w.turns) == list(range(8))
    calls, handle = _count_forwards(lm)
    try:
        rows = monitor_conversation(lm, axis, conv, layers=layers, windows="longest")
    finally:
        handle.remove()
    assert len(calls) <= len(windows)
    assert rows[0].truncated is False and rows[-1].truncated is True
    assert len(windows) == len({(r.history_start, r.dropped_messages) for r in rows})  # one pass per distinct history
    first = 1 if system else 0
    for row in rows:
        assert row.context_tokens <= 260
        if not row.truncated:  # whole history fits: exact
            assert row.history_start == first
            messages = conv[: row.message_index + 1]
        else:  # the same history as the window: the system prompt (while it fits) and the latest messages
            system_kept = row.dropped_messages == row.history_start - first
            assert system_kept != _no_system(windows, row)
            messages = (conv[:first] if system_kept else []) + conv[row.history_start : row.message_index + 1]
        got = torch.tensor([row.projections[layer] for layer in layers])
        torch.testing.assert_close(got, _exact(tiny_llama, axis, messages, layers), atol=1e-6, rtol=1e-4)
    # Every turn has its longest history: the previous user turn and its answer would not fit as well.
    for row in rows:
        if row.truncated and not _no_system(windows, row):
            longer = conv[:first] + conv[row.history_start - 2 : row.message_index + 1]
            assert render_chat(lm.tokenizer, longer, lm.profile).spans[-1].end > 260
    if system and len(system) > 200:
        assert any(w.system_dropped for w in windows)


def _no_system(windows, row) -> bool:
    return any(row.turn in w.turns and w.system_dropped for w in windows)


def test_response_longer_than_context_is_clipped(tiny_llama):
    lm = dataclasses.replace(tiny_llama, profile=dataclasses.replace(tiny_llama.profile, max_context=40))
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The quick brown fox jumps. " * 30}]
    (row,) = monitor_conversation(lm, _axis(lm), conv)
    assert row.truncated and row.context_tokens == 40


def test_bad_inputs(tiny_llama, tmp_path):
    axis = _axis(tiny_llama)
    with pytest.raises(MonitorError, match="no assistant turn"):
        transcript_from_data({"conversation": [{"role": "user", "content": "Hi"}]})
    with pytest.raises(MonitorError, match="unknown role 'robot'"):
        transcript_from_data({"conversation": [{"role": "robot", "content": "Hi"}]})
    with pytest.raises(MonitorError, match="empty content"):
        transcript_from_data(
            {"conversation": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]}
        )
    with pytest.raises(MonitorError, match="no 'conversation' key"):
        transcript_from_data({"messages": []})
    bad = tmp_path / "broken.json"
    bad.write_text('{"conversation": [')
    with pytest.raises(MonitorError, match=r"broken\.json: malformed JSON at line 1"):
        load_transcript(bad)
    with pytest.raises(MonitorError, match="no such file"):
        load_transcripts([tmp_path / "missing.json"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(MonitorError, match="no .json transcripts"):
        load_transcripts([tmp_path / "empty"])
    wrong = Axis(torch.randn(tiny_llama.profile.n_layers, 16))
    with pytest.raises(AxisError, match="hidden size 16"):
        monitor_conversation(tiny_llama, wrong, _conversation(1))
    with pytest.raises(AxisError, match="has 5 layers"):
        monitor_conversation(tiny_llama, Axis(torch.randn(5, tiny_llama.profile.hidden_size)), _conversation(1))
    with pytest.raises(MonitorError, match="no assistant turn"):
        monitor_conversation(tiny_llama, axis, [{"role": "user", "content": "Hi"}])


def test_files_folders_table_and_plot(tiny_llama, tmp_path):
    axis = _axis(tiny_llama)
    folder = tmp_path / "transcripts"
    folder.mkdir()
    for name, n in (("coding", 2), ("therapy", 3)):
        (folder / f"{name}.json").write_text(
            json.dumps({"model": "x", "domain": name, "turns": n, "conversation": _conversation(n)})
        )
    other = tmp_path / "other" / "coding.json"
    other.parent.mkdir()
    other.write_text(json.dumps(_conversation(1, system=None)))
    transcripts = load_transcripts([folder, other])
    assert [t.meta.get("domain") for t in transcripts] == ["coding", "therapy", None]
    assert len({t.name for t in transcripts}) == 3  # the two coding.json are told apart
    calls, handle = _count_forwards(tiny_llama)
    try:
        rows = monitor_transcripts(tiny_llama, axis, transcripts, layers=[1, 2])
    finally:
        handle.remove()
    assert len(calls) == 1  # short transcripts share one batch
    assert len(rows) == 6
    single = monitor_conversation(tiny_llama, axis, transcripts[1].conversation, layers=[1, 2])
    assert [r.projections[2] for r in rows if r.transcript == "therapy"] == pytest.approx(
        [r.projections[2] for r in single], abs=1e-5
    )
    json_path, csv_path = write_table(rows, tmp_path / "out", {"layers": [1, 2]})
    table = json.loads(json_path.read_text())
    assert table["layers"] == [1, 2] and len(table["rows"]) == 6
    assert set(table["rows"][0]) >= {
        "transcript",
        "turn",
        "message_index",
        "layer_1",
        "layer_2",
        "truncated",
        "context_tokens",
    }
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("transcript,turn,message_index,layer_1,layer_2,truncated") and len(lines) == 7
    png = plot_trajectories(rows, tmp_path / "out" / "trajectory.png", layer=2, floor=0.01)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _fits(lm, messages, limit):
    try:
        chat = render_chat(lm.tokenizer, messages, lm.profile)
    except Exception:
        return False
    return bool(chat.spans) and chat.spans[-1].end <= limit


def _best_history(lm, conv, turn_message, limit):
    """Brute force: the system prompt kept while the turn fits with it, then the earliest user turn that fits."""
    first = 1 if conv[0]["role"] == "system" else 0
    starts = [i for i in range(first, turn_message) if i == first or conv[i]["role"] == "user"]
    for keep in [True, False] if first else [False]:
        for s in starts:
            if _fits(lm, (conv[:1] if keep else []) + conv[s : turn_message + 1], limit):
                return s, keep
    return turn_message, False


@pytest.mark.parametrize("seed", range(12))
def test_windows_give_every_turn_its_longest_history_in_fewest_passes(tiny_llama, seed):
    import random

    rng = random.Random(seed)
    limit = rng.choice([120, 180, 260])
    lm = dataclasses.replace(tiny_llama, profile=dataclasses.replace(tiny_llama.profile, max_context=limit))
    conv = [{"role": "system", "content": "You are a pirate. " * rng.randint(1, 8)}] if rng.random() < 0.7 else []
    for i in range(rng.randint(3, 9)):
        conv.append({"role": "user", "content": "Why? " * rng.randint(1, 12)})
        conv.append({"role": "assistant", "content": f"Answer {i}. " + "Arr, matey! " * rng.randint(1, 12)})
    rows = monitor_conversation(lm, _axis(lm), conv, windows="longest")
    first = 1 if conv and conv[0]["role"] == "system" else 0
    keys = []
    for row in rows:
        start, keep = _best_history(lm, conv, row.message_index, limit)
        if start == row.message_index and not _fits(lm, conv[start : start + 1], limit):  # a clipped response
            assert row.truncated and row.context_tokens == limit
            keys.append(("clipped", row.turn))
            continue
        system_kept = bool(first) and row.dropped_messages == row.history_start - first
        assert (row.history_start, system_kept) == (start, keep), row
        assert row.truncated == (start != first or (bool(first) and not keep))
        keys.append((start, keep))
    assert len({r.window for r in rows}) == len(set(keys))  # one pass per distinct history, no more
