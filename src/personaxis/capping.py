"""Activation capping: threshold calibration, layer-band experiments, capping configs.

The paper's cap is a floor on the projection onto the unit axis at every token, at a band of layers::

    h ← h − â · min(⟨h, â⟩ − τ_l, 0)

τ_l is a percentile of the projections ``⟨h, â_l⟩`` of ordinary rollouts' mean response activations (the role,
trait and default rollouts of a run directory). :func:`calibrate_from_projections` computes τ for every layer and
percentile from those projections (:func:`personaxis.calibration.calibrate` reads them from a run) and makes
one experiment per (layer band, percentile), named like the reference configs: ``"layers_46:54-p0.25"`` caps layers
46..53 (end-exclusive) at their 25th percentile. The paper's best: the 25th percentile on a middle-to-late band
(Qwen 3 32B layers 46–53 of 64; Llama 3.3 70B layers 56–71 of 80).

    config = calibrate("runs/quick", percentiles=(1, 25, 50, 75))
    with config.apply(lm, "layers_22:26-p0.25"):
        answers = generate(lm, conversations)

A config holds named vectors (each at one layer) and experiments (lists of caps: vector, τ, floor or ceiling). The
I/O layer writes it (:func:`personaxis.io.tensor_files.save_capping`) as safetensors with JSON metadata (ours), or
as the published reference torch file (:mod:`personaxis.interop`), where each cap is a *ceiling* on the negated axis: a ceiling on −â at −τ is exactly
our floor on +â at τ.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

from personaxis.axis import Axis
from personaxis.interventions import CeilingCap, FloorCap, Operator, VectorError, apply_interventions, check_vector

if TYPE_CHECKING:
    from personaxis.models import LoadedModel

FORMAT = "personaxis.capping/1"
PERCENTILES: tuple[float, ...] = (1.0, 25.0, 50.0, 75.0)
ORDINARY_KINDS: tuple[str, ...] = ("role", "default", "trait_pos", "trait_neg")
# (start, width) as fractions of the layer count (default_bands turns them into (start, end) bands). The first two are the paper's best bands: 0.72·64 = 46, 0.125·64 = 8
# gives Qwen 3 32B's 46:54; 0.70·80 = 56, 0.20·80 = 16 gives Llama 3.3 70B's 56:72. The others vary start and width.
BAND_FRACTIONS: tuple[tuple[float, float], ...] = (
    (0.72, 0.125),
    (0.70, 0.20),
    (0.70, 0.10),
    (0.60, 0.25),
    (0.50, 0.25),
    (0.50, 0.50),
)
CapKind = Literal["floor", "ceiling"]
# How a config's metadata "bands" read; configs written before it was recorded hold (start, width) pairs.
BAND_CONVENTION = "start:end"
_ID = re.compile(r"^layers_(\d+):(\d+)-p([0-9.eE+-]+)$")


class CappingError(ValueError):
    """A capping config is malformed, or does not fit the model, or an experiment is unknown."""


@dataclass(frozen=True)
class Cap:
    """One cap: a floor (default) or ceiling on the projection onto the named vector, at threshold ``tau``."""

    vector: str
    tau: float
    kind: CapKind = "floor"

    def __post_init__(self) -> None:
        if self.kind not in ("floor", "ceiling"):
            raise CappingError(f"cap kind must be 'floor' or 'ceiling', got {self.kind!r}")
        if not math.isfinite(float(self.tau)):
            raise CappingError(f"cap threshold on {self.vector!r} must be finite, got {self.tau}")


@dataclass(frozen=True)
class Experiment:
    id: str
    caps: tuple[Cap, ...]


@dataclass(frozen=True)
class CapVector:
    """A direction ``[hidden]`` at one layer (block output, zero-based)."""

    layer: int
    vector: Tensor


def experiment_id(start: int, end: int, percentile: float) -> str:
    """The reference id for a band ``start:end`` (end-exclusive) at a percentile given in percent."""
    return f"layers_{start}:{end}-p{percentile / 100:g}"


def parse_experiment_id(experiment: str) -> tuple[int, int, float] | None:
    """``"layers_46:54-p0.25"`` → ``(46, 54, 25.0)``; ``None`` for ids of another shape."""
    match = _ID.match(experiment)
    if not match:
        return None
    try:
        fraction = float(match.group(3))
    except ValueError:
        return None
    return int(match.group(1)), int(match.group(2)), round(fraction * 100, 9)


def default_bands(n_layers: int) -> list[tuple[int, int]]:
    """Layer bands ``(start, end)`` (end-exclusive) for an ``n_layers`` model: the paper's bands scaled, plus a few
    widths."""
    if n_layers < 1:
        raise CappingError(f"a model needs at least one layer, got {n_layers}")
    bands: list[tuple[int, int]] = []
    for start_fraction, width_fraction in BAND_FRACTIONS:
        start = min(int(math.floor(start_fraction * n_layers + 0.5)), n_layers - 1)
        width = max(1, min(int(math.floor(width_fraction * n_layers + 0.5)), n_layers - start))
        if (start, start + width) not in bands:
            bands.append((start, start + width))
    return bands


def recorded_bands(metadata: Mapping[str, Any]) -> list[tuple[int, int]]:
    """The ``(start, end)`` bands a config's metadata records (older configs' ``(start, width)`` converted)."""
    bands = [(int(a), int(b)) for a, b in metadata.get("bands") or []]
    if metadata.get("band_convention") == BAND_CONVENTION:
        return bands
    return [(start, start + width) for start, width in bands]


def check_percentiles(percentiles: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(p) for p in percentiles)
    if not values:
        raise CappingError("give at least one percentile")
    for p in values:
        if not math.isfinite(p) or not 0 <= p <= 100:
            raise CappingError(f"percentiles are in percent, 0 to 100; got {p}")
    if len(set(values)) != len(values):
        raise CappingError(f"percentiles must be distinct, got {list(values)}")
    return values


def check_bands(bands: Sequence[tuple[int, int]], n_layers: int) -> list[tuple[int, int]]:
    """Validated bands ``(start, end)``, end-exclusive: at least one layer each, within the model's layers."""
    checked = []
    for band in bands:
        try:
            start, end = (int(x) for x in band)
        except (TypeError, ValueError):
            raise CappingError(f"a band is (start, end), end-exclusive, got {band!r}") from None
        if end <= start or start < 0 or end > n_layers:
            raise CappingError(f"band {start}:{end} (end-exclusive) does not fit a model of {n_layers} layers")
        checked.append((start, end))
    if not checked:
        raise CappingError("give at least one layer band")
    return checked


class CappingConfig:
    """Named vectors and capping experiments; optionally the calibrated thresholds ``[n_percentiles, n_layers]``.

    Attributes:
        vectors: ``{name: CapVector(layer, vector)}``, a direction ``[hidden]`` at a zero-based block index; all share
            one hidden size.
        experiments: the experiments, each an id (``"layers_46:54-p0.25"``: band ``46:54``, end-exclusive, at the 25th
            percentile) and its caps (a floor or ceiling ``tau`` on the projection onto a named vector, in the
            residual stream's units).
        percentiles: the calibration percentiles, in percent, or ``None``.
        thresholds: ``[n_percentiles, n_layers]`` float64, the projection on the axis at each percentile and layer,
            or ``None``.
        model: the name of the model it was made for.
        metadata: how it was made (JSON-able).
    """

    def __init__(
        self,
        vectors: Mapping[str, CapVector],
        experiments: Sequence[Experiment],
        *,
        percentiles: Sequence[float] | None = None,
        thresholds: Tensor | None = None,
        model: str = "unknown",
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        self.vectors: dict[str, CapVector] = {}
        hidden: int | None = None
        for name, cv in vectors.items():
            if not isinstance(cv.layer, int) or isinstance(cv.layer, bool) or cv.layer < 0:
                raise CappingError(f"vector {name!r}: layer must be a non-negative int, got {cv.layer!r}")
            try:
                check_vector(cv.vector, hidden, name=f"vector {name!r}")
            except VectorError as exc:
                raise CappingError(
                    str(exc) + (" (all vectors of a config share one hidden size)" if hidden else "")
                ) from None
            hidden = int(cv.vector.shape[0])
            self.vectors[str(name)] = CapVector(cv.layer, cv.vector.detach().cpu())
        self.experiments: list[Experiment] = list(experiments)
        seen: set[str] = set()
        for exp in self.experiments:
            if exp.id in seen:
                raise CappingError(f"experiment id {exp.id!r} appears twice")
            seen.add(exp.id)
            if not exp.caps:
                raise CappingError(f"experiment {exp.id!r} has no caps")
            for cap in exp.caps:
                if cap.vector not in self.vectors:
                    raise CappingError(f"experiment {exp.id!r} caps unknown vector {cap.vector!r}")
        self.percentiles = check_percentiles(percentiles) if percentiles is not None else None
        if thresholds is not None:
            thresholds = torch.as_tensor(thresholds, dtype=torch.float64).cpu()
            if self.percentiles is None or thresholds.dim() != 2 or thresholds.shape[0] != len(self.percentiles):
                raise CappingError("thresholds must have shape [n_percentiles, n_layers], with the percentiles given")
        self.thresholds: Tensor | None = thresholds
        self.model = model
        self.metadata: dict[str, Any] = dict(metadata or {})

    def __repr__(self) -> str:
        return (
            f"CappingConfig(model={self.model!r}, {len(self.vectors)} vectors, {len(self.experiments)} experiments, "
            f"percentiles={list(self.percentiles) if self.percentiles else None})"
        )

    # ---------------------------------------------------------------------------------------------- shape
    @property
    def hidden_size(self) -> int | None:
        first = next(iter(self.vectors.values()), None)
        return None if first is None else int(first.vector.shape[0])

    @property
    def n_layers(self) -> int | None:
        """Layers covered by the thresholds (or the deepest capped layer + 1 when there are none)."""
        if self.thresholds is not None:
            return int(self.thresholds.shape[1])
        return max((cv.layer for cv in self.vectors.values()), default=-1) + 1 or None

    @property
    def experiment_ids(self) -> list[str]:
        return [exp.id for exp in self.experiments]

    def experiment(self, experiment_id: str) -> Experiment:
        for exp in self.experiments:
            if exp.id == experiment_id:
                return exp
        known = self.experiment_ids
        shown = ", ".join(known[:12]) + (f", … ({len(known)} in all)" if len(known) > 12 else "")
        raise CappingError(f"unknown capping experiment {experiment_id!r}; this config has: {shown or 'none'}")

    def layers(self, experiment_id: str) -> list[int]:
        return sorted({self.vectors[cap.vector].layer for cap in self.experiment(experiment_id).caps})

    def check_fits(self, n_layers: int, hidden_size: int, model_name: str = "the model") -> None:
        if self.hidden_size is not None and self.hidden_size != hidden_size:
            raise CappingError(
                f"capping vectors have hidden size {self.hidden_size} but {model_name}'s hidden size is {hidden_size}"
            )
        deepest = max((cv.layer for cv in self.vectors.values()), default=-1)
        if deepest >= n_layers:
            raise CappingError(f"the capping config uses layer {deepest} but {model_name} has {n_layers} layers")

    # --------------------------------------------------------------------------------------------- use
    def interventions(self, experiment_id: str, *, ceiling: bool | None = None) -> dict[int, list[Operator]]:
        """Per-layer operators of one experiment: each cap as stored (floors on +axis for calibrated configs);
        ``ceiling=True`` turns every cap into a ceiling at the same τ, ``ceiling=False`` into a floor."""
        ops: dict[int, list[Operator]] = {}
        for cap in self.experiment(experiment_id).caps:
            cv = self.vectors[cap.vector]
            kind = cap.kind if ceiling is None else ("ceiling" if ceiling else "floor")
            op_class = CeilingCap if kind == "ceiling" else FloorCap
            ops.setdefault(cv.layer, []).append(op_class(cv.vector, tau=float(cap.tau)))
        return ops

    @contextmanager
    def apply(self, lm: LoadedModel, experiment_id: str, *, ceiling: bool | None = None) -> Iterator[None]:
        """Cap the model within the ``with`` block (hooks removed on exit, whatever happens)."""
        self.check_fits(lm.profile.n_layers, lm.profile.hidden_size, lm.profile.name)
        with apply_interventions(lm, self.interventions(experiment_id, ceiling=ceiling)):
            yield

    def floor(self, layer: int, percentile: float = 25.0) -> float:
        """The calibrated threshold τ at ``layer`` for ``percentile`` (in percent), e.g. to draw it on a plot."""
        if self.thresholds is None or self.percentiles is None:
            raise CappingError("this capping config has no calibrated thresholds")
        matches = [i for i, p in enumerate(self.percentiles) if math.isclose(p, float(percentile), abs_tol=1e-9)]
        if not matches:
            raise CappingError(f"no threshold for percentile {percentile}; this config has {list(self.percentiles)}")
        if not isinstance(layer, int) or not 0 <= layer < self.thresholds.shape[1]:
            raise CappingError(f"layer {layer} is out of range for thresholds over {self.thresholds.shape[1]} layers")
        value = float(self.thresholds[matches[0], layer])
        if math.isnan(value):
            raise CappingError(f"no threshold for layer {layer} at percentile {percentile}")
        return value


# -------------------------------------------------------------------------------------------------- calibration
def rollout_projections(means: Tensor, axis: Axis) -> Tensor:
    """Projections ``[n, n_layers]`` (float64) of rollouts' mean response activations ``[n, n_layers, hidden]`` onto
    the unit axis at every layer."""
    if means.shape[1:] != axis.vectors.shape:
        raise CappingError(
            f"activations of shape [{means.shape[1]}, {means.shape[2]}] per rollout do not fit an axis of "
            f"{axis.n_layers} layers and hidden size {axis.hidden_size}"
        )
    unit_vectors = axis.vectors.to(torch.float64)
    unit_vectors = unit_vectors / unit_vectors.norm(dim=-1, keepdim=True)
    return torch.einsum("nlh,lh->nl", means.to(torch.float64), unit_vectors)


def calibrate_from_projections(
    projections: np.ndarray,
    axis: Axis,
    percentiles: Sequence[float] = PERCENTILES,
    bands: Sequence[tuple[int, int]] | None = None,
    *,
    metadata: Mapping[str, Any] | None = None,
) -> CappingConfig:
    """Per-layer thresholds τ (the ``percentiles``, in percent, of ``projections [n_rollouts, n_layers]``) and one
    floor-cap experiment per (band, percentile); ``bands`` are ``(start, end)`` pairs, end-exclusive (default
    :func:`default_bands`). ``metadata`` is recorded with what calibration itself adds."""
    percentiles = check_percentiles(percentiles)
    bands = check_bands(bands if bands is not None else default_bands(axis.n_layers), axis.n_layers)
    thresholds = torch.from_numpy(np.percentile(projections, percentiles, axis=0).astype(np.float64))
    layers = sorted({layer for start, end in bands for layer in range(start, end)})
    vectors = {f"axis_layer_{layer}": CapVector(layer, axis.vectors[layer].clone()) for layer in layers}
    experiments = [
        Experiment(
            experiment_id(start, end, p),
            tuple(Cap(f"axis_layer_{layer}", float(thresholds[i, layer])) for layer in range(start, end)),
        )
        for start, end in bands
        for i, p in enumerate(percentiles)
    ]
    given = dict(metadata or {})
    recorded = {
        "made_by": given.pop("made_by", "personaxis calibrate"),
        **{k: given.pop(k) for k in ("run_dir", "rollouts") if k in given},
        "n_rollouts": int(projections.shape[0]),
        "bands": [list(b) for b in bands],
        "band_convention": BAND_CONVENTION,
        "axis_model": axis.model,
        "projection_mean": [float(x) for x in projections.mean(0)],
        "projection_std": [float(x) for x in projections.std(0)],
        **given,
    }
    return CappingConfig(
        vectors, experiments, percentiles=percentiles, thresholds=thresholds, model=axis.model, metadata=recorded
    )
