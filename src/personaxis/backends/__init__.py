"""Generation backends for pipeline runs, and where a run's transformers model is placed.

Two backends write the same rollout format (:class:`personaxis.generation.Generation` per conversation):

- ``"transformers"`` (the default): :func:`personaxis.generation.generate` on the run's own model, CPU or GPU;
- ``"vllm"``: vLLM's offline engine with tensor parallelism over the visible GPUs (``pip install personaxis[vllm]``),
  see :mod:`personaxis.backends.vllm_backend`. Neither this package nor the core imports vllm until it is used.

The backend is recorded in the run's settings (``settings.extra["backend"]``, only when it is not the default)
because greedy text from another engine differs in the last bits of its arithmetic, hence sometimes in its tokens.

The transformers backend records the answers' activations while it generates them (:mod:`personaxis.capture`);
rollouts of other backends are extracted teacher-forced through transformers, on the model placed as by every other
command (``--device``/``--dtype``, :class:`personaxis.models.ModelPlacement`): on a machine with CUDA in bfloat16 (or
``settings.extra["dtype"]``) with ``device_map="auto"``: one GPU when the model fits, else sharded across every
visible GPU (and offloaded to CPU memory beyond that).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from personaxis.capture import ResponseCapture
    from personaxis.chat import Conversation
    from personaxis.generation import Generation, SamplingConfig
    from personaxis.models import LoadedModel, ModelPlacement
    from personaxis.settings import RunSettings

BACKENDS: tuple[str, ...] = ("transformers", "vllm")
DEFAULT_BACKEND = "transformers"
# Context the vLLM engine reserves per sequence unless ``settings.extra["max_model_len"]`` says otherwise: rollouts
# are one system prompt, one question and at most ``max_new_tokens`` (512 in the paper preset).
VLLM_MAX_MODEL_LEN = 4096


class GenerationBackend(Protocol):
    """Generates one assistant answer per single-turn conversation."""

    name: str

    def generate(self, conversations: Sequence[Conversation], config: SamplingConfig) -> list[Generation]: ...

    def close(self) -> None: ...


class TransformersBackend:
    """personaxis's own batched generation on a transformers model (loaded on first use), with its float32 weights
    or, opted in, with int8 linear layers (:mod:`personaxis.int8_linears`, CPU only)."""

    name = "transformers"

    def __init__(self, lm: Callable[[], LoadedModel], *, weights: str = "float32") -> None:
        from personaxis.int8_linears import check_rollout_weights

        self._lm = lm
        self.weights = check_rollout_weights(weights)
        # Records the answers' block outputs while generating (the pipeline then skips their teacher-forced
        # extraction); not with int8 weights, whose activations are not the float32 model's.
        self.captures = weights == "float32"

    def generate(
        self, conversations: Sequence[Conversation], config: SamplingConfig, *, capture: ResponseCapture | None = None
    ) -> list[Generation]:
        from personaxis.generation import generate

        lm = self._lm()
        if self.weights == "float32":
            return generate(lm, conversations, config, capture=capture)
        if capture is not None:
            raise ValueError("activations are not captured from int8 weights: extract them on the float32 model")
        from personaxis.int8_linears import int8_linears

        with int8_linears(lm.model) as swapped:
            if not swapped:
                raise ValueError(
                    "int8 rollout weights need a float32 model on the CPU (this one has no such linear layers); "
                    "use --device cpu --dtype float32, or float32 rollout weights"
                )
            return generate(lm, conversations, config)

    def new_capture(self) -> ResponseCapture:
        """A capture of every layer for :meth:`generate`."""
        from personaxis.capture import ResponseCapture

        return ResponseCapture(self._lm())

    def close(self) -> None:
        """Nothing to free: the model stays loaded for the extraction stage."""


def backend_name(settings: RunSettings) -> str:
    name = str(settings.extra.get("backend", DEFAULT_BACKEND))
    if name not in BACKENDS:
        raise ValueError(f"unknown generation backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    return name


def backend_extra(name: str) -> dict[str, Any]:
    """What a backend choice adds to ``settings.extra``: nothing for the default, so existing runs resume."""
    if name not in BACKENDS:
        raise ValueError(f"unknown generation backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    return {} if name == DEFAULT_BACKEND else {"backend": name}


def model_source(model: str) -> str:
    """A path or id that transformers and vLLM can load: the embedded model resolves to its safetensors cache."""
    from personaxis.models import EMBEDDED_ALIASES, ensure_embedded_cache

    return str(ensure_embedded_cache()) if model.lower() in EMBEDDED_ALIASES else model


def make_backend(settings: RunSettings, lm: Callable[[], LoadedModel]) -> GenerationBackend:
    """The backend a run's settings ask for; ``lm`` gives the run's transformers model (loaded lazily).

    Raises:
        ValueError: an unknown backend or rollout-weights choice, or int8 weights with vLLM.
    """
    from personaxis.int8_linears import rollout_weights

    name = backend_name(settings)
    weights = rollout_weights(settings)
    if name == "vllm":
        if weights != "float32":
            raise ValueError("int8 rollout weights are for the transformers backend on a CPU; vLLM has its own dtypes")
        from personaxis.backends.vllm_backend import VLLMBackend

        return VLLMBackend(
            model_source(settings.model),
            name=settings.model,
            dtype=settings.extra.get("dtype"),
            max_model_len=int(settings.extra.get("max_model_len", VLLM_MAX_MODEL_LEN)),
            target_layer=settings.target_layer,
        )
    return TransformersBackend(lm, weights=weights)


def load_run_model(settings: RunSettings, placement: ModelPlacement | None = None) -> LoadedModel:
    """The run's transformers model, placed as every command places one (:class:`personaxis.models.ModelPlacement`:
    CUDA if present, else MPS, else CPU; bfloat16 on a GPU, float32 on the CPU; plain ``cuda`` shards over the
    visible GPUs when the model does not fit on one). ``settings.extra["dtype"]`` overrides the default dtype."""
    from personaxis.models import ModelPlacement

    placement = placement or ModelPlacement()
    dtype = placement.dtype or settings.extra.get("dtype")
    return ModelPlacement(
        placement.device, dtype, placement.allow_download, placement.trust_remote_code, placement.fast_cpu_linears
    ).load(None if settings.model == "embedded" else settings.model, target_layer=settings.target_layer)
