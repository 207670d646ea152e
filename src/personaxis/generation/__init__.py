"""Batched chat generation with optional interventions.

The package, one module per job:

- :mod:`~personaxis.generation.sampling`: the settings (:class:`SamplingConfig`), the choice of each next token
  (:func:`sample_tokens`, :func:`greedy_tokens`), each answer's random stream (:func:`answer_generator`), stop tokens
  and decoding;
- :mod:`~personaxis.generation.cache`: the key/value cache adapter, the one place that touches transformers' cache
  classes;
- :mod:`~personaxis.generation.decode`: the decode step the fast engine and the server's batcher share (the model call
  with a cache, and the rows' cache and mask as a :class:`~personaxis.generation.decode.DecodeBatch`);
- :mod:`~personaxis.generation.engine`: the fast engine (:class:`~personaxis.generation.engine.FastEngine`), a
  continuous-batching decode loop;
- :mod:`~personaxis.generation.hf`: transformers' ``model.generate``, kept for comparison;
- this module: the entry points :func:`generate` (conversations to text) and :func:`generate_ids` (token ids to token
  ids).

The two engines give the same greedy text (exactly in float64; in float32 up to rounding in near-ties, none seen in
the benchmark's comparisons). Interventions (steering, capping) are active at every position, prompt and generated
alike, never at padding: every forward call passes ``attention_mask=`` of shape ``[batch, past + current]``, which the
hooks of :mod:`personaxis.hooks` read. Sampling (``temperature > 0``) draws each answer from its own generator seeded
from ``(seed, prompt index)``, so a seeded answer does not depend on the batch it happened to run in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from personaxis.chat import Conversation, render_prompt
from personaxis.generation.cache import buffer_cache_layer_class, forward_kwargs, kv_bytes_per_token
from personaxis.generation.engine import FastEngine, kv_cache_budget
from personaxis.generation.hf import generate_with_transformers
from personaxis.generation.sampling import (
    SamplingConfig,
    answer_generator,
    decode_answer,
    greedy_tokens,
    pad_token_id,
    row_seed,
    sample_tokens,
    stop_token_ids,
)
from personaxis.interventions import Interventions, apply_interventions
from personaxis.models import LoadedModel
from personaxis.progress import progress_bar

if TYPE_CHECKING:
    from personaxis.capture import ResponseCapture

__all__ = [
    "ENGINES",
    "Engine",
    "FastEngine",
    "Generation",
    "SamplingConfig",
    "answer_generator",
    "buffer_cache_layer_class",
    "decode_answer",
    "forward_kwargs",
    "generate",
    "generate_ids",
    "generate_with_transformers",
    "greedy_tokens",
    "kv_bytes_per_token",
    "kv_cache_budget",
    "pad_token_id",
    "row_seed",
    "sample_tokens",
    "stop_token_ids",
]

Engine = Literal["fast", "hf"]
ENGINES: tuple[str, ...] = ("fast", "hf")


@dataclass(frozen=True)
class Generation:
    """One generated answer.

    Attributes:
        text: the answer's text up to the end-of-turn token, without special tokens (whitespace kept).
        prompt_tokens: the number of tokens of the rendered prompt.
        new_tokens: the number of answer tokens, not counting the end-of-turn token.
        stopped: ``True`` when it ended on an end-of-turn token, ``False`` when cut at ``max_new_tokens``.
    """

    text: str
    prompt_tokens: int
    new_tokens: int
    stopped: bool  # ended on an end-of-turn token (False: cut at max_new_tokens)


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
    """Generate one assistant answer for each conversation.

    Args:
        lm: the model.
        conversations: chats that each end with a user turn; they are rendered with the model's chat template.
        config: sampling settings (default :class:`SamplingConfig`: greedy, 128 new tokens).
        interventions: steering / capping operators per layer, active at every position of every forward call.
        show_progress: show a progress bar (labelled ``desc``) of finished answers.
        desc: the progress bar's label.
        engine: ``"fast"`` (the default) or ``"hf"`` (transformers' ``generate``).
        capture: records the answers' block outputs as they are generated (fast engine only; see
            :mod:`personaxis.capture`).

    Returns:
        One :class:`Generation` per conversation, in order.

    Raises:
        ValueError: a prompt plus ``max_new_tokens`` exceeds the model's context.
    """
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
        text, n_new, stopped = decode_answer(lm.tokenizer, ids, stop_set)
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

    Args:
        lm: the model.
        prompts: tokenised prompts (each at least one token).
        config: sampling settings (default :class:`SamplingConfig`).
        interventions: steering / capping operators per layer, active at every non-padding position.
        stop_ids: token ids that end an answer (default: the tokenizer's end-of-turn tokens, :func:`stop_token_ids`).
        min_new_tokens: forbid the stop tokens until that many tokens were generated (``min_new_tokens =
            max_new_tokens`` gives answers of equal length, for benchmarks).
        engine: ``"fast"`` (the default) or ``"hf"``.
        on_done: called with the number of answers that just finished, as they finish.
        capture: records the block outputs of the generated tokens (fast engine only; see :mod:`personaxis.capture`).

    Returns:
        One list of new token ids per prompt, in order.

    Raises:
        ValueError: an unknown engine, an empty prompt, or a capture with the ``"hf"`` engine.
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
            return generate_with_transformers(lm, prompts, config, stops, min_new, on_done)
        return FastEngine(
            lm, prompts, config, stop_ids=stops, min_new_tokens=min_new, on_done=on_done, capture=capture
        ).run()
