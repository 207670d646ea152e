"""The decode step both decoders share (the fast engine and the server's batcher): the model call with a key/value
cache, and the rows' cache and attention mask as one :class:`DecodeBatch`.

A decode loop prefills prompts left-padded into a new cache, then repeats: extend the mask by one column and derive
each row's position from it (:meth:`DecodeBatch.extend`), feed each row its last token (:meth:`CachedForward.logits`,
last position only), drop rows that ended and the leading columns that are padding in every row
(:meth:`DecodeBatch.keep`), and stack newly prefilled rows onto the running ones (:meth:`DecodeBatch.stack`). Position
ids always come from the attention mask, which may have masked gaps (left padding, the gap after a shared prefix).
The cache itself is changed only through :mod:`personaxis.generation.cache`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from personaxis.generation import cache as kv
from personaxis.generation.llama_step import LlamaDecodeStep


def mask_positions(mask: Tensor) -> Tensor:
    """Position ids of every column of a left-padded attention mask ``[rows, width]``: real tokens count from 0,
    padding columns take 0."""
    return (mask.cumsum(dim=1) - 1).clamp(min=0)


@dataclass(frozen=True)
class CachedForward:
    """A model's forward with a key/value cache: its cache keyword, whether it can compute the logits of the last
    position only, and the step that replaces it for one token per row where it can (Llama-family models on the CPU,
    :mod:`personaxis.generation.llama_step`: the same outputs bit for bit, less Python)."""

    model: torch.nn.Module
    cache_kw: str
    has_logits_to_keep: bool
    step: LlamaDecodeStep | None = None

    @classmethod
    def of(cls, model: torch.nn.Module) -> CachedForward:
        cache_kw, has_logits_to_keep = kv.forward_kwargs(model)
        return cls(model, cache_kw, has_logits_to_keep, LlamaDecodeStep.of(model))

    def _step(self, ids: Tensor, cache: Any) -> LlamaDecodeStep | None:
        step = self.step
        return step if step is not None and step.usable(ids, cache) else None

    def _kwargs(self, ids: Tensor, mask: Tensor, positions: Tensor, cache: Any) -> dict[str, Any]:
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            self.cache_kw: cache,
            "use_cache": True,
        }

    def logits(self, ids: Tensor, mask: Tensor, positions: Tensor, cache: Any) -> Tensor:
        """Feed ``ids`` ``[rows, width]`` (``mask`` covers the cache and them) and return the logits of their last
        position, ``[rows, vocabulary]``."""
        step = self._step(ids, cache)
        if step is not None:
            logits = step.run(ids, mask, positions, cache, self.cache_kw)
            assert logits is not None
            return logits
        kwargs = self._kwargs(ids, mask, positions, cache)
        if self.has_logits_to_keep:
            width = ids.shape[1]
            # An index tensor, not ``1``: slicing the last position of a longer input leaves a non-contiguous
            # tensor, and the LM head then runs as one matrix-vector product per row (8× slower at batch 64).
            kwargs["logits_to_keep"] = 1 if width == 1 else torch.tensor([width - 1], device=ids.device)
        return self.model(**kwargs).logits[:, -1, :]

    def feed(self, ids: Tensor, mask: Tensor, positions: Tensor, cache: Any) -> None:
        """Feed ``ids`` into the cache and compute nothing else (for a model without an LM head: the blocks only)."""
        step = self._step(ids, cache)
        if step is not None:
            step.run(ids, mask, positions, cache, self.cache_kw)
        else:
            self.model(**self._kwargs(ids, mask, positions, cache))


class DecodeBatch:
    """Rows decoded side by side: their key/value cache and attention mask ``[rows, cache length]`` (long), kept in
    step. ``buffered``: the cache is a buffered one (:func:`personaxis.generation.cache.supports_buffer_cache`), which
    can drop leading padding and take new rows."""

    def __init__(self, cache: Any, mask: Tensor, *, buffered: bool) -> None:
        self.cache = cache
        self.mask = mask
        self.buffered = buffered

    def __len__(self) -> int:
        return int(self.mask.shape[0])

    @property
    def width(self) -> int:
        """Cache positions, padding included."""
        return int(self.mask.shape[1])

    def extend(self) -> Tensor:
        """Add one column (the token each row is fed next) to the mask; the position ids of that token, ``[rows,
        1]``."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self), 1))], dim=1)
        return (self.mask.sum(dim=1, keepdim=True) - 1).clamp(min=0)

    def release(self) -> None:
        """Drop the cache once every row is done, so that its memory is free before the next rows' prefill
        allocates theirs (a caller may still hold this batch)."""
        self.cache = None
        self.mask = self.mask[:0]

    def keep(self, index: Tensor) -> None:
        """Keep the rows ``index`` (in that order), then, in a buffered cache, drop the leading positions that are
        padding in every kept row."""
        kv.select_rows(self.cache, index)
        self.mask = self.mask.index_select(0, index)
        if not self.buffered:
            return
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start > 0:
            kv.trim_left(self.cache, start)
            self.mask = self.mask[:, start:]

    def stack(self, others: Sequence[DecodeBatch], reserve: int) -> None:
        """Add the rows of ``others`` after these, in order (buffered caches), the narrower left-padded; the cache
        keeps room for ``reserve`` more positions."""
        batches = [self, *others]
        width = max(batch.width for batch in batches)

        def pad(mask: Tensor) -> Tensor:
            return torch.nn.functional.pad(mask, (width - mask.shape[1], 0), value=0)

        self.cache = kv.stack([batch.cache for batch in batches], reserve)
        self.mask = torch.cat([pad(batch.mask) for batch in batches])
