"""Files of a monitoring run: the per-turn projections as a table (JSON and CSV) and a trajectory plot."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from personaxis.monitor import TurnProjection
from personaxis.store import atomic_write_bytes, atomic_write_json


def write_table(
    rows: Sequence[TurnProjection], out_dir: str | Path, info: dict[str, Any] | None = None
) -> tuple[Path, Path]:
    """``projections.json`` (info + rows) and ``projections.csv`` (one row per turn) in ``out_dir``."""
    out = Path(out_dir)
    flat = [r.row() for r in rows]
    json_path, csv_path = out / "projections.json", out / "projections.csv"
    atomic_write_json(json_path, {**(info or {}), "rows": flat})
    buffer = io.StringIO()
    columns = list(dict.fromkeys(key for row in flat for key in row))
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    atomic_write_bytes(csv_path, buffer.getvalue().encode("utf-8"))
    return json_path, csv_path


def plot_trajectories(
    rows: Sequence[TurnProjection],
    path: str | Path,
    *,
    layer: int,
    floor: float | None = None,
    title: str | None = None,
) -> Path:
    """A PNG of projection against turn at ``layer``, one line per transcript; hollow markers for truncated turns,
    the capping floor as a dashed line."""
    import matplotlib  # optional at import time: only the plot needs it

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=110, layout="constrained")
    ax = fig.subplots()
    names = list(dict.fromkeys(r.transcript for r in rows))
    for index, name in enumerate(names):
        mine = sorted((r for r in rows if r.transcript == name), key=lambda r: r.turn)
        xs = [r.turn + 1 for r in mine]
        ys = [r.projections[layer] for r in mine]
        (line,) = ax.plot(xs, ys, "-o", label=name, color=f"C{index % 10}", ms=5)
        cut = [(x, y) for x, y, r in zip(xs, ys, mine, strict=True) if r.truncated]
        if cut:
            ax.plot(*zip(*cut, strict=True), "o", mfc="white", mec=line.get_color(), ms=7, ls="none")
    if floor is not None:
        ax.axhline(floor, color="crimson", ls="--", lw=1.2, label=f"capping floor ({floor:.3g})")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("assistant turn")
    ax.set_ylabel(f"projection on the Assistant Axis (layer {layer})")
    ax.set_title(title or "Persona drift: higher = more Assistant-like (hollow = history truncated)")
    if names:
        ax.legend(fontsize=8, loc="best")
    from io import BytesIO

    buffer = BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)
