"""Guard mode, capping and steering inside vLLM, registered through vLLM's own extension points (no fork).

Two pieces, both loaded in the process that runs the model:

- :func:`register` — vLLM's general-plugin entry point (``vllm.general_plugins`` in ``pyproject.toml``; call it
  yourself before creating the engine when the engine runs in your process). It re-registers the decoder
  architectures of :data:`ARCHITECTURES` in ``vllm.ModelRegistry`` with subclasses whose decoder blocks carry
  personaxis' operators (:mod:`personaxis.interventions`) and a reader of the projection at the monitored layer, set
  up from the :class:`GuardSpec` file named by ``$PERSONAXIS_VLLM_GUARD``.
- :class:`GuardRows` — a logits processor (``LLM(..., logits_processors=[GuardRows])``) that leaves logits alone
  and tells the blocks which request each row of the batch is: vLLM's documented ``BatchUpdate`` (rows added,
  removed, moved) carries each request's ``SamplingParams.extra_args["personaxis"]``, ``{"mode": "off" | "always" |
  "auto", "id": ...}``.

Per request: ``off`` — no operator; ``always`` — the spec's steering and its caps at every token; ``auto`` — guard
mode, the steering always and the caps only while the mean projection of the last ``window`` answer tokens is below
the threshold (the rule of :func:`personaxis.guard.guard_switch`, as in ``personaxis serve``). A token's
projection is read at the monitored layer in the decoding step that feeds it; a switch acts from the next token.

Forward hooks need an eager engine (``enforce_eager=True``: CUDA graphs and ``torch.compile`` do not run Python
hooks). Tokens are mapped to requests with the attention metadata's ``query_start_loc`` (or one token per request in
a pure decoding step); a step the blocks cannot map runs without operators and is counted in ``unmapped_steps``.
Run the engine in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) to read :func:`report` afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from personaxis.guard import GuardPlan, guard_switch
from personaxis.interventions import Ablate, Add, CeilingCap, FloorCap, Operator, RowInterventions

SPEC_ENV = "PERSONAXIS_VLLM_GUARD"
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
MODES = ("off", "always", "auto")
Interventions = dict[int, list[Operator]]


@dataclass(frozen=True)
class GuardSpec:
    """What the blocks do: ``steering`` for every request not ``off``, ``plan`` (its caps, threshold, window,
    hysteresis) for ``always`` and ``auto``, and the monitored ``layer`` with its unit axis direction."""

    steering: Interventions
    plan: GuardPlan
    layer: int
    unit: Tensor

    def save(self, path: Path) -> Path:
        """Write the spec as plain tensors, numbers and names (read back with ``torch.load(weights_only=True)``: no
        pickled objects cross the process boundary)."""
        plan = self.plan
        torch.save(
            {
                "format": SPEC_FORMAT,
                "steering": _plain_interventions(self.steering),
                "caps": _plain_interventions(plan.interventions),
                "threshold": float(plan.threshold),
                "window": int(plan.window),
                "hysteresis": float(plan.hysteresis),
                "layer": int(self.layer),
                "unit": self.unit.detach().cpu(),
            },
            path,
        )
        return path

    @staticmethod
    def load(path: str | Path) -> GuardSpec:
        data = torch.load(path, weights_only=True, map_location="cpu")
        if not isinstance(data, dict) or data.get("format") != SPEC_FORMAT:
            raise TypeError(f"{path} holds no guard spec (format {SPEC_FORMAT})")
        plan = GuardPlan(
            _operators(data["caps"]), float(data["threshold"]), int(data["window"]), float(data["hysteresis"])
        )
        return GuardSpec(_operators(data["steering"]), plan, int(data["layer"]), data["unit"])


SPEC_FORMAT = "personaxis-vllm-guard-1"
_OPERATOR_KINDS: dict[str, type[Operator]] = {k.__name__: k for k in (Add, Ablate, FloorCap, CeilingCap)}


def _plain_interventions(interventions: Interventions) -> dict[int, list[dict[str, Any]]]:
    """Operators as ``{"kind": class name, "vector": tensor, <init fields>}`` per layer."""
    plain: dict[int, list[dict[str, Any]]] = {}
    for layer, ops in interventions.items():
        plain[int(layer)] = [
            {"kind": type(op).__name__, **{f.name: getattr(op, f.name) for f in fields(op) if f.init}} for op in ops
        ]
    return plain


def _operators(plain: dict[int, list[dict[str, Any]]]) -> dict[int, list[Operator]]:
    out: dict[int, list[Operator]] = {}
    for layer, ops in plain.items():
        out[int(layer)] = []
        for op in ops:
            kind = _OPERATOR_KINDS.get(str(op.get("kind")))
            if kind is None:
                raise TypeError(f"unknown operator {op.get('kind')!r} in a guard spec")
            out[int(layer)].append(kind(**{k: v for k, v in op.items() if k != "kind"}))
    return out


@dataclass
class RowState:
    """One request in the batch: its mode, the projections of its answer tokens so far and its guard switches."""

    id: str
    mode: str
    output: list[int]  # vLLM's live list of the request's generated tokens
    projections: list[float] = field(default_factory=list)
    guard_on: bool = False
    switches: list[tuple[bool, int, float]] = field(default_factory=list)  # (capping, after n tokens, window mean)
    capped_tokens: int = 0

    def capped(self) -> bool:
        return self.mode == "always" or (self.mode == "auto" and self.guard_on)


class _Table:
    """The rows of the running batch (kept by :class:`GuardRows`) and the reports of requests that left it."""

    def __init__(self) -> None:
        self.rows: dict[int, RowState] = {}
        self.batch_size = 0
        self.finished: dict[str, RowState] = {}
        self.unmapped_steps = 0


TABLE = _Table()


def report(request_id: str) -> RowState | None:
    """The guard's record of a request (switches, capped tokens, projections), finished or still in the batch."""
    for row in TABLE.rows.values():
        if row.id == request_id:
            return row
    return TABLE.finished.get(request_id)


def _mode(params: Any) -> tuple[str, str]:
    extra = (getattr(params, "extra_args", None) or {}).get("personaxis") or {}
    mode = extra.get("mode", "off")
    if mode not in MODES:
        raise ValueError(f"personaxis mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode, str(extra.get("id", ""))


def _logits_processor_base() -> type:
    try:
        from vllm.v1.sample.logits_processor import LogitsProcessor

        return LogitsProcessor
    except ImportError:  # no vLLM: the class below is still importable (and unused)
        return object


class GuardRows(_logits_processor_base()):  # type: ignore[misc]
    """Keeps :data:`TABLE` in step with vLLM's persistent batch; the logits pass through unchanged."""

    def __init__(self, vllm_config: Any = None, device: Any = None, is_pin_memory: bool = False) -> None:
        TABLE.rows.clear()

    @classmethod
    def validate_params(cls, params: Any) -> None:
        _mode(params)

    def is_argmax_invariant(self) -> bool:
        return False  # keep vLLM calling update_state for greedy batches too

    def update_state(self, batch_update: Any) -> None:
        if batch_update is None:
            return
        rows = TABLE.rows
        for index in batch_update.removed:
            row = rows.pop(index, None)
            if row is not None:
                TABLE.finished[row.id] = row
        for added in batch_update.added:
            index, params, output = added[0], added[1], added[-1]
            mode, request_id = _mode(params)
            rows[index] = RowState(request_id, mode, output)
        for source, target, direction in batch_update.moved:
            a, b = rows.pop(source, None), rows.pop(target, None)
            if a is not None:
                rows[target] = a
            if b is not None and "SWAP" in str(direction):
                rows[source] = b
        TABLE.batch_size = batch_update.batch_size

    def apply(self, logits: Tensor) -> Tensor:
        return logits


def _tokens_per_row(n_tokens: int) -> list[int] | None:
    """How many of this step's tokens each row of the batch has, in row order; ``None`` when unknown."""
    n_rows = TABLE.batch_size
    try:
        from vllm.forward_context import get_forward_context

        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, dict):
            metadata = next(iter(metadata.values()), None)
        starts = getattr(metadata, "query_start_loc", None)
    except (ImportError, AssertionError, AttributeError):
        starts = None
    if isinstance(starts, Tensor) and starts.numel() == n_rows + 1 and int(starts[-1]) == n_tokens:
        return starts.diff().tolist()
    return [1] * n_rows if n_tokens == n_rows else None


class GuardHooks:
    """Forward hooks on a vLLM decoder stack: the operators of each token's request, then the monitored reading."""

    def __init__(self, spec: GuardSpec) -> None:
        self.spec = spec
        self.table = RowInterventions()
        self.steps: list[tuple[RowState, int]] = []  # this step's decoding rows and their token's index

    def attach(self, layers: Sequence[torch.nn.Module], stack: torch.nn.Module) -> None:
        stack.register_forward_pre_hook(self._begin, with_kwargs=True)
        layer_ids = {*self.spec.steering, *self.spec.plan.interventions, self.spec.layer}
        for index in sorted(layer_ids):
            layers[index].register_forward_hook(self._hook(index))

    def _begin(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        inputs = [args[0] if args else kwargs.get("input_ids"), kwargs.get("inputs_embeds")]
        if len(args) > 3:
            inputs.append(args[3])
        n_tokens = next(int(t.shape[0]) for t in inputs if isinstance(t, Tensor))
        counts = _tokens_per_row(n_tokens)
        self.steps = []
        if counts is None:
            TABLE.unmapped_steps += 1
            self.table.set_rows([{}] * n_tokens)
            return
        per_token: list[Interventions] = []
        for index, count in enumerate(counts):
            row = TABLE.rows.get(index)
            ops = self._treatment(row)
            per_token += [ops] * count
            if row is not None and count == 1 and row.output:  # a decoding step: it feeds the newest answer token
                self.steps.append((row, len(per_token) - 1))
        self.table.set_rows(per_token)

    def _treatment(self, row: RowState | None) -> Interventions:
        if row is None or row.mode == "off":
            return {}
        if not row.capped():
            return self.spec.steering
        merged = {layer: list(ops) for layer, ops in self.spec.steering.items()}
        for layer, ops in self.spec.plan.interventions.items():
            merged.setdefault(layer, []).extend(ops)
        return merged

    def _hook(self, index: int) -> Any:
        def hook(module: Any, args: Any, output: Any) -> Any:
            hidden, residual = output  # vLLM blocks return the block output and the residual not yet added
            before = hidden if residual is None else hidden + residual
            stream = before
            writers = self.table.writers().get(index, [])
            for write in writers:
                stream = write(stream.unsqueeze(1), None).squeeze(1)
            if index == self.spec.layer:
                self._read(stream)
            if not writers:
                return output
            # only the change is added: tokens no operator touched keep their block output bit for bit
            return hidden + (stream - before), residual

        return hook

    def _read(self, stream: Tensor) -> None:
        if not self.steps:
            return
        unit = self.spec.unit.to(device=stream.device, dtype=torch.float32)
        tokens = torch.tensor([i for _, i in self.steps], device=stream.device)
        values = (stream.index_select(0, tokens).to(torch.float32) @ unit).tolist()
        for (row, _), value in zip(self.steps, values, strict=True):
            row.capped_tokens += row.capped()
            row.projections.append(value)
            if row.mode == "auto":
                switch = guard_switch(self.spec.plan, row.projections, row.guard_on)
                if switch is not None:
                    row.guard_on = switch.on
                    row.switches.append((switch.on, switch.n_tokens, switch.projection))


def guarded_class(base: type) -> type:
    """``base`` (a vLLM causal-LM class) with :class:`GuardHooks` on its decoder blocks when a spec is configured."""

    class Guarded(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            path = os.environ.get(SPEC_ENV)
            if path:
                stack = self.model
                GuardHooks(GuardSpec.load(path)).attach(stack.layers, stack)

    Guarded.__name__ = Guarded.__qualname__ = f"Personaxis{base.__name__}"
    return Guarded


def register() -> None:
    """vLLM general plugin (run in every vLLM process): the decoder architectures of :data:`ARCHITECTURES`, guarded.
    Does nothing unless ``$PERSONAXIS_VLLM_GUARD`` names a spec, so that other vLLM engines stay as they are."""
    import importlib

    if not os.environ.get(SPEC_ENV):
        return

    from vllm import ModelRegistry

    modules = {"Llama": "llama", "Mistral": "llama", "Qwen2": "qwen2", "Qwen3": "qwen3"}
    for arch in ARCHITECTURES:
        family = arch.removesuffix("ForCausalLM")
        try:
            module = importlib.import_module(f"vllm.model_executor.models.{modules[family]}")
            base = getattr(module, arch, None) or module.LlamaForCausalLM
        except (ImportError, AttributeError):  # an architecture this vLLM does not have
            continue
        ModelRegistry.register_model(arch, guarded_class(base))
