"""Rollout generation through vLLM's offline engine (``pip install personaxis[vllm]``; needs CUDA GPUs).

Prompts are rendered and tokenised by :mod:`personaxis.chat` exactly as the transformers backend renders them (the
system-prompt fallback for templates without a system role, and thinking switched off where the template has the
switch: ``profile.template_kwargs``), then handed to vLLM as token ids, so both backends see the same prompts. The
chat profile comes from a weightless copy of the model built on the ``meta`` device: the GPUs stay free for vLLM.
Answers are cut at the same end-of-turn tokens and decoded with the same tokenizer as the transformers backend.

The engine uses every visible GPU for tensor parallelism unless told otherwise (a Ray worker sees the GPUs it was
given). ``close()`` frees the engine so that the extraction stage can load the transformers model.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Sequence
from typing import Any

from personaxis.chat import Conversation, render_prompt
from personaxis.generation import Generation, SamplingConfig, decode_answer, row_seed, stop_token_ids
from personaxis.models import ModelProfile, build_profile

VLLM_HINT = "the vLLM backend needs the vllm package and a CUDA GPU: pip install 'personaxis[vllm]'"


def chat_profile(source: str, *, name: str | None = None, target_layer: int | None = None) -> tuple[Any, ModelProfile]:
    """The tokenizer and :class:`ModelProfile` of a local model folder or cached id, without loading its weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    config = AutoConfig.from_pretrained(source, local_files_only=True)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, build_profile(skeleton, tokenizer, name or source, target_layer=target_layer)


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def ray_in_use() -> bool:
    """Whether this process is connected to Ray (without importing it)."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


class VLLMBackend:
    """Batched generation with ``vllm.LLM`` (created on first use, once per process)."""

    name = "vllm"

    def __init__(
        self,
        source: str,
        *,
        name: str | None = None,
        tensor_parallel_size: int | None = None,
        dtype: str | None = None,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = 4096,
        target_layer: int | None = None,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.source = source
        self.display_name = name or source
        self.tensor_parallel_size = tensor_parallel_size
        self.dtype = dtype
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_model_len = max_model_len
        self.target_layer = target_layer
        self.engine_kwargs = dict(engine_kwargs or {})
        self._chat: tuple[Any, ModelProfile] | None = None
        self._llm: Any = None

    # ------------------------------------------------------------------------------------------------ set-up
    @property
    def tokenizer(self) -> Any:
        return self._chat_profile()[0]

    @property
    def profile(self) -> ModelProfile:
        return self._chat_profile()[1]

    def _chat_profile(self) -> tuple[Any, ModelProfile]:
        if self._chat is None:
            self._chat = chat_profile(self.source, name=self.display_name, target_layer=self.target_layer)
        return self._chat

    def engine(self) -> Any:
        """The ``vllm.LLM`` engine (created on first call)."""
        if self._llm is None:
            try:
                import vllm
            except ImportError as exc:
                raise RuntimeError(VLLM_HINT) from exc
            tp = self.tensor_parallel_size or max(1, visible_gpus())
            max_len = self.max_model_len
            if max_len is not None and self.profile.max_context:
                max_len = min(max_len, self.profile.max_context)
            kwargs: dict[str, Any] = {
                "model": self.source,
                "tensor_parallel_size": tp,
                "dtype": self.dtype or "auto",
                "gpu_memory_utilization": self.gpu_memory_utilization,
                "seed": 0,
            }
            if max_len is not None:
                kwargs["max_model_len"] = max_len
            if tp > 1 and ray_in_use():
                # inside a Ray actor that already holds its GPUs: vLLM's own worker processes, not new Ray actors
                kwargs["distributed_executor_backend"] = "mp"
            kwargs.update(self.engine_kwargs)
            self._llm = vllm.LLM(**kwargs)
        return self._llm

    # ------------------------------------------------------------------------------------------- generation
    def sampling_params(self, config: SamplingConfig, index: int, stops: list[int]) -> Any:
        from vllm import SamplingParams

        sample = config.temperature > 0
        return SamplingParams(
            n=1,
            max_tokens=config.max_new_tokens,
            temperature=config.temperature if sample else 0.0,
            top_p=config.top_p if sample else 1.0,
            seed=row_seed(config.seed, index) if sample and config.seed is not None else None,
            stop_token_ids=stops,
            skip_special_tokens=True,
        )

    def generate(self, conversations: Sequence[Conversation], config: SamplingConfig) -> list[Generation]:
        """One answer per conversation (each ends with a user turn), in input order."""
        if not conversations:
            return []
        tokenizer, profile = self._chat_profile()
        prompts = [render_prompt(tokenizer, c, profile) for c in conversations]
        stops = stop_token_ids(tokenizer)
        stop_set = set(stops)
        params = [self.sampling_params(config, i, stops) for i in range(len(prompts))]
        outputs = self.engine().generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        results = []
        for prompt, output in zip(prompts, outputs, strict=True):
            completion = output.outputs[0]
            text, n_new, stopped = decode_answer(tokenizer, list(completion.token_ids), stop_set)
            stopped = stopped or getattr(completion, "finish_reason", None) == "stop"
            results.append(Generation(text=text, prompt_tokens=len(prompt), new_tokens=n_new, stopped=stopped))
        return results

    def close(self) -> None:
        """Shut the engine down and free its GPU memory (the next ``generate`` starts a new one)."""
        if self._llm is None:
            return
        self._llm = None
        try:
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

            destroy_model_parallel()
            destroy_distributed_environment()
        except Exception:  # noqa: BLE001 - best effort: older and newer vLLM versions differ here
            pass
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
