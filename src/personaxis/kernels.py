"""Linear layers on oneDNN for CPUs.

PyTorch's CPU build runs ``nn.Linear`` through MKL, which on AMD processors takes an AVX2 code path: on the 2-core
AMD EPYC (AVX-512) these notes were measured on, a 2048³ fp32 matrix product ran at 211 GFLOP/s through ``torch.mm``
and 479 through oneDNN (also inside PyTorch, as ``torch.ops.mkldnn``). For the small products of decoding the gap
is wider: [64, 576] × [576, 1536] at 170 vs 473 GFLOP/s with the weight packed into oneDNN's blocked layout once.

:func:`use_onednn_linears` turns every plain ``nn.Linear`` of a model into a :class:`OneDNNLinear` (the same module
and parameters, a different ``forward``). Its CPU forward in float32 without autograd runs oneDNN on a packed copy
of the weight, made on first use and remade when the weight changes; anything else (a GPU, another dtype, gradients)
runs ``torch.nn.functional.linear`` as before (bfloat16 is left to PyTorch, which already runs it on oneDNN). Packed
copies cost as much memory as the weights; when they would not fit in a quarter of the memory available, oneDNN runs
on the weights as they are (about 1.5× slower than packed at batches of 16 or more, the same for one row). Results
equal ``F.linear`` up to float rounding (another summation order).

Set ``PERSONAXIS_KERNELS=torch`` to keep PyTorch's own linear layers. Only x86-64 CPUs use oneDNN here.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

KERNELS_ENV = "PERSONAXIS_KERNELS"
# Packed copies may use at most this share of the memory available when the model is converted.
PACK_MEMORY_FRACTION = 0.25


def onednn_available() -> bool:
    """Whether this PyTorch build can run linear layers on oneDNN, on an x86-64 CPU (the only kind measured: on ARM
    PyTorch's oneDNN goes through the Arm Compute Library, which was not)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except Exception:  # pragma: no cover - unusual builds
        return False


def kernels_enabled() -> bool:
    """oneDNN linear layers are used unless ``PERSONAXIS_KERNELS=torch`` (or the build lacks oneDNN)."""
    choice = os.environ.get(KERNELS_ENV, "onednn").strip().lower()
    if choice not in ("onednn", "torch"):
        raise ValueError(f"{KERNELS_ENV} must be 'onednn' or 'torch', got {choice!r}")
    return choice == "onednn" and onednn_available()


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _version(tensor: Tensor) -> int:
    try:
        return int(tensor._version)
    except RuntimeError:  # inference tensors keep no version counter (and cannot be changed in place outside it)
        return 0


def pack_weight(weight: Tensor) -> Tensor:
    """A copy of an fp32 ``[out, in]`` weight in oneDNN's blocked layout, for :func:`onednn_linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` through oneDNN; ``weight`` plain or from :func:`pack_weight`."""
    # ``.default``: the overload itself, skipping the per-call overload resolution (2 µs of ~15 µs per call).
    return torch.ops.mkldnn._linear_pointwise.default(x, weight, bias, "none", [], "")


class OneDNNLinear(nn.Linear):
    """An ``nn.Linear`` whose inference forward on a CPU runs oneDNN (see the module's notes)."""

    _onednn_pack: bool = True
    _onednn_weight: Tensor | None = None
    _onednn_key: tuple[int, int] | None = None

    def _weight_for_onednn(self, weight: Tensor) -> Tensor:
        if not self._onednn_pack:
            return weight
        key = (weight.data_ptr(), _version(weight))
        if self._onednn_key != key or self._onednn_weight is None:
            self._onednn_weight = pack_weight(weight)
            self._onednn_key = key
        return self._onednn_weight

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        if (
            x.is_cpu
            and weight.is_cpu
            and x.dtype is torch.float32
            and weight.dtype is torch.float32
            and x.dim() >= 2
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        ):
            return onednn_linear(x, self._weight_for_onednn(weight), self.bias)
        return nn.functional.linear(x, weight, self.bias)


def _plain_linears(model: nn.Module) -> list[nn.Linear]:
    """Plain ``nn.Linear`` modules (not subclasses such as quantised layers), without accelerate's offloading hooks
    (those swap the weight on every call, which would repack it every time)."""
    return [
        m for m in model.modules()
        if type(m) is nn.Linear and m.weight.dim() == 2 and m.weight.numel() > 0 and not hasattr(m, "_hf_hook")
    ]


def use_onednn_linears(model: nn.Module, *, pack: bool | None = None, force: bool = False) -> int:
    """Turn the model's plain ``nn.Linear`` modules into :class:`OneDNNLinear` in place; returns how many.

    ``pack=None`` packs weights when their copies fit in ``PACK_MEMORY_FRACTION`` of the available memory. Nothing
    changes when oneDNN is unavailable or (unless ``force``) ``PERSONAXIS_KERNELS=torch``.
    """
    if not (onednn_available() if force else kernels_enabled()):
        return 0
    linears = _plain_linears(model)
    if pack is None:
        on_cpu = [m for m in linears if m.weight.is_cpu and m.weight.dtype is torch.float32]
        needed = sum(m.weight.numel() * m.weight.element_size() for m in on_cpu)
        free = available_memory()
        pack = free is None or needed <= PACK_MEMORY_FRACTION * free
    for module in linears:
        module.__class__ = OneDNNLinear
        module._onednn_pack = pack
    return len(linears)


def restore_linears(model: nn.Module) -> int:
    """Undo :func:`use_onednn_linears` (drops the packed copies); returns how many modules changed back."""
    changed = 0
    for module in model.modules():
        if type(module) is OneDNNLinear:
            module.__class__ = nn.Linear
            for name in ("_onednn_weight", "_onednn_key", "_onednn_pack"):
                module.__dict__.pop(name, None)
            changed += 1
    return changed


@contextmanager
def torch_linears(model: nn.Module) -> Iterator[None]:
    """Run PyTorch's own linear layers inside the block (the packed copies are kept for afterwards): the plain path
    that benchmarks and tests compare against."""
    switched = [m for m in model.modules() if type(m) is OneDNNLinear]
    for module in switched:
        module.__class__ = nn.Linear
    try:
        yield
    finally:
        for module in switched:
            module.__class__ = OneDNNLinear


def onednn_linear_count(model: nn.Module) -> int:
    """How many of the model's linear layers run on oneDNN."""
    return sum(type(m) is OneDNNLinear for m in model.modules())
