"""How the fast engine computes a prefill chunk: which prompts share a prefix computed once, and which prompts (or
the rest of them after a shared prefix) are left-padded together in one forward.

Both choices minimise one cost, the tokens computed with padding included, where every forward counts as
:data:`PREFILL_CALL_TOKENS` more (the fixed cost of its Python and kernel calls in every layer):

- :func:`length_buckets` splits prompts into groups of similar length, one forward each;
- :func:`prefix_groups` finds the prompts that share a prefix (a role's system prompt, the chat template's built-in
  one), chosen by dynamic programming over the prompts in sorted order, whatever the prefix's length: a short role
  prompt shared by twelve questions saves as much as a long one shared by two.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# A prefill forward costs about as much as this many more padded tokens: the fixed cost of its Python and kernel
# calls in every layer. Prompts of a chunk are split into groups of similar length (:func:`length_buckets`), one
# forward each, when that saves more padding than the added forwards cost.
PREFILL_CALL_TOKENS = 16
# What a shared prefix costs beyond its tokens, in tokens: its row in the forward of all prefixes is padded to the
# longest prefix, and each member's cache keeps that padding as a masked gap. A group must save more than this.
GROUP_TOKENS = 8
# Shared prefixes are used when the chunk's plan with them computes at least this fraction fewer tokens than without.
SHARED_PLAN_SAVING = 0.1


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """The number of leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def length_buckets(lengths: Sequence[int], call_tokens: int | None = None) -> list[list[int]]:
    """Indices of ``lengths`` (prompts left-padded to their group's longest in one forward each) split into groups,
    longest first: the split with the fewest tokens computed, padding included, plus ``call_tokens`` per group
    (default :data:`PREFILL_CALL_TOKENS`).

    Groups are runs of the lengths sorted longest first (a best split always is); found by dynamic programming over
    the sorted lengths, ``len(lengths)²`` steps (vectorised: a few milliseconds for a thousand prompts).
    """
    call_tokens = PREFILL_CALL_TOKENS if call_tokens is None else call_tokens
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    longest = np.array([lengths[i] for i in order], dtype=np.int64)  # a run starting here is padded to this
    best = np.zeros(n + 1, dtype=np.int64)  # best[end]: the least cost of the first ``end`` sorted lengths
    start_of = [0] * (n + 1)
    for end in range(1, n + 1):
        starts = np.arange(end)
        costs = best[:end] + call_tokens + (end - starts) * longest[:end]
        start = int(np.argmin(costs))
        best[end], start_of[end] = costs[start], start
    groups: list[list[int]] = []
    end = n
    while end > 0:
        groups.append(order[start_of[end] : end])
        end = start_of[end]
    return groups[::-1]


def buckets_cost(lengths: Sequence[int], call_tokens: int | None = None) -> int:
    """Tokens computed (padding and :data:`PREFILL_CALL_TOKENS` per forward included) when ``lengths`` are
    prefilled as :func:`length_buckets` splits them; 0 for none."""
    call_tokens = PREFILL_CALL_TOKENS if call_tokens is None else call_tokens
    return sum(call_tokens + len(g) * max(lengths[i] for i in g) for g in length_buckets(lengths, call_tokens))


def _sorted_with_common_prefixes(prompts: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
    """Prompt indices in sorted order, and for each the tokens it shares with the one before it (0 for the first)."""
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    common = [0] + [common_prefix_length(prompts[a], prompts[b]) for a, b in zip(order, order[1:], strict=False)]
    return order, common


def shared_prefix_tokens(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens that computing every shared prefix once would save: in sorted order, what each prompt shares with the
    one before it (each keeping a token of its own). ``n log n``, for any number of prompts."""
    order, common = _sorted_with_common_prefixes(prompts)
    return sum(min(c, len(prompts[i]) - 1) for i, c in zip(order, common, strict=True))


def prefix_groups(prompts: Sequence[Sequence[int]], *, check_cost: bool = True) -> list[tuple[list[int], int]]:
    """Groups of prompt indices that share a prefix, each with that prefix's length (every member keeps at least one
    token of its own): the grouping that computes the fewest tokens, :data:`GROUP_TOKENS` counted per group.

    Groups are runs of the prompts in sorted order, and a run shares the shortest common prefix of its neighbours;
    the best runs are found by dynamic programming (``len(prompts)²`` steps, vectorised). With ``check_cost``, the
    groups are returned only when the chunk's whole plan with them (a forward of the prefixes, then the members'
    remaining tokens and the other prompts, each split by :func:`length_buckets`) computes :data:`SHARED_PLAN_SAVING`
    fewer tokens than the plan without; else none.
    """
    n = len(prompts)
    order, common_list = _sorted_with_common_prefixes(prompts)
    lengths = np.array([len(prompts[i]) for i in order], dtype=np.int64)
    common = np.array(common_list, dtype=np.int64)
    total = np.concatenate([[0], np.cumsum(lengths)])
    best = np.zeros(n + 1, dtype=np.int64)  # best[end]: the least cost of the first ``end`` sorted prompts
    start_of, shared_of = [0] * (n + 1), [0] * (n + 1)
    for end in range(1, n + 1):
        best[end], start_of[end] = best[end - 1] + lengths[end - 1], end - 1
        if end < 2:
            continue
        # Runs ``start … end - 1`` for start = end - 2 down to 0: what each shares is the least of its members'
        # common prefixes with their predecessors and of its members' lengths less one.
        starts = np.arange(end - 2, -1, -1)
        bounds = np.minimum(common[starts + 1], lengths[starts] - 1)
        shared = np.minimum(np.minimum.accumulate(bounds), lengths[end - 1] - 1)
        costs = best[starts] + total[end] - total[starts] - (end - starts - 1) * shared + GROUP_TOKENS
        costs[shared <= 0] = np.iinfo(np.int64).max  # a run that shares nothing is no group
        pick = int(np.argmin(costs))
        if costs[pick] < best[end]:
            best[end], start_of[end], shared_of[end] = costs[pick], int(starts[pick]), int(shared[pick])
    groups: list[tuple[list[int], int]] = []
    end = n
    while end > 0:
        start = start_of[end]
        if end - start > 1:
            groups.append((order[start:end], shared_of[end]))
        end = start
    groups.reverse()
    if not groups or not check_cost:
        return groups
    grouped = {i for members, _ in groups for i in members}
    rests = [len(prompts[i]) - length for members, length in groups for i in members]
    alone = [len(p) for i, p in enumerate(prompts) if i not in grouped]
    with_groups = PREFILL_CALL_TOKENS + len(groups) * max(n for _, n in groups) + buckets_cost(rests)
    with_groups += buckets_cost(alone)
    without = buckets_cost([len(p) for p in prompts])
    return groups if with_groups <= (1 - SHARED_PLAN_SAVING) * without else []
