"""The fast engine (``engine="fast"``, the default): a decode loop over the model's own forward with a key/value cache,
logits for the last position only, and continuous batching.

Prompts are prefilled in chunks; a prefix shared by several prompts of a chunk (a role's system prompt, the template's
built-in one) is computed once and its cache copied to each of them, and prompts of similar length are padded together
(:mod:`personaxis.generation.prefill_plan` chooses both by the tokens they compute). A row leaves the batch when it ends
(an end-of-turn token or ``max_new_tokens``) and waiting prompts take its place, so the batch stays full and no compute
goes to finished answers. The cache lives in preallocated buffers that grow in place (no copy of the whole cache per
token); rows are dropped and added by reindexing it, new rows left-padded to the batch's current length. Position ids
always come from the attention mask, which may have masked gaps (between a shared prefix and the rest of a prompt, or
left padding). The decode step (model call, mask, dropping and stacking rows) is the one the server's batcher uses too,
:mod:`personaxis.generation.decode`; the cache itself is handled through :mod:`personaxis.generation.cache`.

With a :class:`personaxis.capture.ResponseCapture`, the engine records the block outputs of the generated tokens as it
feeds them back (one more step, the blocks only, for last tokens generation never feeds back), so that response
activations need no second pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from personaxis.activations import pad_batch
from personaxis.generation import cache as kv
from personaxis.generation.decode import CachedForward, DecodeBatch, mask_positions
from personaxis.generation.prefill_plan import length_buckets, prefix_groups, shared_prefix_tokens
from personaxis.generation.sampling import (
    SamplingConfig,
    answer_generator,
    greedy_tokens,
    pad_token_id,
    sample_tokens,
)
from personaxis.hooks import residual_hooks
from personaxis.models import LoadedModel

if TYPE_CHECKING:
    from personaxis.capture import ResponseCapture

# Tokens per prefill forward (rows × padded prompt length) and bytes of key/value cache per running batch: they bound
# memory for long prompts; the batch shrinks below ``batch_size`` only when prompts are long.
PREFILL_TOKENS = 8192
KV_CACHE_BYTES = 2 * 1024**3  # the budget on CPUs, and the least one on GPUs
KV_CACHE_GPU_FRACTION = 0.5  # on a GPU the budget grows to this fraction of its free memory


def kv_cache_budget(device: torch.device) -> int:
    """Bytes of key/value cache one running batch may hold on ``device``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(KV_CACHE_BYTES, int(free * KV_CACHE_GPU_FRACTION))
    return KV_CACHE_BYTES


# A finished row stays in the batch (computing nothing useful) until this fraction of the batch has finished, then
# finished rows are dropped and waiting prompts admitted in one go: reindexing the cache costs about as much as a
# few decode steps, so doing it for every single finished row would not pay.
REFILL_FRACTION = 1 / 8


class _Batch(DecodeBatch):
    """Rows being generated side by side: their cache and attention mask (:class:`DecodeBatch`), next input token
    and output so far."""

    def __init__(
        self,
        rows: list[int],
        cache: Any,
        mask: Tensor,
        next_tokens: Tensor,
        outputs: list[list[int]],
        *,
        buffered: bool,
    ):
        super().__init__(cache, mask, buffered=buffered)
        self.rows = rows  # prompt indices
        self.next_tokens = next_tokens  # [batch]: the last sampled token, the input of the next step
        self.outputs = outputs
        self.finished = [False] * len(rows)

    @property
    def n_finished(self) -> int:
        return sum(self.finished)


class FastEngine:
    """One call of the fast engine over a list of tokenised prompts: :meth:`run` returns their new token ids.

    Interventions, when any, are applied by the caller around :meth:`run` (they act on every forward call the engine
    makes, at every non-padding position). The batch holds at most ``config.batch_size`` rows, fewer when the key/value
    cache of that many rows would exceed :func:`kv_cache_budget` (``max_rows``).

    Args:
        lm: the model.
        prompts: tokenised prompts (each at least one token).
        config: sampling settings; sampled answer ``i`` draws from ``answer_generator(config.seed, i)``.
        stop_ids: token ids that end an answer.
        min_new_tokens: no stop token before this many new tokens.
        on_done: called with 1 as each answer finishes.
        capture: records the block outputs of the generated tokens (see :mod:`personaxis.capture`).
    """

    def __init__(
        self,
        lm: LoadedModel,
        prompts: Sequence[Sequence[int]],
        config: SamplingConfig,
        *,
        stop_ids: Sequence[int],
        min_new_tokens: int = 0,
        on_done: Callable[[int], Any] | None = None,
        capture: ResponseCapture | None = None,
    ) -> None:
        stops = [int(s) for s in stop_ids]
        min_new = min_new_tokens
        self.lm = lm
        self.capture = capture
        self.model = lm.model
        self.prompts = [list(p) for p in prompts]
        self.config = config
        self.device = lm.device
        self.stops = stops
        self.stop_tensor = torch.tensor(stops, dtype=torch.long, device=self.device)
        self.min_new = min_new
        self.on_done = on_done
        self.pad_id = pad_token_id(lm.tokenizer)
        self.forward = CachedForward.of(self.model)
        self.blocks = CachedForward.of(lm.base_model)  # no LM head
        self.buffered = kv.supports_buffer_cache(self.model)
        self.results: list[list[int] | None] = [None] * len(prompts)
        self.generators: dict[int, torch.Generator] = {}
        self.queue = self._order()
        longest = max(len(p) for p in self.prompts)
        kv_rows = kv_cache_budget(torch.device(self.device)) // max(
            1, kv.kv_bytes_per_token(lm) * (longest + config.max_new_tokens)
        )
        self.max_rows = max(1, min(config.batch_size, kv_rows))

    # -- setup ----------------------------------------------------------------------------------------------------

    def _order(self) -> list[int]:
        """The order prompts join the batch. When computing every shared prefix once would save a fifth or more of
        all prompt tokens (system prompts), prompts are queued in sorted order, those sharing a prefix together, so
        that each prefill chunk computes it once; otherwise longest first, so that each prefill chunk holds prompts
        of similar length."""
        indices = range(len(self.prompts))
        if self.buffered and len(self.prompts) > 1:
            if shared_prefix_tokens(self.prompts) >= 0.2 * sum(len(p) for p in self.prompts):
                return sorted(indices, key=lambda i: self.prompts[i])
        return sorted(indices, key=lambda i: -len(self.prompts[i]))

    # -- model calls ----------------------------------------------------------------------------------------------

    def _choose(self, logits: Tensor, batch_rows: list[int], n_generated: list[int]) -> Tensor:
        """Next token per row: greedy argmax, or temperature / top-p sampling. ``logits`` are this step's own (the
        stop tokens of rows below ``min_new_tokens`` are masked in place, not in a copy of the whole vocabulary)."""
        if self.min_new and self.stops:
            early = [i for i, n in enumerate(n_generated) if n < self.min_new]
            if len(early) == len(n_generated):
                logits.index_fill_(1, self.stop_tensor, -math.inf)
            elif early:
                rows = torch.tensor(early, dtype=torch.long, device=logits.device)
                logits[rows.unsqueeze(1), self.stop_tensor.unsqueeze(0)] = -math.inf
        if self.config.temperature == 0:
            return greedy_tokens(logits)
        uniform = self._uniforms(batch_rows, logits.device)
        return sample_tokens(logits, self.config.temperature, self.config.top_p, uniform)

    def _uniforms(self, batch_rows: list[int], device: torch.device) -> Tensor:
        """One uniform draw per row: from the answer's own seeded generator, or the global one without a seed."""
        if self.config.seed is None:
            return torch.rand(len(batch_rows), device=device)
        out = []
        for row in batch_rows:
            generator = self.generators.get(row)
            if generator is None:
                generator = answer_generator(self.config.seed, row)
                self.generators[row] = generator
            out.append(torch.rand(1, generator=generator))
        return torch.cat(out).to(device)

    # -- batch bookkeeping ----------------------------------------------------------------------------------------

    def _prefill(self, rows: list[int]) -> _Batch:
        """Run the prompts of ``rows`` and sample their first tokens; shared prefixes are computed once, and prompts
        (or the rest of them after a shared prefix) of similar length are padded together, one forward each."""
        groups = prefix_groups([self.prompts[i] for i in rows]) if self.buffered and len(rows) > 1 else []
        grouped = {i for group, _ in groups for i in group}
        shared = [n for _, n in groups]
        members = [(g, rows[i]) for g, (group, _) in enumerate(groups) for i in group]
        rest = [row for i, row in enumerate(rows) if i not in grouped]
        member_buckets = self._buckets([len(self.prompts[row]) - shared[g] for g, row in members])
        rest_buckets = self._buckets([len(self.prompts[row]) for row in rest])
        # One forward's cache keeps room for the new tokens; several are stacked with that room at the end.
        alone = len(member_buckets) + len(rest_buckets) == 1
        reserve = self.config.max_new_tokens if alone else 0
        batches = []
        if groups:
            parts = [[members[i] for i in bucket] for bucket in member_buckets]
            batches += self._prefill_shared([[rows[i] for i in group] for group, _ in groups], shared, parts, reserve)
        batches += [self._prefill_padded([rest[i] for i in bucket], reserve) for bucket in rest_buckets]
        return self._merge(batches[0], batches[1:]) if len(batches) > 1 else batches[0]

    def _buckets(self, lengths: list[int]) -> list[list[int]]:
        """Groups of similar ``lengths`` (indices), each prefilled in one forward (:func:`length_buckets`); one group
        where caches cannot be stacked, none for no lengths."""
        if not lengths:
            return []
        return length_buckets(lengths) if self.buffered else [list(range(len(lengths)))]

    def _prefill_padded(self, rows: list[int], reserve: int) -> _Batch:
        """Prefill ``rows`` left-padded to the longest, in one forward; a buffered cache keeps room for ``reserve``
        more positions."""
        ids, mask, positions, _ = pad_batch(
            [self.prompts[i] for i in rows], self.pad_id, side="left", device=self.device
        )
        cache = kv.new_cache(self.model, reserve if self.buffered else None)
        logits = self.forward.logits(ids, mask, positions, cache)
        return self._start(rows, cache, mask, logits)

    def _prefill_shared(
        self, groups: list[list[int]], shared: list[int], parts: list[list[tuple[int, int]]], reserve: int
    ) -> list[_Batch]:
        """Compute each group's common prefix once (one forward for all groups, no LM head), then, one forward per
        part (``(group, row)`` pairs whose remaining tokens are of similar length), copy its cache into every
        member's row and run the members' remaining tokens; each cache keeps room for ``reserve`` more positions. A
        row's cache reads ``[padding, prefix, padding, rest]``: the gap in the middle is masked, and positions still
        count real tokens only."""
        prefixes = [self.prompts[group[0]][:n] for group, n in zip(groups, shared, strict=True)]
        p_ids, p_mask, p_pos, _ = pad_batch(prefixes, self.pad_id, side="left", device=self.device)
        prefix_cache = kv.new_cache(self.model, 0)
        self.blocks.feed(p_ids, p_mask, p_pos, prefix_cache)
        batches = []
        for part in parts:
            owner = torch.tensor([g for g, _ in part], dtype=torch.long, device=self.device)
            rests = [self.prompts[row][shared[g] :] for g, row in part]
            s_ids, s_mask, _, _ = pad_batch(rests, self.pad_id, side="left", device=self.device)
            mask = torch.cat([p_mask.index_select(0, owner), s_mask], dim=1)
            positions = mask_positions(mask)[:, p_ids.shape[1] :]
            cache = kv.expand_rows(self.model, prefix_cache, owner, s_ids.shape[1] + reserve)
            logits = self.forward.logits(s_ids, mask, positions, cache)
            batches.append(self._start([row for _, row in part], cache, mask, logits))
        return batches

    def _start(self, rows: list[int], cache: Any, mask: Tensor, logits: Tensor) -> _Batch:
        tokens = self._choose(logits, rows, [0] * len(rows))
        batch = _Batch(rows, cache, mask, tokens, [[] for _ in rows], buffered=self.buffered)
        self._record(batch, tokens)
        return batch

    def _record(self, batch: _Batch, tokens: Tensor) -> None:
        """Append the sampled tokens and mark rows that ended."""
        is_stop = torch.isin(tokens, self.stop_tensor) if self.stops else torch.zeros_like(tokens, dtype=torch.bool)
        for i, (token, stop) in enumerate(zip(tokens.tolist(), is_stop.tolist(), strict=True)):
            if batch.finished[i]:
                continue
            out = batch.outputs[i]
            out.append(token)
            if (stop and len(out) > self.min_new) or len(out) >= self.config.max_new_tokens:
                batch.finished[i] = True
                self.results[batch.rows[i]] = out
                self.generators.pop(batch.rows[i], None)
                if self.on_done is not None:
                    self.on_done(1)

    def _select(self, batch: _Batch, keep: list[int]) -> _Batch:
        """Keep the rows ``keep`` of ``batch`` (in place), their cache trimmed of leading padding."""
        if len(keep) == len(batch):
            return batch
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        batch.keep(index)
        batch.rows = [batch.rows[i] for i in keep]
        batch.next_tokens = batch.next_tokens.index_select(0, index)
        batch.outputs = [batch.outputs[i] for i in keep]
        batch.finished = [batch.finished[i] for i in keep]
        return batch

    def _merge(self, a: _Batch, others: Sequence[_Batch]) -> _Batch:
        """The rows of ``others`` stacked after those of ``a`` (in ``a``), with room for ``max_new_tokens`` more
        positions."""
        a.stack(others, self.config.max_new_tokens)
        for b in others:
            a.rows = a.rows + b.rows
            a.outputs = a.outputs + b.outputs
            a.finished = a.finished + b.finished
        a.next_tokens = torch.cat([a.next_tokens, *(b.next_tokens for b in others)])
        return a

    def _admit(self, batch: _Batch | None, n: int) -> _Batch | None:
        """Prefill up to ``n`` queued prompts, in chunks of at most ``PREFILL_TOKENS`` tokens, and add them."""
        while n > 0 and self.queue:
            width = len(self.prompts[self.queue[0]])
            take = max(1, min(n, len(self.queue), PREFILL_TOKENS // max(1, width)))
            if batch is not None and not self.buffered:
                break  # plain caches cannot take new rows: wait for an empty batch
            rows, self.queue = self.queue[:take], self.queue[take:]
            n -= take
            new = self._prefill(rows)
            batch = new if batch is None else self._merge(batch, [new])
        return batch

    def _refill(self, batch: _Batch | None) -> _Batch | None:
        """Drop finished rows and admit waiting prompts once enough rows have finished."""
        if batch is None:
            return self._admit(None, self.max_rows)
        live = len(batch) - batch.n_finished
        free = self.max_rows - live
        threshold = max(1, math.ceil(self.max_rows * REFILL_FRACTION))
        can_admit = bool(self.queue) and (self.buffered or live == 0)
        wants_admit = can_admit and free >= min(threshold, len(self.queue))
        if live == 0:
            if self._unfed(batch):
                self._step(batch, sample=False)  # the blocks only, for the capture of the last tokens
            batch.release()  # before the next rows' cache is allocated, not after (the peak held both)
            return self._admit(None, self.max_rows) if self.queue else None
        if wants_admit or batch.n_finished >= max(1, math.ceil(len(batch) * REFILL_FRACTION)):
            unfed = self._unfed(batch)  # they stay until the next step has fed their last token
            batch = self._select(batch, [i for i, done in enumerate(batch.finished) if not done or i in unfed])
        if wants_admit:
            batch = self._admit(batch, free)
        return batch

    def _step(self, batch: _Batch, *, sample: bool = True) -> None:
        """Feed each row its last token; with ``sample``, choose and record the next one (else run the blocks only,
        for a capture of tokens that generation itself would not feed back)."""
        positions = batch.extend()
        self._plan_capture(batch)
        try:
            if not sample:
                self.blocks.feed(batch.next_tokens.unsqueeze(1), batch.mask, positions, batch.cache)
                return
            logits = self.forward.logits(batch.next_tokens.unsqueeze(1), batch.mask, positions, batch.cache)
        finally:
            if self.capture is not None:
                self.capture.end_step()
        tokens = self._choose(logits, batch.rows, [len(o) for o in batch.outputs])
        batch.next_tokens = tokens
        self._record(batch, tokens)

    # -- capture of the generated tokens' block outputs -----------------------------------------------------------

    def _capture_rows(self, batch: _Batch) -> list[int]:
        """Rows whose input token of the next step is still to be recorded: every running row, and finished rows
        whose last token (not an end-of-turn token) was not fed back yet."""
        assert self.capture is not None
        stops = set(self.stops)
        return [
            i
            for i, (row, out) in enumerate(zip(batch.rows, batch.outputs, strict=True))
            if self.capture.wants(row, len(out) - 1) and not (batch.finished[i] and out[-1] in stops)
        ]

    def _plan_capture(self, batch: _Batch) -> None:
        if self.capture is not None:
            rows = self._capture_rows(batch)
            self.capture.begin_step(rows, [batch.rows[i] for i in rows], [len(batch.outputs[i]) - 1 for i in rows])

    def _unfed(self, batch: _Batch) -> set[int]:
        """Finished rows whose last token a capture still needs fed back."""
        if self.capture is None:
            return set()
        return {i for i in self._capture_rows(batch) if batch.finished[i]}

    def run(self) -> list[list[int]]:
        """Generate every answer; one list of new token ids per prompt (in the order of the prompts), up to and
        including the stop token that ended it."""
        with residual_hooks(self.lm, readers=self.capture.readers()) if self.capture is not None else nullcontext():
            if self.capture is not None:
                self.capture.start(self.prompts, self.config.max_new_tokens)
            batch = self._refill(None)
            while batch is not None:
                if batch.n_finished < len(batch):
                    self._step(batch)
                batch = self._refill(batch)
        assert all(r is not None for r in self.results)
        results = [r for r in self.results if r is not None]
        if self.capture is not None:
            self.capture.finish(results)
        return results
