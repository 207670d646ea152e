"""One mechanism for reading and writing the residual stream at decoder-block outputs.

``residual_hooks(lm, writers=..., readers=...)`` registers forward hooks on the decoder blocks for the duration of a
``with`` block and always removes them, even when the body raises. Writers run first (registered with
``prepend=True``, so they also precede transformers' own hidden-state recorders) and readers see the written stream.

Every hook receives the block output ``hidden`` of shape ``[batch, positions, hidden]`` and a boolean ``mask`` of
shape ``[batch, positions]`` that is ``False`` at padding positions (taken from the ``attention_mask`` of the current
forward call, also during ``generate`` with a KV cache), or ``None`` when the call had no attention mask.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from personaxis.models import LoadedModel

Writer = Callable[[Tensor, "Tensor | None"], Tensor]
Reader = Callable[[Tensor, "Tensor | None"], None]


class StopForward(Exception):
    """Raised by a reader to end a forward pass once the deepest needed block has run."""


class _MaskTracker:
    """Remembers the attention mask of the forward call in flight."""

    def __init__(self) -> None:
        self.attention_mask: Tensor | None = None

    def pre_hook(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        self.attention_mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None

    def current(self, hidden: Tensor) -> Tensor | None:
        mask = self.attention_mask
        if mask is None:
            return None
        positions = hidden.shape[1]
        if mask.shape[0] != hidden.shape[0] or mask.shape[1] < positions:
            return None
        return mask[:, -positions:].to(device=hidden.device, dtype=torch.bool)


def is_mask_tracker_hook(hook: Any) -> bool:
    """Whether ``hook`` is the mask tracker :func:`residual_hooks` puts on a base model (a decode step that bypasses
    the base model's forward calls it with the call's keywords, :mod:`personaxis.generation.llama_step`)."""
    return isinstance(getattr(hook, "__self__", None), _MaskTracker)


def _split_output(output: Any) -> tuple[Tensor, Callable[[Tensor], Any]]:
    if isinstance(output, Tensor):
        return output, lambda h: h
    if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
        return output[0], lambda h: (h, *output[1:])
    hidden = getattr(output, "hidden_states", None) if not isinstance(output, tuple) else None
    if isinstance(hidden, Tensor):

        def rebuild(h: Tensor) -> Any:
            output.hidden_states = h
            return output

        return hidden, rebuild
    raise TypeError(f"unexpected decoder block output of type {type(output).__name__}")


def check_layers(lm: LoadedModel, layers: Sequence[int]) -> list[int]:
    return [lm.profile.check_layer(layer) for layer in layers]


@contextmanager
def residual_hooks(
    lm: LoadedModel,
    *,
    writers: Mapping[int, Sequence[Writer]] | None = None,
    readers: Mapping[int, Sequence[Reader]] | None = None,
) -> Iterator[None]:
    """Attach writers and readers to block outputs; remove them on exit, whatever happens."""
    writers = {layer: list(fns) for layer, fns in (writers or {}).items() if fns}
    readers = {layer: list(fns) for layer, fns in (readers or {}).items() if fns}
    check_layers(lm, [*writers, *readers])
    tracker = _MaskTracker()
    handles: list[torch.utils.hooks.RemovableHandle] = []
    blocks = lm.layers
    try:
        handles.append(lm.base_model.register_forward_pre_hook(tracker.pre_hook, with_kwargs=True))
        for layer, fns in writers.items():

            def write(module: torch.nn.Module, args: Any, output: Any, fns: list[Writer] = fns) -> Any:
                hidden, rebuild = _split_output(output)
                mask = tracker.current(hidden)
                for fn in fns:
                    hidden = fn(hidden, mask)
                return rebuild(hidden)

            handles.append(blocks[layer].register_forward_hook(write, prepend=True))
        for layer, fns in readers.items():

            def read(module: torch.nn.Module, args: Any, output: Any, fns: list[Reader] = fns) -> None:
                hidden, _ = _split_output(output)
                mask = tracker.current(hidden)
                for fn in fns:
                    fn(hidden, mask)

            handles.append(blocks[layer].register_forward_hook(read))
        yield
    finally:
        for handle in handles:
            handle.remove()


def hook_count(lm: LoadedModel) -> int:
    """Number of forward hooks currently attached to the decoder blocks and the base model (for tests)."""
    modules = [lm.base_model, *lm.layers]
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)
