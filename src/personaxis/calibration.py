"""Calibrating activation capping on a run: thresholds from the projections of its ordinary rollouts.

config = calibrate("runs/quick", percentiles=(1, 25, 50, 75))
save_capping(config, RunLayout("runs/quick").capping)        # personaxis.io.tensor_files
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from personaxis.axis import Axis
from personaxis.capping import (
    ORDINARY_KINDS,
    PERCENTILES,
    CappingConfig,
    calibrate_from_projections,
    check_bands,
    check_percentiles,
    default_bands,
)
from personaxis.derive import run_projections
from personaxis.io.tensor_files import load_axis
from personaxis.pipeline import Pipeline, open_existing


def calibrate(
    source: str | Path | Pipeline,
    axis: Axis | str | Path | None = None,
    percentiles: Sequence[float] = PERCENTILES,
    bands: Sequence[tuple[int, int]] | None = None,
    *,
    kinds: Sequence[str] = ORDINARY_KINDS,
) -> CappingConfig:
    """Per-layer thresholds from a run directory, and one floor-cap experiment per (band, percentile).

    Args:
        source: the run directory (or an open :class:`~personaxis.pipeline.Pipeline` over it).
        axis: the axis to project on (default: the run's axis file).
        percentiles: threshold percentiles, in percent.
        bands: ``(start, end)`` layer bands, end-exclusive (default :func:`personaxis.capping.default_bands`).
        kinds: the condition kinds whose rollouts are ordinary.

    Returns:
        The capping config, with the thresholds ``[n_percentiles, n_layers]``.
    """
    pipeline = source if isinstance(source, Pipeline) else open_existing(source)
    if axis is None:
        axis = pipeline.layout.axis
    if not isinstance(axis, Axis):
        axis = load_axis(axis)
    percentiles = check_percentiles(percentiles)  # refuse bad settings before reading the run
    bands = check_bands(bands if bands is not None else default_bands(axis.n_layers), axis.n_layers)
    projections, counts = run_projections(pipeline, axis, kinds)
    metadata = {"made_by": "personaxis calibrate", "run_dir": str(pipeline.layout.root), "rollouts": counts}
    return calibrate_from_projections(projections, axis, percentiles, bands, metadata=metadata)
