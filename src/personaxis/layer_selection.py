"""The one rule for choosing layers: what ``layers=`` means wherever a function takes it.

- ``None`` → the caller's default (the axis' target layer, or every layer);
- ``"all"`` → every layer, in order;
- an int → that layer; a sequence of ints → those layers, in the order given, duplicates dropped (a layer steered,
  capped or monitored twice is the same as once).

Every index must be an int (not a bool) in ``0 .. n_layers - 1`` (``IndexError`` names the valid range), and at
least one layer must be chosen (``ValueError``). A caller may pass its own ``check`` of one index (the axis' or the
model profile's, whose errors name the axis or the model) instead of the generic one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

Layers = Sequence[int] | int | Literal["all"] | None


def select_layers(
    layers: Layers,
    n_layers: int,
    *,
    default: Sequence[int],
    what: str = "layer",
    check: Callable[[int], Any] | None = None,
) -> list[int]:
    """The chosen layer indices (see the module's rule); ``what`` names them in errors (``"steering layer"``)."""
    if layers is None:
        items = list(default)
    elif isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"{what}s must be 'all', an index or a list of indices, got {layers!r}")
        items = list(range(n_layers))
    else:
        items = [layers] if isinstance(layers, int) else list(layers)
    if not items:
        raise ValueError(f"no {what} given")
    for layer in items:
        if check is not None:
            check(layer)
            continue
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"a {what} index must be an int, got {layer!r}")
        if not 0 <= layer < n_layers:
            raise IndexError(f"{what} {layer} is out of range: there are {n_layers} layers (0..{n_layers - 1})")
    return list(dict.fromkeys(items))
