"""Guard mode on the embedded model with the axis and capping config of results/guard-run: a persona jailbreak that
drifts switches capping on in the stream, a coding question never does (slow: real model, greedy decoding)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from personaxis.io.tensor_files import load_axis, load_capping

RUN = Path(__file__).resolve().parents[1] / "results" / "guard-run"
pytestmark = pytest.mark.slow


def _guard_events(text: str) -> list[dict]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line)
        if lines.get("event") == "guard":
            events.append(json.loads(lines["data"]))
    return events


def test_guard_switches_on_for_a_drifting_jailbreak_and_never_for_code(embedded_lm):
    from personaxis.evals.guard import CODING_QUESTION
    from personaxis.evals.jailbreak import conversation_for, select_jailbreaks
    from personaxis.web import create_app

    if not (RUN / "axis.safetensors").is_file():
        pytest.skip(f"no axis at {RUN}")
    axis = load_axis(RUN / "axis.safetensors")
    capping = load_capping(RUN / "capping.safetensors")
    jailbreak = next(j for j in select_jailbreaks(None) if j.id == "jb-005")
    app = create_app(embedded_lm, axis, capping, guard_experiment="layers_22:26-p0.25", guard_window=8)
    with TestClient(app) as client:
        drifting = client.post(
            "/api/chat/stream",
            json={"messages": conversation_for(jailbreak, "persona"), "cap": "auto", "max_tokens": 24},
        )
        coding = client.post(
            "/api/chat/stream",
            json={"messages": [{"role": "user", "content": CODING_QUESTION}], "cap": "auto", "max_tokens": 48},
        )
    switches = _guard_events(drifting.text)
    assert switches and switches[0]["capping"] is True and switches[0]["n_tokens"] == 8
    assert switches[0]["projection"] < capping.floor(axis.target_layer, 25.0)
    assert _guard_events(coding.text) == []
