"""The decode step of Llama-family models (Llama, Mistral, Qwen2) on the CPU without transformers' per-layer Python.

A decode step feeds one token per row through every block. transformers spends a large part of it outside the
arithmetic: keyword plumbing and decorators around every block and attention call, module calls for every norm and
projection, the attention mask rebuilt from the 2-D mask. :class:`LlamaDecodeStep` runs the same operations, in the
same order and on the same modules' weights, as one Python loop: the same norms, the projections' own ``forward``
(:mod:`personaxis.kernels`' oneDNN layers, with the shared query/key/value product), the values of transformers'
rotary function, each cache layer's ``update`` and the registered attention's arithmetic
(:func:`personaxis.decode_attention.attend_one_token`). What does not change from block to block is made once per
step: the inverted attention mask, the rotation's ``cos`` and signed ``sin`` (:class:`_Rotation`), and whether the
query/key/value products are stacked. Its outputs are bit for bit those of the model's own forward (tests compare
them with ``torch.equal``), except on the compiled path below. Measured on a random 30-layer model small enough
that only this overhead counts, a step takes 13.6 → 9.9 ms at 16 rows and 8.8 → 7.3 at one row; on the embedded
model 25.0 → 21.5 ms at one row (``benchmarks/decode_steps.py``). Everything in the embedded model's one-row step but its 151 products took 3.2–3.9
ms, and 3.0–3.2 with the work made once per step (linear layers replaced by stubs, best and median of 7).

Where the compiled products of :mod:`personaxis.compiled_gemm` run, each block runs as one compiled call instead
(:mod:`personaxis.generation.fused_block`): equal to this path to float rounding, not bit for bit, with the same
hooks called on its outputs. On the embedded model a one-row step took 18.2 → 14.9 ms (AVX-512) and 18.5 → 15.1 ms
(AVX2), a 64-row step 72.7 → 67.8 and 104.2 → 96.4 ms, the same greedy tokens.

Hooks stay exact. The step is used only when every hook it would skip is absent. It calls the blocks' forward hooks
itself, as PyTorch does: personaxis' residual writers and readers (:mod:`personaxis.hooks`), a capture's readers,
any hook a user put on a block. The mask tracker of :mod:`personaxis.hooks` on the base model gets the call's
keywords. The embedding, the final norm and the LM head are called as modules, so their hooks run too.

Anything else goes to the model's own forward (:meth:`LlamaDecodeStep.usable` says which). That covers more than one
token per row, another dtype or device, a plain (unbuffered) cache, another attention implementation, training mode,
a sliding window, global hooks, a hook on any module inside a block or with keyword arguments on a block, and models
dispatched by accelerate (whose hooks move weights inside ``forward``: no step is made for them).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from personaxis.decode_attention import IMPLEMENTATION, attend_one_token
from personaxis.generation.cache import buffered_layers
from personaxis.generation.fused_block import FusedBlocks, OffSwitch
from personaxis.hooks import is_mask_tracker_hook
from personaxis.kernels import OneDNNLinear, ProjectionGroup, cpu_float32_inference

# Blocks whose forward is ``h + attn(norm(h))`` then ``h + mlp(norm(h))`` with RMS norms of the same formula; each of
# these architectures' attention is Llama's (rotary, grouped-query heads) apart from biases and sliding windows.
BLOCK_CLASSES = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
NORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")
CAUSAL_LM_CLASSES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


_ONE_STEP = OffSwitch()


def model_forward_steps() -> AbstractContextManager[None]:
    """Inside the block every decode step runs the model's own forward (the comparison of benchmarks and tests)."""
    return _ONE_STEP.off()


def _rms_norm(norm: nn.Module, hidden: Tensor) -> Tensor:
    """transformers' Llama RMS norm, operation for operation (float32 input: its casts change nothing)."""
    variance = hidden.pow(2).mean(-1, keepdim=True)
    return norm.weight * (hidden * torch.rsqrt(variance + norm.variance_epsilon))


def _sliding_window(attention: nn.Module) -> Any:
    if hasattr(attention, "sliding_window"):  # Qwen2: per layer
        return attention.sliding_window
    return getattr(getattr(attention, "config", None), "sliding_window", None)  # Mistral: the config's


def _block_parts_supported(block: nn.Module) -> bool:
    attention, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    norms = (getattr(block, "input_layernorm", None), getattr(block, "post_attention_layernorm", None))
    return (
        type(block).__name__ in BLOCK_CLASSES
        and attention is not None
        and mlp is not None
        and all(isinstance(getattr(attention, name, None), nn.Linear) for name in _PROJECTIONS)
        and all(isinstance(getattr(mlp, name, None), nn.Linear) for name in _MLP)
        and all(type(norm).__name__ in NORM_CLASSES for norm in norms)
        and isinstance(getattr(attention, "head_dim", None), int)
        and _sliding_window(attention) is None
        and all(
            hasattr(sys.modules.get(type(attention).__module__), f) for f in ("apply_rotary_pos_emb", "rotate_half")
        )
    )


def _qkv_group(attention: nn.Module) -> ProjectionGroup | None:
    group = getattr(attention.q_proj, "_onednn_group", None)
    members = [attention.q_proj, attention.k_proj, attention.v_proj]
    if (
        isinstance(group, ProjectionGroup)
        and len(group.members) == 3
        and all(a is b for a, b in zip(group.members, members, strict=True))
    ):
        return group
    return None


class LlamaDecodeStep:
    """One decode step (one new token per row) of a Llama-family model or of its base model (blocks only), equal to
    the model's own forward bit for bit; see the module's notes. Make one with :meth:`of`."""

    def __init__(self, module: nn.Module, base: nn.Module, head: nn.Module | None) -> None:
        self.module = module  # what the model's own forward would be called on
        self.base = base
        self.head = head
        self.blocks: list[nn.Module] = list(base.layers)
        first = self.blocks[0].self_attn
        modeling = sys.modules[type(first).__module__]
        self.rotary: Callable[..., tuple[Tensor, Tensor]] = modeling.apply_rotary_pos_emb
        self.config = first.config
        self._head_counts = (first.q_proj.out_features // first.head_dim, first.k_proj.out_features // first.head_dim)
        # Query, key and value projections that run as one oneDNN product (:class:`personaxis.kernels.ProjectionGroup`).
        self._groups = [_qkv_group(block.self_attn) for block in self.blocks]
        self._fused = FusedBlocks(self.blocks, self._groups)  # one row: each block in one compiled call
        inner = [m for block in self.blocks for m in block.modules() if m is not block]
        # Hook dictionaries are kept by their modules for life (registering and removing change them in place).
        self._inner_hooks = [d for m in inner for d in (m._forward_hooks, m._forward_pre_hooks)]
        self._block_hooks = [(b._forward_pre_hooks, b._forward_hooks_with_kwargs) for b in self.blocks]

    @classmethod
    def of(cls, module: nn.Module) -> LlamaDecodeStep | None:
        """The step for a causal LM of :data:`CAUSAL_LM_CLASSES` (logits) or for its base model (blocks only), or
        None for any other model."""
        head = None
        base = module
        if type(module).__name__ in CAUSAL_LM_CLASSES:
            base, head = getattr(module, "model", None), getattr(module, "lm_head", None)
            if base is None or not isinstance(head, nn.Linear):
                return None
        blocks = getattr(base, "layers", None)
        if not (
            isinstance(blocks, nn.ModuleList)
            and len(blocks) > 0
            and all(hasattr(base, name) for name in ("embed_tokens", "norm", "rotary_emb"))
            and type(base.norm).__name__ in NORM_CLASSES
            and all(_block_parts_supported(block) for block in blocks)
            and not any(hasattr(m, "_hf_hook") for m in module.modules())  # accelerate moves weights in forward
        ):
            return None
        return cls(module, base, head)

    def _hooks_allowed(self) -> bool:
        """Whether every hook the step would not call itself is absent (see the module's notes)."""
        if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
            return False
        if any(self._inner_hooks):
            return False
        if any(pre or with_kwargs for pre, with_kwargs in self._block_hooks):
            return False
        top, base = self.module, self.base
        if top is not base and (top._forward_hooks or top._forward_pre_hooks):
            return False
        return not base._forward_hooks and all(is_mask_tracker_hook(h) for h in base._forward_pre_hooks.values())

    def usable(self, ids: Tensor, cache: Any) -> bool:
        """Whether this call (``ids`` ``[rows, 1]``, ``cache``) can take the step; otherwise the caller runs the
        model's own forward."""
        embed = self.base.embed_tokens.weight
        norm = self.blocks[0].input_layernorm.weight
        layers = buffered_layers(cache)
        return (
            _ONE_STEP.on
            and ids.dim() == 2
            and ids.shape[1] == 1
            and ids.is_cpu
            and embed.is_cpu
            and norm.is_cpu
            and embed.dtype is torch.float32
            and norm.dtype is torch.float32
            and not self.module.training
            and getattr(self.config, "_attn_implementation", None) == IMPLEMENTATION
            and layers is not None  # buffered layers, not offloaded: the step calls each layer's ``update``
            and len(layers) == len(self.blocks)
            and self._hooks_allowed()
        )

    def run(self, ids: Tensor, mask: Tensor, positions: Tensor, cache: Any, cache_kw: str) -> Tensor | None:
        """Feed ``ids`` ``[rows, 1]`` (``mask`` covers the cache and them, ``positions`` ``[rows, 1]``) into the
        cache; the logits ``[rows, vocabulary]`` for a causal LM, None for a base model. Call only where
        :meth:`usable`."""
        base = self.base
        keywords = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, cache_kw: cache}
        for hook in base._forward_pre_hooks.values():  # mask trackers only (``usable``)
            hook(base, (), keywords)
        hidden = base.embed_tokens(ids)
        cos, sin = base.rotary_emb(hidden, positions)
        blocked = ~mask.bool()[:, None, None, :]  # [rows, 1, 1, positions]: True where a row does not attend
        rotation = _Rotation(cos, sin) if self._stacked_qkv(hidden) else None
        rows = ids.shape[0]
        layers = buffered_layers(cache)
        assert layers is not None  # ``usable``
        compiled = rotation is not None and self._fused.prepare(hidden, rotation.cos, rotation.sin, blocked, layers)
        for index, block in enumerate(self.blocks):
            output = self._fused.run(index, hidden) if compiled else None
            if output is None:
                output = self._block(index, block, hidden, cos, sin, rotation, blocked, layers[index], rows)
            for hook in block._forward_hooks.values():  # none takes keywords (``usable``)
                result = hook(block, (hidden,), output)
                if result is not None:
                    output = result
            hidden = output
        hidden = base.norm(hidden)
        if self.head is None:
            return None
        return self.head(hidden)[:, -1, :]

    def _stacked_qkv(self, hidden: Tensor) -> bool:
        """Whether every block's query, key and value projections run as one product this step (their
        :class:`ProjectionGroup`, active, on float32 CPU inputs)."""
        return all(
            group is not None
            and group.active
            and all(type(m) is OneDNNLinear for m in group.members)  # not while int8_linears swaps them
            and cpu_float32_inference(hidden, group.members[0].weight)
            for group in self._groups
        )

    def _block(
        self,
        index: int,
        block: nn.Module,
        hidden: Tensor,
        cos: Tensor,
        sin: Tensor,
        rotation: _Rotation | None,
        blocked: Tensor,
        layer: Any,
        rows: int,
    ) -> Tensor:
        """One block's forward, as transformers' Llama block computes it (``layer``: the block's cache layer)."""
        attention, mlp = block.self_attn, block.mlp
        shape = (rows, 1, -1, attention.head_dim)
        x = _rms_norm(block.input_layernorm, hidden)
        group = self._groups[index]
        if rotation is not None and group is not None:
            # The product the group would share between the three projections, sliced here; the rotation of the
            # query and key heads in one go.
            heads = group.stacked_output(x).view(shape).transpose(1, 2)  # [rows, query + 2 key/value heads, 1, dim]
            n_query, n_key = self._head_counts
            rotated = rotation.apply(heads[:, : n_query + n_key])
            query, key, value = rotated[:, :n_query], rotated[:, n_query:], heads[:, n_query + n_key :]
        else:
            query = attention.q_proj.forward(x).view(shape).transpose(1, 2)
            key = attention.k_proj.forward(x).view(shape).transpose(1, 2)
            value = attention.v_proj.forward(x).view(shape).transpose(1, 2)
            query, key = self.rotary(query, key, cos, sin)
        key, value = layer.update(key, value)
        attended = attend_one_token(query, key, value, blocked, attention.scaling)
        hidden = hidden + attention.o_proj.forward(attended.reshape(rows, 1, -1))
        x = _rms_norm(block.post_attention_layernorm, hidden)
        return hidden + mlp.down_proj.forward(mlp.act_fn(mlp.gate_proj.forward(x)) * mlp.up_proj.forward(x))


class _Rotation:
    """transformers' rotary function for ``[rows, heads, 1, dim]`` heads with the step's ``cos`` and ``sin``, value
    for value: ``x * cos + rotate_half(x) * sin``, where ``rotate_half(x)`` is ``x``'s two halves swapped, the
    first negated. The swap is one ``roll`` and the negation moves into ``sin`` (``-a * b == a * -b`` in floating
    point), made once per step instead of once per block."""

    def __init__(self, cos: Tensor, sin: Tensor) -> None:
        half = sin.shape[-1] // 2
        self.cos = cos.unsqueeze(1)
        self.sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1).unsqueeze(1)
        self.half = half

    def apply(self, heads: Tensor) -> Tensor:
        return (heads * self.cos) + (heads.roll(self.half, dims=-1) * self.sin)
