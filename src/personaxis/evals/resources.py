"""What the evaluation commands load: the axis, a capping config and its default experiment (options are parsed by
:mod:`personaxis.options`)."""

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
    from personaxis.capping import parse_experiment_id, recorded_bands

    parsed = [(exp, parse_experiment_id(exp)) for exp in config.experiment_ids]
    quartile = [exp for exp, p in parsed if p is not None and abs(p[2] - 25.0) < 1e-6]
    bands = recorded_bands(config.metadata)
    if bands:
        for exp, p in parsed:
            if p is not None and (p[0], p[1]) == bands[0] and abs(p[2] - 25.0) < 1e-6:
                return exp
    if quartile:
        return quartile[0]
    if not config.experiment_ids:
        raise ValueError("the capping config has no experiments")
    return config.experiment_ids[0]
