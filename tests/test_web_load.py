"""Load and faults: 200 requests from 50 concurrent clients against a real server (uvicorn on a loopback port, tiny
random model): streamed, cancelled mid-stream, malformed and oversized requests mixed. The server stays up, its
key/value cache stays within budget, every well-formed request gets a complete answer or a 429, and every greedy
answer equals the same request served alone."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
from test_web_api import EXPERIMENT, axis, capping  # noqa: E402,F401

from personaxis.web import create_app  # noqa: E402
from personaxis.web.batcher import BatcherConfig  # noqa: E402
from personaxis.web.limits import Limits  # noqa: E402

CLIENTS = 50
PER_CLIENT = 4
PROMPTS = [
    "Who are you?",
    "Tell me about the sea.",
    "What do you fear most?",
    "Explain how rainbows form.",
    "abc def ghi",
    "The quick brown fox jumps over the lazy dog.",
]
TREATMENTS = [
    {"cap": None, "alpha": 0.0},
    {"cap": EXPERIMENT, "alpha": 0.0},
    {"cap": None, "alpha": 0.6},
    {"cap": "auto", "alpha": 0.0},
]
BUDGET = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def server(tiny_llama, axis, capping):  # noqa: F811
    limits = Limits(max_body_bytes=32 * 1024, max_new_tokens=48)
    app = create_app(
        tiny_llama,
        axis,
        capping,
        limits=limits,
        guard_window=3,
        batcher=BatcherConfig(max_batch=16, max_queue=20, kv_budget_bytes=BUDGET, retry_after_s=1),
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    instance = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=instance.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(500):
        if instance.started:
            break
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", app
    instance.should_exit = True
    thread.join(timeout=10)


def _request(i: int) -> dict:
    prompt = PROMPTS[i % len(PROMPTS)]
    treatment = TREATMENTS[(i // len(PROMPTS)) % len(TREATMENTS)]
    return {
        "model": "m",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 8 + i % 9,
        "temperature": 0,
        "personaxis": treatment,
    }


def _stream_text(response) -> tuple[str, str | None]:
    text, finish = [], None
    for line in response.iter_lines():
        if line.startswith("data: {"):
            data = json.loads(line[6:])
            assert "error" not in data, data
            for choice in data["choices"]:
                text.append(choice["delta"].get("content", ""))
                finish = choice["finish_reason"] or finish
    return "".join(text), finish


def _refused(r) -> bool:
    """A 429 carries Retry-After (the server's retry_after_s) and an OpenAI rate-limit error."""
    if r.status_code != 429:
        return False
    r.read()
    assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
    return True


def _one(base: str, i: int) -> tuple[int, str, int, str | None]:
    """(index, kind, status, answer text or None)."""
    kind = ["malformed", "oversized", "cancelled", "stream", "stream", "whole", "whole", "whole", "bad_cap", "whole"][
        i % 10
    ]
    body = _request(i)
    with httpx.Client(base_url=base, timeout=120) as client:
        if kind == "malformed":
            r = client.post(
                "/v1/chat/completions",
                content=b'{"model": "m", "messages": [',
                headers={"content-type": "application/json"},
            )
            return i, kind, r.status_code, None
        if kind == "oversized":
            big = {**body, "messages": [{"role": "user", "content": "x" * 40_000}]}
            return i, kind, client.post("/v1/chat/completions", json=big).status_code, None
        if kind == "bad_cap":
            return (
                i,
                kind,
                client.post("/v1/chat/completions", json={**body, "personaxis": {"cap": "nope"}}).status_code,
                None,
            )
        if kind == "whole":
            r = client.post("/v1/chat/completions", json=body)
            if _refused(r) or r.status_code != 200:
                return i, kind, r.status_code, None
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] in ("stop", "length")
            return i, kind, 200, choice["message"]["content"]
        with client.stream(
            "POST",
            "/v1/chat/completions",
            json={**body, "stream": True, "max_tokens": 48 if kind == "cancelled" else body["max_tokens"]},
        ) as r:
            if _refused(r) or r.status_code != 200:
                r.read()
                return i, kind, r.status_code, None
            if kind == "cancelled":
                for n, _ in enumerate(r.iter_lines()):
                    if n >= 3:
                        break
                return i, kind, 200, None
            text, finish = _stream_text(r)
            assert finish in ("stop", "length")
            return i, kind, 200, text


def test_two_hundred_requests_from_fifty_clients(server):
    base, app = server

    def client_work(c: int) -> list:
        return [_one(base, c * PER_CLIENT + k) for k in range(PER_CLIENT)]

    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        results = [r for rs in pool.map(client_work, range(CLIENTS)) for r in rs]
    assert len(results) == CLIENTS * PER_CLIENT
    expected_errors = {"malformed": 422, "oversized": 413, "bad_cap": 400}
    answered = 0
    for i, kind, status, _ in results:
        if kind in expected_errors:
            assert status == expected_errors[kind], (i, kind, status)
        else:
            assert status in (200, 429), (i, kind, status)
            answered += status == 200
    assert answered >= 50  # most well-formed requests were served, not refused

    # still up, nothing left running, the cache stayed within its budget
    with httpx.Client(base_url=base, timeout=60) as client:
        assert client.get("/api/info").status_code == 200
        for _ in range(200):
            snapshot = app.state.px.service.batcher.snapshot()
            if snapshot["rows"] == 0 and snapshot["queue"] == 0:
                break
            time.sleep(0.05)
        assert snapshot["rows"] == 0 and snapshot["queue"] == 0
        assert 0 < snapshot["peak_kv_bytes"] <= BUDGET and snapshot["peak_rows"] > 1
        assert snapshot["cancelled"] >= 1  # clients that left mid-stream freed their rows
        # every greedy answer is the one the same request gets when served alone
        alone: dict[str, str] = {}
        for i, kind, _status, text in results:
            if text is None:
                continue
            body = _request(i)
            key = json.dumps(body, sort_keys=True)
            if key not in alone:
                r = client.post("/v1/chat/completions", json=body)
                assert r.status_code == 200
                alone[key] = r.json()["choices"][0]["message"]["content"]
            # a stream has sent trailing whitespace before it knew the answer would end there
            assert (text.strip() if kind == "stream" else text) == alone[key], (i, kind)
