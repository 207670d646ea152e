"""personaxis: find, watch and hold the default Assistant persona of a chat language model.

The public API, importable from the package root (loaded on first use, so ``import personaxis`` stays cheap)::

    from personaxis import load_model, load_axis, steering_interventions, generate, SamplingConfig

    lm = load_model()                                  # the embedded SmolLM2-135M-Instruct, or any HF id / folder
    axis = load_axis("runs/quick/axis.safetensors")    # an Axis [n_layers, hidden], toward the Assistant
    away = steering_interventions(axis, layers=15, alpha=-0.3)
    print(generate(lm, [[{"role": "user", "content": "Who are you?"}]], SamplingConfig(max_new_tokens=40),
                   interventions=away)[0].text)

See docs/design.md for the method, the conventions (layer index, sign, units) and the file formats.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "LoadedModel": "personaxis.models",
    "ModelProfile": "personaxis.models",
    "load_model": "personaxis.models",
    "wrap_model": "personaxis.models",
    "Axis": "personaxis.axis",
    "SamplingConfig": "personaxis.generation",
    "Generation": "personaxis.generation",
    "generate": "personaxis.generation",
    "extract_turn_means": "personaxis.activations",
    "TurnActivations": "personaxis.activations",
    "Add": "personaxis.interventions",
    "Ablate": "personaxis.interventions",
    "FloorCap": "personaxis.interventions",
    "CeilingCap": "personaxis.interventions",
    "apply_interventions": "personaxis.interventions",
    "steering_interventions": "personaxis.steering",
    "steer": "personaxis.steering",
    "CappingConfig": "personaxis.capping",
    "calibrate": "personaxis.calibration",
    "load_axis": "personaxis.io.tensor_files",
    "save_axis": "personaxis.io.tensor_files",
    "load_capping": "personaxis.io.tensor_files",
    "save_capping": "personaxis.io.tensor_files",
    "RunLayout": "personaxis.io.run_layout",
    "Transcript": "personaxis.monitor",
    "TurnProjection": "personaxis.monitor",
    "load_transcript": "personaxis.monitor",
    "monitor_conversation": "personaxis.monitor",
    "monitor_transcripts": "personaxis.monitor",
    "RunSettings": "personaxis.settings",
    "Pipeline": "personaxis.pipeline",
}

__all__ = [
    "__version__",
    "LoadedModel",
    "ModelProfile",
    "load_model",
    "wrap_model",
    "Axis",
    "SamplingConfig",
    "Generation",
    "generate",
    "extract_turn_means",
    "TurnActivations",
    "Add",
    "Ablate",
    "FloorCap",
    "CeilingCap",
    "apply_interventions",
    "steering_interventions",
    "steer",
    "CappingConfig",
    "calibrate",
    "load_axis",
    "save_axis",
    "load_capping",
    "save_capping",
    "RunLayout",
    "Transcript",
    "TurnProjection",
    "load_transcript",
    "monitor_conversation",
    "monitor_transcripts",
    "RunSettings",
    "Pipeline",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from personaxis.activations import TurnActivations, extract_turn_means
    from personaxis.axis import Axis
    from personaxis.calibration import calibrate
    from personaxis.capping import CappingConfig
    from personaxis.generation import Generation, SamplingConfig, generate
    from personaxis.interventions import Ablate, Add, CeilingCap, FloorCap, apply_interventions
    from personaxis.io.run_layout import RunLayout
    from personaxis.io.tensor_files import load_axis, load_capping, save_axis, save_capping
    from personaxis.models import LoadedModel, ModelProfile, load_model, wrap_model
    from personaxis.monitor import (
        Transcript,
        TurnProjection,
        load_transcript,
        monitor_conversation,
        monitor_transcripts,
    )
    from personaxis.pipeline import Pipeline
    from personaxis.settings import RunSettings
    from personaxis.steering import steer, steering_interventions


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'personaxis' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
