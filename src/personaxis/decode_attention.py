"""Attention for one new token per row on the CPU, as two matrix products.

transformers runs attention through ``torch.nn.functional.scaled_dot_product_attention`` (its ``"sdpa"``
implementation). On the CPU that picks a flash-attention kernel written for long queries; for decoding, one query
per row against the key/value cache, it spent 457 µs per layer at 32 rows and ~130 cached positions (a fifth of the
quick preset's generation), mostly blocking and filling its work buffers. The same attention as a matrix product of
the query with the keys, a softmax and a product with the values reads the cache once and takes 121 µs, close to
what reading the cache from memory costs.

:func:`use_decode_attention` registers this as the model's attention implementation ``"personaxis_decode"`` (through
transformers' own ``AttentionInterface`` and ``AttentionMaskInterface``, with the masks of ``"sdpa"``). Every call
that is not one float32 query per row on the CPU, or that asks for something beyond a mask and a scale (dropout,
soft capping, attention sinks, a position bias), goes to the ``"sdpa"`` implementation unchanged. Decoder blocks, their
outputs and every hook on them stay as they are: results equal ``"sdpa"``'s up to float rounding (another summation
order; 6e-8 on the embedded model's first decode step).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

IMPLEMENTATION = "personaxis_decode"
# Keyword arguments the fast path cannot honour: the call goes to "sdpa" when one of them is set.
_DELEGATED = ("softcap", "s_aux", "sinks", "position_bias", "output_attentions")


def _sdpa(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(*args, **kwargs)


def decode_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' attention interface: ``query`` ``[rows, heads, 1, dim]``, ``key``/``value`` ``[rows, kv heads,
    positions, dim]`` (grouped-query heads share a key/value head), ``attention_mask`` boolean ``[rows, 1, 1,
    positions]`` (``True``: attend), additive float, or ``None``. Returns the output ``[rows, 1, heads, dim]`` and no
    weights. Anything else goes to ``"sdpa"``.

    Args:
        module: the attention module (passed on to ``"sdpa"``).
        query: the new tokens' queries.
        key: the cached keys, the new token's included.
        value: the cached values.
        attention_mask: which cached positions each row attends to.
        dropout: dropout probability (non-zero goes to ``"sdpa"``).
        scaling: the score scale (default ``dim ** -0.5``).
        **kwargs: passed on to ``"sdpa"``.

    Returns:
        The attention output and ``None``.
    """
    rows, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    if (
        length != 1
        or not query.is_cpu
        or query.dtype is not torch.float32  # "sdpa" accumulates half-precision inputs in float32; this would not
        or dropout
        or heads % kv_heads
        or any(kwargs.get(name) is not None and kwargs.get(name) is not False for name in _DELEGATED)
        or (attention_mask is not None and attention_mask.dim() != 4)
    ):
        return _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    blocked = None
    if attention_mask is not None:
        mask = attention_mask[..., -1:, :]
        blocked = ~mask if mask.dtype is torch.bool else mask
    return attend_one_token(query, key, value, blocked, dim**-0.5 if scaling is None else scaling), None


def attend_one_token(query: Tensor, key: Tensor, value: Tensor, blocked: Tensor | None, scaling: float) -> Tensor:
    """The arithmetic of :func:`decode_attention_forward` for arguments it has checked: ``query`` ``[rows, heads, 1,
    dim]`` float32 on the CPU, ``key``/``value`` ``[rows, kv heads, positions, dim]``, ``blocked`` ``[rows, 1, 1,
    positions]``, boolean (``True``: masked) or additive float, or None. Returns ``[rows, 1, heads, value dim]``. A
    caller that computes ``blocked`` once for every layer (:mod:`personaxis.generation.llama_step`) calls it
    directly; the two products are the batched products ``torch.matmul`` would make of these shapes."""
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(rows * kv_heads, heads // kv_heads, dim)  # the query heads of each key/value head
    scores = torch.bmm(grouped, key.flatten(0, 1).transpose(1, 2))  # [rows × kv heads, group, positions]
    scores.mul_(scaling)
    if blocked is not None:
        grid = scores.view(rows, kv_heads, -1, scores.shape[-1])  # [rows, kv heads, group, positions]
        if blocked.dtype is torch.bool:
            grid.masked_fill_(blocked, float("-inf"))
        else:
            grid.add_(blocked)
    output = torch.bmm(torch.softmax(scores, dim=-1), value.flatten(0, 1))  # [rows × kv heads, group, value dim]
    return output.view(rows, heads, 1, value.shape[-1]).transpose(1, 2).contiguous()


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, decode_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def _configs_using(model: nn.Module, implementation: str) -> list[Any]:
    """The configs of ``model``'s modules whose attention implementation is ``implementation``."""
    configs = [m.config for m in model.modules() if getattr(m, "config", None) is not None]
    return [c for c in configs if getattr(c, "_attn_implementation", None) == implementation]


def use_decode_attention(model: nn.Module) -> bool:
    """Run the model's attention through :func:`decode_attention_forward` where it used ``"sdpa"``; returns whether
    it changed (models on another implementation, ``"eager"`` or flash attention, are left alone)."""
    chosen = _configs_using(model, "sdpa")
    if chosen:
        _register()
    for config in chosen:
        config._attn_implementation = IMPLEMENTATION
    return bool(chosen)


def restore_attention(model: nn.Module) -> bool:
    """Undo :func:`use_decode_attention` (back to ``"sdpa"``); returns whether anything changed."""
    chosen = _configs_using(model, IMPLEMENTATION)
    for config in chosen:
        config._attn_implementation = "sdpa"
    return bool(chosen)


@contextmanager
def sdpa_attention(model: nn.Module) -> Iterator[None]:
    """Run transformers' own ``"sdpa"`` attention inside the block (benchmarks' plain baseline)."""
    changed = restore_attention(model)
    try:
        yield
    finally:
        if changed:
            use_decode_attention(model)
