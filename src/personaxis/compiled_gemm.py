"""A compiled float32 matrix product for AVX2 CPUs, which reads a layer's weights while it computes with them.

On CPUs whose widest vectors PyTorch uses are AVX2 (no AVX-512: most laptops, many servers), oneDNN's products of
decoding (1–64 rows against a packed weight) take about their compute time *plus* the time to read their weights:
on the 2-core AMD EPYC limited to AVX2, the embedded model's 151 products of a 16-row step took 35–42 ms one after
the other and 25–32 ms with every weight in cache. ``csrc/packed_gemm.c`` is a plain AVX2 kernel (tiles of 6 rows
× 16 columns) that prefetches the next block of weights while it computes with the current one: the same 151
products in 21–23 ms, one row's in 13–16 ms against oneDNN's 17–18, 64 rows' in 76 ms against 98–109 (interleaved
whole decode steps, AVX2: 21.0 → 14.3 ms at one row, 48.1 → 30.1 at 16 rows, 113.7 → 98.2 at 64, the same tokens).

Every output is one running sum over the inputs in order, so a row's result depends neither on the rows beside it
nor on the thread count (tests compare them bit for bit); it differs from oneDNN's and MKL's by float rounding only.

The source ships with the package and is built on first use with the system's C compiler (``$CC``, else ``cc``,
``gcc`` or ``clang``) into the user's cache directory, keyed by the source, the flags and the compiler's version, and
loaded with ``ctypes``. It runs on PyTorch's own OpenMP threads (the ``libgomp.so.1`` PyTorch loaded; where loading
it would bring in another OpenMP runtime, it is not used) with ``torch.get_num_threads()`` of them.
:mod:`personaxis.kernels` uses it where PyTorch's CPU capability is AVX2 (:func:`preferred`) or where
``PERSONAXIS_KERNELS=compiled`` asks for it. Where anything is missing (not Linux on x86-64, a CPU without AVX2 and
FMA, no compiler, a failed build or self-test), it keeps oneDNN, and :func:`status` says why.
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
INTERFACE_VERSION = 1
BLOCK = 16  # output columns per packed block
_BUILD_SECONDS = 120


class GemmWeight(NamedTuple):
    """A float32 weight ``[out, in]`` packed for :func:`linear`: ``blocks`` ``[out / 16, in, 16]``."""

    blocks: Tensor
    out_features: int
    in_features: int


_library: Any = None
_reason = "not tried yet"
_tried = False


def preferred() -> tuple[bool, str]:
    """Whether the kernel is the choice here: PyTorch's CPU capability is AVX2, and why not. With AVX-512, oneDNN's
    own kernels stay: about twice as fast at 64 rows and in prefill, and one packed copy serves every batch size
    (this AVX2 kernel was faster than them at 1 and 16 rows only)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX2":
        return False, f"PyTorch's CPU capability is {capability}, where oneDNN's kernels are used"
    return True, "AVX2"


def cpu_supported() -> tuple[bool, str]:
    """Whether the kernel can run here (Linux on x86-64, the CPU reporting AVX2 and FMA), and why not."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False, f"built for Linux on x86-64 only ({platform.system()} on {platform.machine()})"
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            flags = next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), [])
    except OSError:
        flags = []
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
    """The built library for this source, flags and compiler (built once, then taken from the cache)."""
    source = resources.files("personaxis").joinpath("csrc/packed_gemm.c").read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + compiler.encode() + version.encode()).hexdigest()[:16]
    target = _cache_dir() / f"packed_gemm-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        source_path = Path(work) / "packed_gemm.c"
        source_path.write_bytes(source)
        built = Path(work) / target.name
        result = subprocess.run(
            [compiler, *FLAGS, str(source_path), "-o", str(built)],
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


def _self_test(library: Any) -> bool:
    """A product of odd sizes against PyTorch's, to float rounding."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(7, 37, generator=generator)
    weight = torch.randn(2 * BLOCK, 37, generator=generator)
    out = torch.empty(7, 2 * BLOCK)
    blocks = pack(weight).blocks
    library.packed_gemm(7, 2 * BLOCK, 37, x.data_ptr(), blocks.data_ptr(), out.data_ptr(), 1)
    return bool(torch.allclose(out, x @ weight.T, atol=1e-4, rtol=1e-4))


def _load() -> tuple[Any, str]:
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
    library.packed_gemm.argtypes = (integer, integer, integer, pointer, pointer, pointer, integer)
    library.packed_gemm.restype = None
    if not _self_test(library):
        return None, "the self-test product disagreed with PyTorch's"
    return library, f"compiled AVX2 products ({path})"


def library() -> Any:
    """The loaded library, built on first use, or None (:func:`status` says why)."""
    global _library, _reason, _tried
    if not _tried:
        _tried = True
        _library, _reason = _load()
    return _library


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
        _library.packed_gemm(
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
