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

A block's query, key and value projections run as one product of their stacked weights
(:class:`ProjectionGroup`), which saves two calls' fixed cost per block: the first member called computes all three
outputs, and the others take theirs when called with the same input.

Memory: a packed copy replaces its original in the resident set (:func:`release_pages`) and lies in a memory mapping
of its own (:func:`packed_copies_mapped`), so the peak RSS stays close to that of PyTorch's layers.

On CPUs where PyTorch's widest kernels are AVX2 or AVX-512, the packed copies and products are those of
:mod:`personaxis.compiled_gemm` instead (a compiled kernel that reads the weights at the memory's rate while it
computes; oneDNN's products take their compute time plus their weights' read time under AVX2, and pay a fixed cost
per call that one-row products feel with AVX-512), where it builds; oneDNN otherwise.

``PERSONAXIS_KERNELS``: ``auto`` (the default, as above), ``compiled`` (the compiled products wherever they build),
``onednn`` (oneDNN everywhere), or ``torch`` (PyTorch's own linear layers). Only x86-64 CPUs use these kernels.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from personaxis import compiled_gemm
from personaxis.compiled_gemm import GemmWeight

KERNELS_ENV = "PERSONAXIS_KERNELS"
KERNEL_CHOICES = ("auto", "compiled", "onednn", "torch")
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


def kernels_choice() -> str:
    """``PERSONAXIS_KERNELS``, checked: one of :data:`KERNEL_CHOICES` (default ``auto``)."""
    choice = os.environ.get(KERNELS_ENV, "auto").strip().lower()
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"{KERNELS_ENV} must be one of {', '.join(KERNEL_CHOICES)}, got {choice!r}")
    return choice


def kernels_enabled() -> bool:
    """The linear layers of this module are used unless ``PERSONAXIS_KERNELS=torch`` (or the build lacks oneDNN)."""
    return kernels_choice() != "torch" and onednn_available()


def compiled_products() -> bool:
    """Whether packed products run on :mod:`personaxis.compiled_gemm`: ``PERSONAXIS_KERNELS=compiled``, or ``auto``
    on a CPU where it is the faster choice (:func:`personaxis.compiled_gemm.preferred`), and the library built.
    Checked when a weight is packed."""
    choice = kernels_choice()
    wanted = choice == "compiled" or (choice == "auto" and compiled_gemm.preferred()[0])
    return wanted and compiled_gemm.library() is not None


def kernels_status() -> str:
    """Which products the packed layers run, in words (the benchmark records it)."""
    choice = kernels_choice()
    if choice == "torch" or not onednn_available():
        return "PyTorch's linear layers"
    if choice == "onednn":
        return "oneDNN (PERSONAXIS_KERNELS=onednn)"
    if compiled_products():
        return compiled_gemm.status()
    preferred, why = compiled_gemm.preferred()
    if choice == "auto" and not preferred:
        return f"oneDNN ({why})"
    return f"oneDNN (compiled products unavailable: {compiled_gemm.status()})"


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


def tensor_version(tensor: Tensor) -> int:
    """How many times ``tensor`` was changed in place (0 for inference tensors, which keep no count)."""
    # Inference tensors keep no version counter (and cannot be changed in place outside inference mode); asking
    # raises, and catching that costs about 7 µs, so they are recognised first.
    if tensor.is_inference():
        return 0
    return int(tensor._version)


def pack_weight(weight: Tensor) -> Tensor:
    """A copy of an fp32 ``[out, in]`` weight in oneDNN's blocked layout, for :func:`onednn_linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


PackedWeight = Tensor | GemmWeight


def pack_for_products(weight: Tensor) -> PackedWeight:
    """The packed copy the layers here use: :mod:`personaxis.compiled_gemm`'s where :func:`compiled_products` (and
    the output size is a multiple of 16), else oneDNN's (:func:`pack_weight`)."""
    if weight.shape[0] % compiled_gemm.BLOCK == 0 and compiled_products():
        return compiled_gemm.pack(weight)
    return pack_weight(weight)


def packed_linear(x: Tensor, weight: PackedWeight, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for a weight from :func:`pack_for_products` (or a plain one: oneDNN)."""
    if type(weight) is GemmWeight:
        return compiled_gemm.linear(x, weight, bias)
    return onednn_linear(x, weight, bias)  # type: ignore[arg-type]


_MADV_RANDOM = 1
_MADV_DONTNEED = 4
_MADV_PAGEOUT = 21  # Linux 5.4+


def _madvise() -> Any:
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    libc.madvise.restype = ctypes.c_int
    return libc.madvise


# Files mapped privately and checked for written pages: (inode, path) → no page written. /proc/self/smaps takes ~0.1 s
# to read, so each file is checked once (a model's weights file is one mapping; weights are not written after
# loading, and a written tensor has a version above 0, see ``release_pages``). Keyed by the file, not by the mapping's
# bounds: ``MADV_RANDOM`` on a released weight splits the mapping into pieces, and a check per piece read smaps for
# every weight (1.2 s for the embedded model's 211).
_CLEAN_FILES: dict[tuple[str, str], bool] = {}


def _file_of(address: int, end: int) -> tuple[str, str] | None:
    """The file (inode, path) whose private mapping covers ``[address, end)`` without gaps, possibly in several
    pieces (from /proc/self/maps), or None (anonymous memory, several files, unknown)."""
    found: tuple[str, str] | None = None
    covered = address
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as handle:
        for line in handle:
            head = line.split(maxsplit=5)
            low, high = (int(x, 16) for x in head[0].split("-"))
            if high <= covered or low >= end:
                continue
            path = head[5].strip() if len(head) == 6 else ""
            file = (head[4], path)
            if low > covered or not path.startswith("/") or head[4] == "0" or (found is not None and file != found):
                return None
            found, covered = file, high
            if covered >= end:
                return found
    return None


def _clean_file_mapping(address: int, end: int) -> bool:
    """Whether ``[address, end)`` lies in a private mapping of a file none of whose pages was written (no anonymous
    copy-on-write pages): dropping such pages loses nothing, they are read again from the file."""
    try:
        file = _file_of(address, end)
        if file is None:
            return False
        if file not in _CLEAN_FILES:
            anonymous, seen = 0, False
            with open("/proc/self/smaps", encoding="utf-8", errors="replace") as handle:
                inside = False
                for line in handle:
                    head = line.split(maxsplit=5)
                    if "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's header line
                        inside = (head[4], head[5].strip() if len(head) == 6 else "") == file
                        seen = seen or inside
                    elif inside and head[0] == "Anonymous:":
                        anonymous += int(head[1])
            _CLEAN_FILES[file] = seen and anonymous == 0
        return _CLEAN_FILES[file]
    except (OSError, ValueError, IndexError):
        return False


def release_pages(tensor: Tensor) -> bool:
    """Take the memory pages of a CPU tensor no longer read in the hot path (an original weight once packed) out of
    this process's resident set. transformers maps safetensors weights from the file: such pages, never written, are
    dropped and read again from the file if the tensor is used again; other pages are only offered to the kernel
    for reclaim (``MADV_PAGEOUT``: kept, or swapped out). Dropped file pages are also marked as read at random
    (``MADV_RANDOM``): a page read again later (an embedding row, when the LM head that was packed shares its
    weight) then comes back alone, not with the 64 KiB around it that Linux maps on a fault otherwise (which
    brought 87 of the embedded model's 113 MB embedding back for the ~1,400 tokens of a generation run). The
    tensor's values never change. Returns whether the kernel accepted the request (Linux only)."""
    if not tensor.is_cpu or tensor.numel() == 0 or platform.system() != "Linux":
        return False
    global _MADVISE
    try:
        if _MADVISE is None:
            _MADVISE = _madvise()
        page = os.sysconf("SC_PAGE_SIZE")
        first = tensor.data_ptr()
        last = first + tensor.numel() * tensor.element_size()
        start, end = -(-first // page) * page, last // page * page  # whole pages inside the tensor only
        if end <= start:
            return False
        clean = tensor_version(tensor) == 0 and _clean_file_mapping(first, last)
        if clean:
            _MADVISE(start, end - start, _MADV_RANDOM)
        advice = _MADV_DONTNEED if clean else _MADV_PAGEOUT
        return _MADVISE(start, end - start, advice) == 0
    except (OSError, AttributeError, ValueError):  # pragma: no cover - no libc, or an unusual platform
        return False


_MADVISE: Any = None
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Allocations from this size up are their own memory mappings outside packing (glibc's own ceiling for the threshold).
HEAP_BLOCK_LIMIT = 32 << 20
# Allocations from this size up are their own memory mappings while a weight is packed.
PACK_BLOCK_LIMIT = 64 << 10


def _mallopt() -> Any:
    """glibc's ``mallopt``, or None (not Linux with glibc, or the user chose ``MALLOC_MMAP_THRESHOLD_``)."""
    if platform.system() != "Linux" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return None
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOPT: Any = False  # not looked up yet


@contextmanager
def packed_copies_mapped() -> Iterator[bool]:
    """Inside the block, allocations of :data:`PACK_BLOCK_LIMIT` or more (a packed weight) get memory mappings of
    their own; after it, only those of :data:`HEAP_BLOCK_LIMIT` or more do (glibc's ``M_MMAP_THRESHOLD``). Packed
    weights are made on first use, in the middle of generation's key/value caches and activations: in the heap,
    these long-lived copies pinned the freed blocks around them, and the quick preset's resident set never came back
    down between batches. Outside the heap they pin nothing. Everything else stays in the heap, where a freed block
    is reused without page faults: giving every block of a megabyte or more its own mapping instead (this module's
    previous rule) cost 6 million page faults and about 10 % of the quick preset's generation speed (logits and
    cache buffers mapped and zeroed afresh at every step). Leaves a threshold the user set
    (``MALLOC_MMAP_THRESHOLD_``) alone; Linux with glibc only. Yields whether the thresholds were set."""
    global _MALLOPT
    if _MALLOPT is False:
        _MALLOPT = _mallopt()
    if _MALLOPT is None:
        yield False
        return
    _MALLOPT(_M_MMAP_THRESHOLD, PACK_BLOCK_LIMIT)
    try:
        yield True
    finally:
        _MALLOPT(_M_MMAP_THRESHOLD, HEAP_BLOCK_LIMIT)
        # glibc's own rule once its threshold has risen: keep up to twice that much free at the heap's top rather
        # than returning it to the system and faulting it in again for the next batch's cache.
        _MALLOPT(_M_TRIM_THRESHOLD, 2 * HEAP_BLOCK_LIMIT)


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` through oneDNN; ``weight`` plain or from :func:`pack_weight`."""
    # ``.default``: the overload itself, skipping the per-call overload resolution (2 µs of ~15 µs per call).
    return torch.ops.mkldnn._linear_pointwise.default(x, weight, bias, "none", [], "")


def cpu_float32_inference(x: Tensor, weight: Tensor) -> bool:
    """Whether ``F.linear(x, weight)`` is a float32 product on the CPU without autograd, ``x`` with a batch
    dimension: the case the CPU kernels here (and :mod:`personaxis.int8_linears`) take over."""
    return (
        x.is_cpu
        and weight.is_cpu
        and x.dtype is torch.float32
        and weight.dtype is torch.float32
        and x.dim() >= 2
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


class OneDNNLinear(nn.Linear):
    """An ``nn.Linear`` whose inference forward on a CPU runs the compiled products (AVX2 and AVX-512 CPUs) or oneDNN
    (see the module's notes)."""

    _onednn_pack: bool = True
    _onednn_weight: PackedWeight | None = None
    _onednn_key: tuple[int, int] | None = None
    _onednn_group: ProjectionGroup | None = None

    def _weight_for_onednn(self, weight: Tensor) -> PackedWeight:
        if not self._onednn_pack:
            return weight
        key = (weight.data_ptr(), tensor_version(weight))
        if self._onednn_key != key or self._onednn_weight is None:
            self._onednn_weight = None  # the old copy goes before the new one is made
            with packed_copies_mapped():
                self._onednn_weight = pack_for_products(weight)
            self._onednn_key = key
            release_pages(weight)  # the packed copy serves the forward: the original need not stay resident
        return self._onednn_weight

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        if cpu_float32_inference(x, weight):
            group = self._onednn_group
            if group is not None:
                shared = group.output_of(self, x)
                if shared is not None:
                    return shared
            return packed_linear(x, self._weight_for_onednn(weight), self.bias)
        return nn.functional.linear(x, weight, self.bias)


# Sibling projections that a block applies to one input, by attribute name: one product of their stacked weights
# replaces three. Measured per layer of the embedded model on the 2-core AMD EPYC, cold weights: 79 → 50 µs at 1 row,
# 127 → 79 µs at 16 rows, 257 → 217 µs at 64 (limited to AVX2: 80 → 57, 160 → 123, 419 → 399). Each oneDNN call
# costs about 10 µs before any arithmetic, and one row's small products read their weights at half the rate of a
# long one. Stacking a block's gate and up projections gained less (180 → 163 µs at 1 row) and lost under AVX2 at 64
# rows (1,123 → 1,182 µs), so they stay apart.
SIBLING_PROJECTIONS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"),)
# A group that computed an output some member then did not take this many times stops (the block does not give its
# members one input), and its members run alone.
GROUP_MISSES_ALLOWED = 2


class ProjectionGroup:
    """Linear layers of one block that read the same input (a block's query, key and value projections), run as one
    oneDNN product of their stacked, packed weights.

    The first member called with an input computes every member's output; the others, called next with the same
    tensor (the same object, unchanged since: its version counter where it has one), take their columns of it.
    Any other call (another input, as under a hook that replaces a member's input) computes afresh from the input
    it was given, so every output is its own layer applied to its own input, as before, up to float rounding. Each
    member stays a module of its own, and its hooks run as before. Like the hooks, a group assumes one forward pass
    of its model at a time (the web app holds a lock around every pass).
    """

    def __init__(self, members: list[OneDNNLinear]) -> None:
        self.members = members
        self.columns: dict[int, tuple[int, int]] = {}
        start = 0
        for member in members:
            self.columns[id(member)] = (start, start + member.out_features)
            start += member.out_features
        self.weight: PackedWeight | None = None  # the packed stacked weight
        self.bias: Tensor | None = None
        self.key: tuple[tuple[int, int], ...] | None = None
        self.misses = 0
        self._input: Tensor | None = None
        self._input_version = 0
        self._output: Tensor | None = None
        self._waiting: set[int] = set()

    @property
    def active(self) -> bool:
        return self.misses < GROUP_MISSES_ALLOWED

    def _packed(self) -> PackedWeight:
        key = tuple((m.weight.data_ptr(), tensor_version(m.weight)) for m in self.members)
        if self.key != key or self.weight is None:
            self.weight = None
            stacked = torch.cat([m.weight.detach() for m in self.members])
            with packed_copies_mapped():
                self.weight = pack_for_products(stacked)
            del stacked
            biases = [m.bias for m in self.members]
            self.bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])  # type: ignore[union-attr]
            self.key = key
            for member in self.members:
                member._onednn_weight = None  # a copy packed before the group took over is not read again
                release_pages(member.weight)
        return self.weight

    def stacked_output(self, x: Tensor) -> Tensor:
        """Every member's output for ``x`` side by side (the members' order), from one product; a caller that slices
        it itself (:mod:`personaxis.generation.llama_step`) bypasses the members' modules and their hooks."""
        return packed_linear(x, self._packed(), self.bias)

    def _forget(self) -> None:
        self._input = self._output = None
        self._waiting = set()

    def output_of(self, member: OneDNNLinear, x: Tensor) -> Tensor | None:
        """``member``'s output for ``x``, from the product shared with its siblings; None when the group has
        stopped (the member then runs alone)."""
        if not self.active:
            return None
        start, end = self.columns[id(member)]
        if x is self._input and id(member) in self._waiting and tensor_version(x) == self._input_version:
            assert self._output is not None
            output = self._output[..., start:end].contiguous()
            self._waiting.discard(id(member))
            if not self._waiting:
                self._forget()
            return output
        if self._waiting:  # an output computed for members that never asked for it
            self.misses += 1
            self._forget()
            if not self.active:
                self.weight = self.bias = self.key = None
                return None
        shared = self.stacked_output(x)
        self._input, self._input_version, self._output = x, tensor_version(x), shared
        self._waiting = {id(m) for m in self.members if m is not member}
        return shared[..., start:end].contiguous()


def group_sibling_projections(model: nn.Module) -> int:
    """Group each block's :data:`SIBLING_PROJECTIONS` that run on oneDNN with packed weights (same input size,
    dtype and device, all with a bias or none) into a :class:`ProjectionGroup`; returns how many groups."""
    groups = 0
    for parent in model.modules():
        for names in SIBLING_PROJECTIONS:
            members = [getattr(parent, name, None) for name in names]
            if not all(type(m) is OneDNNLinear and m._onednn_pack for m in members):
                continue
            linears: list[OneDNNLinear] = members  # type: ignore[assignment]
            first = linears[0].weight
            if any(
                m.in_features != linears[0].in_features
                or m.weight.dtype != first.dtype
                or m.weight.device != first.device
                or (m.bias is None) != (linears[0].bias is None)
                for m in linears
            ):
                continue
            group = ProjectionGroup(linears)
            for member in linears:
                member._onednn_group = group
            groups += 1
    return groups


def _plain_linears(model: nn.Module) -> list[nn.Linear]:
    """Plain ``nn.Linear`` modules (not subclasses such as quantised layers), without accelerate's offloading hooks
    (those swap the weight on every call, which would repack it every time)."""
    return [
        m
        for m in model.modules()
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
    if pack:
        group_sibling_projections(model)
    return len(linears)


def restore_linears(model: nn.Module) -> int:
    """Undo :func:`use_onednn_linears` (drops the packed copies); returns how many modules changed back."""
    changed = 0
    for module in model.modules():
        if type(module) is OneDNNLinear:
            module.__class__ = nn.Linear
            for name in ("_onednn_weight", "_onednn_key", "_onednn_pack", "_onednn_group"):
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
