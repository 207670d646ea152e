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

The Python around the calls is done once per step, before the first block (:meth:`FusedBlocks.prepare`): every
block's structure checked against what it was made from, each cache layer given its new position, each output
allocated and each call's arguments made. Between the blocks, after each block's weights have streamed through the
caches, the same Python took about 150 µs a block on a 2-core AVX2 AMD EPYC (4.5 ms of a one-row step); at the
step's start it takes about 1.8 ms for all 30 blocks, and whole greedy runs went from 25.0 to 29.1 tokens/s at one
row and 166 to 178 at 16 rows (interleaved, best of 6, the same tokens).

What stays as before: the cache layer keeps its own bookkeeping (``make_room``; the call writes the new key and
value), the blocks' forward hooks are called by :class:`personaxis.generation.llama_step.LlamaDecodeStep` with
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
import operator
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from itertools import repeat
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from personaxis import compiled_gemm
from personaxis.compiled_gemm import BlockWeights, GemmWeight
from personaxis.kernels import OneDNNLinear, tensor_version


class OffSwitch:
    """On until a ``with switch.off():`` block turns it off; such blocks nest (it is on again when the outermost
    ends). Tests and benchmarks use them to compare a fast path with the one it replaces."""

    def __init__(self) -> None:
        self._depth = 0

    @property
    def on(self) -> bool:
        return self._depth == 0

    @contextmanager
    def off(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1


_COMPILED_BLOCKS = OffSwitch()


def unfused_blocks() -> AbstractContextManager[None]:
    """Inside the block the decode steps run each block through its modules' arithmetic (tests and comparisons)."""
    return _COMPILED_BLOCKS.off()


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


_VERSION = operator.attrgetter("_version")
_BLOCK_PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
_ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


class _Watched:
    """What blocks' structures for the library were made from: the blocks' modules where they sit, the linear layers
    (packed for the compiled products), and each weight's tensor, storage and in-place version. :meth:`holds` tells
    whether all of that still stands, reading the modules' own dictionaries in loops that run in C (``map``), for
    one block or, merged, for all. Checking through the modules' attributes and packed-copy keys, as the module path
    does, took about 100 µs a block between the weights' streams (the objects no longer in the caches)."""

    def __init__(self, places: list[tuple[dict[str, Any], str]]) -> None:
        self.parents, self.names = [parent for parent, _ in places], [name for _, name in places]
        self.children = [parent[name] for parent, name in places]
        self.linears = [child for child, name in zip(self.children, self.names, strict=True) if name.endswith("_proj")]
        holders = [child for child, name in zip(self.children, self.names, strict=True) if name not in _BLOCK_PARTS[:2]]
        self.parameters = [child._parameters for child in holders]  # the norms' and the linear layers'
        self.tensors = [parameters["weight"] for parameters in self.parameters]
        self.pointers = [weight.data_ptr() for weight in self.tensors]
        # Inference tensors keep no version (and cannot change outside inference mode): the others' counts.
        self.counted = [weight for weight in self.tensors if not weight.is_inference()]
        self.versions = [tensor_version(weight) for weight in self.counted]

    @classmethod
    def block(cls, block: nn.Module) -> _Watched:
        attention, mlp = block.self_attn, block.mlp
        places = [(block._modules, name) for name in _BLOCK_PARTS]
        places += [(attention._modules, name) for name in _ATTENTION_LINEARS]
        places += [(mlp._modules, name) for name in _MLP_LINEARS]
        return cls(places)

    @classmethod
    def merged(cls, watched: list[_Watched]) -> _Watched:
        return cls([place for w in watched for place in zip(w.parents, w.names, strict=True)])

    def holds(self) -> bool:
        """Whether the blocks still have these modules (linear layers packed for the compiled products) and each
        weight the same tensor, storage and version."""
        return (
            all(map(operator.is_, map(dict.get, self.parents, self.names), self.children))
            and all(map(operator.is_, map(type, self.linears), repeat(OneDNNLinear)))
            and all(map(operator.attrgetter("_onednn_pack"), self.linears))
            and all(map(operator.is_, map(dict.get, self.parameters, repeat("weight")), self.tensors))
            and list(map(Tensor.data_ptr, self.tensors)) == self.pointers
            and list(map(_VERSION, self.counted)) == self.versions
        )


class _MadeBlock(NamedTuple):
    """A block's structure for the library, the packed copies its pointers point into (kept alive here), and what
    they were made from."""

    weights: BlockWeights
    packed: tuple[Any, ...]
    watched: _Watched


class FusedBlocks:
    """The compiled one-row path of a :class:`~personaxis.generation.llama_step.LlamaDecodeStep`'s blocks (see the
    module's notes); ``groups``: each block's query/key/value :class:`~personaxis.kernels.ProjectionGroup`."""

    def __init__(self, blocks: list[nn.Module], groups: list[Any]) -> None:
        self.blocks = blocks
        self.groups = groups
        self.fusable = [g is not None and _fusable(b) for b, g in zip(blocks, groups, strict=True)]
        # Per block: the structure for the library and what it was made from.
        self._made: list[_MadeBlock | None] = [None] * len(blocks)
        self._steps: list[_BlockStep | None] = []  # this step's calls (``prepare``)
        self._current: list[BlockWeights | None] = []  # the blocks' structures, while ``_watched`` holds
        self._watched: _Watched | None = None  # what all blocks' structures were made from, merged
        self._function: Any = None

    def prepare(self, hidden: Tensor, cos: Tensor, sin_signed: Tensor, blocked: Tensor, layers: list[Any]) -> bool:
        """Set up this step's compiled blocks for ``hidden`` ``[rows, 1, hidden]`` (``cos``, ``sin_signed``: the
        step's rotation ``[rows, 1, 1, head dim]``; ``blocked``: ``[rows, 1, 1, positions]`` bool; ``layers``: the
        blocks' cache layers), all at once: each block's structure checked, its cache layer given the new position
        and its output allocated. Between the blocks' weight streams the same work met emptied caches (about
        150 µs a block on the AVX2 CPU of the module's notes; here about 60). False, with nothing changed, where this
        step cannot take the compiled path (not float32 CPU rows, or no library)."""
        self._function = compiled_gemm.block_function() if _COMPILED_BLOCKS.on else None
        if self._function is None or hidden.dtype is not torch.float32 or not hidden.is_cpu:
            return False
        rotation = (cos.contiguous(), sin_signed.contiguous(), blocked.contiguous())
        threads = torch.get_num_threads()
        self._steps = []
        for index, weights in enumerate(self._structures()):
            if weights is None:
                self._steps.append(None)
                continue
            layer = layers[index]
            keys, values = layer.make_room(1)  # the call writes the new position
            stride, length = keys.stride(), keys.shape[2]
            if (
                stride[2:] != (weights.head_dim, 1)
                or values.stride() != stride
                or keys.shape[0] != hidden.shape[0]
                or blocked.shape[-1] != length
            ):
                raise RuntimeError(
                    "the cache layer's keys and values are not laid out as the compiled block reads them"
                )
            out = torch.empty(hidden.shape)
            arguments = [ctypes.byref(weights), hidden.shape[0], 0, out.data_ptr(), rotation[0].data_ptr()]
            arguments += [rotation[1].data_ptr(), keys.data_ptr(), values.data_ptr(), stride[0], stride[1], length]
            arguments += [rotation[2].data_ptr(), threads]
            self._steps.append(_BlockStep(layer, out, arguments, rotation))
        return True

    def _structures(self) -> list[BlockWeights | None]:
        """Each block's structure for the library this step (None: the module path): all blocks checked at once
        while every fusable block has one and nothing they were made from changed, else block by block."""
        if self._watched is not None and self._watched.holds():
            return self._current
        self._watched = None
        self._current = [self._weights(i) if fusable else None for i, fusable in enumerate(self.fusable)]
        made = [m for m in self._made if m is not None]
        if len(made) == sum(self.fusable):
            self._watched = _Watched.merged([m.watched for m in made])
        return self._current

    def _weights(self, index: int) -> BlockWeights | None:
        """The block's structure for the library, remade when any packed weight was remade; None when a weight is
        not packed for the compiled products."""
        made = self._made[index]
        if made is not None and made.watched.holds():
            return made.weights
        self._made[index] = None
        block, group = self.blocks[index], self.groups[index]
        attention, mlp = block.self_attn, block.mlp
        linears = (*group.members, attention.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if not all(type(m) is OneDNNLinear and m._onednn_pack for m in linears):
            return None
        packed = (group._packed(), *(m._weight_for_onednn(m.weight) for m in linears[3:]))
        if not all(type(p) is GemmWeight for p in packed):
            return None
        norms = (block.input_layernorm.weight, block.post_attention_layernorm.weight)
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
        self._made[index] = _MadeBlock(weights, packed, _Watched.block(block))
        return weights

    def run(self, index: int, hidden: Tensor) -> Tensor | None:
        """Block ``index``'s output for ``hidden`` in a step that :meth:`prepare` set up, or None where this block
        takes the module path (its cache layer then as before the step)."""
        step = self._steps[index]
        if step is None:
            return None
        if hidden.dtype is not torch.float32 or hidden.shape != step.out.shape:  # a hook changed them
            step.layer.make_room(-1)  # the position goes back: the module path writes it through ``update``
            return None
        if not hidden.is_contiguous():
            hidden = hidden.contiguous()
        step.arguments[2] = hidden.data_ptr()
        if self._function(*step.arguments) != 0:
            raise MemoryError("the compiled block could not allocate its scratch memory")
        return step.out


class _BlockStep(NamedTuple):
    """One block's compiled call in a step: its cache layer, its output, the call's arguments (the input's
    address filled in by :meth:`FusedBlocks.run`) and the tensors they point into."""

    layer: Any
    out: Tensor
    arguments: list[Any]
    keep: tuple[Tensor, ...]
