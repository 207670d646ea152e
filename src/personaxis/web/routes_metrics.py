"""``GET /metrics``: the server's counters in Prometheus' text format (requests, tokens, guard alarms, capped tokens,
the queue, the batch and its key/value cache)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse

from personaxis.web.state import WebState, get_state

router = APIRouter(tags=["metrics"])

# name in the snapshot -> (metric, type, help)
METRICS = {
    "requests": ("personaxis_requests_total", "counter", "Generation requests accepted into the queue."),
    "completed": ("personaxis_requests_completed_total", "counter", "Requests answered to the end."),
    "cancelled": ("personaxis_requests_cancelled_total", "counter", "Requests whose client left before the end."),
    "timed_out": ("personaxis_requests_timed_out_total", "counter", "Requests ended by their deadline."),
    "rejected": ("personaxis_requests_rejected_total", "counter", "Requests refused with 429 (queue full)."),
    "tokens": ("personaxis_tokens_total", "counter", "New tokens generated."),
    "alarms": ("personaxis_guard_alarms_total", "counter", "Guard mode switched capping on for a row."),
    "capped_tokens": ("personaxis_capped_tokens_total", "counter", "Tokens generated while a cap acted on the row."),
    "steps": ("personaxis_decode_steps_total", "counter", "Batched decoding steps."),
    "prefill_passes": (
        "personaxis_prefill_passes_total",
        "counter",
        "Forward passes over joining prompts (chunked while other rows decode).",
    ),
    "prefix_hits": (
        "personaxis_prefix_cache_hits_total",
        "counter",
        "Joining prompts started from a prompt start read before.",
    ),
    "prefix_tokens": ("personaxis_prefix_cache_tokens_total", "counter", "Prompt positions not read again."),
    "queue": ("personaxis_queue_requests", "gauge", "Requests waiting for a row."),
    "rows": ("personaxis_batch_rows", "gauge", "Rows decoding now."),
    "peak_rows": ("personaxis_batch_rows_peak", "gauge", "Most rows decoded side by side."),
    "kv_bytes": ("personaxis_kv_cache_bytes", "gauge", "Key/value cache of the running batch."),
    "peak_kv_bytes": ("personaxis_kv_cache_bytes_peak", "gauge", "Largest key/value cache of the running batch."),
    "kv_budget_bytes": ("personaxis_kv_cache_budget_bytes", "gauge", "The configured key/value cache budget."),
    "max_batch": ("personaxis_batch_rows_max", "gauge", "The configured most rows per batch."),
}


def render(snapshot: dict[str, int]) -> str:
    lines = []
    for key, (name, kind, text) in METRICS.items():
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {snapshot.get(key, 0)}"]
    return "\n".join(lines) + "\n"


@router.get("/metrics", response_class=PlainTextResponse, summary="Counters in Prometheus' text format")
def metrics(state: WebState = Depends(get_state)) -> PlainTextResponse:
    return PlainTextResponse(render(state.service.batcher.snapshot()), media_type="text/plain; version=0.0.4")
