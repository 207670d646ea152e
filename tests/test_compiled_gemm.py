"""The compiled products (AVX2 and AVX-512 versions): the numbers of PyTorch's product to float rounding, a row's
result independent of the rows beside it, of the thread count and of the instruction set, and chosen where they
should be."""

from __future__ import annotations

import ctypes
import platform
import shutil

import pytest
import torch
from torch import nn

from personaxis import compiled_gemm, kernels
from personaxis.compiled_gemm import GemmWeight

pytestmark = pytest.mark.skipif(not kernels.onednn_available(), reason="this PyTorch build has no oneDNN")


def _buildable() -> bool:
    """Linux on x86-64 with AVX2, FMA and a C compiler: there the library must build."""
    return compiled_gemm.cpu_supported()[0] and compiled_gemm._compiler() is not None


@pytest.fixture(scope="module")
def library():
    if compiled_gemm.library() is None:
        assert not _buildable(), f"the compiled products should build here: {compiled_gemm.status()}"
        pytest.skip(compiled_gemm.status())
    return compiled_gemm.library()


@pytest.mark.parametrize("rows", [0, 1, 5, 6, 7, 16, 64, 100])
@pytest.mark.parametrize(("n", "k"), [(16, 1), (48, 37), (1536, 576)])
def test_products_match_torch(library, rows, n, k):
    generator = torch.Generator().manual_seed(rows * 1000 + n + k)
    weight = torch.randn(n, k, generator=generator)
    bias = torch.randn(n, generator=generator)
    x = torch.randn(rows, 3, k, generator=generator)[:, 1]  # rows with a stride: copied to contiguous rows
    expected = (x.double() @ weight.double().T + bias.double()).float()
    got = compiled_gemm.linear(x, compiled_gemm.pack(weight), bias)
    assert got.shape == (rows, n) and got.dtype is torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * k**0.5)
    leading = compiled_gemm.linear(x.reshape(rows, 1, k), compiled_gemm.pack(weight))
    assert leading.shape == (rows, 1, n)


def test_a_row_does_not_depend_on_the_rows_beside_it_or_the_threads(library):
    generator = torch.Generator().manual_seed(0)
    weight = compiled_gemm.pack(torch.randn(96, 200, generator=generator))
    x = torch.randn(23, 200, generator=generator)
    together = compiled_gemm.linear(x, weight)
    for i in range(23):
        assert torch.equal(compiled_gemm.linear(x[i : i + 1], weight), together[i : i + 1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = compiled_gemm.linear(x, weight)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone, together)
    # Stacked weights (a projection group's) give each member's columns bit for bit.
    first, second = torch.randn(32, 200, generator=generator), torch.randn(64, 200, generator=generator)
    stacked = compiled_gemm.linear(x, compiled_gemm.pack(torch.cat([first, second])))
    assert torch.equal(stacked[:, :32], compiled_gemm.linear(x, compiled_gemm.pack(first)))
    assert torch.equal(stacked[:, 32:], compiled_gemm.linear(x, compiled_gemm.pack(second)))


def test_pack_refuses_sizes_it_cannot_block():
    with pytest.raises(ValueError, match="multiple of 16"):
        compiled_gemm.pack(torch.randn(20, 8))


@pytest.mark.parametrize("choice", ["compiled", "onednn", "auto"])
def test_layers_pack_for_the_chosen_products(library, monkeypatch, choice):
    monkeypatch.setenv(kernels.KERNELS_ENV, choice)
    model = nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 20))  # 20 outputs: no 16-column blocks
    x = torch.randn(5, 24)
    expected = model(x).detach()
    kernels.use_onednn_linears(model, pack=True)
    with torch.inference_mode():
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    compiled = choice == "compiled" or (choice == "auto" and compiled_gemm.preferred()[0])
    assert (type(model[0]._onednn_weight) is GemmWeight) == compiled
    assert type(model[2]._onednn_weight) is not GemmWeight
    status = kernels.kernels_status()
    assert ("compiled" in status and "products (" in status) == compiled and ("oneDNN" in status) != compiled


def test_preferred_where_pytorch_runs_avx2_or_avx512():
    preferred, why = compiled_gemm.preferred()
    assert preferred == (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")), why
    if preferred:
        version = "AVX-512" if compiled_gemm.avx512() else "AVX2"
        assert compiled_gemm.status().startswith(f"compiled {version} products"), compiled_gemm.status()


def test_avx2_and_avx512_versions_agree_bit_for_bit(library):
    """Both versions make every output the same running sum over the inputs in order (one row through the AVX-512
    version's two-block path, several through its 12-row tiles, an odd number of blocks)."""
    if "avx512f" not in compiled_gemm._cpu_flags():
        pytest.skip("the CPU has no AVX-512F")
    compiler = compiled_gemm._compiler()
    assert compiler is not None
    handle = ctypes.CDLL(str(compiled_gemm._build(compiler)))
    generator = torch.Generator().manual_seed(1)
    dense = torch.randn(80, 300, generator=generator)
    weight = compiled_gemm.pack(dense)
    for rows in (1, 2, 12, 13, 40):
        x = torch.randn(rows, 300, generator=generator)
        outs = []
        for name in ("packed_gemm", "packed_gemm_avx512"):
            product = getattr(handle, name)
            product.argtypes = (ctypes.c_int,) * 3 + (ctypes.c_void_p,) * 3 + (ctypes.c_int,)
            out = torch.empty(rows, 80)
            product(rows, 80, 300, x.data_ptr(), weight.blocks.data_ptr(), out.data_ptr(), 2)
            outs.append(out)
        assert torch.equal(outs[0], outs[1]), rows
        torch.testing.assert_close(outs[0], x @ dense.T, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(platform.system() != "Linux", reason="the build is tried on Linux only")
def test_a_missing_compiler_leaves_onednn(monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-here")
    assert compiled_gemm._compiler() is None
    monkeypatch.delenv("CC")
    assert (compiled_gemm._compiler() is not None) == any(shutil.which(c) for c in ("cc", "gcc", "clang"))
    monkeypatch.setattr(compiled_gemm, "_compiler", lambda: None)
    library, reason = compiled_gemm._load()
    assert library is None and (reason == "no C compiler found ($CC, cc, gcc or clang)" or "x86-64" in reason)
