"""The Assistant Axis: per-layer directions with metadata, projection and arithmetic.

Conventions: ``vectors[l]`` lives at the output of decoder block ``l`` (zero-based, ``hidden_states[l + 1]``), and
points toward the Assistant: a higher projection means more Assistant-like. Projections are onto the unit axis,
``⟨h, â_l⟩``, in the residual stream's own units.

Reading and writing axis files is the I/O layer's job: :func:`personaxis.io.tensor_files.load_axis` and
:func:`personaxis.io.tensor_files.save_axis`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

LAYER_CONVENTION = "block_output"  # vectors[l] = output of decoder block l = hidden_states[l + 1]
SIGN_CONVENTION = "assistant_positive"


class AxisError(ValueError):
    """An axis or vector file is malformed or does not fit the model."""


def check_layer_vectors(
    vectors: Tensor, *, name: str = "axis", n_layers: int | None = None, hidden: int | None = None
) -> Tensor:
    """Validate a ``[n_layers, hidden]`` stack of per-layer vectors."""
    if not isinstance(vectors, Tensor):
        raise AxisError(f"{name} must be a tensor, got {type(vectors).__name__}")
    if vectors.dim() != 2:
        raise AxisError(f"{name} must have shape [n_layers, hidden], got {tuple(vectors.shape)}")
    if not vectors.is_floating_point():
        raise AxisError(f"{name} must hold floating-point values, got {vectors.dtype}")
    if not torch.isfinite(vectors).all():
        raise AxisError(f"{name} holds NaN or inf values")
    if n_layers is not None and vectors.shape[0] != n_layers:
        raise AxisError(f"{name} has {vectors.shape[0]} layers but the model has {n_layers}")
    if hidden is not None and vectors.shape[1] != hidden:
        raise AxisError(f"{name} has hidden size {vectors.shape[1]} but the model's hidden size is {hidden}")
    zero = (vectors.norm(dim=-1) == 0).nonzero().flatten().tolist()
    if zero:
        raise AxisError(f"{name} is a zero vector at layer(s) {zero}: it has no direction there")
    return vectors


@dataclass
class Axis:
    """Per-layer directions ``[n_layers, hidden]`` toward the Assistant, with what is known about them.

    Attributes:
        vectors: ``[n_layers, hidden]`` float32 on the CPU; row ``l`` is the direction at the output of decoder block
            ``l`` (zero-based), pointing toward the Assistant (higher projection = more Assistant-like).
        model: the name of the model it was computed on.
        target_layer: the default layer for steering and monitoring (``n_layers // 2`` unless given).
        residual_norms: ``[n_layers]``, the mean L2 norm of block outputs on ordinary rollouts, per layer: the unit
            of the default steering α; ``None`` when not measured (an imported reference axis).
        metadata: how the axis was made (JSON-able).
    """

    vectors: Tensor
    model: str = "unknown"
    target_layer: int | None = None
    residual_norms: Tensor | None = None  # mean L2 norm of block outputs on ordinary rollouts, per layer
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_layer_vectors(self.vectors)
        self.vectors = self.vectors.detach().to(torch.float32).cpu()
        if self.target_layer is None:
            self.target_layer = self.n_layers // 2
        if not 0 <= self.target_layer < self.n_layers:
            raise AxisError(f"target layer {self.target_layer} is out of range for an axis of {self.n_layers} layers")
        if self.residual_norms is not None:
            norms = torch.as_tensor(self.residual_norms, dtype=torch.float32).flatten()
            if norms.shape[0] != self.n_layers or not torch.isfinite(norms).all() or (norms <= 0).any():
                raise AxisError(f"residual norms must be {self.n_layers} positive finite numbers")
            self.residual_norms = norms

    # ----------------------------------------------------------------------------------------------- shape
    @property
    def n_layers(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.vectors.shape[1])

    def check_fits(self, n_layers: int, hidden_size: int, model_name: str = "the model") -> None:
        if self.hidden_size != hidden_size:
            raise AxisError(
                f"axis hidden size {self.hidden_size} does not match {model_name}'s hidden size {hidden_size}"
            )
        if self.n_layers != n_layers:
            raise AxisError(f"axis has {self.n_layers} layers but {model_name} has {n_layers}")

    def layer(self, layer: int) -> Tensor:
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise IndexError(
                f"layer {layer} is out of range for an axis of {self.n_layers} layers (0..{self.n_layers - 1})"
            )
        return self.vectors[layer]

    def unit(self, layer: int | None = None) -> Tensor:
        vectors = self.vectors if layer is None else self.layer(layer)
        return vectors / vectors.norm(dim=-1, keepdim=True)

    def norms(self) -> Tensor:
        return self.vectors.norm(dim=-1)

    # ----------------------------------------------------------------------------------------- projection
    def project(self, activations: Tensor, layer: int | None = None) -> Tensor:
        """Project onto the unit axis.

        - ``[hidden]`` with ``layer`` → scalar; ``[..., hidden]`` with ``layer`` → ``[...]``;
        - ``[n_layers, hidden]`` or ``[..., n_layers, hidden]`` without ``layer`` → ``[..., n_layers]``.
        """
        acts = torch.as_tensor(activations).to(torch.float32)
        if acts.shape[-1] != self.hidden_size:
            raise AxisError(f"activations have hidden size {acts.shape[-1]}, the axis {self.hidden_size}")
        if layer is not None:
            return acts @ self.unit(layer)
        if acts.dim() < 2 or acts.shape[-2] != self.n_layers:
            raise AxisError(
                f"activations of shape {tuple(acts.shape)} need a layer index, or a layer dimension of {self.n_layers}"
            )
        return (acts * self.unit()).sum(-1)

    def cosine(self, other: Axis | Tensor) -> Tensor:
        """Cosine similarity per layer with another axis or ``[n_layers, hidden]`` stack."""
        vectors = (
            other.vectors if isinstance(other, Axis) else check_layer_vectors(torch.as_tensor(other), name="other")
        )
        if vectors.shape != self.vectors.shape:
            raise AxisError(f"cannot compare an axis of shape {tuple(self.vectors.shape)} with {tuple(vectors.shape)}")
        return torch.nn.functional.cosine_similarity(self.vectors, vectors.to(torch.float32), dim=-1)

    def alpha_to_raw(self, layer: int, alpha: float) -> float:
        """Convert a steering coefficient in units of the layer's mean residual norm to raw units."""
        if self.residual_norms is None:
            raise AxisError("this axis has no residual norms: give the coefficient in raw units")
        self.layer(layer)
        return float(alpha) * float(self.residual_norms[layer])

    # ----------------------------------------------------------------------------------------- arithmetic
    def _derive(self, vectors: Tensor, how: str) -> Axis:
        meta = {**self.metadata, "derived": how}
        return Axis(
            vectors, model=self.model, target_layer=self.target_layer, residual_norms=self.residual_norms, metadata=meta
        )

    def _other(self, other: Axis | Tensor) -> Tensor:
        vectors = other.vectors if isinstance(other, Axis) else torch.as_tensor(other, dtype=torch.float32)
        if vectors.shape != self.vectors.shape:
            raise AxisError(f"cannot combine an axis of shape {tuple(self.vectors.shape)} with {tuple(vectors.shape)}")
        return vectors

    def __add__(self, other: Axis | Tensor) -> Axis:
        return self._derive(self.vectors + self._other(other), "sum")

    def __sub__(self, other: Axis | Tensor) -> Axis:
        return self._derive(self.vectors - self._other(other), "difference")

    def __mul__(self, scale: float) -> Axis:
        return self._derive(self.vectors * float(scale), f"scaled by {float(scale)}")

    __rmul__ = __mul__

    def __neg__(self) -> Axis:
        return self._derive(-self.vectors, "negated")
