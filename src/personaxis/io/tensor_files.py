"""Tensor files: the axis and capping configs in our safetensors formats (or the reference's ``.pt`` by suffix), and a
run's activations and vectors read into tensors.

Our files are safetensors only (no pickle) with JSON metadata, written atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from personaxis.axis import LAYER_CONVENTION, SIGN_CONVENTION, Axis, AxisError
from personaxis.capping import FORMAT as CAPPING_FORMAT
from personaxis.capping import Cap, CappingConfig, CappingError, CapVector, Experiment
from personaxis.interop import load_reference_axis, load_reference_capping, save_reference_capping
from personaxis.io.records import VectorIndex, VectorIndexRole
from personaxis.io.run_layout import RunLayout
from personaxis.store import atomic_save_tensors, atomic_write_bytes, load_tensors, read_record, safetensors_bytes
from personaxis.vectors import TooFewRolesError, group_tensor

AXIS_FORMAT = "personaxis.axis/1"


# ------------------------------------------------------------------------------------------------------------ axis
def save_axis(axis: Axis, path: str | Path) -> Path:
    """Write an axis as safetensors (no pickle) with JSON metadata, atomically (temporary file, fsync, rename).

    Args:
        axis: the axis; its vectors ``[n_layers, hidden]``, residual norms (when present), model name, target layer
            and metadata are written, with the layer and sign conventions.
        path: the file to write (``.safetensors`` by convention; the format does not depend on the suffix).

    Returns:
        ``path``, as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    tensors = {"axis": axis.vectors.contiguous()}
    if axis.residual_norms is not None:
        tensors["residual_norms"] = axis.residual_norms.contiguous()
    header = {
        "format": AXIS_FORMAT,
        "model": axis.model,
        "target_layer": str(axis.target_layer),
        "layer_convention": LAYER_CONVENTION,
        "sign": SIGN_CONVENTION,
        "metadata": json.dumps(axis.metadata, sort_keys=True),
    }
    atomic_write_bytes(path, safetensors_bytes(tensors, header))
    return path


def load_axis(path: str | Path, *, model: str | None = None) -> Axis:
    """Read an axis: our safetensors, or a reference torch file (``[n_layers, hidden]`` or ``{"axis": ...}``).

    Args:
        path: a ``.safetensors`` file written by :func:`save_axis`; any other suffix is read as the reference's torch
            file (with ``weights_only=True``).
        model: the model name to record on an axis read from a reference file (which keeps none); our files carry
            their own.

    Returns:
        The :class:`~personaxis.axis.Axis`: float32 vectors ``[n_layers, hidden]`` pointing toward the Assistant,
        with its residual norms (``None`` when the file has none, as the reference's files), target layer and
        metadata.

    Raises:
        AxisError: the file is missing, not a valid axis file, has an unknown sign convention or malformed metadata
            (:class:`~personaxis.interop.InteropError`, an ``AxisError``, for a reference file that is unreadable,
            refused as unsafe or too large, or holds something else).
    """
    path = Path(path)
    if not path.is_file():
        raise AxisError(f"{path}: axis file not found")
    if path.suffix != ".safetensors":
        return load_reference_axis(path, model=model)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            keys = set(handle.keys())
            if "axis" not in keys:
                raise AxisError(f"{path}: no 'axis' tensor in the file (found: {', '.join(sorted(keys)) or 'none'})")
            vectors = handle.get_tensor("axis")
            norms = handle.get_tensor("residual_norms") if "residual_norms" in keys else None
    except SafetensorError as exc:
        raise AxisError(f"{path}: not a valid safetensors file: {exc}") from None
    if header.get("sign", SIGN_CONVENTION) != SIGN_CONVENTION:
        raise AxisError(f"{path}: unknown sign convention {header.get('sign')!r}")
    try:
        metadata = json.loads(header.get("metadata", "{}"))
        target = int(header["target_layer"]) if "target_layer" in header else None
    except (ValueError, TypeError) as exc:
        raise AxisError(f"{path}: malformed metadata: {exc}") from None
    try:
        return Axis(
            vectors, model=header.get("model", "unknown"), target_layer=target, residual_norms=norms, metadata=metadata
        )
    except AxisError as exc:
        raise AxisError(f"{path}: {exc}") from None


# --------------------------------------------------------------------------------------------------------- capping
def save_capping(config: CappingConfig, path: str | Path) -> Path:
    """Write our format (``.safetensors``, no pickle) or, for any other suffix, the reference torch file.

    Args:
        config: the capping config: named vectors with their layers, the experiments, and the calibrated thresholds
            and percentiles when present (the reference's format keeps them under an extra ``"personaxis"`` key).
        path: the file to write; ``.safetensors`` selects our format, written atomically.

    Returns:
        ``path``, as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        return save_reference_capping(config, path)
    tensors = {f"vector/{name}": cv.vector.contiguous() for name, cv in config.vectors.items()}
    if config.thresholds is not None:
        tensors["thresholds"] = config.thresholds.contiguous()
    body = {
        "vectors": {name: {"layer": cv.layer} for name, cv in config.vectors.items()},
        "experiments": [
            {"id": e.id, "caps": [[c.vector, float(c.tau), c.kind] for c in e.caps]} for e in config.experiments
        ],
        "percentiles": list(config.percentiles) if config.percentiles is not None else None,
        "metadata": config.metadata,
    }
    header = {"format": CAPPING_FORMAT, "model": config.model, "config": json.dumps(body, sort_keys=True)}
    atomic_write_bytes(path, safetensors_bytes(tensors, header))
    return path


def load_capping(path: str | Path) -> CappingConfig:
    """Read our safetensors format, or a reference torch file (read with ``weights_only=True`` only).

    Args:
        path: a ``.safetensors`` file written by :func:`save_capping`, or (any other suffix) the reference's torch
            file.

    Returns:
        The :class:`~personaxis.capping.CappingConfig`; its thresholds ``[n_percentiles, n_layers]`` are ``None``
        when the file has none (a reference file written by the reference implementation).

    Raises:
        CappingError: the file is missing, not a valid safetensors file, not a personaxis capping config, or
            malformed.
        InteropError: a reference file is unreadable, refused as unsafe or too large, or malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise CappingError(f"{path}: capping config not found")
    if path.suffix != ".safetensors":
        return load_reference_capping(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except SafetensorError as exc:
        raise CappingError(f"{path}: not a valid safetensors file: {exc}") from None
    if header.get("format") != CAPPING_FORMAT:
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


# ------------------------------------------------------------------------------------------------- unit activations
def save_unit_activations(path: Path, ids: list[str], means: Tensor, norms: Tensor) -> None:
    """One unit's activation file: the response means ``[n, n_layers, hidden]`` and norms ``[n, n_layers]`` of its
    rollouts, in the order of ``ids``."""
    atomic_save_tensors(path, {"means": means, "norms": norms}, {"ids": json.dumps(ids)})


def load_unit_activations(path: Path) -> tuple[list[str], Tensor, Tensor]:
    """The rollout ids, means (float32) and norms (float32) of one unit's activation file."""
    with safe_open(str(path), framework="pt") as handle:
        ids = json.loads((handle.metadata() or {})["ids"])
    tensors = load_tensors(path)
    means, norms = tensors["means"].to(torch.float32), tensors["norms"].to(torch.float32)
    if means.shape[0] != len(ids) or norms.shape[0] != len(ids):
        raise ValueError(f"{len(ids)} ids but {means.shape[0]} rows")
    return ids, means, norms


# --------------------------------------------------------------------------------------------------------- vectors
def read_vector_index(layout: RunLayout) -> VectorIndex:
    return read_record(layout.vector_index, VectorIndex)


def load_default_vector(layout: RunLayout) -> Tensor:
    return load_tensors(layout.default_vector)["vector"]


def load_residual_norms(layout: RunLayout) -> Tensor | None:
    """The run's mean residual norms per layer; ``None`` when not measured (a run imported from the reference's
    outputs, which keep none)."""
    norms = load_tensors(layout.residual_norms)["norms"]
    return norms if bool(torch.isfinite(norms).all() and (norms > 0).all()) else None


def load_role_vectors(layout: RunLayout, index: VectorIndex | None = None) -> tuple[list[VectorIndexRole], Tensor]:
    """The index entries of the roles in the axis and their axis vectors ``[n_roles, L, H]``."""
    index = index or read_vector_index(layout)
    kept = [r for r in index.roles if r.axis_vector]
    vectors = [load_tensors(layout.role_vectors(r.name))["used"] for r in kept]
    if len(vectors) < 2:
        recipe = index.recipe
        raise TooFewRolesError(
            f"only {len(vectors)} role(s) have at least {index.min_count} rollouts the judge scored as role play "
            f"(recipe {recipe!r}); lower --min-count, add prompts or questions, "
            + ("use --vectors pooled, " if recipe != "pooled" else "")
            + "or use --judge none"
        )
    return kept, torch.stack(vectors)


def load_space_points(layout: RunLayout, index: VectorIndex | None = None) -> tuple[list[dict[str, Any]], Tensor]:
    """The persona space's points — one per role and score group the recipe keeps (``group`` says which) — and
    their vectors ``[n_points, L, H]``."""
    index = index or read_vector_index(layout)
    points: list[dict[str, Any]] = []
    vectors: list[Tensor] = []
    for role in index.roles:
        if not role.space_vectors:
            continue
        tensors = load_tensors(layout.role_vectors(role.name))
        for group in role.space_vectors:
            points.append({**role.to_json(), "group": group})
            vectors.append(group_tensor(tensors, group))
    if len(vectors) < 2:
        raise TooFewRolesError(f"the persona space needs at least 2 role vectors, the run has {len(vectors)}")
    return points, torch.stack(vectors)


def load_trait_vectors(layout: RunLayout, names: list[str]) -> Tensor:
    """The trait vectors ``[n_traits, L, H]`` of ``names``."""
    return torch.stack([load_tensors(layout.trait_vector(n))["vector"] for n in names])
