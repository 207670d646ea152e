"""One place that says what a number or an output path may be: the command line, the web app's request schemas and
the run settings all check their values here, so ``nan``, ``inf``, ``1e300`` or a port of 99999 is refused with the
same one-line message wherever it comes in.

Each named quantity has a :class:`Bound` in :data:`BOUNDS`; :func:`check` refuses a value that is not a finite number
in that range (``ValueError``, which the CLI shows as ``error: …`` with exit code 2), and :func:`field` gives the same
bound as a pydantic ``Field`` for the web schemas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Bound:
    """A closed range ``[low, high]`` (either end may be open with ``low_open``/``high_open``); ``integer``: whole
    numbers only."""

    low: float
    high: float
    integer: bool = False
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        left = "(" if self.low_open else "["
        right = ")" if self.high_open else "]"
        kind = "a whole number" if self.integer else "a finite number"
        return f"{kind} in {left}{self.low:g}, {self.high:g}{right}"


# Coefficients are fractions of a layer's mean residual norm (or raw residual units, whose norms are at most a few
# thousand in the models we know): 10,000 is far past any useful value and far inside float32.
_COEFFICIENT = Bound(-1e4, 1e4)
BOUNDS: dict[str, Bound] = {
    "temperature": Bound(0.0, 100.0),
    "top_p": Bound(0.0, 1.0, low_open=True),
    "alpha": _COEFFICIENT,
    "scale": _COEFFICIENT,
    "seed": Bound(0, 2**63 - 1, integer=True),
    "max_new_tokens": Bound(1, 1_000_000, integer=True),
    "max_tokens": Bound(1, 10_000_000, integer=True),  # a context window, in tokens
    "batch_size": Bound(1, 1_000_000, integer=True),
    "port": Bound(1, 65_535, integer=True),
    "max_upload_mb": Bound(0.0, 1024.0, low_open=True),
    "percentile": Bound(0.0, 100.0),
    "layer": Bound(0, 100_000, integer=True),
}


def check(name: str, value: Any, *, option: str | None = None) -> Any:
    """``value`` if it is a finite number within ``BOUNDS[name]``; else ``ValueError`` naming ``option`` (default
    ``--name-with-dashes``). ``None`` passes (an unset option)."""
    if value is None:
        return None
    bound = BOUNDS[name]
    label = option or f"--{name.replace('_', '-')}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{label} must be {bound.describe()}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{label} must be {bound.describe()}, got {value}")
    if bound.integer and int(value) != value:
        raise ValueError(f"{label} must be {bound.describe()}, got {value}")
    too_low = value <= bound.low if bound.low_open else value < bound.low
    too_high = value >= bound.high if bound.high_open else value > bound.high
    if too_low or too_high:
        raise ValueError(f"{label} must be {bound.describe()}, got {value:g}")
    return value


def check_all(**values: Any) -> None:
    """:func:`check` every keyword (``check_all(temperature=t, alpha=a)``)."""
    for name, value in values.items():
        check(name, value)


def finite_tensor(name: str, tensor: Any) -> None:
    """Refuse a tensor holding NaN or infinity (``ValueError`` naming it)."""
    import torch

    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} holds NaN or infinite values")


def field(name: str, default: Any, **kwargs: Any) -> Any:
    """A pydantic ``Field`` with ``BOUNDS[name]`` (and ``allow_inf_nan=False`` for floats)."""
    from pydantic import Field

    bound = BOUNDS[name]
    limits: dict[str, Any] = {
        "lt" if bound.high_open else "le": bound.high,
        "gt" if bound.low_open else "ge": bound.low,
    }
    if bound.integer:
        limits = {k: int(v) for k, v in limits.items()}
    else:
        limits["allow_inf_nan"] = False
    for key in ("le", "lt", "ge", "gt"):  # a tighter bound given here replaces the shared one on that side
        if key in kwargs:
            limits.pop({"le": "lt", "lt": "le", "ge": "gt", "gt": "ge"}[key], None)
    return Field(default, **{**limits, **kwargs})


# ------------------------------------------------------------------------------------------------ text
def lone_surrogate(text: str) -> int | None:
    """The index of the first lone surrogate (``\\ud800``…) in ``text``, which no tokenizer can encode, or None."""
    for i, char in enumerate(text):
        if 0xD800 <= ord(char) <= 0xDFFF:
            return i
    return None


# ------------------------------------------------------------------------------------------------ output paths
def output_file(path: Path | None, option: str) -> Path | None:
    """Refuse an output *file* path that is an existing folder, or whose parent is an existing file."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path}: is a folder; give a file name")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{option} {path}: {parent} is a file, not a folder")
            break
    return path


def output_folder(path: Path | None, option: str) -> Path | None:
    """Refuse an output *folder* path that is an existing file (or lies under one)."""
    if path is None:
        return None
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise ValueError(f"{option} {path}: {candidate} is a file, not a folder")
            break
    return path


def output_suffix(path: Path, suffixes: tuple[str, ...], option: str) -> Path:
    """Refuse an output file whose name does not end in one of ``suffixes`` (so it reads back as what it is)."""
    if Path(path).suffix.lower() not in suffixes:
        raise ValueError(
            f"{option} {path}: our files are {' or '.join(suffixes)} files; the file name must end in "
            f"{' or '.join(suffixes)}"
        )
    return Path(path)
