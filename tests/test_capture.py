"""Activations captured while generating equal teacher-forced extraction of the same tokens (the axis in one pass)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from test_generation_fast import common_tokens, conversations

from personaxis.activations import extract_rendered, extract_turn_means
from personaxis.capture import EDGE, ResponseCapture, extract_extra, extract_mode
from personaxis.chat import RenderedChat, ResponseSpan, build_conversation, render_prompt
from personaxis.generation import SamplingConfig, generate, generate_ids
from personaxis.io.tensor_files import load_axis
from personaxis.pipeline import Pipeline
from personaxis.settings import RunSettings

LONG_SYSTEM = "You are a pirate who sails the seven seas and tells tall tales of sea monsters to anyone who listens."


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _prompts(lm, n: int = 20) -> list[list[int]]:
    convos = conversations(n)
    for i in range(0, n, 4):  # a long shared system prompt: prefills share its cache
        convos[i] = [{"role": "system", "content": LONG_SYSTEM}, *[m for m in convos[i] if m["role"] == "user"]]
    return [render_prompt(lm.tokenizer, c, lm.profile) for c in convos]


def test_captured_sums_equal_teacher_forced_on_the_generated_tokens(tiny_lm):
    """Left padding, rows that stop early or run to the cap (their last token is fed by an extra step), rows
    joining a running batch, shared prefixes: every layer's mean and norm over any span the capture keeps equals a
    teacher-forced pass over the prompt and the generated tokens."""
    lm = tiny_lm
    prompts = _prompts(lm)
    assert len({len(p) for p in prompts}) > 5
    config = SamplingConfig(max_new_tokens=12, batch_size=6)
    stops = common_tokens(generate_ids(lm, prompts, config, stop_ids=[]))
    capture = ResponseCapture(lm)
    new = generate_ids(lm, prompts, config, stop_ids=stops, capture=capture)
    assert new == generate_ids(lm, prompts, config, stop_ids=stops)  # capturing changes no token
    lengths = {len(ids) for ids in new}
    assert 12 in lengths and min(lengths) < 12  # both ways of ending
    checked = 0
    for i, (prompt, ids) in enumerate(zip(prompts, new, strict=True)):
        n = len(ids) - (ids[-1] in stops)  # every token but an end-of-turn token is fed back and recorded
        assert capture.fed[i] == n
        spans = [(0, n), (1, n - 1), (min(EDGE, n - 1), n), (0, max(1, n - EDGE))]
        for start, end in spans:
            if not 0 <= start < end <= n:
                continue
            captured = capture.means_over(i, start, end)
            assert captured is not None
            rendered = RenderedChat("", prompt + ids, [ResponseSpan(0, 0, len(prompt) + start, len(prompt) + end)])
            forced = extract_rendered(lm, [rendered])[0]
            assert captured.n_tokens == forced.n_tokens and captured.layers == forced.layers
            assert _relative_error(captured.means, forced.means) < 1e-5
            assert _relative_error(captured.norms, forced.norms) < 1e-5
            checked += 1
    assert checked > 40
    # A token left out between the edges went into the running sum: the capture declines.
    long_row = next(i for i, ids in enumerate(new) if capture.fed[i] > 2 * EDGE)
    assert capture.means_over(long_row, EDGE + 1, capture.fed[long_row]) is None
    assert capture.means_over(long_row, 0, capture.fed[long_row] + 1) is None


def test_capture_needs_the_fast_engine(tiny_llama):
    with pytest.raises(ValueError, match="fast generation engine"):
        generate_ids(
            tiny_llama, [[1, 2, 3]], SamplingConfig(max_new_tokens=2), engine="hf", capture=ResponseCapture(tiny_llama)
        )


def test_extract_mode_setting():
    assert extract_mode(RunSettings.from_preset("tiny")) == "capture"
    forced = RunSettings.from_preset("tiny", extra=extract_extra("teacher-forced"))
    assert extract_mode(forced) == "teacher-forced"
    assert extract_extra("capture") == {}
    with pytest.raises(ValueError, match="unknown extraction mode"):
        extract_extra("twice")


@pytest.mark.model
def test_captured_answer_means_equal_teacher_forced_on_the_embedded_model(embedded_lm):
    """The stored answer's content span (chat.render_chat of the conversation as the pipeline stores it) is taken
    from the capture, and its means equal teacher-forced extraction of that conversation at every layer."""
    lm = embedded_lm
    systems = ["You are a ghost haunting an old library.", "You are a meticulous accountant.", ""]
    questions = ["Who are you?", "What do you do all day?", "Describe yourself in one sentence.", "Hi!"]
    convos = [build_conversation(s, q) for s in systems for q in questions]
    for max_new in (8, 40):  # all cut at the cap; most ending on the end-of-turn token
        capture = ResponseCapture(lm)
        gens = generate(lm, convos, SamplingConfig(max_new_tokens=max_new, batch_size=5), capture=capture)
        stored = [
            build_conversation(s, q, g.text)
            for (s, q), g in zip([(s, q) for s in systems for q in questions], gens, strict=True)
        ]
        forced = extract_turn_means(lm, stored)
        taken = 0
        for i, conversation in enumerate(stored):
            captured = capture.turn_activations(i, conversation)
            if captured is None:
                continue
            taken += 1
            assert captured.n_tokens == forced[i].n_tokens
            assert _relative_error(captured.means, forced[i].means) < 1e-4
            assert _relative_error(captured.norms, forced[i].norms) < 1e-4
        assert taken >= 0.8 * len(stored)


@pytest.mark.model
def test_pipeline_writes_activations_while_generating(tmp_path, embedded_lm):
    """The generate stage writes every activation file (the extract stage has nothing left), and they equal a
    teacher-forced extraction of the same rollouts; ``extract: teacher-forced`` keeps the two-pass way."""
    settings = RunSettings.from_preset("tiny", judge="none", n_traits=0)
    one = Pipeline(tmp_path / "one", settings, lm=embedded_lm, show_progress=False)
    done = one.run(["generate", "extract"])
    assert done["generate"] == len(one.units) and done["extract"] == 0
    two_settings = RunSettings.from_preset("tiny", judge="none", n_traits=0, extra=extract_extra("teacher-forced"))
    two = Pipeline(tmp_path / "two", two_settings, lm=embedded_lm, show_progress=False)
    two.open()
    shutil.copytree(tmp_path / "one" / "rollouts", tmp_path / "two" / "rollouts")
    assert two.run(["extract"])["extract"] == len(two.units)
    for unit in one.units:
        ids_one, means_one, norms_one = one.read_activations(unit)
        ids_two, means_two, norms_two = two.read_activations(unit)
        assert ids_one == ids_two and len(ids_one) > 0
        assert _relative_error(means_one, means_two) < 1e-4
        assert _relative_error(norms_one, norms_two) < 1e-4
    # The teacher-forced run's own generate stage leaves extraction to the extract stage.
    forced = Pipeline(tmp_path / "forced", two_settings, lm=embedded_lm, show_progress=False)
    assert forced.run(["generate", "extract"])["extract"] == len(forced.units)
    manifest = json.loads((tmp_path / "forced" / "manifest.json").read_text())
    assert manifest["settings"]["extra"] == {"extract": "teacher-forced"}


def _numbers(value, prefix: str = "") -> dict[str, float]:
    """Every number in a JSON value, by path."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _numbers(item, f"{prefix}/{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in _numbers(item, f"{prefix}/{i}").items()}
    if isinstance(value, int | float) and not isinstance(value, bool):
        return {prefix: float(value)}
    return {}


def two_pass_agrees(one_dir, two_dir, lm) -> tuple[float, float]:
    """Recompute a finished one-pass run's activations teacher-forced on the same rollouts (and judgments) in
    ``two_dir``; return the largest relative difference of the axis vectors and of the summary's numbers."""
    from personaxis.pipeline import open_existing

    one = open_existing(one_dir, lm=lm, show_progress=False)
    two = Pipeline(two_dir, one.settings, lm=lm, show_progress=False)
    two.open()
    for folder in ("rollouts", "judgments"):
        shutil.copytree(one_dir / folder, two_dir / folder)
    assert two.run(["extract", "vectors", "axis", "space"])["extract"] == len(two.units)
    a, b = load_axis(one_dir / "axis.safetensors").vectors, load_axis(two_dir / "axis.safetensors").vectors
    axis_diff = float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())
    s1, s2 = (_numbers(json.loads((d / "summary.json").read_text())) for d in (one_dir, two_dir))
    assert s1.keys() == s2.keys()
    # Each number against the scale of its kind (every role's projection, every layer's cosine, ...), at least 1.
    kinds: dict[str, float] = {}
    for key, value in s2.items():
        kind = re.sub(r"/\d+", "/#", key)
        kinds[kind] = max(kinds.get(kind, 1.0), abs(value))
    return axis_diff, max(abs(s1[k] - s2[k]) / kinds[re.sub(r"/\d+", "/#", k)] for k in s1)


@pytest.mark.slow
@pytest.mark.model
def test_quick_preset_in_one_pass_equals_two_passes(tmp_path, embedded_lm):
    """The quick preset's axis and summary from captured activations agree to five digits with teacher-forced
    extraction of the same rollouts (the whole preset: about 2 minutes on a quiet 2-core machine, more when busy)."""
    Pipeline(tmp_path / "one", RunSettings.from_preset("quick"), lm=embedded_lm, show_progress=False).run()
    axis_diff, summary_diff = two_pass_agrees(tmp_path / "one", tmp_path / "two", embedded_lm)
    assert axis_diff < 1e-5 and summary_diff < 1e-5
