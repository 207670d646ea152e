"""Linear layers with int8 weights for generating rollouts on CPUs: opt-in, faster, and not the same tokens.

In float32 the linear layers of decoding already run near the CPU's peak (:mod:`personaxis.kernels`): on an AVX2
CPU, at 64 rows, at 94 % of oneDNN's AVX2 rate, which leaves no room for 2× plain transformers. int8 products
(FBGEMM, inside PyTorch) do about twice the arithmetic per instruction and read a quarter of the bytes. Measured
per product on the 2-core AMD EPYC limited to AVX2, float32 oneDNN → int8: [64, 576] × [576, 1536] 475 → 262 µs,
[16, 576] × [576, 1536] 138 → 72 µs, the LM head for one row 2.4 → 0.5 ms.

:func:`int8_linears` runs a model's linear layers this way inside a ``with`` block and gives the float32 layers back
after it; the int8 copies are kept on the modules for the next block (a quarter of the float32 weights' memory).

- Weights: int8 per output channel (scale: the channel's largest magnitude over 127).
- Inputs: quantised when each product runs, to 7 bits (FBGEMM's ``reduce_range``, which keeps AVX2's 16-bit
  pairwise sums from saturating). With several rows, each row is first divided by its largest magnitude and the
  output rows multiplied back, so one row's outliers (the first token of a prompt) do not coarsen the others'.
- The rest of the model (attention, norms, embeddings, hooks and interventions on the residual stream) stays float32.

The outputs differ from float32 by about 1 % of their scale, so greedy answers part from float32's within a few
tokens: this is another generator, like the paper's vLLM in bfloat16. A run that uses it for rollouts records it
(``settings.extra["rollout_weights"] = "int8"``) and extracts activations afterwards on the float32 model
(:mod:`personaxis.pipeline`), as the paper generated with one engine and extracted with another.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from personaxis.kernels import OneDNNLinear, cpu_float32_inference, tensor_version

ROLLOUT_WEIGHTS: tuple[str, ...] = ("float32", "int8")
DEFAULT_ROLLOUT_WEIGHTS = "float32"
# Quantised engines that run int8 products on x86 CPUs (FBGEMM, and "x86", which uses FBGEMM for these).
_ENGINES = ("fbgemm", "x86")


def int8_engine() -> str | None:
    """The quantised engine this PyTorch build offers for int8 linear layers on the CPU, or None."""
    try:
        supported = torch.backends.quantized.supported_engines
    except Exception:  # pragma: no cover - builds without quantisation
        return None
    return next((engine for engine in _ENGINES if engine in supported), None)


def int8_available() -> bool:
    """Whether int8 linear layers can run here (an x86-64 CPU build of PyTorch with FBGEMM)."""
    return int8_engine() is not None


def quantize_weight(weight: Tensor) -> Tensor:
    """``weight`` [out, in] as int8 per output channel: PyTorch's packed form for :func:`int8_linear`."""
    weight = weight.detach().float()
    scales = (weight.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny).double()
    zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # the quantised tensor API is marked for a later move to torchao
        warnings.simplefilter("ignore")
        quantized = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(quantized, None)


def int8_linear(x: Tensor, packed: Any, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` with the int8 weight of :func:`quantize_weight`, ``x`` float32 on the CPU."""
    if x.numel() > x.shape[-1]:  # several rows: each gets the whole 7-bit range
        scale = x.abs().amax(dim=-1, keepdim=True).clamp_min_(torch.finfo(torch.float32).tiny)
        out = torch.ops.quantized.linear_dynamic(x / scale, packed, True).mul_(scale)
    else:
        out = torch.ops.quantized.linear_dynamic(x, packed, True)
    return out if bias is None else out.add_(bias)


class Int8Linear(nn.Linear):
    """An ``nn.Linear`` whose float32 CPU forward without autograd runs on int8 weights (inside
    :func:`int8_linears` only); anything else runs ``torch.nn.functional.linear``."""

    _int8_weight: Any = None
    _int8_key: tuple[int, int] | None = None

    def _packed_int8(self) -> Any:
        weight = self.weight
        key = (weight.data_ptr(), tensor_version(weight))
        if self._int8_key != key or self._int8_weight is None:
            self._int8_weight = quantize_weight(weight)
            self._int8_key = key
        return self._int8_weight

    def forward(self, x: Tensor) -> Tensor:
        if cpu_float32_inference(x, self.weight):
            return int8_linear(x, self._packed_int8(), self.bias)
        return nn.functional.linear(x, self.weight, self.bias)


def _linears(model: nn.Module) -> list[nn.Linear]:
    """The model's linear layers that int8 can stand in for: plain ``nn.Linear`` or :class:`OneDNNLinear` with a
    two-dimensional float32 weight on the CPU, without accelerate's offloading hooks."""
    return [
        m
        for m in model.modules()
        if type(m) in (nn.Linear, OneDNNLinear)
        and m.weight.dim() == 2
        and m.weight.numel() > 0
        and m.weight.is_cpu
        and m.weight.dtype is torch.float32
        and not hasattr(m, "_hf_hook")
    ]


@contextmanager
def int8_linears(model: nn.Module) -> Iterator[int]:
    """Run the model's float32 CPU linear layers on int8 weights inside the block; yields how many. The layers are
    themselves again after it (their int8 copies are kept for the next block).

    Raises:
        RuntimeError: this PyTorch build has no int8 engine for the CPU (FBGEMM, x86-64 only).
    """
    engine = int8_engine()
    if engine is None:
        raise RuntimeError(
            "int8 weights need PyTorch's FBGEMM engine (x86-64 CPU builds); this build offers "
            f"{torch.backends.quantized.supported_engines}. Generate in float32 instead."
        )
    linears = _linears(model)
    classes = [type(m) for m in linears]
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    for module in linears:
        module.__class__ = Int8Linear
    try:
        yield len(linears)
    finally:
        for module, cls in zip(linears, classes, strict=True):
            module.__class__ = cls
        torch.backends.quantized.engine = before


def check_rollout_weights(choice: str) -> str:
    """``choice`` if it names rollout weights (:data:`ROLLOUT_WEIGHTS`).

    Raises:
        ValueError: an unknown choice.
    """
    if choice not in ROLLOUT_WEIGHTS:
        raise ValueError(f"unknown rollout weights {choice!r}; choose one of: {', '.join(ROLLOUT_WEIGHTS)}")
    return choice


def rollout_weights(settings: Any) -> str:
    """The weights a run generates its rollouts with (``settings.extra["rollout_weights"]``, float32 unless set).

    Raises:
        ValueError: an unknown choice.
    """
    return check_rollout_weights(str(settings.extra.get("rollout_weights", DEFAULT_ROLLOUT_WEIGHTS)))


def rollout_weights_extra(choice: str) -> dict[str, str]:
    """What a choice of rollout weights adds to ``settings.extra``: nothing for float32, so existing runs resume.

    Raises:
        ValueError: an unknown choice.
    """
    return {} if check_rollout_weights(choice) == DEFAULT_ROLLOUT_WEIGHTS else {"rollout_weights": choice}
