"""Optional capability benchmarks through EleutherAI's ``lm-eval`` harness (IFEval, GSM8k), with and without capping.

Used only where ``lm-eval`` is installed and its task data is available locally (no network is assumed); otherwise
the evaluation records ``{"status": "skipped", "reason": ...}`` and carries on. personaxis never installs it.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from typing import Any

from personaxis.interventions import Interventions, apply_interventions
from personaxis.models import LoadedModel

DEFAULT_TASKS: tuple[str, ...] = ("ifeval", "gsm8k")


def available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def _numbers(results: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in results.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    }


def run_lm_eval(
    lm: LoadedModel,
    conditions: dict[str, Interventions | None],
    *,
    tasks: Sequence[str] = DEFAULT_TASKS,
    limit: int | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """``{"status": "ok", "tasks": ..., "results": {condition: {task: {metric: value}}}}``, or skipped/failed."""
    if not available():
        return {"status": "skipped", "reason": "lm-eval is not installed (optional: pip install lm-eval)"}
    try:
        from lm_eval import simple_evaluate  # type: ignore[import-not-found]
        from lm_eval.models.huggingface import HFLM  # type: ignore[import-not-found]

        model = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size)
        out: dict[str, Any] = {}
        for name, ops in conditions.items():
            with apply_interventions(lm, ops):
                result = simple_evaluate(
                    model=model, tasks=list(tasks), limit=limit, apply_chat_template=True, log_samples=False
                )
            out[name] = {task: _numbers(values) for task, values in (result or {}).get("results", {}).items()}
    except Exception as exc:  # noqa: BLE001 - the harness, its tasks or their data may be missing: report, go on
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:500]}
    return {"status": "ok", "tasks": list(tasks), "limit": limit, "results": out}
