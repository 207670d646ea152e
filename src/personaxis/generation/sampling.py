"""How an answer is generated and read back: the sampling settings, the choice of each next token, the random stream
of each answer, and the tokens that end an answer and its decoding to text.

Every decoder of the project (the fast engine, the server's batcher) chooses tokens with :func:`sample_tokens` (greedy
rows with :func:`greedy_tokens`) and draws its uniforms from :func:`answer_generator`, so that a seeded answer is the
same whichever loop produced it and whatever batch it ran in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")

# Top-p looks at this many most likely tokens first and sorts the whole vocabulary only for rows they do not cover.
_TOP_P_CANDIDATES = 256
# Greedy decoding on the CPU finds each row's maximum per block of this many logits (the largest that divides the
# vocabulary; none below the smallest: plain argmax).
_GREEDY_BLOCKS = (1024, 512, 256, 128, 64)


@dataclass(frozen=True)
class SamplingConfig:
    """How to generate: greedy when ``temperature == 0``; sampled answers are seeded from ``seed`` and their index.

    ``batch_size`` is the number of answers generated side by side (the fast engine keeps that many running).

    Attributes:
        max_new_tokens: the most tokens generated per answer (at least 1).
        temperature: ``0`` for greedy decoding, else the sampling temperature.
        top_p: the nucleus sampling mass, in ``(0, 1]``.
        seed: the seed of a sampled call (answer ``i`` has its own stream); ``None`` draws from torch's global
            generator.
        batch_size: answers generated side by side (at least 1).
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


# --- tokens that end an answer, and decoding ----------------------------------------------------------------------


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn for this tokenizer (its end-of-sequence token and the end-of-turn tokens
    of the chat templates it knows)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_TOKENS:
        if token in vocab:
            ids.add(int(vocab[token]))
    return sorted(ids)


def pad_token_id(tokenizer: Any) -> int:
    """The id that pads prompts in a batch: the tokenizer's pad token, else its end-of-sequence token, else 0."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    return int(pad if pad is not None else 0)


def decode_answer(tokenizer: Any, new_ids: list[int], stops: set[int]) -> tuple[str, int, bool]:
    """The text of generated tokens up to the first stop token.

    Args:
        tokenizer: the model's tokenizer.
        new_ids: the generated token ids (possibly ending with a stop token, possibly cut at ``max_new_tokens``).
        stops: the ids that end an answer (:func:`stop_token_ids`).

    Returns:
        ``(text, n_tokens, stopped)``: the text without special tokens (whitespace kept), the number of tokens before
        the stop token, and whether a stop token ended the answer.
    """
    for i, token in enumerate(new_ids):
        if token in stops:
            return tokenizer.decode(new_ids[:i], skip_special_tokens=True), i, True
    return tokenizer.decode(new_ids, skip_special_tokens=True), len(new_ids), False


# --- random streams -----------------------------------------------------------------------------------------------


def row_seed(seed: int, index: int) -> int:
    """The seed of answer ``index`` of a call seeded with ``seed`` (a 63-bit integer)."""
    return (seed * 1_000_003 + index * 7_919 + 0x9E3779B9) % (2**63 - 1)


def answer_generator(seed: int, index: int) -> torch.Generator:
    """The random stream of answer ``index`` of a sampled call seeded with ``seed``: one uniform draw per token."""
    return torch.Generator().manual_seed(row_seed(seed, index))


# --- choosing the next token --------------------------------------------------------------------------------------


def draw(weights: Tensor, uniform: Tensor) -> Tensor:
    """Column index per row, drawn with probability proportional to ``weights`` by inverting the cumulative sum
    at ``uniform`` (one random number per row instead of one per vocabulary entry)."""
    cdf = weights.cumsum(dim=-1)
    target = (uniform.to(cdf.dtype) * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=weights.shape[-1] - 1)


def nucleus(sorted_probs: Tensor, top_p: float) -> Tensor:
    """Zero the tail of probabilities sorted in descending order once the mass before a token reaches ``top_p``
    (the most likely token always stays)."""
    before = sorted_probs.cumsum(dim=-1) - sorted_probs
    return sorted_probs.masked_fill(before >= top_p, 0.0)


def greedy_tokens(logits: Tensor) -> Tensor:
    """``logits.argmax(dim=-1)`` for ``[rows, vocabulary]`` logits, index for index: the first of equal maxima, and
    the first NaN of a row that has one.

    On the CPU, torch's ``argmax`` compares the logits one by one, while its ``amax`` runs vectorised: 64 rows of
    49,152 logits took 1.4–1.6 ms through ``argmax`` on the 2-core AMD EPYC (about 1 % of a 64-row decode step) and
    0.2 ms as the maximum of every block of 512, the first block that holds the row's maximum, and ``argmax`` inside
    that block. Rows with a NaN, other devices, and vocabularies no block size divides take ``argmax`` itself.
    """
    rows, vocabulary = logits.shape
    block = next((b for b in _GREEDY_BLOCKS if vocabulary % b == 0 and vocabulary >= 4 * b), None)
    if block is None or rows == 0 or not logits.is_cpu or not logits.is_floating_point() or not logits.is_contiguous():
        return logits.argmax(dim=-1)
    blocks = logits.view(rows, vocabulary // block, block)
    block_max = blocks.amax(dim=-1)  # [rows, blocks]; NaN where a block holds one
    best = block_max.amax(dim=-1, keepdim=True)
    if bool(best.isnan().any()):
        return logits.argmax(dim=-1)
    first = (block_max == best).byte().argmax(dim=-1)  # the first block that holds the row's maximum
    inside = blocks[torch.arange(rows, device=logits.device), first].argmax(dim=-1)
    return first * block + inside


def sample_tokens(logits: Tensor, temperature: float, top_p: float, uniform: Tensor) -> Tensor:
    """One token per row of ``logits``.

    Args:
        logits: ``[rows, vocabulary]``.
        temperature: 0 for greedy (argmax), else the softmax temperature.
        top_p: the probability mass kept (1: the whole distribution).
        uniform: one number in [0, 1) per row, the draw of that row (ignored when greedy).

    Returns:
        ``[rows]`` token ids (long).
    """
    if temperature == 0:
        return greedy_tokens(logits)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1:
        return draw(probs, uniform)
    # Top-p over the most likely candidates; the whole vocabulary is sorted only for rows they do not cover.
    picked = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    values, ids = probs.topk(min(probs.shape[-1], _TOP_P_CANDIDATES), dim=-1)
    covered = values.sum(dim=-1) >= top_p
    if bool(covered.all()):
        return ids.gather(1, draw(nucleus(values, top_p), uniform).unsqueeze(1)).squeeze(1)
    for group in (covered, ~covered):
        if bool(group.any()):
            if group is covered:
                v, i = values[group], ids[group]
            else:
                v, i = probs[group].sort(dim=-1, descending=True)
            picked[group] = i.gather(1, draw(nucleus(v, top_p), uniform[group]).unsqueeze(1)).squeeze(1)
    return picked
