"""The key/value cache adapter: the one module that knows transformers' cache classes and the keywords of a model's
forward.

Decoders (the fast engine, the server's batcher) hold a cache as an opaque object and change it only through these
functions: make one, keep some of its rows, stack two, drop leading padding, copy a shared prefix into many rows.

A buffered cache (:func:`buffer_cache_layer_class`) keeps each layer's keys and values in a preallocated buffer
``[batch, heads, capacity, dim]`` that grows in place, so a decode step writes one column instead of copying the cache,
and rows can be added to a running batch. It needs full attention in every layer (:func:`supports_buffer_cache`);
other models get transformers' plain cache, which can only shrink.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from personaxis.models import LoadedModel


def _new_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
        """A full-attention cache layer whose keys and values live in a preallocated buffer ``[batch, heads,
        capacity, dim]``; ``keys``/``values`` are views of its first ``length`` positions. Appending a token writes
        one column instead of copying the whole cache as ``torch.cat`` would."""

        def __init__(self, reserve: int = 0) -> None:
            super().__init__()
            self.reserve = reserve
            self.length = 0
            self.key_buffer: Tensor | None = None
            self.value_buffer: Tensor | None = None

        def _views(self) -> None:
            assert self.key_buffer is not None and self.value_buffer is not None
            self.keys = self.key_buffer[:, :, : self.length]
            self.values = self.value_buffer[:, :, : self.length]

        def _allocate(self, like: Tensor, batch: int, capacity: int) -> tuple[Tensor, Tensor]:
            # Left uninitialised: every position up to ``length`` is written before it is read (keys and values, or
            # zeros for padding), and the room after it is written by ``update`` as it fills.
            shape = (batch, like.shape[1], capacity, like.shape[3])
            return like.new_empty(shape), like.new_empty(shape)

        def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
            n = key_states.shape[-2]
            if self.key_buffer is None:
                self.device = key_states.device
                self.is_initialized = True
                self.key_buffer, self.value_buffer = self._allocate(key_states, key_states.shape[0], n + self.reserve)
            start = self.length
            self.make_room(n)
            assert self.key_buffer is not None and self.value_buffer is not None
            self.key_buffer[:, :, start : start + n] = key_states
            self.value_buffer[:, :, start : start + n] = value_states
            return self.keys, self.values

        def make_room(self, n: int) -> tuple[Tensor, Tensor]:
            """``n`` more positions at the end of the keys and values, left unwritten for the caller (a compiled
            decode step writes them), or ``-n`` positions given back; the views of all ``length`` positions, as
            ``update`` returns them. Only on a layer that already holds a buffer."""
            assert self.key_buffer is not None and self.value_buffer is not None
            if self.length + n > self.key_buffer.shape[2]:
                capacity = self.length + n + max(64, self.length // 4)
                keys, values = self._allocate(self.key_buffer, self.key_buffer.shape[0], capacity)
                keys[:, :, : self.length] = self.keys
                values[:, :, : self.length] = self.values
                self.key_buffer, self.value_buffer = keys, values
            self.length += n
            self._views()
            return self.keys, self.values

        def batch_select_indices(self, indices: Tensor) -> None:
            if self.key_buffer is not None and self.value_buffer is not None:
                indices = indices.to(self.key_buffer.device)  # layers of a sharded model live on several devices
                self.key_buffer = self.key_buffer.index_select(0, indices)
                self.value_buffer = self.value_buffer.index_select(0, indices)
                self._views()

        def trim_left(self, n: int) -> None:
            if n > 0 and self.key_buffer is not None and self.value_buffer is not None:
                self.key_buffer = self.key_buffer[:, :, n:]
                self.value_buffer = self.value_buffer[:, :, n:]
                self.length -= n
                self._views()

        @classmethod
        def from_tensors(cls, keys: Tensor, values: Tensor, reserve: int) -> Any:
            out = cls(reserve)
            out.device, out.is_initialized, out.length = keys.device, True, keys.shape[2]
            out.key_buffer, out.value_buffer = out._allocate(keys, keys.shape[0], out.length + reserve)
            out.key_buffer[:, :, : out.length] = keys
            out.value_buffer[:, :, : out.length] = values
            out._views()
            return out

        @classmethod
        def concat(cls, layers: Sequence[Any], reserve: int) -> Any:
            """Stack the rows of ``layers``, each left-padded with zeros (masked out) to the longest, in one new
            buffer."""
            length = max(layer.length for layer in layers)
            like = layers[0].key_buffer
            rows = sum(layer.key_buffer.shape[0] for layer in layers)
            out = cls(reserve)
            out.device, out.is_initialized, out.length = layers[0].device, True, length
            out.key_buffer, out.value_buffer = out._allocate(like, rows, length + reserve)
            start = 0
            for layer in layers:
                stop, pad = start + layer.key_buffer.shape[0], length - layer.length
                for buffer, source in ((out.key_buffer, layer.keys), (out.value_buffer, layer.values)):
                    buffer[start:stop, :, :pad].zero_()
                    buffer[start:stop, :, pad:length] = source
                start = stop
            out._views()
            return out

    return BufferLayer


_BUFFER_LAYER: type | None = None


def buffer_cache_layer_class() -> type:
    """The preallocated key/value cache layer (a subclass of transformers' ``DynamicLayer``, made on first use)."""
    global _BUFFER_LAYER
    if _BUFFER_LAYER is None:
        _BUFFER_LAYER = _new_layer_class()
    return _BUFFER_LAYER


def buffered_layers(cache: Any) -> list[Any] | None:
    """The cache's layers when every one is a buffered layer (:func:`buffer_cache_layer_class`) and the cache does
    not offload them, else None: a decode step may then give each layer its new keys and values through the layer's
    own ``update``, or take the new position with ``make_room`` and write it itself
    (:mod:`personaxis.generation.llama_step`, :mod:`personaxis.generation.fused_block`)."""
    layers = getattr(cache, "layers", None)
    buffer_layer = buffer_cache_layer_class()
    if not isinstance(layers, list) or getattr(cache, "offloading", False):
        return None
    return layers if all(type(layer) is buffer_layer for layer in layers) else None


def forward_kwargs(model: torch.nn.Module) -> tuple[str, bool]:
    """The cache keyword of this model's forward (``cache`` in recent transformers) and whether it takes
    ``logits_to_keep``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic wrappers
        return "past_key_values", False
    cache_kw = "cache" if "cache" in params else "past_key_values"
    return cache_kw, "logits_to_keep" in params


def kv_bytes_per_token(lm: LoadedModel) -> int:
    """Bytes of key/value cache one token takes in every layer of ``lm`` (keys and values, its dtype)."""
    cfg = lm.model.config
    text = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    n_layers = getattr(text, "num_hidden_layers", None) or lm.profile.n_layers
    heads = getattr(text, "num_attention_heads", None) or 1
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or lm.profile.hidden_size // max(1, heads)
    element = torch.finfo(lm.model.dtype).bits // 8 if lm.model.dtype.is_floating_point else 4
    return int(n_layers * 2 * kv_heads * head_dim * element)


def _plain_cache(model: torch.nn.Module) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def supports_buffer_cache(model: torch.nn.Module) -> bool:
    """Whether ``model`` can use buffered caches (and so admit rows into a running batch): full attention in every
    layer."""
    try:
        from transformers.cache_utils import DynamicLayer

        layers = _plain_cache(model).layers
        return len(layers) > 0 and all(type(layer) is DynamicLayer for layer in layers)
    except Exception:  # pragma: no cover - other transformers versions: fall back to plain caches
        return False


def new_cache(model: torch.nn.Module, reserve: int | None) -> Any:
    """An empty cache for ``model``: buffered, with room for ``reserve`` positions beyond the first input, or
    transformers' plain cache when ``reserve`` is None."""
    cache = _plain_cache(model)
    if reserve is not None:
        layer_class = buffer_cache_layer_class()
        cache.layers = [layer_class(reserve) for _ in cache.layers]
    return cache


def select_rows(cache: Any, index: Tensor) -> None:
    """Keep the rows ``index`` of ``cache``, in that order (in place)."""
    cache.batch_select_indices(index)


def trim_left(cache: Any, n: int) -> None:
    """Drop the first ``n`` positions of a buffered cache (padding in every row), in place."""
    for layer in cache.layers:
        layer.trim_left(n)


def stack(caches: Sequence[Any], reserve: int) -> Any:
    """The rows of buffered ``caches`` in order, in the first one (returned), each left-padded with zeros (masked
    out) to the longest; each layer gets room for ``reserve`` more positions. The others are left as they were."""
    layer_class = buffer_cache_layer_class()
    first = caches[0]
    for other in caches[1:]:
        if len(other.layers) != len(first.layers):
            raise ValueError(f"cannot stack caches of {len(first.layers)} and {len(other.layers)} layers")
    # Layer by layer, each old layer of the first cache dropped as soon as its replacement exists: the stacked cache
    # never sits beside the whole of the first (at 64 rows that was 330 MB more at the peak). All go into one new
    # buffer per layer: stacking them two at a time copied the first rows again for every cache after them.
    for i in range(len(first.layers)):
        first.layers[i] = layer_class.concat([cache.layers[i] for cache in caches], reserve)
    return first


def from_tensors(model: torch.nn.Module, keys: Iterable[Tensor], values: Iterable[Tensor], reserve: int) -> Any:
    """A new buffered cache holding ``keys`` and ``values`` (one ``[rows, heads, positions, dim]`` tensor per layer),
    with room for ``reserve`` more positions. Both are read one layer at a time: generators keep only one layer's
    tensors beside the new buffers."""
    layer_class = buffer_cache_layer_class()
    cache = _plain_cache(model)
    cache.layers = [layer_class.from_tensors(k, v, reserve) for k, v in zip(keys, values, strict=True)]
    return cache


def expand_rows(model: torch.nn.Module, prefix: Any, owner: Tensor, reserve: int) -> Any:
    """A new buffered cache whose row ``i`` is a copy of row ``owner[i]`` of ``prefix``, with room for ``reserve``
    more positions (a prefix shared by several prompts, computed once)."""
    keys = (layer.keys.index_select(0, owner.to(layer.keys.device)) for layer in prefix.layers)
    values = (layer.values.index_select(0, owner.to(layer.values.device)) for layer in prefix.layers)
    return from_tensors(model, keys, values, reserve)


def row_tensors(cache: Any, row: int, start: int, stop: int | None) -> tuple[list[Tensor], list[Tensor]]:
    """Copies of the keys and values of positions ``start:stop`` of row ``row``, one ``[heads, positions, dim]``
    tensor per layer."""
    keys = [layer.keys[row, :, start:stop].clone() for layer in cache.layers]
    values = [layer.values[row, :, start:stop].clone() for layer in cache.layers]
    return keys, values


def cache_bytes(cache: Any) -> int:
    """Bytes ``cache`` holds: its buffers (a buffered cache's spare room included), else its keys and values."""
    total = 0
    for layer in cache.layers:
        for name in ("key_buffer", "value_buffer", "keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, Tensor):
                total += t.numel() * t.element_size()
                if name == "value_buffer":
                    break
    return total
