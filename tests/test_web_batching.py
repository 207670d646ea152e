"""Continuous batching in the server: mixed treatments in one batch, guard mode, the queue, timeouts, /metrics,
/v1/completions and OpenAI conformance (tiny random model)."""

from __future__ import annotations

import json
import threading

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from test_web_api import EXPERIMENT, HIGH_FLOOR, QUESTION, _events, axis, capping  # noqa: E402,F401

from personaxis.generation import SamplingConfig, generate  # noqa: E402
from personaxis.io.tensor_files import save_axis, save_capping
from personaxis.web import create_app  # noqa: E402
from personaxis.web.batcher import BatcherConfig, GuardPlan, GuardSwitch, Job, QueueFull, RowEnd, RowError  # noqa: E402
from personaxis.web.engine import ModelService  # noqa: E402
from personaxis.web.stream import StreamSettings, TokenStep  # noqa: E402

PROMPTS = [
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "user", "content": "Tell me about the sea and the ghost that sings to the moon."}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "What do you fear most?"}],
    [{"role": "user", "content": "Explain how rainbows form."}],
    [{"role": "user", "content": "abc"}],
]


class Collector:
    """A job's items, and an event set when it ended."""

    def __init__(self) -> None:
        self.items: list = []
        self.ended = threading.Event()

    def __call__(self, item) -> None:
        self.items.append(item)
        if isinstance(item, RowEnd | RowError):
            self.ended.set()

    @property
    def end(self):
        assert self.ended.wait(60)
        return self.items[-1]


def _job(service: ModelService, messages, treatment, max_new: int = 10, **kw) -> tuple[Job, Collector]:
    prompt = service.prepare_prompt(messages, max_new).prompt
    out = Collector()
    return Job(
        prompt, StreamSettings(max_new_tokens=max_new, **kw), treatment.interventions, out, guard=treatment.guard
    ), out


@pytest.fixture()
def service(tiny_llama, axis, capping):  # noqa: F811
    svc = ModelService(tiny_llama, axis, capping, batcher=BatcherConfig(max_batch=16), guard_window=3)
    yield svc
    svc.close()


def test_batched_greedy_answers_match_served_alone_with_mixed_treatments(service, tiny_llama):
    treatments = [
        service.treatment(None, 0.0),
        service.treatment(EXPERIMENT, 0.0),
        service.treatment(None, 0.7),
        service.treatment(None, -0.5),
        service.treatment("auto", 0.0),
        service.treatment(EXPERIMENT, 0.3),
    ]
    cases = [(PROMPTS[i % len(PROMPTS)], t) for i, t in enumerate(treatments)]
    alone = []
    for messages, treatment in cases:
        job, out = _job(service, messages, treatment)
        service.batcher.submit(job)
        alone.append(out.end)
    with service.lock:  # every request is queued before the first step: they decode side by side
        jobs = [_job(service, m, t) for m, t in cases]
        for job, _ in jobs:
            service.batcher.submit(job)
    batched = [out.end for _, out in jobs]
    assert service.batcher.counters.peak_rows >= len(cases) - 1
    for a, b in zip(alone, batched, strict=True):
        assert isinstance(a, RowEnd) and isinstance(b, RowEnd)
        assert a.text == b.text and a.new_tokens == b.new_tokens
        assert a.projection == pytest.approx(b.projection, abs=1e-4)
    # each row kept its own treatment inside the shared passes
    assert batched[1].projection >= HIGH_FLOOR - 1e-3 and batched[5].projection >= HIGH_FLOOR - 1e-3
    assert batched[0].projection < HIGH_FLOOR and batched[2].projection != pytest.approx(batched[0].projection)
    assert batched[1].capped_tokens == batched[1].new_tokens and batched[0].capped_tokens == 0
    # and the answers are the generation engine's for the same request
    for (messages, treatment), answer in zip(cases[:4], alone[:4], strict=True):
        expected = generate(
            tiny_llama,
            [messages],
            SamplingConfig(max_new_tokens=10, temperature=0.0, batch_size=1),
            interventions=treatment.interventions,
        )[0]
        assert answer.text == expected.text.strip()  # the web app shows answers without surrounding whitespace


def test_a_joining_prompt_is_prefilled_in_chunks_between_decoding_steps(tiny_llama, axis, capping):  # noqa: F811
    config = BatcherConfig(max_batch=8, prefill_chunk=3, prefix_cache=False)
    chunked = ModelService(tiny_llama, axis, capping, batcher=config)
    try:
        cases = [
            (PROMPTS[0], chunked.treatment(None, 0.3), 24),
            (PROMPTS[1], chunked.treatment(EXPERIMENT, 0.0), 8),
        ]
        running, joining = cases
        alone = []
        for messages, treatment, max_new in cases:
            job, out = _job(chunked, messages, treatment, max_new=max_new)
            chunked.batcher.submit(job)
            alone.append(out.end)
        passes_alone = chunked.batcher.counters.prefill_passes
        assert passes_alone == 2  # nothing else decoding: each prompt in one pass
        late, late_out = _job(chunked, joining[0], joining[1], max_new=joining[2])
        first, first_out = _job(chunked, running[0], running[1], max_new=running[2])
        passes_seen: list[int] = []

        def emit(item) -> None:  # the scheduler thread: the late request queues before the next step
            if isinstance(item, TokenStep):
                passes_seen.append(chunked.batcher.counters.prefill_passes)
                if len(passes_seen) == 1:
                    chunked.batcher.submit(late)
            first_out(item)

        first.emit = emit
        chunked.batcher.submit(first)
        batched = [first_out.end, late_out.end]
        n_chunks = -(-len(late.prompt) // 3)
        assert n_chunks > 2 and chunked.batcher.counters.prefill_passes == passes_alone + 1 + n_chunks
        # one chunk of the joining prompt between two steps of the running answer
        assert passes_seen[1 : 1 + n_chunks] == list(range(passes_alone + 2, passes_alone + 2 + n_chunks))
        for a, b in zip(alone, batched, strict=True):
            assert isinstance(a, RowEnd) and isinstance(b, RowEnd)
            assert a.text == b.text and a.new_tokens == b.new_tokens
            assert a.prompt_projections == pytest.approx(b.prompt_projections, abs=1e-4)
        assert len(batched[1].prompt_projections) == len(late.prompt)
    finally:
        chunked.close()


@pytest.mark.parametrize("kept", [None, 10])
def test_a_shared_prompt_start_is_read_once(tiny_llama, axis, capping, kept, monkeypatch):  # noqa: F811
    from personaxis.web import prefix_cache

    if kept is not None:  # a cache that keeps only the first 10 positions of each prompt
        monkeypatch.setattr(prefix_cache, "MAX_TOKENS", kept)
    pirate = [{"role": "system", "content": "You are a pirate who sails the seven seas."}]
    first = [*pirate, {"role": "user", "content": "What do you fear most?"}]
    second = [*pirate, {"role": "user", "content": "Where is the treasure buried?"}]
    third = [*pirate, {"role": "user", "content": "Tell me the longest story of your voyages and your crew."}]
    reference = ModelService(tiny_llama, axis, capping, batcher=BatcherConfig(prefix_cache=False))
    cached = ModelService(tiny_llama, axis, capping)
    try:
        answers = []
        for svc in (reference, cached):
            treatment = svc.treatment(EXPERIMENT, 0.2)
            for messages in (first, second):
                job, out = _job(svc, messages, treatment, max_new=12)
                svc.batcher.submit(job)
                answers.append(out.end)
            with svc.lock:  # two prompts of different lengths join together, left-padded
                pair = [_job(svc, m, treatment, max_new=12) for m in (third, second)]
                for job, _ in pair:
                    svc.batcher.submit(job)
            answers += [out.end for _, out in pair]
            other, other_out = _job(svc, second, svc.treatment(None, 0.0), max_new=12)
            svc.batcher.submit(other)  # another treatment: its own prompt start
            answers.append(other_out.end)
        prompt = cached.prepare_prompt(second, 12).prompt
        shared = next(
            i for i, (a, b) in enumerate(zip(cached.prepare_prompt(first, 12).prompt, prompt, strict=False)) if a != b
        )
        assert shared >= 8
        shared = min(shared, kept or shared)
        assert cached.batcher.prefixes.hits == 2 and cached.batcher.prefixes.tokens_reused == 3 * shared
        assert reference.batcher.prefixes.hits == 0
        snapshot = cached.batcher.snapshot()
        assert snapshot["prefix_hits"] == 2 and snapshot["prefix_tokens"] == 3 * shared
        assert len(answers) == 10
        for a, b in zip(answers[:5], answers[5:], strict=True):
            assert a.text == b.text and a.new_tokens == b.new_tokens
            assert a.prompt_projections == pytest.approx(b.prompt_projections, abs=1e-4)
            assert a.projection == pytest.approx(b.projection, abs=1e-4)
    finally:
        reference.close()
        cached.close()


def test_sampled_answers_do_not_depend_on_the_batch(service):
    treatment = service.treatment(None, 0.0)
    settings = {"temperature": 1.2, "top_p": 0.9, "seed": 5}
    job, out = _job(service, PROMPTS[0], treatment, **settings)
    service.batcher.submit(job)
    alone = out.end
    with service.lock:
        jobs = [_job(service, PROMPTS[i], treatment, **settings) for i in range(3)]
        for job, _ in jobs:
            service.batcher.submit(job)
    assert jobs[0][1].end.text == alone.text
    # the same random stream as the first answer of `generate` with this seed: the same sampled answer
    expected = generate(
        service.lm,
        [PROMPTS[0]],
        SamplingConfig(max_new_tokens=10, temperature=1.2, top_p=0.9, seed=5),
        interventions=treatment.interventions,
    )[0]
    assert alone.text == expected.text.strip() and alone.new_tokens == expected.new_tokens


def test_running_projection_is_the_mean_of_the_same_pass_readings(service):
    job, out = _job(service, PROMPTS[1], service.treatment(None, 0.0), max_new=8)
    service.batcher.submit(job)
    end = out.end
    steps = [i for i in out.items if isinstance(i, TokenStep)]
    assert steps and steps[-1].projection == pytest.approx(end.projection)
    # the answer is `generate_ids`'s, and each step's projection the mean of the teacher-forced readings of the answer
    # tokens fed so far (every generated token but an end-of-turn one is fed back once)
    from personaxis.generation import generate_ids
    from personaxis.hooks import residual_hooks

    prompt = service.prepare_prompt(PROMPTS[1], 8).prompt
    answer = generate_ids(service.lm, [prompt], SamplingConfig(max_new_tokens=8), stop_ids=service.stop_ids)[0]
    fed = [t for t in answer if t not in set(service.stop_ids)]
    assert len(fed) == end.new_tokens
    unit = service.axis.unit(service.layer).to(device=service.lm.device, dtype=torch.float32)
    seen: dict[str, torch.Tensor] = {}

    def read(hidden: torch.Tensor, mask: torch.Tensor | None) -> None:
        seen["projection"] = hidden[0].to(torch.float32) @ unit

    with service.lock, torch.inference_mode(), residual_hooks(service.lm, readers={service.layer: [read]}):
        service.lm.model(input_ids=torch.tensor([prompt + fed], device=service.lm.device))
    readings = seen["projection"][len(prompt) :].tolist()
    running = [sum(readings[: s.n_tokens]) / s.n_tokens for s in steps]
    assert [s.projection for s in steps] == pytest.approx(running, abs=1e-5)
    assert [s.n_tokens for s in steps][-1] == len(fed)


def test_guard_switches_on_below_the_threshold_and_never_above_it(service):
    treatment = service.treatment("auto", 0.0)
    assert treatment.guard is not None and treatment.guard.threshold == pytest.approx(HIGH_FLOOR)
    job, out = _job(service, PROMPTS[0], treatment, max_new=12)
    with service.lock:
        service.batcher.submit(job)
        quiet = Job(
            job.prompt,
            job.settings,
            {},
            Collector(),
            guard=GuardPlan(treatment.guard.interventions, threshold=-1e9, window=3),
        )
        service.batcher.submit(quiet)
    end = out.end
    switches = [i for i in out.items if isinstance(i, GuardSwitch)]
    if end.new_tokens >= 3:
        assert switches and switches[0].on and switches[0].n_tokens == 3
        assert end.capped_tokens == end.new_tokens - 3 and end.switches == len(switches)
        # once capped, the floor holds the projection at the threshold: no switching back (hysteresis)
        assert len(switches) == 1
    quiet_end = quiet.emit.end
    assert not any(isinstance(i, GuardSwitch) for i in quiet.emit.items) and quiet_end.capped_tokens == 0
    assert service.batcher.counters.alarms >= 1


def test_a_full_queue_is_refused_and_a_late_request_times_out(service, tiny_llama, axis, capping):  # noqa: F811
    small = ModelService(tiny_llama, axis, capping, batcher=BatcherConfig(max_batch=1, max_queue=1))
    try:
        with small.lock:
            jobs = [_job(small, PROMPTS[0], small.treatment(None, 0.0)) for _ in range(3)]
            with pytest.raises(QueueFull):
                for job, _ in jobs:
                    small.batcher.submit(job)
        assert small.batcher.counters.rejected == 1
    finally:
        small.close()
    job, out = _job(service, PROMPTS[0], service.treatment(None, 0.0))
    job.timeout_s = 1e-9
    service.batcher.submit(job)
    assert isinstance(out.end, RowError) and out.end.status == 504


def test_a_request_past_its_deadline_mid_answer_ends_with_504_and_frees_its_row(service):
    job, out = _job(service, PROMPTS[1], service.treatment(None, 0.0), max_new=30)

    def emit(item) -> None:  # the deadline passes once the first token is out
        if isinstance(item, TokenStep):
            job.deadline = 0.0
        out(item)

    job.emit = emit
    before = service.batcher.counters.timed_out
    service.batcher.submit(job)
    end = out.end
    assert isinstance(end, RowError) and end.status == 504 and "timed out after 1 tokens" in end.message
    assert [type(i) for i in out.items].count(TokenStep) == 1
    assert service.batcher.counters.timed_out == before + 1
    for _ in range(200):  # the scheduler frees the row (and the cache) at its next turn
        if service.batcher.snapshot()["rows"] == 0 and service.batcher.snapshot()["kv_bytes"] == 0:
            break
        threading.Event().wait(0.01)
    assert service.batcher.snapshot()["rows"] == 0 and service.batcher.snapshot()["kv_bytes"] == 0


def test_a_timed_out_request_is_a_504_or_an_error_chunk_with_its_type(tiny_llama, axis):  # noqa: F811
    app = create_app(tiny_llama, axis, batcher=BatcherConfig(timeout_s=1e-9))
    body = {"model": "m", "messages": QUESTION, "max_tokens": 4}
    with TestClient(app) as local:
        for path in ("/v1/chat/completions", "/api/chat"):
            response = local.post(path, json=body)
            assert response.status_code == 504 and response.json()["error"]["type"] == "timeout"
            assert "timed out" in response.json()["error"]["message"]
        text = local.post("/v1/chat/completions", json={**body, "stream": True}).text
        errors = [json.loads(line[6:]) for line in text.splitlines() if line.startswith('data: {"error"')]
        assert errors and errors[0]["error"]["type"] == "timeout" and errors[0]["error"]["code"] == 504
        assert text.rstrip().endswith("data: [DONE]")
        events = _events(local.post("/api/chat/stream", json=body).text)
        assert events[-1][0] == "error" and events[-1][1]["error"]["type"] == "timeout"
        metrics = local.get("/metrics").text
        assert "personaxis_requests_timed_out_total 4" in metrics and "personaxis_batch_rows 0" in metrics


def test_the_cache_budget_bounds_the_rows_decoded_together(tiny_llama, axis):  # noqa: F811
    probe = ModelService(tiny_llama, axis)
    prompt = probe.prepare_prompt(PROMPTS[1], 12).prompt
    per_row = (len(prompt) + 12 + 1) * probe.batcher.bytes_per_token
    probe.close()
    budget = 2 * per_row + per_row // 2  # room for two such rows, not three
    small = ModelService(tiny_llama, axis, batcher=BatcherConfig(max_batch=8, kv_budget_bytes=budget))
    try:
        with small.lock:  # all four wait before the first step
            jobs = [_job(small, PROMPTS[1], small.treatment(None, 0.1 * i), max_new=12) for i in range(4)]
            for job, _ in jobs:
                small.batcher.submit(job)
        assert all(isinstance(out.end, RowEnd) for _, out in jobs)
        counters = small.batcher.counters
        assert counters.peak_rows == 2 and 0 < counters.peak_kv_bytes <= budget
    finally:
        small.close()


# ------------------------------------------------------------------------------------------------ over HTTP
@pytest.fixture(scope="module")
def client(tiny_llama, axis, capping):  # noqa: F811
    app = create_app(tiny_llama, axis, capping, guard_window=3)
    with TestClient(app) as test_client:
        yield test_client


def test_guard_switch_is_visible_in_both_streams(client):
    events = _events(client.post("/api/chat/stream", json={"messages": QUESTION, "max_tokens": 10, "cap": "auto"}).text)
    names = [n for n, _ in events]
    assert "guard" in names and names[-1] == "done"
    guard = dict(events)["guard"]
    assert guard["capping"] is True and guard["n_tokens"] == 3
    assert events[-1][1]["guard_switches"] == [guard] and events[-1][1]["capped_tokens"] >= 1
    text = client.post(
        "/v1/chat/completions",
        json={
            "model": "m",
            "messages": QUESTION,
            "max_tokens": 10,
            "temperature": 0,
            "stream": True,
            "personaxis": {"cap": "auto"},
        },
    ).text
    chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    guards = [c["personaxis"]["guard"] for c in chunks if "guard" in c.get("personaxis", {})]
    assert guards and guards[0]["capping"] is True
    assert all(
        "running_projection" in c["personaxis"]
        for c in chunks
        if c["choices"] and c["choices"][0]["delta"].get("content")
    )
    metrics = client.get("/metrics").text
    alarms = [line for line in metrics.splitlines() if line.startswith("personaxis_guard_alarms_total ")]
    assert alarms and int(alarms[0].split()[1]) >= 2


def test_metrics_count_requests_and_tokens(client):
    before = client.get("/metrics").text
    client.post("/api/chat", json={"messages": QUESTION, "max_tokens": 4})
    after = client.get("/metrics").text

    def value(text: str, name: str) -> int:
        return int(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))

    assert value(after, "personaxis_requests_total") == value(before, "personaxis_requests_total") + 1
    assert value(after, "personaxis_tokens_total") > value(before, "personaxis_tokens_total")
    assert value(after, "personaxis_kv_cache_bytes_peak") <= value(after, "personaxis_kv_cache_budget_bytes")


def test_a_full_queue_is_a_429_with_retry_after(tiny_llama, axis):  # noqa: F811
    app = create_app(tiny_llama, axis, batcher=BatcherConfig(max_queue=0, retry_after_s=3))
    with TestClient(app) as local:
        for path in ("/api/chat", "/api/chat/stream"):
            response = local.post(path, json={"messages": QUESTION, "max_tokens": 4})
            assert response.status_code == 429 and response.headers["retry-after"] == "3"
            assert response.json()["error"]["type"] == "rate_limit_error"


def test_a_conversation_over_the_cache_budget_is_413(tiny_llama, axis):  # noqa: F811
    app = create_app(tiny_llama, axis, batcher=BatcherConfig(kv_budget_bytes=1000))
    with TestClient(app) as local:
        response = local.post("/v1/chat/completions", json={"model": "m", "messages": QUESTION, "max_tokens": 4})
        assert response.status_code == 413 and "budget" in response.json()["error"]["message"]


# ------------------------------------------------------------------------------------------ OpenAI conformance
@pytest.fixture(scope="module")
def openai_client(client):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)


def test_openai_completions_streamed_and_not(openai_client):
    whole = openai_client.completions.create(model="m", prompt="The quick brown fox", max_tokens=6, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 6 and isinstance(whole.model_extra["personaxis"]["projection"], float)
    chunks = list(
        openai_client.completions.create(
            model="m", prompt="The quick brown fox", max_tokens=6, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices).strip() == whole.choices[0].text
    default = openai_client.completions.create(model="m", prompt="The quick brown fox", max_tokens=20)
    assert default.usage.completion_tokens <= 20


def test_openai_default_temperature_is_one(client):
    greedy = client.post(
        "/v1/chat/completions", json={"model": "m", "messages": QUESTION, "max_tokens": 12, "temperature": 0}
    ).json()["choices"][0]["message"]["content"]
    sampled = client.post(
        "/v1/chat/completions", json={"model": "m", "messages": QUESTION, "max_tokens": 12, "temperature": 1.0}
    ).json()["choices"][0]["message"]["content"]
    default = client.post("/v1/chat/completions", json={"model": "m", "messages": QUESTION, "max_tokens": 12}).json()[
        "choices"
    ][0]["message"]["content"]
    assert default == sampled and sampled != greedy


@pytest.mark.parametrize(
    "field, value",
    [
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("logprobs", True),
        ("response_format", {"type": "json_object"}),
        ("presence_penalty", 0.5),
        ("frequency_penalty", 1.0),
        ("logit_bias", {"1": 5}),
    ],
)
def test_openai_unsupported_fields_are_a_clear_400(openai_client, field, value):
    import openai

    with pytest.raises(openai.BadRequestError, match=f"{field} is not supported"):
        openai_client.chat.completions.create(model="m", messages=QUESTION, max_tokens=4, **{field: value})
    # a value that means "not used" is accepted
    openai_client.chat.completions.create(
        model="m", messages=QUESTION, max_tokens=2, presence_penalty=0, response_format={"type": "text"}, logprobs=False
    )


def test_openai_models_and_stream_errors_carry_the_error_type(openai_client, client, monkeypatch):
    assert [m.id for m in openai_client.models.list().data] == ["tiny-llama"]
    service = client.app.state.px.service
    monkeypatch.setattr(service.batcher, "_step", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    text = client.post(
        "/v1/chat/completions", json={"model": "m", "messages": QUESTION, "max_tokens": 4, "stream": True}
    ).text
    errors = [json.loads(line[6:]) for line in text.splitlines() if line.startswith('data: {"error"')]
    assert errors and errors[0]["error"]["type"] == "server_error" and "boom" in errors[0]["error"]["message"]
    monkeypatch.undo()
    assert client.post("/api/chat", json={"messages": QUESTION, "max_tokens": 2}).status_code == 200


def test_rows_per_step_use_one_forward(service, tiny_llama):
    """Four requests in one batch: decoding steps are shared (fewer steps than tokens)."""
    with service.lock:
        jobs = [_job(service, PROMPTS[i], service.treatment(None, 0.1 * i), max_new=6) for i in range(4)]
        for job, _ in jobs:
            service.batcher.submit(job)
    ends = [out.end for _, out in jobs]
    tokens = sum(e.new_tokens for e in ends)
    assert service.batcher.counters.steps <= max(e.new_tokens for e in ends) + 1 < tokens
    assert torch.is_grad_enabled()  # the scheduler's inference mode does not leak into the caller


def test_guard_eval_runs_three_conditions_in_one_batch(tiny_llama, axis, capping):  # noqa: F811
    from personaxis.evals.guard import GuardEvalSettings, guard_metrics, label_and_score, markdown_table, run_guard_eval

    settings = GuardEvalSettings(
        EXPERIMENT, n_jailbreaks=2, n_arithmetic=1, n_instructions=1, max_new_tokens=6, window=2
    )
    records, guard = run_guard_eval(tiny_llama, axis, capping, settings)
    assert guard["threshold"] == pytest.approx(HIGH_FLOOR) and guard["window"] == 2
    metrics = guard_metrics(label_and_score(records))
    assert [r["condition"] for r in records].count("guard") == 4
    assert metrics["none"]["capped_share_jailbreak"] == 0 and metrics["always"]["capped_share_jailbreak"] == 1
    # the tiny model's projections are all below the high floor: guard mode caps every answer after 2 tokens
    guard_rows = [r for r in records if r["condition"] == "guard" and r["new_tokens"] > 2]
    assert all(r["switches"][0]["capping"] and r["capped_tokens"] == r["new_tokens"] - 2 for r in guard_rows)
    assert "guard mode" in markdown_table(metrics)


def test_per_turn_projections_come_from_the_serving_passes(service):
    from test_web_api import FIXED

    messages = [*FIXED, {"role": "user", "content": "Why?"}]
    prepared = service.prepare_prompt(messages, 8)
    treatment = service.treatment(EXPERIMENT, 0.0)
    job = Job(prepared.prompt, StreamSettings(max_new_tokens=8), treatment.interventions, Collector())
    service.batcher.submit(job)
    end = job.emit.end
    from personaxis.web.engine import per_turn

    served = per_turn(prepared, end)
    checked = service.teacher_forced_projections(prepared.conversation, end.text, treatment)
    assert len(served) == len(checked) == 3
    assert served[:2] == pytest.approx(checked[:2], abs=1e-4)  # earlier turns: the prefill's readings
    assert served[2] == end.projection  # the answer: the running mean of its own tokens


def test_guard_eval_command_refuses_bad_inputs(tmp_path, capsys, axis, capping):  # noqa: F811
    from personaxis.evals.guard import main

    assert main(["--run", str(tmp_path), "--experiment", EXPERIMENT]) == 2
    assert "error: no axis at" in capsys.readouterr().err
    save_axis(axis, tmp_path / "axis.safetensors")
    assert main(["--run", str(tmp_path), "--experiment", EXPERIMENT]) == 2
    assert "error: no capping config" in capsys.readouterr().err
    save_capping(capping, tmp_path / "capping.safetensors")
    assert main(["--run", str(tmp_path), "--experiment", "nope"]) == 2
    assert "error: unknown experiment 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "option", ["--max-batch", "--kv-budget-mb", "--request-timeout", "--timeout", "--guard-window"]
)
def test_serve_refuses_bad_batching_options(tmp_path, axis, option):  # noqa: F811
    from typer.testing import CliRunner

    from personaxis.cli import app as cli

    save_axis(axis, tmp_path / "axis.safetensors")
    result = CliRunner().invoke(cli, ["serve", "--run", str(tmp_path), option, "0"])
    assert result.exit_code == 2 and "error:" in result.output
    assert ("--request-timeout" if option == "--timeout" else option) in result.output


def test_row_interventions_act_on_their_rows_only():
    from personaxis.interventions import Add, FloorCap, RowInterventions

    vector = torch.zeros(4)
    vector[0] = 1.0
    add, cap = Add(vector, alpha=2.0), FloorCap(vector, tau=10.0)
    table = RowInterventions()
    table.set_rows([{}, {1: [add]}, {1: [add, cap]}])
    hidden = torch.zeros(3, 2, 4)
    mask = torch.tensor([[True, True], [False, True], [True, True]])
    out = table.writers()[1][0](hidden, mask)
    assert out[0].abs().sum() == 0  # no treatment
    assert out[1, 0, 0] == 0 and out[1, 1, 0] == 2  # padding untouched, the rest steered
    assert (out[2, :, 0] == 10).all()  # steered, then floored
    assert table.layers == [1]
    table.set_rows([{}, {}, {}])
    assert table.writers() == {}
