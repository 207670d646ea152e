"""What the evaluation commands load: the axis, a capping config and its default experiment, parsed size options."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from personaxis.axis import Axis
    from personaxis.capping import CappingConfig

from personaxis.io.run_layout import RunLayout
from personaxis.io.tensor_files import load_axis, load_capping


def axis_path(axis: Path | None, run: Path | None) -> Path:
    if axis is not None:
        return axis
    if run is None:
        raise ValueError("give --axis, or --run with a run directory holding axis.safetensors")
    return RunLayout(run).axis


def resolve_axis(axis: Path | None, run: Path | None) -> tuple[Axis, Path]:

    path = axis_path(axis, run)
    return load_axis(path), path


def resolve_capping(capping: Path | None, run: Path | None, axis: Axis) -> tuple[CappingConfig, dict[str, Any]]:
    """The capping config from ``capping``, else beside the run's axis, else calibrated now from the run (25th
    percentile and others, the default bands). Returns it with a note of where it came from."""
    from personaxis.calibration import calibrate

    if capping is not None:
        return load_capping(capping), {"path": str(capping), "source": "file"}
    if run is not None:
        found = RunLayout(run).find_capping()
        if found is not None:
            return load_capping(found), {"path": str(found), "source": "file"}
        config = calibrate(run, axis)
        return config, {"path": None, "source": f"calibrated from {run} (default bands and percentiles)"}
    raise ValueError("capping needs --capping FILE or --run DIR (to calibrate from)")


def default_experiment(config: CappingConfig) -> str:
    """The paper's best setting where the config has it: the 25th percentile on the first (paper-scaled) band."""
    from personaxis.capping import parse_experiment_id

    parsed = [(exp, parse_experiment_id(exp)) for exp in config.experiment_ids]
    quartile = [exp for exp, p in parsed if p is not None and abs(p[2] - 25.0) < 1e-6]
    bands = config.metadata.get("bands") or []
    if bands:
        start, width = bands[0]
        for exp, p in parsed:
            if p is not None and (p[0], p[1]) == (start, start + width) and abs(p[2] - 25.0) < 1e-6:
                return exp
    if quartile:
        return quartile[0]
    if not config.experiment_ids:
        raise ValueError("the capping config has no experiments")
    return config.experiment_ids[0]


def floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"expected comma-separated numbers, got {text!r}")
    return values


def names(text: str | None) -> tuple[str, ...]:
    return tuple(x.strip() for x in (text or "").split(",") if x.strip())


def layer_set(text: str) -> tuple[int, ...]:
    """``"15"`` → (15,); ``"12:18"`` → 12..17 (end-exclusive); ``"10,15"`` → (10, 15)."""
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if ":" in part:
                start, end = (int(x) for x in part.split(":"))
                if end <= start:
                    raise ValueError
                out.extend(range(start, end))
            elif part:
                out.append(int(part))
    except ValueError:
        raise ValueError(f"expected a layer, a range START:END (end-exclusive) or a list, got {text!r}") from None
    if not out:
        raise ValueError(f"no layer in {text!r}")
    return tuple(dict.fromkeys(out))


def bands(text: str | None) -> list[tuple[int, int]] | None:
    """``"22:26,15:23"`` → ``[(22, 26), (15, 23)]`` (start, end-exclusive)."""
    if not text:
        return None
    out = []
    for part in text.split(","):
        try:
            start, end = (int(x) for x in part.strip().split(":"))
        except ValueError:
            raise ValueError(f"expected layer bands START:END, got {text!r}") from None
        out.append((start, end))
    return out
