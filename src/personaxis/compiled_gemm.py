"""Compiled float32 matrix products for AVX2 and AVX-512 CPUs, which read a layer's weights at the memory's rate.

oneDNN's products of decoding (1–64 rows against a packed weight) leave memory time on the table. Under AVX2 they take
about their compute time *plus* the time to read their weights: on the 2-core AMD EPYC limited to AVX2, the embedded
model's 151 products of a 16-row step took 35–42 ms one after the other and 25–32 ms with every weight in cache. With
AVX-512, its one-row products read their weights at 0.68–0.76 of a large product's rate (a fixed cost of 11–13 µs per
call). ``csrc/packed_gemm.c`` has two versions of one plain kernel: AVX2 (tiles of 6 rows × 16 columns, prefetching the
next block of weights while it computes) and AVX-512 (tiles of 12 rows × 16 columns; one row as two streams of
blocks). The same 151 products under AVX2: 21–23 ms at 16 rows, 13–16 at one row against oneDNN's 17–18, 76 at 64
rows against 98–109 (whole decode steps: 21.0 → 14.3 ms at one row, 48.1 → 30.1 at 16 rows, 113.7 → 98.2 at 64, the
same tokens). With AVX-512, against oneDNN's AVX-512 kernels in the same minutes: one row 11.9–12.8 ms against
15.1–15.8 (0.87–0.93 of the 256 MB product's rate), 16 rows 16.1 against 21.8, 64 rows 48.3 against 52.5, 200 rows
(prefill) 144 against 147, single products of 1,024–4,096 rows 316–380 GFLOP/s against 281–410; whole decode
steps 21.5 → 18.7 ms at one row, 32.5 → 25.7 at 16, 83.2 → 77.6 at 64, the same tokens.

Every output is one running sum over the inputs in order, in both versions, so a row's result depends neither on the
rows beside it, nor on the thread count, nor on the instruction set (tests compare them bit for bit); it differs
from oneDNN's and MKL's by float rounding only.

The library also holds ``csrc/decode_block.c``, a decode step of one Llama-family block in one call
(:mod:`personaxis.generation.fused_block`; :func:`block_function`), which includes ``packed_gemm.c``. The sources
ship with the package and are built on first use with the system's C compiler (``$CC``, else ``cc``,
``gcc`` or ``clang``) into the user's cache directory, keyed by the sources, the flags and the compiler's version, and
loaded with ``ctypes``; the AVX-512 version is compiled for AVX-512F function by function and called only where
PyTorch itself runs AVX-512 (:func:`avx512`). It runs on PyTorch's own OpenMP threads (the ``libgomp.so.1`` PyTorch
loaded; where loading it would bring in another OpenMP runtime, it is not used) with ``torch.get_num_threads()`` of
them. :mod:`personaxis.kernels` uses it where PyTorch's CPU capability is AVX2 or AVX-512 (:func:`preferred`) or
where ``PERSONAXIS_KERNELS=compiled`` asks for it. Where anything is missing (not Linux on x86-64, a CPU without AVX2
and FMA, no compiler, a failed build or self-test), it keeps oneDNN, and :func:`status` says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c11")
LIBRARIES = ("-lm",)
# The library's source (it includes the others, which sit beside it when it is built).
SOURCES = ("decode_block.c", "packed_gemm.c")
INTERFACE_VERSION = 3
BLOCK = 16  # output columns per packed block
_BUILD_SECONDS = 120


class GemmWeight(NamedTuple):
    """A float32 weight ``[out, in]`` packed for :func:`linear`: ``blocks`` ``[out / 16, in, 16]``."""

    blocks: Tensor
    out_features: int
    in_features: int


_loaded: Any = None  # the library's functions for this CPU (:class:`_Functions`)
_reason = "not tried yet"
_tried = False


def preferred() -> tuple[bool, str]:
    """Whether the kernel is the choice here: PyTorch's CPU capability is AVX2 or AVX-512, and why not. On the 2-core
    AMD EPYC (Zen 5) its AVX-512 version took the embedded model's 151 products of one decode step in 11.9–12.8 ms
    against oneDNN's 15.1–15.8 (one row), 16.1 against 21.8 (16 rows), 48.3 against 52.5 (64 rows) and 144 against
    147 (200 rows, as in prefill)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return False, f"PyTorch's CPU capability is {capability}, where oneDNN's kernels are used"
    return True, capability


def avx512() -> bool:
    """Whether the AVX-512 version runs here: PyTorch itself uses AVX-512 (so a process limited to AVX2, as
    ``ATEN_CPU_CAPABILITY=avx2`` does, runs the AVX2 version) and the CPU reports AVX-512F."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and "avx512f" in _cpu_flags()


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            return next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), [])
    except OSError:
        return []


def cpu_supported() -> tuple[bool, str]:
    """Whether the kernel can run here (Linux on x86-64, the CPU reporting AVX2 and FMA), and why not."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False, f"built for Linux on x86-64 only ({platform.system()} on {platform.machine()})"
    flags = _cpu_flags()
    missing = [flag for flag in ("avx2", "fma") if flag not in flags]
    if missing:
        return False, f"the CPU does not report {', '.join(missing)}"
    return True, "supported"


def _compiler() -> str | None:
    chosen = os.environ.get("CC")
    if chosen:
        return shutil.which(chosen)
    return next((path for name in ("cc", "gcc", "clang") if (path := shutil.which(name))), None)


def _cache_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("personaxis")) / "kernels"


def _build(compiler: str) -> Path:
    """The built library for these sources, flags and compiler (built once, then taken from the cache)."""
    sources = {name: resources.files("personaxis").joinpath(f"csrc/{name}").read_bytes() for name in SOURCES}
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    described = b"".join(sources.values()) + " ".join(FLAGS + LIBRARIES).encode() + compiler.encode()
    key = hashlib.sha256(described + version.encode()).hexdigest()[:16]
    target = _cache_dir() / f"packed_gemm-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        for name, text in sources.items():
            (Path(work) / name).write_bytes(text)
        built = Path(work) / target.name
        result = subprocess.run(
            [compiler, *FLAGS, str(Path(work) / SOURCES[0]), "-o", str(built), *LIBRARIES],
            capture_output=True,
            text=True,
            timeout=_BUILD_SECONDS,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{Path(compiler).name} failed: {result.stderr.strip()[-400:]}")
        os.replace(built, target)  # atomic: a concurrent build of the same key writes the same file
    return target


def _openmp_runtimes() -> set[str]:
    """The OpenMP runtime libraries mapped into this process."""
    names = ("libgomp", "libiomp", "libomp")
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as handle:
            paths = {line.split()[-1] for line in handle if any(name in line for name in names)}
    except OSError:
        return set()
    return {os.path.realpath(path) for path in paths}


def _self_test(product: Any) -> bool:
    """Products of odd sizes (several rows; one row over an odd number of blocks) against PyTorch's, to float
    rounding."""
    generator = torch.Generator().manual_seed(0)
    for rows, blocks in ((7, 2), (1, 3)):
        x = torch.randn(rows, 37, generator=generator)
        weight = torch.randn(blocks * BLOCK, 37, generator=generator)
        out, packed = torch.empty(rows, blocks * BLOCK), pack(weight).blocks  # kept alive through the call
        product(rows, blocks * BLOCK, 37, x.data_ptr(), packed.data_ptr(), out.data_ptr(), 1)
        if not torch.allclose(out, x @ weight.T, atol=1e-4, rtol=1e-4):
            return False
    return True


class _Functions(NamedTuple):
    product: Any  # ``packed_gemm`` (AVX2) or ``packed_gemm_avx512``, as this CPU runs
    block: Any  # ``decode_block`` (:mod:`personaxis.generation.fused_block`)


class BlockWeights(ctypes.Structure):
    """``decode_block.c``'s ``block_weights``: a block's sizes, norms' epsilons, attention scaling, and the addresses
    of its norms' weights and packed products (whose tensors the caller keeps alive)."""

    _fields_ = [
        *((name, ctypes.c_int) for name in ("hidden", "heads", "kv_heads", "head_dim", "intermediate", "avx512")),
        *((name, ctypes.c_float) for name in ("eps_attention", "eps_mlp", "scaling")),
        *((name, ctypes.c_void_p) for name in ("attention_norm", "mlp_norm", "qkv", "o", "gate", "up", "down")),
    ]


def _load() -> tuple[_Functions | None, str]:
    supported, why = cpu_supported()
    if not supported:
        return None, why
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler found ($CC, cc, gcc or clang)"
    try:
        path = _build(compiler)
        before = _openmp_runtimes()
        library = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        return None, f"build or load failed: {error}"
    added = _openmp_runtimes() - before
    if added:  # the library did not bind to PyTorch's runtime (another OpenMP vendor, or none loaded)
        return None, f"its OpenMP runtime would run beside PyTorch's ({', '.join(sorted(added))})"
    library.packed_gemm_version.restype = ctypes.c_int
    if library.packed_gemm_version() != INTERFACE_VERSION:
        return None, f"{path} has another interface version"
    pointer, integer = ctypes.c_void_p, ctypes.c_int
    name = "packed_gemm_avx512" if avx512() else "packed_gemm"
    product = getattr(library, name)
    product.argtypes = (integer, integer, integer, pointer, pointer, pointer, integer)
    product.restype = None
    if not _self_test(product):
        return None, "the self-test product disagreed with PyTorch's"
    block = library.decode_block
    long = ctypes.c_long
    block.argtypes = (pointer, integer, *(pointer,) * 6, long, long, integer, pointer, integer)
    block.restype = integer
    return _Functions(product, block), f"compiled {'AVX-512' if name.endswith('avx512') else 'AVX2'} products ({path})"


def _functions() -> _Functions | None:
    global _loaded, _reason, _tried
    if not _tried:
        _tried = True
        _loaded, _reason = _load()
    return _loaded


def library() -> Any:
    """The loaded library's product for this CPU, built on first use, or None (:func:`status` says why)."""
    functions = _functions()
    return None if functions is None else functions.product


def block_function() -> Any:
    """The library's ``decode_block`` (one decode step of one Llama-family block), or None where the library is
    not used."""
    functions = _functions()
    return None if functions is None else functions.block


def status() -> str:
    """What :func:`library` found: the library's path, or why it is not used."""
    library()
    return _reason


def pack(weight: Tensor) -> GemmWeight:
    """``weight`` ``[out, in]`` (float32, ``out`` a multiple of 16) in the kernel's layout: a new tensor."""
    out_features, in_features = weight.shape
    if out_features % BLOCK:
        raise ValueError(f"out_features must be a multiple of {BLOCK}, got {out_features}")
    blocks = weight.detach().reshape(out_features // BLOCK, BLOCK, in_features).transpose(1, 2).contiguous()
    return GemmWeight(blocks, out_features, in_features)


def linear(x: Tensor, weight: GemmWeight, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for float32 CPU ``x`` ``[..., in]``; call only where :func:`library` is not
    None."""
    rows = x.numel() // weight.in_features if weight.in_features else 0
    flat = x.reshape(rows, weight.in_features)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    out = torch.empty((*x.shape[:-1], weight.out_features), dtype=torch.float32)
    if rows:
        _loaded.product(
            rows,
            weight.out_features,
            weight.in_features,
            flat.data_ptr(),
            weight.blocks.data_ptr(),
            out.data_ptr(),
            torch.get_num_threads(),
        )
    elif weight.in_features == 0:
        out.zero_()
    if bias is not None:
        out.add_(bias)
    return out
