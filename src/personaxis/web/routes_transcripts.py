"""The transcripts page's API: list and read the server's transcript folder, project uploaded transcripts."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from personaxis.web import schemas
from personaxis.web.errors import ApiError
from personaxis.web.state import WebState, get_state

router = APIRouter(prefix="/api/transcripts", tags=["transcripts"])


def _short(text: str, n: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


@router.get("", response_model=schemas.TranscriptList, summary="Transcripts in the server's folder")
def list_transcripts(state: WebState = Depends(get_state)) -> dict[str, Any]:
    items = []
    for name in state.run.transcript_names():
        try:
            data = state.run.transcript(name)
        except ApiError:
            continue
        conversation = data.get("conversation") if isinstance(data, dict) else data
        if not isinstance(conversation, list):
            continue
        meta = (
            {k: v for k, v in data.items() if k != "conversation" and isinstance(v, str | int | float)}
            if isinstance(data, dict)
            else {}
        )
        items.append(
            {
                "name": name,
                "messages": len(conversation),
                "meta": meta,
                "assistant_turns": sum(1 for m in conversation if isinstance(m, dict) and m.get("role") == "assistant"),
            }
        )
    folder = state.run.transcripts_dir
    return {"transcripts": items, "folder": str(folder) if folder is not None else None}


@router.get("/{name}", responses=schemas.ERROR_RESPONSES, summary="One transcript of the server's folder, as stored")
def get_transcript(name: str, state: WebState = Depends(get_state)) -> Any:
    return state.run.transcript(name)


@router.post(
    "/project",
    response_model=schemas.TranscriptProjectResponse,
    responses=schemas.ERROR_RESPONSES,
    summary="Per-turn trajectories of uploaded transcripts (one batched teacher-forced pass)",
)
async def project_transcripts(
    body: schemas.TranscriptProjectRequest, state: WebState = Depends(get_state)
) -> dict[str, Any]:
    from personaxis.monitor import MonitorError, transcript_from_data

    limits = state.limits
    if len(body.transcripts) > limits.max_transcripts:
        raise ApiError(
            422,
            f"{len(body.transcripts)} transcripts in one request, more than the limit of {limits.max_transcripts}",
            param="transcripts",
        )
    service = state.service
    treatment = service.treatment(body.cap, body.alpha)
    parsed = []
    for i, upload in enumerate(body.transcripts):
        data = upload.data
        limits.check_text(data, param=f"transcripts.{i}.data")
        conversation = data.get("conversation") if isinstance(data, dict) else data
        if isinstance(conversation, list):
            limits.check_messages(conversation, param=f"transcripts.{i}.conversation")
        try:
            parsed.append(transcript_from_data(data, name=upload.name))
        except MonitorError as exc:
            raise ApiError(422, f"malformed transcript: {exc}", param=f"transcripts.{i}") from None
    limits.check_token_budget(service.lm.tokenizer, [t.conversation for t in parsed], param="transcripts")
    try:
        rows = await service.call(service.project_many_locked, [t.conversation for t in parsed], treatment)
    except ValueError as exc:
        raise ApiError(422, str(exc), param="transcripts") from None
    trajectories = []
    for transcript, turns in zip(parsed, rows, strict=True):
        conv = transcript.conversation
        points = []
        for row in turns:
            before = [m["content"] for m in conv[: row.message_index] if m["role"] == "user"]
            points.append(
                {
                    "turn": row.turn,
                    "message_index": row.message_index,
                    "projection": row.projections[service.layer],
                    "truncated": row.truncated,
                    "user": _short(before[-1]) if before else "",
                    "assistant": _short(conv[row.message_index]["content"]),
                }
            )
        meta = {k: v for k, v in transcript.meta.items() if isinstance(v, str | int | float | bool)}
        trajectories.append({"name": transcript.name, "meta": meta, "turns": points})
    return {
        "layer": service.layer,
        "cap": body.cap,
        "alpha": treatment.alpha,
        "floor": service.floor(body.cap) if body.cap else service.floor(),
        "trajectories": trajectories,
    }
