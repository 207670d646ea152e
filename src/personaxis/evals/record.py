"""What every evaluation writes: one JSON per run with its provenance, settings, raw labelled items and metrics.

The items hold everything the metrics are computed from (each answer and its label, or each turn and its
projection), so ``metrics`` can always be recomputed from ``items`` by the evaluation's ``*_metrics`` function;
``personaxis eval results`` does exactly that before it draws a figure.
"""

from __future__ import annotations

import datetime as _dt
import subprocess
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from personaxis.io.records import EvaluationRecord
from personaxis.store import atomic_write_bytes, read_json
from personaxis.store import write_record as write_run_record

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from personaxis.axis import Axis
    from personaxis.models import LoadedModel

FORMAT = "personaxis.eval/1"
EVAL_NAMES = ("steering", "drift", "drift_predict", "jailbreak", "capability", "capping")


def git_commit(where: str | Path | None = None) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the git checkout holding ``where`` (default: this code)."""
    folder = Path(where) if where is not None else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": sha or None, "dirty": bool(status.strip())}


def model_info(lm: LoadedModel) -> dict[str, Any]:
    p = lm.profile
    return {
        "name": p.name,
        "n_layers": p.n_layers,
        "hidden_size": p.hidden_size,
        "target_layer": p.target_layer,
        "builtin_system_prompt": p.builtin_system_prompt,
        "revision": p.revision,
    }


def axis_info(axis: Axis, path: str | Path | None = None) -> dict[str, Any]:
    return {
        "path": str(path) if path is not None else None,
        "model": axis.model,
        "target_layer": axis.target_layer,
        "n_layers": axis.n_layers,
        "has_residual_norms": axis.residual_norms is not None,
    }


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def make_record(
    name: str,
    *,
    model: dict[str, Any],
    settings: Any,
    items: list[dict[str, Any]],
    metrics: dict[str, Any],
    axis: dict[str, Any] | None = None,
    judge: str | None = None,
    sizes: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON object an evaluation writes (see the module docstring)."""
    settings_dict = _plain(settings)
    return {
        "format": FORMAT,
        "eval": name,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git": git_commit(),
        "model": model,
        "axis": axis,
        "judge": judge,
        "settings": {k: _plain(v) for k, v in settings_dict.items()}
        if isinstance(settings_dict, dict)
        else settings_dict,
        "sizes": sizes or {},
        **(extra or {}),
        "metrics": metrics,
        "items": items,
    }


def write_record(record: dict[str, Any], out_dir: str | Path, stem: str | None = None) -> Path:
    """Write ``OUT/<stem or eval>.json`` atomically and return its path."""
    path = Path(out_dir) / f"{stem or record['eval']}.json"
    write_run_record(path, EvaluationRecord.model_validate(record))
    return path


def read_record(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(
            f"{path}: not a personaxis evaluation result (format {data.get('format') if isinstance(data, dict) else None!r})"
        )
    try:
        return EvaluationRecord.model_validate(data).to_json()
    except ValidationError as exc:
        raise ValueError(f"{path}: a damaged evaluation result ({exc.error_count()} field(s) do not fit)") from None


def new_figure(width: float = 7.5, height: float = 4.5) -> Figure:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def save_figure(fig: Figure, path: str | Path) -> Path:
    from io import BytesIO

    buffer = BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)
