"""The web app's JSON API, OpenAI-compatible endpoint, limits and safety, with a tiny random model."""

from __future__ import annotations

import functools
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from personaxis.axis import Axis  # noqa: E402
from personaxis.capping import Cap, CappingConfig, CapVector, Experiment  # noqa: E402
from personaxis.io.tensor_files import save_axis, save_capping
from personaxis.web import create_app  # noqa: E402
from personaxis.web.limits import Limits  # noqa: E402

HIGH_FLOOR = 5.0  # far above any projection of the tiny random model: capping at layer 2 lifts every token to it
EXPERIMENT = "layers_2:4-p0.25"
QUESTION = [{"role": "user", "content": "Who are you?"}]
FIXED = [
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "I am a helpful assistant."},
    {"role": "user", "content": "What do you fear most?"},
    {"role": "assistant", "content": "The sea, matey!"},
]


@pytest.fixture(scope="module")
def axis() -> Axis:
    generator = torch.Generator().manual_seed(1)
    return Axis(torch.randn(4, 32, generator=generator), model="tiny-llama", residual_norms=torch.full((4,), 3.0))


@pytest.fixture(scope="module")
def capping(axis: Axis) -> CappingConfig:
    vectors = {f"axis_layer_{layer}": CapVector(layer, axis.vectors[layer].clone()) for layer in (2, 3)}
    experiments = [
        Experiment(EXPERIMENT, (Cap("axis_layer_2", HIGH_FLOOR), Cap("axis_layer_3", HIGH_FLOOR))),
        Experiment("layers_3:4-p0.25", (Cap("axis_layer_3", HIGH_FLOOR),)),
    ]
    thresholds = torch.full((1, 4), HIGH_FLOOR, dtype=torch.float64)
    return CappingConfig(vectors, experiments, percentiles=[25.0], thresholds=thresholds, model="tiny-llama")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("run")
    roles = [
        {
            "name": "ghost",
            "category": "fantastical_spiritual",
            "n_rollouts": 1,
            "vector_source": "unjudged",
            "projection": -3.5,
            "pc": [-4.0, 1.0, 0.5],
        },
        {
            "name": "analyst",
            "category": "assistant_like",
            "n_rollouts": 1,
            "vector_source": "unjudged",
            "projection": 2.5,
            "pc": [3.0, -0.5, 0.2],
        },
    ]
    layers = [
        {"layer": i, "cos_pc1_axis": 0.7, "pc1_explained_variance": 0.6, "explained_variance": [0.6, 0.3, 0.1]}
        for i in range(4)
    ]
    summary = {
        "model": "tiny-llama",
        "n_layers": 4,
        "target_layer": 2,
        "layers": layers,
        "roles": roles,
        "default_projection": 4.0,
        "default_position": {"pc1_fraction": 1.1, "pc1": 4.2},
        "target": {"cos_pc1_axis": 0.7, "pc1_explained_variance": 0.6},
    }
    (root / "summary.json").write_text(json.dumps(summary))
    sample = {
        "condition": "ghost",
        "system_prompt": "You are a ghost.",
        "rollouts": [
            {"question": "Tell me about yourself.", "answer": "Boo. I have haunted this house for a century."}
        ],
    }
    (root / "rollouts" / "ghost").mkdir(parents=True)
    (root / "rollouts" / "ghost" / "p0.json").write_text(json.dumps(sample))
    (root / "transcripts").mkdir()
    (root / "transcripts" / "coding.json").write_text(json.dumps({"domain": "coding", "conversation": FIXED[:2]}))
    (root / "transcripts" / "drift.json").write_text(json.dumps({"domain": "therapy", "conversation": FIXED}))
    (root / "secret.json").write_text(json.dumps({"conversation": FIXED, "secret": "do not serve"}))
    return root


LIMITS = Limits(max_body_bytes=64 * 1024, max_message_chars=2000, max_messages=20, max_new_tokens=32, max_transcripts=3)


@pytest.fixture(scope="module")
def client(tiny_llama, axis, capping, run_dir):
    app = create_app(tiny_llama, axis, capping, run_dir, limits=LIMITS)
    with TestClient(app) as test_client:
        yield test_client


def _error(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) >= {"message", "type", "code"} and body["error"]["code"] == status
    return body["error"]["message"]


def _events(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((lines["event"], json.loads(lines["data"])))
    return events


# ------------------------------------------------------------------------------------------------ info and pages
def test_info_lists_experiments_and_floor(client):
    info = client.get("/api/info").json()
    assert info["model"] == "tiny-llama" and info["layer"] == 2 and info["n_layers"] == 4
    assert [e["id"] for e in info["experiments"]] == [EXPERIMENT, "layers_3:4-p0.25"]
    assert info["experiments"][0]["layers"] == [2, 3]
    assert info["floor"] == pytest.approx(HIGH_FLOOR)
    assert info["reference"]["role_min_name"] == "ghost" and info["limits"]["max_new_tokens"] == 32


@pytest.mark.parametrize("path", ["/", "/space", "/transcripts", "/docs"])
def test_pages_are_local_html_with_a_strict_policy(client, path):
    response = client.get(path)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in response.headers["content-security-policy"]
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", response.text)


def test_static_assets_fetch_nothing_from_the_internet():
    static = Path(__file__).parents[1] / "src" / "personaxis" / "web" / "static"
    for path in static.iterdir():
        text = path.read_text(encoding="utf-8")
        assert not re.search(
            r"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?https?:|@import|fetch\(\s*["']https?:""", text
        ), path


def test_openapi_schema_is_complete_and_docs_are_offline(client):
    spec = client.get("/openapi.json").json()
    paths = set(spec["paths"])
    assert {
        "/api/info",
        "/api/chat",
        "/api/chat/stream",
        "/api/project",
        "/api/space",
        "/api/roles/{name}",
        "/api/transcripts",
        "/api/transcripts/{name}",
        "/api/transcripts/project",
        "/v1/models",
        "/v1/chat/completions",
    } <= paths
    schemas = spec["components"]["schemas"]
    assert {"ChatRequest", "ChatResponse", "ChatCompletionRequest", "ChatCompletion", "ErrorResponse"} <= set(schemas)
    assert "personaxis" in schemas["ChatCompletionRequest"]["properties"]
    assert "413" in spec["paths"]["/api/chat"]["post"]["responses"]
    docs = client.get("/docs").text
    assert "cdn" not in docs.lower() and "swagger-ui" not in docs.lower()
    assert client.get("/redoc").status_code == 404


# ------------------------------------------------------------------------------------------------------ chat
def test_chat_answers_with_per_turn_projections(client):
    body = client.post(
        "/api/chat", json={"messages": FIXED + [{"role": "user", "content": "Why?"}], "max_tokens": 8}
    ).json()
    assert isinstance(body["text"], str) and 1 <= body["new_tokens"] <= 8
    assert len(body["projections"]) == 3 and body["projection"] == body["projections"][-1]
    assert body["layer"] == 2 and body["cap"] is None and body["floor"] == pytest.approx(HIGH_FLOOR)


def test_stream_sends_tokens_with_running_projection_then_the_answer(client):
    response = client.post("/api/chat/stream", json={"messages": QUESTION, "max_tokens": 8})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = _events(response.text)
    names = [name for name, _ in events]
    assert names[0] == "start" and names[-1] == "done" and set(names[1:-1]) == {"token"}
    tokens = [data for name, data in events if name == "token"]
    assert all(isinstance(t["projection"], float) for t in tokens)
    assert [t["n_tokens"] for t in tokens] == sorted(t["n_tokens"] for t in tokens)
    done = events[-1][1]
    assert "".join(t["delta"] for t in tokens).strip() == done["text"]
    whole = client.post("/api/chat", json={"messages": QUESTION, "max_tokens": 8}).json()
    assert whole["text"] == done["text"]  # the streaming loop and the batch engine agree on greedy text
    # ... and on sampled text: the same sampler and the same random stream for the same seed
    sampled = {"messages": QUESTION, "max_tokens": 12, "temperature": 1.3, "top_p": 0.95, "seed": 11}
    streamed = _events(client.post("/api/chat/stream", json=sampled).text)[-1][1]["text"]
    assert streamed == client.post("/api/chat", json=sampled).json()["text"]
    assert streamed != done["text"]


def test_capping_lifts_the_projection_to_the_floor(client):
    plain = client.post("/api/project", json={"messages": FIXED}).json()["projections"]
    capped = client.post("/api/project", json={"messages": FIXED, "cap": EXPERIMENT}).json()["projections"]
    assert all(p < HIGH_FLOOR for p in plain)
    assert all(c >= HIGH_FLOOR - 1e-3 for c in capped)
    chat = client.post("/api/chat", json={"messages": QUESTION, "max_tokens": 6, "cap": EXPERIMENT}).json()
    assert chat["cap"] == EXPERIMENT and chat["projection"] >= HIGH_FLOOR - 1e-3
    events = _events(
        client.post("/api/chat/stream", json={"messages": QUESTION, "max_tokens": 6, "cap": EXPERIMENT}).text
    )
    assert all(d["projection"] >= HIGH_FLOOR - 1e-3 for n, d in events if n == "token")


def test_steering_shifts_the_projection_by_alpha_times_the_residual_norm(client):
    base = client.post("/api/project", json={"messages": FIXED}).json()["projections"]
    steered = client.post("/api/project", json={"messages": FIXED, "alpha": 0.5}).json()["projections"]
    for b, s in zip(base, steered, strict=True):
        assert s - b == pytest.approx(0.5 * 3.0, abs=1e-3)


# ----------------------------------------------------------------------------------------------- bad requests
def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(client):
    assert "unknown capping experiment 'nope'" in _error(
        client.post("/api/chat", json={"messages": QUESTION, "cap": "nope"}), 400
    )
    assert "empty content" in _error(
        client.post("/api/chat", json={"messages": [{"role": "user", "content": "  "}]}), 422
    )
    assert "limit of 2000" in _error(
        client.post("/api/chat", json={"messages": [{"role": "user", "content": "x" * 2001}]}), 422
    )
    many = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}] * 11
    assert "limit of 20" in _error(client.post("/api/chat", json={"messages": many + QUESTION}), 422)
    assert "limit of 32" in _error(client.post("/api/chat", json={"messages": QUESTION, "max_tokens": 33}), 422)
    assert "end with a user message" in _error(client.post("/api/chat/stream", json={"messages": FIXED}), 422)
    assert "malformed JSON" in _error(
        client.post("/api/chat", content=b"{nope", headers={"content-type": "application/json"}), 422
    )
    assert "messages" in _error(client.post("/api/chat", json={"max_tokens": 4}), 422)
    assert "alpha" in _error(client.post("/api/project", json={"messages": FIXED, "alpha": 1e9}), 422)
    assert "no assistant turn" in _error(client.post("/api/project", json={"messages": QUESTION}), 422)
    assert client.get("/api/info").status_code == 200
    assert client.post("/api/chat", json={"messages": QUESTION, "max_tokens": 2}).status_code == 200


def test_oversized_bodies_are_refused_with_413(client):
    big = {"transcripts": [{"name": "big", "data": {"conversation": [{"role": "user", "content": "x" * 70_000}]}}]}
    assert "limit of 65536 bytes" in _error(client.post("/api/transcripts/project", json=big), 413)

    def chunks():  # no Content-Length: the limit is enforced on the stream itself
        for _ in range(10):
            yield b" " * 10_000

    _error(client.post("/api/chat", content=chunks(), headers={"content-type": "application/json"}), 413)
    assert client.get("/api/info").status_code == 200


@pytest.mark.parametrize(
    "data, message",
    [
        ({"messages": FIXED}, "no 'conversation' key"),
        ({"conversation": "hello"}, "a conversation must be a list"),
        ({"conversation": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ({"conversation": [{"role": "wizard", "content": "hi"}]}, "unknown role"),
        ("just text", "a transcript must be a JSON object"),
    ],
)
def test_malformed_transcripts_are_422(client, data, message):
    response = client.post("/api/transcripts/project", json={"transcripts": [{"name": "bad", "data": data}]})
    assert message in _error(response, 422)


@pytest.mark.parametrize(
    "path",
    [
        "/static/%2e%2e/app.py",
        "/static/..%2fapp.py",
        "/static/..%2f..%2fweb%2fapp.py",
        "/static/%2e%2e%2f%2e%2e%2f__init__.py",
        "/api/transcripts/..%2fsecret",
        "/api/transcripts/%2e%2e%2fsecret",
        "/api/roles/..%2f..%2fsummary",
    ],
)
def test_no_file_outside_the_static_dir_is_served(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert "def create_app" not in response.text and "do not serve" not in response.text


def test_static_files_are_served(client):
    response = client.get("/static/chat.js")
    assert response.status_code == 200 and "PX.stream" in response.text


def test_host_header_is_checked_when_asked(tiny_llama, axis):
    app = create_app(tiny_llama, axis, allowed_hosts=["127.0.0.1", "localhost"])
    with TestClient(app, base_url="http://127.0.0.1") as local:
        assert local.get("/api/info").status_code == 200
        assert local.get("/api/info", headers={"host": "evil.example"}).status_code == 400


def test_model_calls_are_serialised(axis):
    from tiny import tiny_model

    lm = tiny_model("llama")
    active, peak, guard = [0], [0], threading.Lock()
    original = lm.model.forward

    @functools.wraps(original)
    def counting_forward(*args, **kwargs):
        with guard:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            return original(*args, **kwargs)
        finally:
            with guard:
                active[0] -= 1

    lm.model.forward = counting_forward
    with TestClient(create_app(lm, axis)) as local:

        def call(i: int) -> int:
            path = "/api/chat/stream" if i % 2 else "/api/chat"
            return local.post(path, json={"messages": QUESTION, "max_tokens": 4}).status_code

        with ThreadPoolExecutor(max_workers=6) as pool:
            codes = list(pool.map(call, range(6)))
    assert codes == [200] * 6
    assert peak[0] == 1


# ---------------------------------------------------------------------------------------- persona space, roles
def test_space_and_role_details(client):
    space = client.get("/api/space").json()
    assert space["target_layer"] == 2 and [r["name"] for r in space["roles"]] == ["ghost", "analyst"]
    assert space["layers"][0]["explained_variance"] == [0.6, 0.3, 0.1]
    ghost = client.get("/api/roles/ghost").json()
    assert ghost["category"] == "fantastical_spiritual" and len(ghost["system_prompts"]) >= 1
    assert ghost["samples"][0]["answer"].startswith("Boo.")
    assert "no role named 'pirate'" in _error(client.get("/api/roles/pirate"), 404)


def test_space_without_a_run_is_a_clear_404(tiny_llama, axis):
    with TestClient(create_app(tiny_llama, axis)) as local:
        assert "personaxis run" in _error(local.get("/api/space"), 404)
        assert local.get("/api/transcripts").json()["transcripts"] == []
        assert "no capping config" in _error(
            local.post("/api/chat", json={"messages": QUESTION, "cap": EXPERIMENT}), 400
        )


# ------------------------------------------------------------------------------------------------ transcripts
def test_transcripts_are_listed_read_and_projected(client):
    listed = client.get("/api/transcripts").json()["transcripts"]
    assert [t["name"] for t in listed] == ["coding", "drift"] and listed[1]["assistant_turns"] == 2
    data = client.get("/api/transcripts/drift").json()
    upload = {"name": "mine", "data": FIXED}
    body = client.post(
        "/api/transcripts/project", json={"transcripts": [{"name": "drift", "data": data}, upload]}
    ).json()
    assert [t["name"] for t in body["trajectories"]] == ["drift", "mine"]
    drift = body["trajectories"][0]
    assert [p["turn"] for p in drift["turns"]] == [0, 1] and drift["meta"] == {"domain": "therapy"}
    assert drift["turns"][1]["user"] == "What do you fear most?"
    direct = client.post("/api/project", json={"messages": FIXED}).json()["projections"]
    assert [p["projection"] for p in drift["turns"]] == pytest.approx(direct, abs=1e-4)
    capped = client.post("/api/transcripts/project", json={"transcripts": [upload], "cap": EXPERIMENT}).json()
    assert all(p["projection"] >= HIGH_FLOOR - 1e-3 for p in capped["trajectories"][0]["turns"])
    four = {"transcripts": [upload] * 4}
    assert "limit of 3" in _error(client.post("/api/transcripts/project", json=four), 422)


# ---------------------------------------------------------------------------------------- OpenAI-compatible
@pytest.fixture(scope="module")
def openai_client(client):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)


def test_openai_client_non_streaming(openai_client):
    assert [m.id for m in openai_client.models.list().data] == ["tiny-llama"]
    completion = openai_client.chat.completions.create(model="tiny-llama", messages=FIXED + QUESTION, max_tokens=6)
    assert completion.object == "chat.completion" and completion.choices[0].finish_reason in ("stop", "length")
    assert isinstance(completion.choices[0].message.content, str)
    info = completion.model_extra["personaxis"]
    assert info["layer"] == 2 and len(info["projections"]) == 3 and info["cap"] is None
    assert completion.usage.completion_tokens <= 6


def test_openai_client_streaming_with_capping(openai_client):
    stream = openai_client.chat.completions.create(
        model="tiny-llama",
        messages=QUESTION,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"personaxis": {"cap": EXPERIMENT, "alpha": 0.0}},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    info = final.model_extra["personaxis"]
    assert info["cap"] == EXPERIMENT and info["projection"] >= HIGH_FLOOR - 1e-3
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 6
    plain = openai_client.chat.completions.create(
        model="tiny-llama", messages=QUESTION, max_tokens=6, extra_body={"personaxis": {"cap": EXPERIMENT}}
    )
    assert plain.choices[0].message.content == text.strip()


def test_openai_errors(openai_client):
    import openai

    with pytest.raises(openai.BadRequestError, match="unknown capping experiment"):
        openai_client.chat.completions.create(model="m", messages=QUESTION, extra_body={"personaxis": {"cap": "nope"}})
    with pytest.raises(openai.UnprocessableEntityError, match="empty content"):
        openai_client.chat.completions.create(model="m", messages=[{"role": "user", "content": ""}])
    with pytest.raises(openai.UnprocessableEntityError, match="one choice"):
        openai_client.chat.completions.create(model="m", messages=QUESTION, n=2)
    with pytest.raises(openai.UnprocessableEntityError, match="not supported"):
        openai_client.chat.completions.create(
            model="m", messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]
        )


def test_openai_server_defaults_apply_unless_overridden(tiny_llama, axis, capping):
    import openai

    app = create_app(tiny_llama, axis, capping, default_cap=EXPERIMENT, default_alpha=0.0)
    with TestClient(app) as local:
        api = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=local, max_retries=0)
        default = api.chat.completions.create(model="m", messages=FIXED + QUESTION, max_tokens=4)
        assert default.model_extra["personaxis"]["cap"] == EXPERIMENT
        assert min(default.model_extra["personaxis"]["projections"]) >= HIGH_FLOOR - 1e-3
        off = api.chat.completions.create(
            model="m", messages=FIXED + QUESTION, max_tokens=4, extra_body={"personaxis": {"cap": None}}
        )
        assert off.model_extra["personaxis"]["cap"] is None
        assert max(off.model_extra["personaxis"]["projections"][:2]) < HIGH_FLOOR


def test_a_bad_default_experiment_is_refused_at_start(tiny_llama, axis, capping):
    with pytest.raises(ValueError, match="unknown capping experiment"):
        create_app(tiny_llama, axis, capping, default_cap="layers_9:10-p0.25")


# ---------------------------------------------------------------------------------------------------- CLI
def test_serve_command_wires_the_app(tmp_path, monkeypatch, tiny_llama, axis, capping):
    import uvicorn
    from typer.testing import CliRunner

    import personaxis.models
    from personaxis.cli import app as cli

    run = tmp_path / "run"
    save_axis(axis, run / "axis.safetensors")
    save_capping(capping, run / "capping.safetensors")
    seen = {}
    monkeypatch.setattr(personaxis.models, "load_model", lambda *a, **k: tiny_llama)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(app=app, **kwargs))
    result = CliRunner().invoke(cli, ["serve", "--run", str(run), "--cap", EXPERIMENT, "--port", "8123"])
    assert result.exit_code == 0, result.output
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8123
    service = seen["app"].state.px.service
    assert service.default_cap == EXPERIMENT and service.experiment_ids[0] == EXPERIMENT
    with TestClient(seen["app"], base_url="http://127.0.0.1") as local:
        assert local.get("/api/info").status_code == 200
        assert local.get("/api/info", headers={"host": "attacker.example"}).status_code == 400

    missing = CliRunner().invoke(cli, ["serve", "--run", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "no axis at" in missing.output
    unknown = CliRunner().invoke(cli, ["serve", "--run", str(run), "--cap", "layers_0:1-p0.5"])
    assert unknown.exit_code == 2 and "unknown capping experiment" in unknown.output


def test_openai_stop_strings_and_seeded_sampling(openai_client):
    full = openai_client.chat.completions.create(model="m", messages=QUESTION, max_tokens=12).choices[0].message.content
    assert len(full) >= 4
    stop = full[2:4]
    cut = full[: full.find(stop)].rstrip()
    whole = openai_client.chat.completions.create(model="m", messages=QUESTION, max_tokens=12, stop=[stop])
    assert whole.choices[0].message.content == cut and whole.choices[0].finish_reason == "stop"
    chunks = list(
        openai_client.chat.completions.create(model="m", messages=QUESTION, max_tokens=12, stop=stop, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip() == cut
    sampled = [
        openai_client.chat.completions.create(
            model="m", messages=QUESTION, max_tokens=8, temperature=0.9, top_p=0.9, seed=7, stream=True
        )
        for _ in range(2)
    ]
    texts = ["".join(c.choices[0].delta.content or "" for c in s if c.choices) for s in sampled]
    assert texts[0] == texts[1]
