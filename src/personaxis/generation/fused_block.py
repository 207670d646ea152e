"""A decode step of a Llama-family block in one compiled call (``csrc/decode_block.c``), for any number of rows.

Decoding one sequence reads every weight once per token; on the 2-core AMD EPYC the embedded model's 151 products of
a one-row step took 12.5 ms of an 18.4 ms step (compiled AVX-512 products), and the rest was the step's Python: about
45 PyTorch calls per block for the norms, the rotation, the cache, the attention and the gated activation, each
slowed by caches that the weights' stream has just emptied. With more rows the attention over the cache grows: at 64
rows 25–34 ms of a 90–110 ms step went outside the products. :class:`FusedBlocks` runs each block as one call of the
compiled library instead: the same arithmetic as transformers' Llama block (see ``decode_block.c``), its products on
the library's kernels (bit for bit those of the packed layers) inside one OpenMP region. Steps of the embedded model,
interleaved, best of 5: one row 18.2 → 14.9 ms (AVX-512) and 18.5 → 15.1 (AVX2); 16 rows 25.6 → 21.4 and 30.2 →
28.1; 64 rows 72.7 → 67.8 and 104.2 → 96.4; the same greedy tokens.

What stays as before: the cache is written through its own ``update`` (the new key and value are then filled in by
the call), the blocks' forward hooks are called by :class:`personaxis.generation.llama_step.LlamaDecodeStep` with
the block's input and output as PyTorch would (interventions and readers see and change the same tensors), and the
embedding, final norm and LM head are modules. The block's output equals the module path's up to float rounding: the
norms' means, the attention's dot products and sums, and the exponentials are computed in another order or by
another ``exp`` than PyTorch's (tests bound the difference and compare greedy tokens and captured activations).

It is used where the compiled products are the packed layers' (:mod:`personaxis.compiled_gemm`; on x86-64 CPUs with
AVX2 or AVX-512, unless ``PERSONAXIS_KERNELS`` says otherwise) and the block has no projection biases (Qwen2's query,
key and value biases take the module path) and a SiLU gate; :func:`unfused_blocks` turns it off, and
``PERSONAXIS_KERNELS=onednn`` gives the module path, bit for bit the model's own forward.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from personaxis import compiled_gemm
from personaxis.compiled_gemm import BlockWeights, GemmWeight

_switched_off = 0  # depth of nested ``unfused_blocks`` blocks


@contextmanager
def unfused_blocks() -> Iterator[None]:
    """Inside the block one-row steps run each block through its modules' arithmetic (tests and comparisons)."""
    global _switched_off
    _switched_off += 1
    try:
        yield
    finally:
        _switched_off -= 1


def _silu(mlp: nn.Module) -> bool:
    act = getattr(mlp, "act_fn", None)
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _fusable(block: nn.Module) -> bool:
    attention, mlp = block.self_attn, block.mlp
    linears = [attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj]
    linears += [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    heads = attention.q_proj.out_features // attention.head_dim
    kv_heads = attention.k_proj.out_features // attention.head_dim
    return all(m.bias is None for m in linears) and _silu(mlp) and kv_heads > 0 and heads % kv_heads == 0


class FusedBlocks:
    """The compiled one-row path of a :class:`~personaxis.generation.llama_step.LlamaDecodeStep`'s blocks (see the
    module's notes); ``groups``: each block's query/key/value :class:`~personaxis.kernels.ProjectionGroup`."""

    def __init__(self, blocks: list[nn.Module], groups: list[Any]) -> None:
        self.blocks = blocks
        self.groups = groups
        self.fusable = [g is not None and _fusable(b) for b, g in zip(blocks, groups, strict=True)]
        # Per block: the packed weights' objects last seen and the structure made from them (with what it points to).
        self._made: list[tuple[tuple[Any, ...], BlockWeights] | None] = [None] * len(blocks)
        self._placeholder: Tensor | None = None

    def ready(self, hidden: Tensor) -> bool:
        """Whether this step's blocks may take the compiled path (float32 CPU rows, the library loaded)."""
        return (
            not _switched_off
            and hidden.dtype is torch.float32
            and hidden.is_cpu
            and compiled_gemm.block_function() is not None
        )

    def _weights(self, index: int) -> BlockWeights | None:
        """The block's structure for the library, remade when any packed weight was remade; None when a weight is
        not packed for the compiled products."""
        block, group = self.blocks[index], self.groups[index]
        attention, mlp = block.self_attn, block.mlp
        mlp_linears = (attention.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        packed = (group._packed(), *(m._weight_for_onednn(m.weight) for m in mlp_linears))
        if not all(type(p) is GemmWeight for p in packed):
            return None
        norms = (block.input_layernorm.weight, block.post_attention_layernorm.weight)
        made = self._made[index]
        if made is not None and all(a is b for a, b in zip(made[0], packed + norms, strict=True)):
            return made[1]
        if not all(n.dtype is torch.float32 and n.is_contiguous() for n in norms):
            return None
        weights = BlockWeights(
            hidden=attention.o_proj.out_features,
            heads=attention.q_proj.out_features // attention.head_dim,
            kv_heads=attention.k_proj.out_features // attention.head_dim,
            head_dim=attention.head_dim,
            intermediate=mlp.gate_proj.out_features,
            avx512=int(compiled_gemm.avx512()),
            eps_attention=block.input_layernorm.variance_epsilon,
            eps_mlp=block.post_attention_layernorm.variance_epsilon,
            scaling=attention.scaling,
            attention_norm=norms[0].data_ptr(),
            mlp_norm=norms[1].data_ptr(),
            qkv=packed[0].blocks.data_ptr(),
            o=packed[1].blocks.data_ptr(),
            gate=packed[2].blocks.data_ptr(),
            up=packed[3].blocks.data_ptr(),
            down=packed[4].blocks.data_ptr(),
        )
        self._made[index] = (packed + norms, weights)
        return weights

    def run(
        self, index: int, hidden: Tensor, cos: Tensor, sin_signed: Tensor, blocked: Tensor, layer: Any
    ) -> Tensor | None:
        """Block ``index``'s output for ``hidden`` ``[rows, 1, hidden]`` (``cos``, ``sin_signed``: the step's
        rotation ``[rows, 1, 1, head dim]``; ``blocked``: ``[rows, 1, 1, positions]`` bool; ``layer``: the block's
        cache layer), or None where this block cannot take the compiled path (nothing has been written then)."""
        if not self.fusable[index] or hidden.dtype is not torch.float32:  # a hook may have changed the dtype
            return None
        weights = self._weights(index)
        if weights is None:
            return None
        rows = hidden.shape[0]
        shape = (rows, weights.kv_heads, 1, weights.head_dim)
        if self._placeholder is None or self._placeholder.shape != shape:
            self._placeholder = torch.zeros(shape)
        keys, values = layer.update(self._placeholder, self._placeholder)  # the layer's own bookkeeping
        length = keys.shape[2]
        if (
            keys.stride()[2:] != (weights.head_dim, 1)
            or values.stride() != keys.stride()
            or blocked.shape[-1] != length
        ):
            raise RuntimeError("the cache layer's keys and values are not laid out as the compiled block reads them")
        hidden = hidden.contiguous()
        out = torch.empty_like(hidden)
        status = compiled_gemm.block_function()(
            ctypes.byref(weights),
            rows,
            hidden.data_ptr(),
            out.data_ptr(),
            cos.data_ptr(),
            sin_signed.data_ptr(),
            keys.data_ptr(),
            values.data_ptr(),
            keys.stride(0),
            keys.stride(1),
            length,
            blocked.data_ptr(),
            torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError("the compiled block could not allocate its scratch memory")
        return out
