"""Batched chat generation with optional interventions.

Two engines give the same greedy text (exactly in float64; in float32 up to rounding in near-ties, none seen in the
benchmark's comparisons):

- ``"fast"`` (the default): a decode loop over the model's own forward with a key/value cache, logits for the last
  position only, and continuous batching. Prompts are prefilled in chunks; a prefix shared by several prompts of a
  chunk (a role's system prompt, the template's built-in one) is computed once and its cache copied to each of them.
  A row leaves the batch when it ends (an end-of-turn token or ``max_new_tokens``) and waiting prompts take its
  place, so the batch stays full and no compute goes to finished answers. The cache lives in preallocated buffers
  that grow in place (no copy of the whole cache per token); rows are dropped and added by reindexing it, new rows
  left-padded to the batch's current length. Position ids always come from the attention mask, which may have
  masked gaps (between a shared prefix and the rest of a prompt, or left padding).
- ``"hf"``: transformers' ``model.generate`` on length-sorted static batches (kept for comparison).

With a :class:`personaxis.capture.ResponseCapture`, the fast engine records the block outputs of the generated tokens
as it feeds them back (one more step, the blocks only, for last tokens generation never feeds back), so that response
activations need no second pass.

Interventions (steering, capping) are active at every position, prompt and generated alike, never at padding: every
forward call passes ``attention_mask=`` of shape ``[batch, past + current]``, which the hooks of
:mod:`personaxis.hooks` read. Sampling (``temperature > 0``) draws each answer from its own generator seeded from
``(seed, prompt index)``, so a seeded answer does not depend on the batch it happened to run in.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from personaxis.activations import length_batches, pad_batch
from personaxis.chat import Conversation, render_prompt
from personaxis.hooks import residual_hooks
from personaxis.interventions import Interventions, apply_interventions
from personaxis.models import LoadedModel
from personaxis.progress import progress_bar

if TYPE_CHECKING:
    from personaxis.capture import ResponseCapture

_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")

Engine = Literal["fast", "hf"]
ENGINES: tuple[str, ...] = ("fast", "hf")

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
# Prompts that share a prefix of at least this many tokens (a system prompt, the chat template's own preamble) have it
# computed once per prefill chunk, when that saves at least a fifth of the chunk's prefill work.
MIN_SHARED_PREFIX = 16
# Top-p looks at this many most likely tokens first and sorts the whole vocabulary only for rows they do not cover.
_TOP_P_CANDIDATES = 256


@dataclass(frozen=True)
class SamplingConfig:
    """How to generate: greedy when ``temperature == 0``; sampled answers are seeded from ``seed`` and their index.

    ``batch_size`` is the number of answers generated side by side (the fast engine keeps that many running).
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = 0
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int
    stopped: bool  # ended on an end-of-turn token (False: cut at max_new_tokens)


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn for this tokenizer."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for token in _END_OF_TURN_TOKENS:
        if token in vocab:
            ids.add(int(vocab[token]))
    return sorted(ids)


def _decode(tokenizer: Any, new_ids: list[int], stops: set[int]) -> tuple[str, int, bool]:
    for i, token in enumerate(new_ids):
        if token in stops:
            return tokenizer.decode(new_ids[:i], skip_special_tokens=True), i, True
    return tokenizer.decode(new_ids, skip_special_tokens=True), len(new_ids), False


@torch.inference_mode()
def generate(
    lm: LoadedModel,
    conversations: Sequence[Conversation],
    config: SamplingConfig | None = None,
    *,
    interventions: Interventions | None = None,
    show_progress: bool = False,
    desc: str = "generate",
    engine: Engine = "fast",
    capture: ResponseCapture | None = None,
) -> list[Generation]:
    """Generate one assistant answer for each conversation (each must end with a user turn). ``capture`` records the
    answers' block outputs as they are generated (fast engine only; see :mod:`personaxis.capture`)."""
    config = config or SamplingConfig()
    prompts = [render_prompt(lm.tokenizer, c, lm.profile) for c in conversations]
    limit = lm.profile.max_context
    for i, prompt in enumerate(prompts):
        if limit and len(prompt) + config.max_new_tokens > limit:
            raise ValueError(
                f"prompt {i} has {len(prompt)} tokens: with {config.max_new_tokens} new tokens it exceeds the context of {limit}"
            )
    stops = stop_token_ids(lm.tokenizer)
    stop_set = set(stops)
    bar = progress_bar(total=len(prompts), desc=desc, unit="answer", disable=not show_progress)
    try:
        new = generate_ids(
            lm,
            prompts,
            config,
            interventions=interventions,
            stop_ids=stops,
            engine=engine,
            on_done=bar.update,
            capture=capture,
        )
    finally:
        bar.close()
    results = []
    for prompt, ids in zip(prompts, new, strict=True):
        text, n_new, stopped = _decode(lm.tokenizer, ids, stop_set)
        results.append(Generation(text=text, prompt_tokens=len(prompt), new_tokens=n_new, stopped=stopped))
    return results


@torch.inference_mode()
def generate_ids(
    lm: LoadedModel,
    prompts: Sequence[Sequence[int]],
    config: SamplingConfig | None = None,
    *,
    interventions: Interventions | None = None,
    stop_ids: Sequence[int] | None = None,
    min_new_tokens: int = 0,
    engine: Engine = "fast",
    on_done: Callable[[int], Any] | None = None,
    capture: ResponseCapture | None = None,
) -> list[list[int]]:
    """New token ids for each tokenised prompt, up to and including the stop token that ended it.

    ``stop_ids`` defaults to the tokenizer's end-of-turn tokens; ``min_new_tokens`` forbids them until that many
    tokens were generated (``min_new_tokens = max_new_tokens`` gives answers of equal length, for benchmarks).
    ``on_done(n)`` is called as answers finish. ``capture`` (fast engine only) records the block outputs of the
    generated tokens (see :mod:`personaxis.capture`).
    """
    config = config or SamplingConfig()
    if engine not in ENGINES:
        raise ValueError(f"unknown generation engine {engine!r}; expected one of {', '.join(ENGINES)}")
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if capture is not None and engine != "fast":
        raise ValueError("capturing activations needs the fast generation engine")
    stops = stop_token_ids(lm.tokenizer) if stop_ids is None else [int(s) for s in stop_ids]
    min_new = min(max(0, min_new_tokens), config.max_new_tokens)
    with apply_interventions(lm, interventions):
        if engine == "hf":
            return _generate_hf(lm, prompts, config, stops, min_new, on_done)
        return _FastGenerator(lm, prompts, config, stops, min_new, on_done, capture).run()


# --- the transformers engine ----------------------------------------------------------------------------------------


def _generate_hf(
    lm: LoadedModel,
    prompts: Sequence[Sequence[int]],
    config: SamplingConfig,
    stops: list[int],
    min_new: int,
    on_done: Callable[[int], Any] | None,
) -> list[list[int]]:
    pad_id = _pad_id(lm)
    results: list[list[int]] = [[] for _ in prompts]
    lengths = [len(p) for p in prompts]
    batches = length_batches(lengths, max_batch_size=config.batch_size, max_batch_tokens=10**9)
    sample = config.temperature > 0
    stop_set = set(stops)
    for batch_index, batch in enumerate(batches):
        ids, mask, _, _ = pad_batch([prompts[i] for i in batch], pad_id, side="left", device=lm.device)
        kwargs: dict[str, Any] = {"do_sample": sample}
        if sample:
            kwargs.update(temperature=config.temperature, top_p=config.top_p)
            if config.seed is not None:
                torch.manual_seed(config.seed + batch_index)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if min_new:
            kwargs["min_new_tokens"] = min_new
        out = lm.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=config.max_new_tokens,
            eos_token_id=stops or None,
            pad_token_id=pad_id,
            **kwargs,
        )
        new = out[:, ids.shape[1] :].tolist()
        for row, index in enumerate(batch):
            tokens = new[row]
            for i, token in enumerate(tokens):
                if token in stop_set and i >= min_new:
                    tokens = tokens[: i + 1]
                    break
            results[index] = tokens
        if on_done is not None:
            on_done(len(batch))
    return results


def _pad_id(lm: LoadedModel) -> int:
    pad = lm.tokenizer.pad_token_id
    if pad is None:
        pad = lm.tokenizer.eos_token_id
    return int(pad if pad is not None else 0)


# --- the fast engine ------------------------------------------------------------------------------------------------


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
            shape = (batch, like.shape[1], capacity, like.shape[3])
            return like.new_zeros(shape), like.new_zeros(shape)

        def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
            n = key_states.shape[-2]
            if self.key_buffer is None:
                self.device = key_states.device
                self.is_initialized = True
                self.key_buffer, self.value_buffer = self._allocate(key_states, key_states.shape[0], n + self.reserve)
            elif self.length + n > self.key_buffer.shape[2]:
                capacity = self.length + n + max(64, self.length // 4)
                keys, values = self._allocate(self.key_buffer, self.key_buffer.shape[0], capacity)
                keys[:, :, : self.length] = self.keys
                values[:, :, : self.length] = self.values
                self.key_buffer, self.value_buffer = keys, values
            assert self.value_buffer is not None
            self.key_buffer[:, :, self.length : self.length + n] = key_states
            self.value_buffer[:, :, self.length : self.length + n] = value_states
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
        def concat(cls, a: Any, b: Any, reserve: int) -> Any:
            """Stack the rows of two layers, left-padding the shorter one with zeros (masked out)."""
            length = max(a.length, b.length)
            rows_a = a.key_buffer.shape[0]
            out = cls(reserve)
            out.device, out.is_initialized, out.length = a.device, True, length
            out.key_buffer, out.value_buffer = out._allocate(
                a.key_buffer, rows_a + b.key_buffer.shape[0], length + reserve
            )
            for src, rows in ((a, slice(0, rows_a)), (b, slice(rows_a, None))):
                out.key_buffer[rows, :, length - src.length : length] = src.keys
                out.value_buffer[rows, :, length - src.length : length] = src.values
            out._views()
            return out

    return BufferLayer


_BUFFER_LAYER: type | None = None


def _buffer_layer_class() -> type:
    global _BUFFER_LAYER
    if _BUFFER_LAYER is None:
        _BUFFER_LAYER = _new_layer_class()
    return _BUFFER_LAYER


def buffer_cache_layer_class() -> type:
    """The fast engine's preallocated key/value cache layer, for other decode loops (the server's batcher)."""
    return _buffer_layer_class()


def forward_kwargs(model: torch.nn.Module) -> tuple[str, bool]:
    """The cache keyword of this model's forward (``cache`` in recent transformers) and whether it takes
    ``logits_to_keep``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic wrappers
        return "past_key_values", False
    cache_kw = "cache" if "cache" in params else "past_key_values"
    return cache_kw, "logits_to_keep" in params


def _row_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index * 7_919 + 0x9E3779B9) % (2**63 - 1)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _prefix_groups(prompts: Sequence[Sequence[int]], *, check_cost: bool = True) -> list[tuple[list[int], int]]:
    """Groups of prompt indices sharing a prefix of at least ``MIN_SHARED_PREFIX`` tokens, with that prefix's
    length (each member keeps at least one token of its own); with ``check_cost``, empty when sharing would not
    save a fifth of the prefill work of one batch (tokens computed, padding included)."""
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    runs: list[tuple[list[int], int]] = []
    for previous, index in zip([None, *order[:-1]], order, strict=True):
        common = 0 if previous is None else _common_prefix(prompts[previous], prompts[index])
        if common >= MIN_SHARED_PREFIX:
            members, length = runs[-1]
            runs[-1] = ([*members, index], min(length, common))
        else:
            runs.append(([index], len(prompts[index])))
    groups = []
    for members, length in runs:
        length = min(length, *(len(prompts[i]) - 1 for i in members))
        if len(members) > 1 and length >= MIN_SHARED_PREFIX:
            groups.append((members, length))
    if not groups or not check_cost:
        return groups
    grouped = {i for members, _ in groups for i in members}
    plain_cost = len(prompts) * max(len(p) for p in prompts)
    rest = [len(p) for i, p in enumerate(prompts) if i not in grouped]
    shared_cost = len(groups) * max(n for _, n in groups) + len(grouped) * max(
        len(prompts[i]) - n for members, n in groups for i in members
    )
    if rest:
        shared_cost += len(rest) * max(rest)
    return groups if shared_cost <= 0.8 * plain_cost else []


def _draw(weights: Tensor, uniform: Tensor) -> Tensor:
    """Column index per row, drawn with probability proportional to ``weights`` by inverting the cumulative sum
    at ``uniform`` (one random number per row instead of one per vocabulary entry)."""
    cdf = weights.cumsum(dim=-1)
    target = (uniform.to(cdf.dtype) * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=weights.shape[-1] - 1)


def _nucleus(sorted_probs: Tensor, top_p: float) -> Tensor:
    """Zero the tail of probabilities sorted in descending order once the mass before a token reaches ``top_p``
    (the most likely token always stays)."""
    before = sorted_probs.cumsum(dim=-1) - sorted_probs
    return sorted_probs.masked_fill(before >= top_p, 0.0)


def sample_tokens(logits: Tensor, temperature: float, top_p: float, uniform: Tensor) -> Tensor:
    """One token per row of ``logits`` [rows, vocabulary]: greedy at temperature 0, else drawn at ``uniform`` (one
    number in [0, 1) per row) from the temperature-scaled distribution cut to its top-``top_p`` mass."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1:
        return _draw(probs, uniform)
    # Top-p over the most likely candidates; the whole vocabulary is sorted only for rows they do not cover.
    picked = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    values, ids = probs.topk(min(probs.shape[-1], _TOP_P_CANDIDATES), dim=-1)
    covered = values.sum(dim=-1) >= top_p
    if bool(covered.all()):
        return ids.gather(1, _draw(_nucleus(values, top_p), uniform).unsqueeze(1)).squeeze(1)
    for group in (covered, ~covered):
        if bool(group.any()):
            if group is covered:
                v, i = values[group], ids[group]
            else:
                v, i = probs[group].sort(dim=-1, descending=True)
            picked[group] = i.gather(1, _draw(_nucleus(v, top_p), uniform[group]).unsqueeze(1)).squeeze(1)
    return picked


def answer_generator(seed: int, index: int) -> torch.Generator:
    """The random stream of answer ``index`` of a sampled call seeded with ``seed``: one uniform draw per token."""
    return torch.Generator().manual_seed(_row_seed(seed, index))


class _Batch:
    """Rows being generated side by side: their cache, attention mask, next input token and output so far."""

    def __init__(self, rows: list[int], cache: Any, mask: Tensor, next_tokens: Tensor, outputs: list[list[int]]):
        self.rows = rows  # prompt indices
        self.cache = cache
        self.mask = mask  # [batch, cache length], long
        self.next_tokens = next_tokens  # [batch]: the last sampled token, the input of the next step
        self.outputs = outputs
        self.finished = [False] * len(rows)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def n_finished(self) -> int:
        return sum(self.finished)


class _FastGenerator:
    def __init__(
        self,
        lm: LoadedModel,
        prompts: Sequence[Sequence[int]],
        config: SamplingConfig,
        stops: list[int],
        min_new: int,
        on_done: Callable[[int], Any] | None,
        capture: ResponseCapture | None = None,
    ) -> None:
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
        self.pad_id = _pad_id(lm)
        self.cache_kw, self.has_logits_to_keep = forward_kwargs(self.model)
        self.base_cache_kw, _ = forward_kwargs(lm.base_model)
        self.buffered = self._supports_buffer_cache()
        self.results: list[list[int] | None] = [None] * len(prompts)
        self.generators: dict[int, torch.Generator] = {}
        self.queue = self._order()
        longest = max(len(p) for p in self.prompts)
        kv_rows = kv_cache_budget(torch.device(self.device)) // max(
            1, self._kv_bytes_per_token() * (longest + config.max_new_tokens)
        )
        self.max_rows = max(1, min(config.batch_size, kv_rows))

    # -- setup ----------------------------------------------------------------------------------------------------

    def _order(self) -> list[int]:
        """The order prompts join the batch. When a fifth or more of all prompt tokens are shared prefixes (system
        prompts), prompts sharing one are queued together so that each prefill chunk computes it once; otherwise
        longest first, so that each prefill chunk holds prompts of similar length."""
        indices = range(len(self.prompts))
        if self.buffered and len(self.prompts) > 1:
            groups = _prefix_groups(self.prompts, check_cost=False)
            shared = sum((len(members) - 1) * length for members, length in groups)
            if shared >= 0.2 * sum(len(p) for p in self.prompts):
                return sorted(indices, key=lambda i: self.prompts[i])
        return sorted(indices, key=lambda i: -len(self.prompts[i]))

    def _kv_bytes_per_token(self) -> int:
        cfg = self.model.config
        text = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
        n_layers = getattr(text, "num_hidden_layers", None) or self.lm.profile.n_layers
        heads = getattr(text, "num_attention_heads", None) or 1
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or self.lm.profile.hidden_size // max(1, heads)
        element = torch.finfo(self.model.dtype).bits // 8 if self.model.dtype.is_floating_point else 4
        return int(n_layers * 2 * kv_heads * head_dim * element)

    def _hf_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _supports_buffer_cache(self) -> bool:
        """Buffered caches (and so admitting rows into a running batch) need full attention in every layer."""
        try:
            from transformers.cache_utils import DynamicLayer

            layers = self._hf_cache().layers
            return len(layers) > 0 and all(type(layer) is DynamicLayer for layer in layers)
        except Exception:  # pragma: no cover - other transformers versions: fall back to plain caches
            return False

    def _new_cache(self) -> Any:
        cache = self._hf_cache()
        if self.buffered:
            layer_class = _buffer_layer_class()
            cache.layers = [layer_class(self.config.max_new_tokens) for _ in cache.layers]
        return cache

    # -- model calls ----------------------------------------------------------------------------------------------

    def _forward(self, input_ids: Tensor, mask: Tensor, positions: Tensor, cache: Any) -> Tensor:
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "position_ids": positions,
            self.cache_kw: cache,
            "use_cache": True,
        }
        if self.has_logits_to_keep:
            width = input_ids.shape[1]
            # An index tensor, not ``1``: slicing the last position of a longer input leaves a non-contiguous
            # tensor, and the LM head then runs as one matrix-vector product per row (8× slower at batch 64).
            kwargs["logits_to_keep"] = 1 if width == 1 else torch.tensor([width - 1], device=input_ids.device)
        return self.model(**kwargs).logits[:, -1, :]

    def _choose(self, logits: Tensor, batch_rows: list[int], n_generated: list[int]) -> Tensor:
        """Next token per row: greedy argmax, or temperature / top-p sampling."""
        if self.min_new and self.stops:
            early = [i for i, n in enumerate(n_generated) if n < self.min_new]
            if early:
                logits = logits.clone()
                rows = torch.tensor(early, dtype=torch.long, device=logits.device)
                logits[rows.unsqueeze(1), self.stop_tensor.unsqueeze(0)] = -math.inf
        if self.config.temperature == 0:
            return logits.argmax(dim=-1)
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
        """Run the prompts of ``rows`` and sample their first tokens; shared prefixes are computed once."""
        groups = _prefix_groups([self.prompts[i] for i in rows]) if self.buffered and len(rows) > 1 else []
        if not groups:
            return self._prefill_plain(rows)
        grouped = {i for group, _ in groups for i in group}
        batch = self._prefill_shared([[rows[i] for i in group] for group, _ in groups], [n for _, n in groups])
        rest = [row for i, row in enumerate(rows) if i not in grouped]
        return self._merge(batch, self._prefill_plain(rest)) if rest else batch

    def _prefill_plain(self, rows: list[int]) -> _Batch:
        ids, mask, positions, _ = pad_batch(
            [self.prompts[i] for i in rows], self.pad_id, side="left", device=self.device
        )
        cache = self._new_cache()
        logits = self._forward(ids, mask, positions, cache)
        return self._start(rows, cache, mask, logits)

    def _prefill_shared(self, groups: list[list[int]], shared: list[int]) -> _Batch:
        """Compute each group's common prefix once (one forward for all groups, no LM head), copy its cache into
        every member's row, then run the members' remaining tokens. A row's cache reads ``[padding, prefix,
        padding, rest]``: the gap in the middle is masked, and positions still count real tokens only."""
        prefixes = [self.prompts[group[0]][:n] for group, n in zip(groups, shared, strict=True)]
        p_ids, p_mask, p_pos, _ = pad_batch(prefixes, self.pad_id, side="left", device=self.device)
        prefix_cache = self._new_cache()
        for layer in prefix_cache.layers:
            layer.reserve = 0
        self.lm.base_model(
            input_ids=p_ids,
            attention_mask=p_mask,
            position_ids=p_pos,
            use_cache=True,
            **{self.base_cache_kw: prefix_cache},
        )
        rows = [row for group in groups for row in group]
        owner = torch.tensor([g for g, group in enumerate(groups) for _ in group], dtype=torch.long, device=self.device)
        rests = [self.prompts[row][n:] for group, n in zip(groups, shared, strict=True) for row in group]
        s_ids, s_mask, _, _ = pad_batch(rests, self.pad_id, side="left", device=self.device)
        mask = torch.cat([p_mask.index_select(0, owner), s_mask], dim=1)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, p_ids.shape[1] :]
        layer_class = _buffer_layer_class()
        cache = self._new_cache()
        reserve = s_ids.shape[1] + self.config.max_new_tokens
        cache.layers = [
            layer_class.from_tensors(
                layer.keys.index_select(0, owner.to(layer.keys.device)),
                layer.values.index_select(0, owner.to(layer.values.device)),
                reserve,
            )
            for layer in prefix_cache.layers
        ]
        logits = self._forward(s_ids, mask, positions, cache)
        return self._start(rows, cache, mask, logits)

    def _start(self, rows: list[int], cache: Any, mask: Tensor, logits: Tensor) -> _Batch:
        tokens = self._choose(logits, rows, [0] * len(rows))
        batch = _Batch(rows, cache, mask, tokens, [[] for _ in rows])
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
        if len(keep) == len(batch):
            return batch
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        batch.cache.batch_select_indices(index)
        out = _Batch(
            [batch.rows[i] for i in keep],
            batch.cache,
            batch.mask.index_select(0, index),
            batch.next_tokens.index_select(0, index),
            [batch.outputs[i] for i in keep],
        )
        out.finished = [batch.finished[i] for i in keep]
        if self.buffered:
            self._trim(out)
        return out

    def _trim(self, batch: _Batch) -> None:
        """Drop leading cache positions that are padding in every row."""
        used = batch.mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start > 0:
            for layer in batch.cache.layers:
                layer.trim_left(start)
            batch.mask = batch.mask[:, start:]

    def _merge(self, a: _Batch, b: _Batch) -> _Batch:
        width = max(a.mask.shape[1], b.mask.shape[1])

        def pad_mask(mask: Tensor) -> Tensor:
            return torch.nn.functional.pad(mask, (width - mask.shape[1], 0), value=0)

        layer_class = _buffer_layer_class()
        cache = a.cache
        cache.layers = [
            layer_class.concat(la, lb, self.config.max_new_tokens)
            for la, lb in zip(a.cache.layers, b.cache.layers, strict=True)
        ]
        out = _Batch(
            a.rows + b.rows,
            cache,
            torch.cat([pad_mask(a.mask), pad_mask(b.mask)]),
            torch.cat([a.next_tokens, b.next_tokens]),
            a.outputs + b.outputs,
        )
        out.finished = a.finished + b.finished
        return out

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
            batch = new if batch is None else self._merge(batch, new)
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
        ones = batch.mask.new_ones((len(batch), 1))
        batch.mask = torch.cat([batch.mask, ones], dim=1)
        positions = (batch.mask.sum(dim=1, keepdim=True) - 1).clamp(min=0)
        self._plan_capture(batch)
        try:
            if not sample:
                self.lm.base_model(
                    input_ids=batch.next_tokens.unsqueeze(1),
                    attention_mask=batch.mask,
                    position_ids=positions,
                    use_cache=True,
                    **{self.base_cache_kw: batch.cache},
                )
                return
            logits = self._forward(batch.next_tokens.unsqueeze(1), batch.mask, positions, batch.cache)
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
