"""Operators on the residual stream: add, ablate, floor cap, ceiling cap.

Each operator maps a block output ``h`` (``[..., hidden]``) to a new one. They are applied per layer through the one
hook mechanism of :mod:`personaxis.hooks`, at every non-padding position, including positions generated with a KV
cache. Arithmetic runs in float32 (or the model's dtype when that is wider) and is cast back.

    with apply_interventions(lm, {15: [Add(axis_vector, alpha=4.0)]}):
        model.generate(...)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from personaxis.hooks import residual_hooks
from personaxis.models import LoadedModel


class VectorError(ValueError):
    """A vector has the wrong size or holds NaN, inf or only zeros."""


def check_vector(
    vector: Tensor, hidden_size: int | None = None, *, name: str = "vector", nonzero: bool = True
) -> Tensor:
    """Validate a 1-D direction: finite, non-zero, and of the model's hidden size."""
    if not isinstance(vector, Tensor):
        raise VectorError(f"{name} must be a torch tensor, got {type(vector).__name__}")
    if vector.dim() != 1:
        raise VectorError(f"{name} must be 1-D [hidden], got shape {tuple(vector.shape)}")
    if hidden_size is not None and vector.shape[0] != hidden_size:
        raise VectorError(f"{name} has size {vector.shape[0]} but the model's hidden size is {hidden_size}")
    if not torch.isfinite(vector).all():
        raise VectorError(f"{name} holds NaN or inf values")
    if nonzero and not bool((vector != 0).any()):
        raise VectorError(f"{name} is all zeros: it has no direction")
    return vector


def _compute_dtype(hidden: Tensor) -> torch.dtype:
    return torch.promote_types(hidden.dtype, torch.float32)


def _unit(direction: Tensor) -> Tensor:
    direction = direction.detach().to(torch.float64)
    return direction / direction.norm()  # kept in float64; cast to the compute dtype where used


@dataclass(frozen=True, eq=False)
class Operator:
    """Base class: ``vector`` is the direction the operator acts along.

    Attributes:
        vector: a 1-D tensor ``[hidden]`` (finite; nonzero for the operators that need a direction).
    """

    vector: Tensor

    def __post_init__(self) -> None:
        check_vector(self.vector, nonzero=self._needs_direction)

    _needs_direction = True

    @property
    def hidden_size(self) -> int:
        return int(self.vector.shape[0])

    def __call__(self, hidden: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class Add(Operator):
    """``h ← h + alpha · vector`` (the vector as given, not normalised).

    Attributes:
        vector: the vector added, ``[hidden]`` (may be zero).
        alpha: its coefficient, in the vector's own units.
    """

    alpha: float = 1.0
    _needs_direction = False

    def __call__(self, hidden: Tensor) -> Tensor:
        ct = _compute_dtype(hidden)
        return (hidden.to(ct) + self.alpha * self.vector.to(hidden.device, ct)).to(hidden.dtype)


@dataclass(frozen=True, eq=False)
class Ablate(Operator):
    """Project out the direction: ``h ← h − â⟨h, â⟩``, then optionally add back ``add_back · â``.

    Attributes:
        vector: the direction ``[hidden]`` (nonzero; normalised to ``â``).
        add_back: the projection to set after removing it, in the residual stream's units; ``None`` leaves zero.
        unit: ``â``, computed from ``vector``.
    """

    add_back: float | None = None
    unit: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "unit", _unit(self.vector))

    def __call__(self, hidden: Tensor) -> Tensor:
        ct = _compute_dtype(hidden)
        h, u = hidden.to(ct), self.unit.to(hidden.device, ct)
        out = h - (h @ u).unsqueeze(-1) * u
        if self.add_back is not None:
            out = out + self.add_back * u
        return out.to(hidden.dtype)


@dataclass(frozen=True, eq=False)
class FloorCap(Operator):
    """Floor on the projection: ``h ← h − â · min(⟨h, â⟩ − tau, 0)``; never lowers a projection.

    Attributes:
        vector: the direction ``[hidden]`` (nonzero; normalised to ``â``).
        tau: the threshold on ``⟨h, â⟩``, in the residual stream's units (finite).
        unit: ``â``, computed from ``vector``.
    """

    tau: float = 0.0
    unit: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not torch.isfinite(torch.tensor(float(self.tau))):
            raise VectorError(f"cap threshold must be finite, got {self.tau}")
        object.__setattr__(self, "unit", _unit(self.vector))

    def _excess(self, projection: Tensor) -> Tensor:
        return torch.clamp(projection - self.tau, max=0.0)

    def __call__(self, hidden: Tensor) -> Tensor:
        ct = _compute_dtype(hidden)
        h, u = hidden.to(ct), self.unit.to(hidden.device, ct)
        return (h - self._excess(h @ u).unsqueeze(-1) * u).to(hidden.dtype)


@dataclass(frozen=True, eq=False)
class CeilingCap(FloorCap):
    """Ceiling on the projection: ``h ← h − â · max(⟨h, â⟩ − tau, 0)``; never raises a projection.

    Attributes (as :class:`FloorCap`): ``vector``, the direction; ``tau``, the ceiling on ``⟨h, â⟩``; ``unit``, ``â``.
    """

    def _excess(self, projection: Tensor) -> Tensor:
        return torch.clamp(projection - self.tau, min=0.0)


Interventions = Mapping[int, Sequence[Operator]]


def merge_interventions(*maps: Interventions | None) -> dict[int, list[Operator]]:
    """Compose several per-layer operator maps; operators at one layer run in the order given."""
    merged: dict[int, list[Operator]] = {}
    for mapping in maps:
        for layer, ops in (mapping or {}).items():
            merged.setdefault(layer, []).extend(ops)
    return merged


def _writer(op: Operator):
    def write(hidden: Tensor, mask: Tensor | None) -> Tensor:
        new = op(hidden)
        if mask is None or bool(mask.all()):
            return new
        return torch.where(mask.unsqueeze(-1), new, hidden)

    return write


@contextmanager
def apply_interventions(lm: LoadedModel, interventions: Interventions | None) -> Iterator[None]:
    """Apply per-layer operators to block outputs within the ``with`` block (nothing when empty).

    Args:
        lm: the model.
        interventions: operators (:class:`Add`, :class:`Ablate`, :class:`FloorCap`, :class:`CeilingCap`) per layer,
            keyed by zero-based block index (they act on block ``l``'s output, every token of every forward pass);
            at one layer they run in the order given. ``None`` or empty applies nothing.

    Returns:
        A context manager; the hooks are removed when the ``with`` block ends, also on an error.

    Raises:
        IndexError: a layer is out of range for the model.
        TypeError: an entry is not an intervention operator.
        VectorError: an operator's vector does not match the model's hidden size.
    """
    interventions = interventions or {}
    for layer, ops in interventions.items():
        lm.profile.check_layer(layer)
        for op in ops:
            if not isinstance(op, Operator):
                raise TypeError(f"layer {layer}: {op!r} is not an intervention operator")
            if op.hidden_size != lm.profile.hidden_size:
                raise VectorError(
                    f"layer {layer}: {type(op).__name__} vector has size {op.hidden_size} "
                    f"but the model's hidden size is {lm.profile.hidden_size}"
                )
    with residual_hooks(lm, writers={layer: [_writer(op) for op in ops] for layer, ops in interventions.items()}):
        yield


class RowInterventions:
    """Per-row operators for a batch whose rows each have their own treatment, applied in one forward pass.

    ``set_rows([map_row_0, map_row_1, ...])`` says which operators act on which row; an operator shared by several
    rows (the same object) runs once over the batch and is kept where its row mask is set. Rows can change between
    forward passes (a batch that gains and loses rows, a cap switched on for one row): call ``set_rows`` again.
    :meth:`writers` gives the hook functions for :func:`personaxis.hooks.residual_hooks`.
    """

    def __init__(self) -> None:
        self._layers: dict[int, list[tuple[Operator, Tensor | None]]] = {}

    def set_rows(self, per_row: Sequence[Interventions | None]) -> None:
        groups: dict[int, dict[int, tuple[Operator, list[bool]]]] = {}
        n = len(per_row)
        for row, mapping in enumerate(per_row):
            for layer, ops in (mapping or {}).items():
                for op in ops:
                    entry = groups.setdefault(layer, {}).setdefault(id(op), (op, [False] * n))
                    entry[1][row] = True
        self._layers = {
            layer: [(op, None if all(rows) else torch.tensor(rows, dtype=torch.bool)) for op, rows in ops.values()]
            for layer, ops in groups.items()
        }

    @property
    def layers(self) -> list[int]:
        return sorted(self._layers)

    def writers(self) -> dict[int, list]:
        return {layer: [self._writer(layer)] for layer in self._layers}

    def _writer(self, layer: int):
        def write(hidden: Tensor, mask: Tensor | None) -> Tensor:
            for op, rows in self._layers.get(layer, []):
                keep = mask if mask is not None else None
                if rows is not None:
                    row_mask = rows.to(hidden.device).unsqueeze(1).expand(hidden.shape[0], hidden.shape[1])
                    keep = row_mask if keep is None else keep & row_mask
                new = op(hidden)
                hidden = new if keep is None or bool(keep.all()) else torch.where(keep.unsqueeze(-1), new, hidden)
            return hidden

        return write
