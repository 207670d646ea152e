"""Prompt prefixes the batcher has already read: their key/value cache and projections, reused by later requests.

Requests to a chat server share the start of their prompt — the chat template's system turn alone is most of a short
question's tokens on SmolLM2 (29 of about 37). A prefix's keys and values depend only on its tokens, their positions
(every prompt starts at position 0, whatever its left padding) and the interventions acting on the prompt, so the
batcher keeps the start (up to ``MAX_TOKENS``) of the last prompt it read per treatment, for a few treatments, and
starts a group of joining requests that share its first
tokens from those positions instead of recomputing them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from personaxis.generation import cache as kv
from personaxis.generation.prefill_plan import common_prefix_length

MIN_PREFIX = 8  # shorter shared starts are not worth the copy
MAX_ENTRIES = 4  # treatments remembered
MAX_TOKENS = 256  # of each remembered prompt: the cache holds at most MAX_ENTRIES × MAX_TOKENS positions


@dataclass(frozen=True)
class Prefix:
    tokens: list[int]
    interventions: object  # the treatment's operators (the same object for requests of the same treatment)
    keys: list[Tensor]  # per layer [heads, tokens, dim]
    values: list[Tensor]
    projections: list[float]  # at the monitored layer, one per token


class PrefixCache:
    def __init__(self) -> None:
        self._entries: OrderedDict[int, Prefix] = OrderedDict()
        self.hits = 0  # groups started from a cached prefix
        self.tokens_reused = 0  # prompt positions not recomputed

    def clear(self) -> None:
        self._entries.clear()

    def lookup(self, prompts: Sequence[Sequence[int]], interventions: Sequence[object]) -> tuple[Prefix, int] | None:
        """The cached prefix every prompt starts with and how many of its tokens they share (at least one prompt
        token is left to read, so that the pass gives logits), or ``None``."""
        first = interventions[0]
        if any(i is not first for i in interventions):
            return None
        entry = self._entries.get(id(first))
        if entry is None or entry.interventions is not first:
            return None
        shared = min(common_prefix_length(entry.tokens, p) for p in prompts)
        shared = min(shared, min(len(p) for p in prompts) - 1)
        return (entry, shared) if shared >= MIN_PREFIX else None

    def store(
        self, prompt: Sequence[int], interventions: object, cache: Any, row: int, projections: list[float]
    ) -> None:
        """Remember the prompt of ``row`` of a prefilled group (its positions are the last ``len(prompt)`` of the
        cache, left-padded)."""
        n = len(prompt)
        prompt, projections = prompt[:MAX_TOKENS], projections[:MAX_TOKENS]
        end = -n + len(prompt) or None
        keys, values = kv.row_tensors(cache, row, -n, end)
        self._entries[id(interventions)] = Prefix(list(prompt), interventions, keys, values, list(projections))
        self._entries.move_to_end(id(interventions))
        while len(self._entries) > MAX_ENTRIES:
            self._entries.popitem(last=False)

    def start(
        self, prefix: Prefix, shared: int, lengths: Sequence[int], width: int
    ) -> tuple[list[Tensor], list[Tensor], int, Tensor]:
        """Keys and values (per layer ``[rows, heads, fed, dim]``) for a left-padded group whose prompts
        (``lengths``, padded to ``width``) all start with ``shared`` tokens of ``prefix``: the first ``fed`` columns
        filled (the longest prompt's prefix; shorter prompts' prefixes wherever they fall in those columns), ``fed``,
        and the projections of those columns."""
        fed = width - max(lengths) + shared
        rows = len(lengths)
        projections = torch.zeros(rows, fed)
        all_keys, all_values = [], []
        for k, v in zip(prefix.keys, prefix.values, strict=True):
            keys = k.new_zeros((rows, k.shape[0], fed, k.shape[2]))
            values = torch.zeros_like(keys)
            for i, n in enumerate(lengths):
                start = width - n
                stop = min(start + shared, fed)
                if stop > start:
                    keys[i, :, start:stop] = k[:, : stop - start]
                    values[i, :, start:stop] = v[:, : stop - start]
            all_keys.append(keys)
            all_values.append(values)
        reading = torch.tensor(prefix.projections[:shared], dtype=projections.dtype)
        for i, n in enumerate(lengths):
            start = width - n
            stop = min(start + shared, fed)
            if stop > start:
                projections[i, start:stop] = reading[: stop - start]
        self.hits += 1
        self.tokens_reused += shared * rows
        return all_keys, all_values, fed, projections.to(prefix.keys[0].device)
