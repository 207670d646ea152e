"""Activation capping: threshold calibration, layer-band experiments, capping configs.

The paper's cap is a floor on the projection onto the unit axis at every token, at a band of layers::

    h ← h − â · min(⟨h, â⟩ − τ_l, 0)

τ_l is a percentile of the projections ``⟨h, â_l⟩`` of ordinary rollouts' mean response activations (the role,
trait and default rollouts of a run directory). :func:`calibrate` computes τ for every layer and percentile and makes
one experiment per (layer band, percentile), named like the reference configs: ``"layers_46:54-p0.25"`` caps layers
46..53 (end-exclusive) at their 25th percentile. The paper's best: the 25th percentile on a middle-to-late band
(Qwen 3 32B layers 46–53 of 64; Llama 3.3 70B layers 56–71 of 80).

    config = calibrate("runs/quick", percentiles=(1, 25, 50, 75))
    with config.apply(lm, "layers_22:26-p0.25"):
        answers = generate(lm, conversations)

A config holds named vectors (each at one layer) and experiments (lists of caps: vector, τ, floor or ceiling). It is
written as safetensors with JSON metadata (ours), or as the published reference torch file
(:mod:`personaxis.interop`), where each cap is a *ceiling* on the negated axis: a ceiling on −â at −τ is exactly
our floor on +â at τ.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

from personaxis.axis import Axis
from personaxis.interventions import CeilingCap, FloorCap, Operator, VectorError, apply_interventions, check_vector

# File names under which a capping config is looked for beside an axis (ours first, then the reference names).
CAPPING_NAMES = ("capping.safetensors", "capping.pt", "capping_config.pt")

if TYPE_CHECKING:
    from personaxis.models import LoadedModel
    from personaxis.pipeline import Pipeline

FORMAT = "personaxis.capping/1"
PERCENTILES: tuple[float, ...] = (1.0, 25.0, 50.0, 75.0)
ORDINARY_KINDS: tuple[str, ...] = ("role", "default", "trait_pos", "trait_neg")
# (start, width) as fractions of the layer count. The first two are the paper's best bands: 0.72·64 = 46, 0.125·64 = 8
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
    """Layer bands ``(start, width)`` for an ``n_layers`` model: the paper's bands scaled, plus a few widths."""
    if n_layers < 1:
        raise CappingError(f"a model needs at least one layer, got {n_layers}")
    bands: list[tuple[int, int]] = []
    for start_fraction, width_fraction in BAND_FRACTIONS:
        start = min(int(math.floor(start_fraction * n_layers + 0.5)), n_layers - 1)
        width = max(1, min(int(math.floor(width_fraction * n_layers + 0.5)), n_layers - start))
        if (start, width) not in bands:
            bands.append((start, width))
    return bands


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
    checked = []
    for band in bands:
        try:
            start, width = (int(x) for x in band)
        except (TypeError, ValueError):
            raise CappingError(f"a band is (start, width), got {band!r}") from None
        if width < 1 or start < 0 or start + width > n_layers:
            raise CappingError(
                f"band start {start}, width {width} (layers {start}:{start + width}) does not fit a model of {n_layers} layers"
            )
        checked.append((start, width))
    if not checked:
        raise CappingError("give at least one layer band")
    return checked


class CappingConfig:
    """Named vectors and capping experiments; optionally the calibrated thresholds ``[n_percentiles, n_layers]``."""

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

    # ------------------------------------------------------------------------------------------ storage
    def save(self, path: str | Path) -> Path:
        """Write our format (``.safetensors``, no pickle) or, for any other suffix, the reference torch file."""
        path = Path(path)
        if path.suffix != ".safetensors":
            from personaxis.interop import save_reference_capping

            return save_reference_capping(self, path)
        from safetensors.torch import save

        from personaxis.store import atomic_write_bytes

        tensors = {f"vector/{name}": cv.vector.contiguous() for name, cv in self.vectors.items()}
        if self.thresholds is not None:
            tensors["thresholds"] = self.thresholds.contiguous()
        body = {
            "vectors": {name: {"layer": cv.layer} for name, cv in self.vectors.items()},
            "experiments": [
                {"id": e.id, "caps": [[c.vector, float(c.tau), c.kind] for c in e.caps]} for e in self.experiments
            ],
            "percentiles": list(self.percentiles) if self.percentiles is not None else None,
            "metadata": self.metadata,
        }
        header = {"format": FORMAT, "model": self.model, "config": json.dumps(body, sort_keys=True)}
        atomic_write_bytes(path, save(tensors, metadata=header))
        return path

    @classmethod
    def load(cls, path: str | Path) -> CappingConfig:
        """Read our safetensors format, or a reference torch file (read with ``weights_only=True`` only)."""
        path = Path(path)
        if not path.is_file():
            raise CappingError(f"{path}: capping config not found")
        if path.suffix != ".safetensors":
            from personaxis.interop import load_reference_capping

            return load_reference_capping(path)
        return _load_safetensors(path)


def _load_safetensors(path: Path) -> CappingConfig:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except SafetensorError as exc:
        raise CappingError(f"{path}: not a valid safetensors file: {exc}") from None
    if header.get("format") != FORMAT:
        raise CappingError(f"{path}: not a personaxis capping config (format {header.get('format')!r})")
    try:
        body = json.loads(header["config"])
        vectors = {name: CapVector(int(v["layer"]), tensors[f"vector/{name}"]) for name, v in body["vectors"].items()}
        experiments = [
            Experiment(e["id"], tuple(Cap(c[0], float(c[1]), c[2]) for c in e["caps"])) for e in body["experiments"]
        ]
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise CappingError(f"{path}: malformed capping config ({type(exc).__name__}: {exc})") from None
    try:
        return CappingConfig(
            vectors,
            experiments,
            percentiles=body.get("percentiles"),
            thresholds=tensors.get("thresholds"),
            model=header.get("model", "unknown"),
            metadata=body.get("metadata") or {},
        )
    except CappingError as exc:
        raise CappingError(f"{path}: {exc}") from None


# -------------------------------------------------------------------------------------------------- calibration
def run_projections(
    pipeline: Pipeline, axis: Axis, kinds: Sequence[str] = ORDINARY_KINDS
) -> tuple[np.ndarray, dict[str, int]]:
    """Projections ``[n_rollouts, n_layers]`` (float64) of the mean response activations of a run's rollouts of the
    given condition kinds onto the unit axis, and the number of rollouts per kind."""
    from personaxis.store import RunDirError

    units = [u for u in pipeline.units if u.condition.kind in kinds]
    missing = [pipeline.activation_path(u) for u in units if not pipeline.activation_path(u).is_file()]
    if missing:
        raise RunDirError(
            f"{len(missing)} unit(s) have no activations yet (e.g. {missing[0]}); "
            f"run `personaxis extract --out {pipeline.store.root}` or `personaxis run` first"
        )
    unit_vectors = axis.vectors.to(torch.float64)
    unit_vectors = unit_vectors / unit_vectors.norm(dim=-1, keepdim=True)
    rows: list[Tensor] = []
    counts: dict[str, int] = {}
    for unit in units:
        _, means, _ = pipeline.read_activations(unit)
        if means.shape[0] == 0:
            continue
        if means.shape[1:] != axis.vectors.shape:
            raise CappingError(
                f"{pipeline.activation_path(unit)}: activations of shape [{means.shape[1]}, {means.shape[2]}] per rollout "
                f"do not fit an axis of {axis.n_layers} layers and hidden size {axis.hidden_size}"
            )
        rows.append(torch.einsum("nlh,lh->nl", means.to(torch.float64), unit_vectors))
        counts[unit.condition.kind] = counts.get(unit.condition.kind, 0) + int(means.shape[0])
    if not rows:
        raise CappingError(f"no rollout with an answer among the {', '.join(kinds)} rollouts of {pipeline.store.root}")
    return torch.cat(rows).numpy(), counts


def calibrate(
    source: str | Path | Pipeline,
    axis: Axis | str | Path | None = None,
    percentiles: Sequence[float] = PERCENTILES,
    bands: Sequence[tuple[int, int]] | None = None,
    *,
    kinds: Sequence[str] = ORDINARY_KINDS,
) -> CappingConfig:
    """Per-layer thresholds from a run directory, and one floor-cap experiment per (band, percentile).

    ``axis`` defaults to the run's ``axis.safetensors``; ``bands`` are ``(start, width)`` pairs (default
    :func:`default_bands`); ``percentiles`` are in percent.
    """
    from personaxis.pipeline import Pipeline, open_existing

    pipeline = source if isinstance(source, Pipeline) else open_existing(source)
    root = pipeline.store.root
    if axis is None:
        axis = root / "axis.safetensors"
    if not isinstance(axis, Axis):
        axis = Axis.load(axis)
    percentiles = check_percentiles(percentiles)
    bands = check_bands(bands if bands is not None else default_bands(axis.n_layers), axis.n_layers)
    projections, counts = run_projections(pipeline, axis, kinds)
    thresholds = torch.from_numpy(np.percentile(projections, percentiles, axis=0).astype(np.float64))
    layers = sorted({layer for start, width in bands for layer in range(start, start + width)})
    vectors = {f"axis_layer_{layer}": CapVector(layer, axis.vectors[layer].clone()) for layer in layers}
    experiments = [
        Experiment(
            experiment_id(start, start + width, p),
            tuple(Cap(f"axis_layer_{layer}", float(thresholds[i, layer])) for layer in range(start, start + width)),
        )
        for start, width in bands
        for i, p in enumerate(percentiles)
    ]
    metadata = {
        "made_by": "personaxis calibrate",
        "run_dir": str(root),
        "rollouts": counts,
        "n_rollouts": int(projections.shape[0]),
        "bands": [list(b) for b in bands],
        "axis_model": axis.model,
        "projection_mean": [float(x) for x in projections.mean(0)],
        "projection_std": [float(x) for x in projections.std(0)],
    }
    return CappingConfig(
        vectors, experiments, percentiles=percentiles, thresholds=thresholds, model=axis.model, metadata=metadata
    )
