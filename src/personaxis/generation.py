"""Batched chat generation with optional interventions.

Prompts are rendered with the chat template, sorted by length, left-padded and generated in batches; each sequence
stops at an end-of-turn token or after ``max_new_tokens``. Interventions (steering, capping) are active at every
position, prompt and generated alike, never at padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from personaxis.activations import length_batches, pad_batch
from personaxis.chat import Conversation, render_prompt
from personaxis.interventions import Interventions, apply_interventions
from personaxis.models import LoadedModel
from personaxis.progress import progress_bar

_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


@dataclass(frozen=True)
class SamplingConfig:
    """How to generate: greedy when ``temperature == 0``; sampled runs are seeded per batch from ``seed``."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = 0
    batch_size: int = 16

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
            return tokenizer.decode(new_ids[:i], skip_special_tokens=True).strip(), i, True
    return tokenizer.decode(new_ids, skip_special_tokens=True).strip(), len(new_ids), False


@torch.inference_mode()
def generate(
    lm: LoadedModel,
    conversations: Sequence[Conversation],
    config: SamplingConfig | None = None,
    *,
    interventions: Interventions | None = None,
    show_progress: bool = False,
    desc: str = "generate",
) -> list[Generation]:
    """Generate one assistant answer for each conversation (each must end with a user turn)."""
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
    pad_id = lm.tokenizer.pad_token_id
    results: list[Generation | None] = [None] * len(prompts)
    lengths = [len(p) for p in prompts]
    batches = length_batches(lengths, max_batch_size=config.batch_size, max_batch_tokens=10**9)
    bar = progress_bar(total=len(prompts), desc=desc, unit="answer", disable=not show_progress)
    sample = config.temperature > 0
    with apply_interventions(lm, interventions):
        for batch_index, batch in enumerate(batches):
            ids, mask, _, _ = pad_batch([prompts[i] for i in batch], pad_id, side="left", device=lm.device)
            kwargs: dict[str, Any] = {"do_sample": sample}
            if sample:
                kwargs.update(temperature=config.temperature, top_p=config.top_p)
                if config.seed is not None:
                    torch.manual_seed(config.seed + batch_index)
            else:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            out = lm.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=config.max_new_tokens,
                eos_token_id=stops,
                pad_token_id=pad_id,
                **kwargs,
            )
            new = out[:, ids.shape[1] :].tolist()
            for row, index in enumerate(batch):
                text, n_new, stopped = _decode(lm.tokenizer, new[row], stop_set)
                results[index] = Generation(text=text, prompt_tokens=lengths[index], new_tokens=n_new, stopped=stopped)
            bar.update(len(batch))
    bar.close()
    return [r for r in results if r is not None]
