"""Steering along the Assistant Axis: ``h ← h + α · r_l · â_l`` at one or more layers, every token.

α is unit-free by default: a fraction of the layer's mean residual norm ``r_l`` (stored in the axis metadata as
``axis.residual_norms``, measured on ordinary rollouts). ``raw=True`` takes α in the reference implementation's
units: ``h ← h + α · axis[l]``, the stored (unnormalised) axis row, so a coefficient from a reference notebook gives
the same push here (and ``personaxis export --raw`` writes the same vector). α < 0 steers away from the Assistant (other identities, at extremes a theatrical style), α > 0 toward it.

    ops = steering_interventions(axis, 15, -0.3)
    answers = generate(lm, conversations, config, interventions=ops)

or, for side-by-side answers, ``steer(lm, axis, ["Who are you?"], layers=15, alpha=-0.3)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from personaxis.activations import extract_turn_means
from personaxis.axis import Axis, AxisError
from personaxis.chat import Conversation, build_conversation
from personaxis.data import load_questions
from personaxis.generation import Generation, SamplingConfig, generate
from personaxis.interventions import Add
from personaxis.layer_selection import select_layers
from personaxis.models import LoadedModel


@dataclass(frozen=True)
class SteeredAnswer:
    """One prompt answered without and with steering."""

    prompt: str
    unsteered: Generation
    steered: Generation


def resolve_layers(axis: Axis, layers: Sequence[int] | int | None) -> list[int]:
    """Validated, de-duplicated layer indices (the axis' target layer when ``None``), in the order given
    (:func:`personaxis.layer_selection.select_layers`)."""

    def check(layer: int) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise AxisError(f"a layer index must be an int, got {layer!r}")
        axis.layer(layer)  # raises IndexError with the valid range

    assert axis.target_layer is not None
    try:
        return select_layers(layers, axis.n_layers, default=[axis.target_layer], what="steering layer", check=check)
    except ValueError as exc:
        raise AxisError(str(exc)) from None


def raw_coefficient(axis: Axis, layer: int, alpha: float, *, raw: bool = False) -> float:
    """The coefficient of the *unit* axis at ``layer``: ``α · ‖axis[l]‖`` when ``raw`` (α times the stored row),
    else ``α · r_l``."""
    if raw:
        return float(alpha) * float(axis.layer(layer).norm())
    return axis.alpha_to_raw(layer, alpha)


def steering_vector(axis: Axis, layer: int, alpha: float, *, raw: bool = False) -> Tensor:
    """What steering adds at ``layer``: ``α · axis[l]`` (the stored row) when ``raw``, else ``α · r_l · â_l``.

    The one definition of the units, shared by ``steer``, ``export``, the web app and the Python API.
    """
    if raw:
        return float(alpha) * axis.layer(layer)
    return axis.alpha_to_raw(layer, alpha) * axis.unit(layer)


def steering_interventions(
    axis: Axis, layers: Sequence[int] | int | None, alpha: float, *, raw: bool = False
) -> dict[int, list[Add]]:
    """Per-layer ``Add`` operators that push the residual stream along the axis.

    α is a fraction of each layer's mean residual norm (``raw=False``, needs ``axis.residual_norms``) or, with
    ``raw=True``, the reference's coefficient of the stored axis row. With several layers, the same α applies at each
    one, in that layer's own units.

    Args:
        axis: the axis to steer along.
        layers: zero-based block indices (block ``l``'s output, see docs/design.md "Conventions"): an int, a list
            (duplicates dropped, order kept), ``"all"``, or ``None`` for the axis' target layer.
        alpha: the steering coefficient; by default a fraction of the layer's mean residual norm ``r_l``
            (``h ← h + α · r_l · â_l``), with ``raw`` the coefficient of the stored axis row (``h ← h + α · axis[l]``).
            ``α > 0`` pushes toward the Assistant, ``α < 0`` away from it.
        raw: take ``alpha`` in the reference implementation's units.

    Returns:
        ``{layer: [Add(...)]}``, one :class:`~personaxis.interventions.Add` per layer, for
        :func:`~personaxis.generation.generate` or :func:`~personaxis.interventions.apply_interventions`.

    Raises:
        AxisError: ``alpha`` is not finite, no layer is chosen, a layer is not an int, or (``raw=False``) the axis has
            no residual norms.
        IndexError: a layer is out of range for the axis.
    """
    alpha = float(alpha)
    if alpha != alpha or alpha in (float("inf"), float("-inf")):
        raise AxisError(f"steering coefficient must be finite, got {alpha}")
    return {
        layer: [
            Add(axis.layer(layer), alpha=alpha) if raw else Add(axis.unit(layer), alpha=axis.alpha_to_raw(layer, alpha))
        ]
        for layer in resolve_layers(axis, layers)
    }


def describe(axis: Axis, layers: Sequence[int] | int | None, alpha: float, *, raw: bool = False) -> str:
    """A short human label, e.g. ``α = -0.3 × residual norm at layer 15 (raw -1.23)``."""
    parts = []
    for layer in resolve_layers(axis, layers):
        coef = raw_coefficient(axis, layer, alpha, raw=raw)
        parts.append(f"L{layer}: {coef:+.3g}")
    unit = "× axis row (reference units)" if raw else "× residual norm"
    return f"α = {alpha:+g} {unit} (added {', '.join(parts)})"


def steer(
    lm: LoadedModel,
    axis: Axis,
    prompts: Sequence[str | Conversation],
    layers: Sequence[int] | int | None,
    alpha: float,
    config: SamplingConfig | None = None,
    *,
    raw: bool = False,
    system_prompt: str | None = None,
    show_progress: bool = False,
) -> list[SteeredAnswer]:
    """Answer each prompt twice, without and with steering, with the same sampling settings and seeds.

    A prompt is a user message (optionally after ``system_prompt``) or a whole conversation ending in a user turn.

    Args:
        lm: the model.
        axis: the axis to steer along; it must fit the model (same layer count and hidden size).
        prompts: user messages, or conversations of ``{"role", "content"}`` messages ending with a user turn.
        layers: the layers steered, as in :func:`steering_interventions` (``None``: the axis' target layer).
        alpha: the steering coefficient, as in :func:`steering_interventions` (a fraction of the layer's mean
            residual norm unless ``raw``; negative steers away from the Assistant).
        config: sampling settings (default :class:`~personaxis.generation.SamplingConfig`: greedy).
        raw: take ``alpha`` in the reference implementation's units (the coefficient of the stored axis row).
        system_prompt: a system message put before each string prompt (not before whole conversations).
        show_progress: show progress bars for the two generation passes.

    Returns:
        One :class:`SteeredAnswer` per prompt, in order: the prompt (a conversation's last message), the unsteered
        and the steered :class:`~personaxis.generation.Generation`.

    Raises:
        AxisError: the axis does not fit the model, or the steering settings are invalid (see
            :func:`steering_interventions`).
        IndexError: a layer is out of range for the axis.
        ValueError: a prompt plus ``max_new_tokens`` exceeds the model's context.
    """
    axis.check_fits(lm.profile.n_layers, lm.profile.hidden_size, lm.profile.name)
    ops = steering_interventions(axis, layers, alpha, raw=raw)
    conversations = [build_conversation(system_prompt, p) if isinstance(p, str) else list(p) for p in prompts]
    labels = [p if isinstance(p, str) else str(p[-1].get("content", "")) for p in prompts]
    config = config or SamplingConfig()
    plain = generate(lm, conversations, config, show_progress=show_progress, desc="unsteered")
    steered = generate(lm, conversations, config, interventions=ops, show_progress=show_progress, desc="steered")
    return [SteeredAnswer(label, a, b) for label, a, b in zip(labels, plain, steered, strict=True)]


def measure_residual_norms(
    lm: LoadedModel, *, n_questions: int = 24, max_new_tokens: int = 64, show_progress: bool = False
) -> Tensor:
    """The mean L2 norm of each block's output over the response tokens of ordinary answers, per layer ``[n_layers]``:
    the unit of the norm-relative α, for an axis that came without one (a published reference axis).

    The model answers ``n_questions`` of the package's extraction questions without a system prompt (greedy); each
    answer's mean token norm is averaged, as a run does over its rollouts.
    """
    import torch

    if n_questions < 1:
        raise ValueError(f"need at least one question to measure residual norms, got {n_questions}")
    questions = load_questions(limit=n_questions)
    prompts = [build_conversation(None, q.question) for q in questions]
    answers = generate(
        lm,
        prompts,
        SamplingConfig(max_new_tokens=max_new_tokens, batch_size=16),
        show_progress=show_progress,
        desc="answers",
    )
    chats = [
        [*p, {"role": "assistant", "content": a.text}] for p, a in zip(prompts, answers, strict=True) if a.text.strip()
    ]
    if not chats:
        raise ValueError("the model gave only empty answers: no tokens to measure residual norms on")
    activations = extract_turn_means(lm, chats, show_progress=show_progress)
    return torch.stack([a.norms[0] for a in activations]).mean(0)
