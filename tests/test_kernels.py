"""oneDNN linear layers: the same numbers as PyTorch's own, on tiny models and on the embedded one."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from personaxis import kernels
from personaxis.activations import extract_turn_means
from personaxis.decode_attention import sdpa_attention
from personaxis.generation import SamplingConfig, generate, generate_ids
from personaxis.kernels import (
    OneDNNLinear,
    onednn_linear_count,
    restore_linears,
    torch_linears,
    use_onednn_linears,
)

pytestmark = pytest.mark.skipif(not kernels.onednn_available(), reason="this PyTorch build has no oneDNN")


class Quantised(nn.Linear):
    """Stands for a library's own linear subclass (bitsandbytes and the like): left alone."""


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(37, 53), nn.GELU(), nn.Linear(53, 29, bias=False), Quantised(29, 7), nn.Embedding(5, 3)
    )


def _inputs() -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(1, 37), torch.randn(16, 37), torch.randn(2, 5, 37), torch.randn(37, 64).t()]


@pytest.mark.parametrize("pack", [True, False])
def test_onednn_linear_matches_torch_linear(pack):
    layer = nn.Linear(37, 53)
    reference = [nn.functional.linear(x, layer.weight, layer.bias) for x in _inputs()]
    use_onednn_linears(layer, pack=pack)
    assert type(layer) is OneDNNLinear
    with torch.inference_mode():
        for x, expected in zip(_inputs(), reference, strict=True):
            got = layer(x)
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (layer._onednn_weight is not None) == pack


def test_packed_weight_follows_in_place_changes():
    layer = nn.Linear(16, 8)
    use_onednn_linears(layer, pack=True)
    x = torch.randn(4, 16)
    with torch.no_grad():
        before = layer(x)
        layer.weight.mul_(2)
        after = layer(x)
    torch.testing.assert_close(after - layer.bias, 2 * (before - layer.bias), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        layer.weight = nn.Parameter(torch.zeros(8, 16))  # a new tensor altogether
        torch.testing.assert_close(layer(x), layer.bias.expand(4, 8))


def test_weights_are_packed_on_first_use_only(monkeypatch):
    """Converting packs nothing (loading costs what PyTorch's layers cost); each layer packs its weight on its first
    forward, once, and releases the original there."""
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 6))
    x = torch.randn(5, 12)
    expected = model(x).detach()
    packed: list[tuple[int, ...]] = []
    released: list[tuple[int, ...]] = []
    real_pack, real_release = kernels.pack_weight, kernels.release_pages
    monkeypatch.setattr(kernels, "pack_weight", lambda w: packed.append(tuple(w.shape)) or real_pack(w))
    monkeypatch.setattr(kernels, "release_pages", lambda w: released.append(tuple(w.shape)) or real_release(w))
    assert use_onednn_linears(model, pack=True) == 2
    assert packed == [] and all(m._onednn_weight is None for m in model if isinstance(m, OneDNNLinear))
    with torch.no_grad():
        first = model(x)
        second = model(x)
    assert packed == [(24, 12), (6, 24)] and released == packed  # once per layer, in the order the forward runs
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(first, second)


def test_only_plain_linears_are_converted_and_can_be_restored():
    model = _model()
    assert use_onednn_linears(model) == 2
    assert [type(m).__name__ for m in model] == ["OneDNNLinear", "GELU", "OneDNNLinear", "Quantised", "Embedding"]
    assert onednn_linear_count(model) == 2
    with torch_linears(model):
        assert onednn_linear_count(model) == 0 and type(model[0]) is nn.Linear
    assert onednn_linear_count(model) == 2
    model[0](torch.randn(2, 37))
    assert restore_linears(model) == 2
    assert type(model[0]) is nn.Linear and "_onednn_weight" not in model[0].__dict__
    assert sorted(model.state_dict()) == sorted(_model().state_dict())


def test_environment_switch(monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, "torch")
    assert not kernels.kernels_enabled()
    model = _model()
    assert use_onednn_linears(model) == 0 and onednn_linear_count(model) == 0
    monkeypatch.setenv(kernels.KERNELS_ENV, "fastest")
    with pytest.raises(ValueError, match="PERSONAXIS_KERNELS must be one of auto, compiled, onednn, torch"):
        use_onednn_linears(model)


def test_packing_is_skipped_when_memory_is_short(monkeypatch):
    monkeypatch.setattr(kernels, "available_memory", lambda: 1000)
    model = _model()
    use_onednn_linears(model)
    assert model[0]._onednn_pack is False
    model[0](torch.randn(3, 37))
    assert model[0]._onednn_weight is None


def test_other_dtypes_and_gradients_fall_back_to_torch():
    layer = nn.Linear(12, 6)
    use_onednn_linears(layer)
    x64 = torch.randn(3, 12, dtype=torch.float64)
    layer64 = nn.Linear(12, 6).double()
    use_onednn_linears(layer64)
    assert torch.equal(layer64(x64), nn.functional.linear(x64, layer64.weight, layer64.bias))
    x = torch.randn(3, 12, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(3, 12))
    vector = torch.randn(12)  # 1-D input
    with torch.no_grad():
        assert torch.equal(layer(vector), nn.functional.linear(vector, layer.weight, layer.bias))


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_tiny_models_give_the_same_numbers(tiny_lm):
    assert onednn_linear_count(tiny_lm.model) > 0  # tiny_model converts, as load_model does
    convs = [
        [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "general kenobi you are bold"}],
        [{"role": "user", "content": "a b c"}, {"role": "assistant", "content": "d e f g"}],
    ]
    ours = torch.stack([t.means for t in extract_turn_means(tiny_lm, convs)])
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    config = SamplingConfig(max_new_tokens=12, batch_size=2)
    tokens = generate_ids(tiny_lm, prompts, config)
    with torch_linears(tiny_lm.model), sdpa_attention(tiny_lm.model):
        plain = torch.stack([t.means for t in extract_turn_means(tiny_lm, convs)])
        plain_tokens = generate_ids(tiny_lm, prompts, config)
    assert _relative_error(ours, plain) < 1e-4
    assert tokens == plain_tokens


@pytest.mark.slow
@pytest.mark.ci_sample
@pytest.mark.model
def test_embedded_model_gives_the_same_text_and_activations(embedded_lm):
    assert onednn_linear_count(embedded_lm.model) == 7 * embedded_lm.profile.n_layers + 1  # the LM head too
    questions = [
        "Tell me about yourself.",
        "What do you fear most?",
        "Explain how rainbows form, briefly.",
        "Write one sentence about the sea.",
    ]
    convs = [[{"role": "user", "content": q}] for q in questions]
    convs.append([{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Who are you?"}])
    config = SamplingConfig(max_new_tokens=24, batch_size=4)
    ours = generate(embedded_lm, convs, config)
    rollouts = [[*c, {"role": "assistant", "content": g.text}] for c, g in zip(convs, ours, strict=True)]
    means = torch.stack([t.means for t in extract_turn_means(embedded_lm, rollouts)])
    with torch_linears(embedded_lm.model), sdpa_attention(embedded_lm.model):  # transformers as it comes
        plain = generate(embedded_lm, convs, config)
        plain_means = torch.stack([t.means for t in extract_turn_means(embedded_lm, rollouts)])
    assert [g.text for g in ours] == [g.text for g in plain]
    assert _relative_error(means, plain_means) < 1e-4


def _resident_kb(path) -> int:
    """Resident kB of this process's mappings of ``path``."""
    total, inside = 0, False
    with open("/proc/self/smaps") as handle:
        for line in handle:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):
                inside = line.rstrip().endswith(str(path))
            elif inside and head[0] == "Rss:":
                total += int(head[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc/self/smaps are Linux's")
def test_released_pages_leave_memory_and_keep_their_values(tmp_path):
    """A weight mapped from its file (as transformers maps safetensors) leaves the resident set once packed and reads
    the same afterwards; a weight changed in memory keeps its change."""
    values = torch.randn(1024, 512)
    path = tmp_path / "weights.bin"
    values.numpy().tofile(path)
    mapped = torch.from_file(str(path), shared=False, size=values.numel()).view(1024, 512)
    assert torch.equal(mapped, values) and _resident_kb(path) >= 1024 * 512 * 4 // 1024 - 8
    assert kernels.release_pages(mapped)
    assert _resident_kb(path) < 64
    assert torch.equal(mapped, values)  # read again from the file
    mapped[0, 0] = 42.0  # a written (copy-on-write) page: never dropped
    assert kernels.release_pages(mapped)
    assert float(mapped[0, 0]) == 42.0 and torch.equal(mapped[1:], values[1:])
    del mapped
    layer = nn.Linear(512, 1024, bias=False)
    layer.weight = nn.Parameter(
        torch.from_file(str(path), shared=False, size=values.numel()).view(1024, 512), requires_grad=False
    )
    use_onednn_linears(layer, pack=True)
    x = torch.randn(3, 512)
    with torch.inference_mode():
        got = layer(x)
    assert _resident_kb(path) < 64  # packing released the original
    torch.testing.assert_close(got, x @ values.t(), rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc/self/smaps are Linux's")
def test_released_file_pages_are_marked_random(tmp_path, monkeypatch):
    """A tied LM head is packed and its weight released, but the embedding still reads rows of it: dropped file
    pages are marked as read at random (so a row read does not map the 64 KiB around it), written pages are not."""
    values = torch.randn(256, 1024)
    path = tmp_path / "embedding.bin"
    values.numpy().tofile(path)
    mapped = torch.from_file(str(path), shared=False, size=values.numel()).view(256, 1024)
    real = kernels._madvise()
    calls: list[int] = []

    def recording(start: int, length: int, advice: int) -> int:
        calls.append(advice)
        return real(start, length, advice)

    monkeypatch.setattr(kernels, "_MADVISE", recording)
    assert kernels.release_pages(mapped)
    assert calls == [kernels._MADV_RANDOM, kernels._MADV_DONTNEED]
    assert torch.equal(nn.functional.embedding(torch.tensor([3, 200]), mapped), values[[3, 200]])
    calls.clear()
    anonymous = values.clone()
    assert kernels.release_pages(anonymous)
    assert calls == [kernels._MADV_PAGEOUT] and torch.equal(anonymous, values)


# In a fresh process, after a layer's forward: whether blocks of 8, 8 and 1.5 MiB, each freed before the next, were
# memory mappings of their own (glibc marks such a block's header with IS_MMAPPED, bit 2 of the size word before it).
_BLOCKS_AFTER_PACKING_SCRIPT = """
import ctypes, sys, torch
from torch import nn
from personaxis.kernels import use_onednn_linears
layer = nn.Linear(1024, 512)
use_onednn_linears(layer, pack=sys.argv[1] == "pack", force=True)
with torch.inference_mode():
    layer(torch.randn(2, 1024))
flags = []
for size in (8 << 20, 8 << 20, 3 << 19):
    block = torch.empty(size, dtype=torch.uint8)
    flags.append(bool(ctypes.c_size_t.from_address(block.data_ptr() - 8).value & 2))
    del block
print(flags)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux's")
def test_after_packing_large_blocks_stay_in_the_heap():
    """Caches and logits allocated after the weights are packed come from the heap, reused without page faults (a
    mapping per block of a megabyte or more cost 10 % of the quick preset's generation speed); without packing,
    glibc's own rule stands (its threshold rises to the size of a freed block)."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}

    def flags(mode: str) -> str:
        run = subprocess.run(
            [sys.executable, "-c", _BLOCKS_AFTER_PACKING_SCRIPT, mode], env=env, capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr[-2000:]
        return run.stdout.strip()

    plain = flags("plain")
    if plain != "[True, False, False]":
        pytest.skip(f"not glibc's allocator as known ({plain})")
    assert flags("pack") == "[False, False, False]"


def test_a_weight_is_packed_into_a_mapping_of_its_own(monkeypatch):
    """While a weight is packed, glibc maps every block of 64 KiB or more on its own (the packed copy pins no freed
    heap block around it); afterwards only blocks of 32 MiB or more, and up to 64 MiB stay free at the heap's top."""
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(kernels, "_MALLOPT", lambda option, value: calls.append((option, value)) or 1)
    layer = nn.Linear(64, 32)
    kernels.use_onednn_linears(layer, pack=True, force=True)
    with torch.inference_mode():
        layer(torch.randn(2, 64))
        layer(torch.randn(2, 64))  # packed once
    assert calls == [
        (kernels._M_MMAP_THRESHOLD, kernels.PACK_BLOCK_LIMIT),
        (kernels._M_MMAP_THRESHOLD, kernels.HEAP_BLOCK_LIMIT),
        (kernels._M_TRIM_THRESHOLD, 2 * kernels.HEAP_BLOCK_LIMIT),
    ]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc/self/smaps are Linux's")
def test_a_weights_file_is_checked_once(tmp_path, monkeypatch):
    """Releasing weights splits their file's mapping into pieces (``MADV_RANDOM`` on some of them); the file is still
    checked for written pages once, and a weight lying across pieces is still dropped (not just offered)."""
    values = torch.randn(3, 64 * 1024)  # three weights of 256 KiB, one file
    path = tmp_path / "weights.bin"
    values.numpy().tofile(path)
    mapped = torch.from_file(str(path), shared=False, size=values.numel()).view(3, -1)
    assert torch.equal(mapped, values)
    opened: list[str] = []
    monkeypatch.setattr(
        kernels, "open", lambda name, *a, **k: opened.append(str(name)) or open(name, *a, **k), raising=False
    )
    advised: list[int] = []
    real = kernels._madvise()
    monkeypatch.setattr(
        kernels, "_MADVISE", lambda start, length, advice: advised.append(advice) or real(start, length, advice)
    )
    kernels._CLEAN_FILES.clear()
    assert kernels.release_pages(mapped[1])  # the middle weight: its pages become a piece of their own
    assert kernels.release_pages(mapped[0]) and kernels.release_pages(mapped)  # the whole file, across the pieces
    assert opened.count("/proc/self/smaps") == 1
    assert advised == [kernels._MADV_RANDOM, kernels._MADV_DONTNEED] * 3
    assert _resident_kb(path) < 64 and torch.equal(mapped, values)


class _Projections(nn.Module):
    """A block's sibling projections as transformers names them, and one that reads another input."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(24, 24, bias), nn.Linear(24, 8, bias), nn.Linear(24, 8, bias)
        self.o_proj = nn.Linear(24, 24, bias)


def _count_onednn_calls(monkeypatch) -> list[int]:
    calls = [0]
    real = kernels.onednn_linear

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "onednn_linear", counting)
    return calls


@pytest.mark.parametrize("bias", [True, False])
def test_sibling_projections_share_one_product(monkeypatch, bias):
    block = _Projections(bias)
    x = torch.randn(3, 5, 24)
    expected = [nn.functional.linear(x, m.weight, m.bias) for m in (block.q_proj, block.k_proj, block.v_proj)]
    use_onednn_linears(block, pack=True)
    group = block.q_proj._onednn_group
    assert group is not None and group is block.k_proj._onednn_group is block.v_proj._onednn_group
    assert block.o_proj._onednn_group is None  # reads the attention output, not the block's input
    calls = _count_onednn_calls(monkeypatch)
    with torch.inference_mode():
        got = [block.q_proj(x), block.k_proj(x), block.v_proj(x)]
    assert calls[0] == 1
    for g, e in zip(got, expected, strict=True):
        assert g.is_contiguous() and g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert block.q_proj._onednn_weight is None  # the members never packed copies of their own


def test_a_projection_given_another_input_computes_from_it(monkeypatch):
    block = _Projections(True)
    x, y = torch.randn(2, 24), torch.randn(2, 24)
    use_onednn_linears(block, pack=True)
    group = block.q_proj._onednn_group
    with torch.inference_mode():
        q = block.q_proj(x)
        k = block.k_proj(y)  # as under a hook that replaced the key projection's input
        v = block.v_proj(x)
    torch.testing.assert_close(q, nn.functional.linear(x, block.q_proj.weight, block.q_proj.bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, nn.functional.linear(y, block.k_proj.weight, block.k_proj.bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v, nn.functional.linear(x, block.v_proj.weight, block.v_proj.bias), rtol=1e-5, atol=1e-5)
    # Two outputs computed for siblings that never took them: the group stops and each member runs alone.
    assert group.misses == kernels.GROUP_MISSES_ALLOWED and not group.active and group.weight is None
    calls = _count_onednn_calls(monkeypatch)
    with torch.inference_mode():
        block.q_proj(x), block.k_proj(x), block.v_proj(x)
    assert calls[0] == 3


def test_a_group_reads_an_input_changed_in_place_afresh():
    block = _Projections(False)
    use_onednn_linears(block, pack=True)
    x = torch.randn(4, 24)
    with torch.no_grad():
        block.q_proj(x)
        x.mul_(2)  # the version counter moves: the shared product no longer belongs to x
        k = block.k_proj(x)
    torch.testing.assert_close(k, nn.functional.linear(x, block.k_proj.weight), rtol=1e-5, atol=1e-5)


def test_a_group_follows_changes_to_its_weights():
    block = _Projections(True)
    use_onednn_linears(block, pack=True)
    x = torch.randn(2, 24)
    with torch.no_grad():
        block.q_proj(x), block.k_proj(x), block.v_proj(x)
        block.k_proj.weight.mul_(-3)
        got = [block.q_proj(x), block.k_proj(x), block.v_proj(x)]
    for g, m in zip(got, (block.q_proj, block.k_proj, block.v_proj), strict=True):
        torch.testing.assert_close(g, nn.functional.linear(x, m.weight, m.bias), rtol=1e-5, atol=1e-5)


def test_groups_need_packed_weights_and_go_with_restore():
    unpacked = _Projections(True)
    use_onednn_linears(unpacked, pack=False)
    assert unpacked.q_proj._onednn_group is None
    block = _Projections(True)
    use_onednn_linears(block, pack=True)
    assert restore_linears(block) == 4
    assert all("_onednn_group" not in m.__dict__ for m in block.modules())
