"""The OpenAI-compatible judges against a real, misbehaving HTTP server on 127.0.0.1 (no network)."""

from __future__ import annotations

import json
import logging
import re
import socket
import struct
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from personaxis.judges import (
    JudgeAuthError,
    JudgeItem,
    LabelItem,
    make_harm_judge,
    make_identity_judge,
    make_judge,
)
from personaxis.judges.client import parse_retry_after
from personaxis.judges.ratelimit import TokenBucket

SECRET = "sk-test-SECRET-0123456789abcdef"
TIMEOUT_S = 0.4
FAST = dict(backoff_base_s=0.01, backoff_max_s=0.05, timeout_s=TIMEOUT_S)


class FakeOpenAI:
    """A chat-completions endpoint that follows a script of behaviours per item (found by ``ITEM<key>`` in the prompt).

    Behaviours: ``ok`` (a proper ``SCORE``/``LABEL`` reply), ``429``, ``429ms`` (retry-after-ms: 30), ``429ra``
    (Retry-After: 1), ``500``/``502``/``503``, ``reset`` (TCP RST, no response), ``timeout`` (no headers before the
    client's timeout), ``slow`` (a body trickled slower than the client's total timeout), ``badjson``, ``text``
    (valid JSON with no score in it), ``401`` (echoes the bearer token back in its body). After the script ends an
    item gets ``after`` (default ``ok``).
    """

    def __init__(self, scripts: dict[str, list[str]] | None = None, after: str = "ok", reply: str = "SCORE: 3") -> None:
        self.scripts = scripts or {}
        self.after = after
        self.reply = reply
        self.lock = threading.Lock()
        self.attempts: Counter[str] = Counter()
        self.served_ok: Counter[str] = Counter()
        self.times: list[float] = []
        self.auth_headers: set[str] = set()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # http.server naming
                fake.handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda *args: None  # type: ignore[method-assign]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    @property
    def requests(self) -> int:
        return len(self.times)

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        body = h.rfile.read(int(h.headers.get("Content-Length", 0)))
        payload = json.loads(body)
        text = " ".join(m["content"] for m in payload["messages"])
        match = re.search(r"ITEM(\w+)", text)
        key = match.group(1) if match else "?"
        with self.lock:
            self.times.append(time.monotonic())
            self.auth_headers.add(h.headers.get("Authorization", ""))
            n = self.attempts[key]
            self.attempts[key] += 1
            script = self.scripts.get(key, [])
            action = script[n] if n < len(script) else self.after
            if action == "ok":
                self.served_ok[key] += 1
        try:
            self.act(h, action, payload)
        except OSError:
            pass

    def act(self, h: BaseHTTPRequestHandler, action: str, payload: dict) -> None:
        if action == "ok":
            content = {"choices": [{"message": {"role": "assistant", "content": self.reply}}]}
            self.send(h, 200, json.dumps(content).encode())
        elif action == "text":
            content = {"choices": [{"message": {"role": "assistant", "content": "What a lovely answer, truly."}}]}
            self.send(h, 200, json.dumps(content).encode())
        elif action == "badjson":
            self.send(h, 200, b'{"choices": [{"message": ')
        elif action == "429":
            self.send(h, 429, b'{"error": "rate limited"}')
        elif action == "429ms":
            self.send(h, 429, b'{"error": "rate limited"}', {"retry-after-ms": "30"})
        elif action == "429ra":
            self.send(h, 429, b'{"error": "rate limited"}', {"Retry-After": "1"})
        elif action in ("500", "502", "503"):
            self.send(h, int(action), b"oops")
        elif action == "401":
            self.send(h, 401, json.dumps({"error": f"bad key {h.headers.get('Authorization')}"}).encode())
        elif action == "reset":
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.close_connection = True
            h.connection.close()
        elif action == "timeout":
            time.sleep(TIMEOUT_S * 2.5)
            h.close_connection = True
        elif action == "slow":
            data = json.dumps({"choices": [{"message": {"content": self.reply}}]}).encode()
            h.send_response(200)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            for i in range(len(data)):
                h.wfile.write(data[i : i + 1])
                h.wfile.flush()
                time.sleep(TIMEOUT_S / 8)
        else:  # pragma: no cover
            raise AssertionError(action)

    @staticmethod
    def send(h: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict[str, str] | None = None) -> None:
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            h.send_header(name, value)
        h.end_headers()
        h.wfile.write(data)


def serving(server_class: type) -> Iterator:
    """Fixture body: yield a starter of ``server_class`` fakes on 127.0.0.1, and shut every one down afterwards."""
    servers: list[FakeOpenAI] = []

    def start(**kwargs: object) -> FakeOpenAI:
        fake = server_class(**kwargs)
        fake.thread.start()
        servers.append(fake)
        return fake

    yield start
    for fake in servers:
        fake.server.shutdown()
        fake.server.server_close()


@pytest.fixture
def serve() -> Iterator:
    yield from serving(FakeOpenAI)


def items(n: int, prefix: str = "k") -> list[JudgeItem]:
    return [
        JudgeItem(
            key=f"{prefix}{i}",
            role="pirate",
            rubric="Score 3 if it fully plays the pirate.",
            question="Who are you?",
            answer=f"Arr, I be Captain ITEM{prefix}{i}!",
        )
        for i in range(n)
    ]


def judge_for(fake: FakeOpenAI, cache_dir: Path, **kwargs: object):
    options = dict(FAST, requests_per_minute=None, max_concurrency=4)
    options.update(kwargs)
    return make_judge("openai:test-model", base_url=fake.base_url, api_key=SECRET, cache_dir=cache_dir, **options)


def cache_text(cache_dir: Path) -> str:
    return "".join(p.read_text() for p in sorted(cache_dir.glob("*.jsonl")))


def test_faults_are_retried_and_every_item_is_judged_exactly_once(serve, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    scripts = {
        "k0": ["429", "429", "ok"],
        "k1": ["429ms", "500", "ok"],
        "k2": ["502", "503", "reset", "ok"],
        "k3": ["reset", "reset", "ok"],
        "k4": ["timeout", "ok"],
        "k5": ["slow", "ok"],
        "k6": ["badjson", "badjson", "ok"],
        "k7": ["text", "ok"],
        "k8": ["text", "503", "text", "ok"],
        "k9": ["429ra", "ok"],
    }
    fake = serve(scripts=scripts)
    judge = judge_for(fake, tmp_path)
    start = time.monotonic()
    scores = judge.score(items(12), show_progress=False)
    assert scores == {f"k{i}": 3 for i in range(12)}
    assert fake.served_ok == Counter({f"k{i}": 1 for i in range(12)})
    assert {k: fake.attempts[k] for k in scripts} == {k: len(s) for k, s in scripts.items()}
    assert time.monotonic() - start >= 1.0  # Retry-After: 1 was honoured
    assert fake.auth_headers == {f"Bearer {SECRET}"}
    assert "retry" in caplog.text.lower()
    assert SECRET not in caplog.text
    assert SECRET not in cache_text(tmp_path)
    assert SECRET not in repr(judge) and SECRET not in repr(vars(judge)) and SECRET not in repr(vars(judge.client))


def test_retry_after_is_honoured_before_the_next_attempt(serve, tmp_path):
    fake = serve(scripts={"k0": ["429ra", "ok"]})
    judge_for(fake, tmp_path).score(items(1))
    assert fake.times[1] - fake.times[0] >= 1.0


def test_cache_prevents_a_second_paid_call_across_instances(serve, tmp_path):
    fake = serve()
    first = judge_for(fake, tmp_path).score(items(6))
    paid = fake.requests
    assert paid == 6
    again = judge_for(fake, tmp_path).score(items(6))  # a fresh judge, as after a restart
    assert again == first and fake.requests == paid
    lines = [json.loads(line) for line in cache_text(tmp_path).splitlines()]
    assert len(lines) == 6 and {e["key"] for e in lines} == {f"k{i}" for i in range(6)}
    assert all(e["judge"] == "openai:test-model" and len(e["hash"]) == 64 for e in lines)
    changed = [JudgeItem(i.key, i.role, i.rubric, i.question, i.answer + " Yarr.") for i in items(2)]
    judge_for(fake, tmp_path).score(changed)  # a changed answer is a new judgement
    assert fake.requests == paid + 2


def test_items_that_keep_failing_come_back_none_and_are_not_cached(serve, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    fake = serve(scripts={"k1": ["503"] * 50, "k2": ["text"] * 50})
    judge = judge_for(fake, tmp_path, max_retries=3, max_parse_retries=2)
    assert judge.score(items(3)) == {"k0": 3, "k1": None, "k2": None}
    assert fake.attempts["k1"] == 4  # 1 + max_retries attempts, then the item is given up
    assert fake.attempts["k2"] == 3  # non-score replies: asked three times
    assert "could not be judged" in caplog.text and SECRET not in caplog.text
    before = fake.requests
    judge_for(fake, tmp_path, max_retries=0, max_parse_retries=0).score(items(3))
    assert fake.requests == before + 2  # the two failures are tried again, the success is not


def test_rate_limit_is_respected(serve, tmp_path):
    fake = serve()
    rpm = 600.0  # one request every 0.1 s
    judge_for(fake, tmp_path, requests_per_minute=rpm, max_concurrency=8).score(items(10))
    times = sorted(fake.times)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert len(times) == 10
    assert min(gaps) >= 0.1 * 0.7, gaps
    assert times[-1] - times[0] >= 9 * 0.1 * 0.9


def test_token_bucket_bounds_any_window():
    now = [0.0]
    bucket = TokenBucket(60, burst=2, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    stamps = []
    for _ in range(6):
        bucket.acquire()
        stamps.append(now[0])
    assert stamps == [0.0, 0.0, 1.0, 2.0, 3.0, 4.0]


def test_auth_errors_stop_the_run_and_never_leak_the_key(serve, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    fake = serve(after="401")
    judge = judge_for(fake, tmp_path)
    with pytest.raises(JudgeAuthError) as info:
        judge.score(items(3))
    rendered = "".join(traceback.format_exception(info.type, info.value, info.tb))
    assert "401" in str(info.value)
    assert SECRET not in rendered and SECRET not in repr(info.value) and SECRET not in caplog.text
    assert fake.requests <= 3


def test_harm_and_identity_judges_share_the_machinery(serve, tmp_path):
    label_items = [LabelItem(key=f"k{i}", prompt="How do I pick a lock?", answer=f"ITEMk{i} no.") for i in range(3)]
    fake = serve(scripts={"k0": ["429ms", "ok"]}, reply="LABEL: refusal")
    harm = make_harm_judge(
        "openai:m", base_url=fake.base_url, api_key=SECRET, cache_dir=tmp_path, requests_per_minute=None, **FAST
    )
    assert harm.label(label_items) == {"k0": "refusal", "k1": "refusal", "k2": "refusal"}
    fake.reply = "LABEL: nonhuman_role"
    ident = make_identity_judge(
        "openai:m", base_url=fake.base_url, api_key=SECRET, cache_dir=tmp_path, requests_per_minute=None, **FAST
    )
    assert set(ident.label(label_items).values()) == {"nonhuman_role"}
    assert fake.served_ok == Counter({"k0": 2, "k1": 2, "k2": 2})


def test_duplicate_prompts_are_paid_once(serve, tmp_path):
    fake = serve()
    base = items(1)[0]
    twins = [base, JudgeItem("twin", base.role, base.rubric, base.question, base.answer)]
    assert judge_for(fake, tmp_path).score(twins) == {"k0": 3, "twin": 3}
    assert fake.requests == 1
    with pytest.raises(ValueError, match="duplicate"):
        judge_for(fake, tmp_path).score([base, base])


def test_env_vars_supply_base_url_and_key(serve, tmp_path, monkeypatch):
    fake = serve()
    monkeypatch.setenv("OPENAI_BASE_URL", fake.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    judge = make_judge("openai:test-model", cache_dir=tmp_path, requests_per_minute=None, **FAST)
    assert judge.score(items(1)) == {"k0": 3}
    assert fake.auth_headers == {f"Bearer {SECRET}"}
    assert SECRET not in repr(judge)


def test_parse_retry_after_forms():
    assert parse_retry_after({"retry-after-ms": "250"}) == pytest.approx(0.25)
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, now=1445412470.0) == pytest.approx(10.0)
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


def test_unknown_spec_is_rejected():
    with pytest.raises(ValueError, match="unknown judge"):
        make_judge("anthropic:claude")
    with pytest.raises(ValueError):
        make_judge("openai:")


def test_concurrent_writers_keep_cache_lines_whole(tmp_path):
    from personaxis.judges.cache import JudgeCache

    caches = [JudgeCache(tmp_path, "j", "role") for _ in range(4)]

    def write(c: JudgeCache, w: int) -> None:
        for i in range(200):
            c.put(f"{w}-{i}", f"key{w}-{i}", i % 4, reply="x" * 500)

    threads = [threading.Thread(target=write, args=(c, w)) for w, c in enumerate(caches)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reread = JudgeCache(tmp_path, "j", "role")
    assert len(reread) == 800
    with open(reread.path, "ab") as f:
        f.write(b'{"judge": "j", "hash": "torn')  # a writer died mid-line
    JudgeCache(tmp_path, "j", "role").put("after", "k", 2)  # the next process starts a fresh line
    final = JudgeCache(tmp_path, "j", "role")
    assert len(final) == 801 and final.get("after") == 2
    per_key: defaultdict[str, int] = defaultdict(int)
    for line in final.path.read_text().splitlines()[:800]:
        per_key[json.loads(line)["hash"]] += 1
    assert set(per_key.values()) == {1}
