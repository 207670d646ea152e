"""The transformers engine (``engine="hf"``): ``model.generate`` on length-sorted static batches, kept to compare the
fast engine with."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from personaxis.activations import length_batches, pad_batch
from personaxis.generation.sampling import SamplingConfig, pad_token_id
from personaxis.models import LoadedModel


def generate_with_transformers(
    lm: LoadedModel,
    prompts: Sequence[Sequence[int]],
    config: SamplingConfig,
    stops: list[int],
    min_new: int,
    on_done: Callable[[int], Any] | None,
) -> list[list[int]]:
    """New token ids for each prompt from transformers' ``generate``, up to and including the stop token that ended
    it (interventions, when any, are applied by the caller).

    Args:
        lm: the model.
        prompts: tokenised prompts.
        config: sampling settings; sampled batches are seeded with ``seed + batch index`` (so, unlike the fast
            engine, a sampled answer depends on its batch).
        stops: token ids that end an answer.
        min_new: no stop token before this many new tokens.
        on_done: called with the number of answers of each finished batch.

    Returns:
        One list of new token ids per prompt, in the order of ``prompts``.
    """
    pad_id = pad_token_id(lm.tokenizer)
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
