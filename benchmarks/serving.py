"""The serving benchmark: concurrent streaming clients against `personaxis serve`'s app, batched and one at a time.

Each server runs in its own process (uvicorn on a loopback port, the model loaded there), so that the clients — one
asyncio loop in the benchmark's process — do not share the server's interpreter. Both servers are up together and
the client counts alternate between them, so that other work on the machine hurts both alike.

    python benchmarks/serving.py --child '{"port": 8123, "max_batch": 1, "model": null}'   # one server (used by run.py)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

QUESTIONS = [
    "Tell me about yourself.",
    "What do you fear most?",
    "Explain how rainbows form.",
    "How do vaccines work?",
    "What advice would you give to someone starting a new job?",
    "Describe your ideal day.",
    "What is the meaning of friendship?",
    "Write a short poem about the sea.",
    "What makes a good leader?",
    "How should I prepare for a marathon?",
    "What do you think about modern architecture?",
    "What is the relationship between law and morality?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child(config: dict[str, Any]) -> None:
    """Serve the app with a random axis of the model's shape (speed does not depend on the axis' values)."""
    import torch
    import uvicorn

    from personaxis.axis import Axis
    from personaxis.models import load_model
    from personaxis.web import create_app
    from personaxis.web.batcher import BatcherConfig
    from personaxis.web.limits import Limits

    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    lm = load_model(config.get("model"), device=config.get("device"))
    generator = torch.Generator().manual_seed(0)
    axis = Axis(
        torch.randn(lm.profile.n_layers, lm.profile.hidden_size, generator=generator),
        model=lm.profile.name,
        residual_norms=torch.ones(lm.profile.n_layers),
    )
    app = create_app(
        lm,
        axis,
        limits=Limits(max_new_tokens=1024),
        batcher=BatcherConfig(
            max_batch=int(config["max_batch"]), max_queue=1024, kv_budget_bytes=4 * 1024**3, timeout_s=3600
        ),
    )
    uvicorn.run(app, host="127.0.0.1", port=int(config["port"]), log_level="warning")


def start_server(
    max_batch: int, model: str | None, device: str | None, threads: int | None
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    config = {"port": port, "max_batch": max_batch, "model": model, "device": device, "threads": threads}
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return proc, f"http://127.0.0.1:{port}"


async def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 600.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=base, timeout=5) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited: {proc.stderr.read().decode(errors='replace')[-2000:]}")
            try:
                if (await client.get("/v1/models")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError("the server did not start")


async def one_stream(client: Any, index: int, max_tokens: int) -> dict[str, float]:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if "error" in data:
                raise RuntimeError(data["error"]["message"])
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            if data["choices"] and data["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
    end = time.perf_counter()
    first = first or end
    last = last or end
    return {
        "ttft": first - start,
        "tpot": (last - first) / max(1, tokens - 1),
        "tokens": tokens,
        "end": end,
        "start": start,
    }


async def run_clients(base: str, clients: int, requests_per_client: int, max_tokens: int) -> dict[str, Any]:
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=base, timeout=3600, limits=limits) as client:

        async def worker(c: int) -> list[dict[str, float]]:
            return [
                await one_stream(client, c * requests_per_client + r, max_tokens) for r in range(requests_per_client)
            ]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    ttft = sorted(r["ttft"] for r in results)
    tpot = sorted(r["tpot"] for r in results)

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]

    return {
        "clients": clients,
        "requests": len(results),
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "ttft_p50_s": round(statistics.median(ttft), 4),
        "ttft_p95_s": round(pct(ttft, 0.95), 4),
        "tpot_p50_s": round(statistics.median(tpot), 5),
        "tpot_p95_s": round(pct(tpot, 0.95), 5),
    }


async def compare(
    client_counts: Sequence[int],
    *,
    model: str | None,
    device: str | None,
    threads: int | None,
    max_tokens: int,
    requests_per_client: int,
    max_batch: int,
    one_at_a_time_up_to: int | None = None,
) -> dict[str, Any]:
    """Both servers up together; for each client count, the one-at-a-time server then the batched one. The
    one-at-a-time server is measured up to ``one_at_a_time_up_to`` clients (all when ``None``): it serves one
    request after the other whatever the count, so that more clients only take longer."""
    servers = {
        "one_at_a_time": start_server(1, model, device, threads),
        "batched": start_server(max_batch, model, device, threads),
    }
    try:
        for proc, base in servers.values():
            await wait_ready(base, proc)
        for _, base in servers.values():  # warm up: first calls allocate
            await run_clients(base, 2, 1, 4)
        out: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
        for n in client_counts:
            for name, (_, base) in servers.items():
                if name == "one_at_a_time" and one_at_a_time_up_to is not None and n > one_at_a_time_up_to:
                    out[name].append({"clients": n, "skipped": True})
                    continue
                out[name].append(await run_clients(base, n, requests_per_client, max_tokens))
        return out
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--clients", default="1,8,32,64")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--model", default=None)
    args = p.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    counts = [int(c) for c in args.clients.split(",")]
    result = asyncio.run(
        compare(
            counts,
            model=args.model,
            device=None,
            threads=None,
            max_tokens=args.max_tokens,
            requests_per_client=1,
            max_batch=max(counts),
        )
    )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
