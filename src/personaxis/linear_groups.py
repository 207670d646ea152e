"""Sibling linear layers that read the same input, run as one oneDNN product.

An attention block's query, key and value projections read the same hidden states, and so do a gated MLP's gate and
up projections. On SmolLM2-135M a decode step makes 211 linear calls; with each group as one product it makes 121,
and the products are wider (N = 960 and 3,072 instead of 576/192/192 and 1,536/1,536), which small-batch matrix
products run at a better rate (fewer per-call costs, longer rows for each thread).

The modules and their parameters stay as they are (state dicts, hooks on blocks and on the projections themselves,
interventions): :func:`group_sibling_linears` only links each member of a group to a :class:`LinearGroup`. The first
member called with an input computes the whole group's product from one packed copy of the concatenated weights and
keeps the other members' column slices; a sibling called with that same tensor (the same object, unchanged) gets its
slice without computing anything. Any other input gets the whole product again, so results never depend on the order
or the number of calls. Slices are views of the product (their rows are ``sum(out_features)`` apart), equal to what
each layer computes alone up to float rounding. A group whose slices keep going unused (siblings fed different
inputs, as in cross-attention) is dissolved: its members then pack their own weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from personaxis import kernels
from personaxis.kernels import OneDNNLinear, _version

# Attribute names of sibling projections reading the same input, in the Llama family's naming (Llama, Mistral, Qwen2/3,
# Gemma, OLMo, Granite, SmolLM ...). Other models keep one product per layer.
SIBLING_NAMES: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# Computations that left a sibling's slice unused before a group is dissolved.
MAX_WASTED = 2


def _key(members: Sequence[nn.Linear]) -> tuple[int, ...]:
    key: list[int] = []
    for m in members:
        key += [m.weight.data_ptr(), _version(m.weight)]
        if m.bias is not None:
            key += [m.bias.data_ptr(), _version(m.bias)]
    return tuple(key)


class LinearGroup:
    """Linear layers with one input, computed as one product; see the module's notes."""

    def __init__(self, members: Sequence[OneDNNLinear]) -> None:
        self.members = list(members)
        self.sizes = [m.out_features for m in members]
        self.packed: Tensor | None = None
        self.bias: Tensor | None = None
        self.key: tuple[int, ...] | None = None
        # The last input, its version, and the slices of its product not yet handed out (None once taken).
        self.state: tuple[Tensor, int, list[Tensor | None]] | None = None
        self.wasted = 0

    def _weight(self) -> tuple[Tensor, Tensor | None]:
        key = _key(self.members)
        if self.key != key or self.packed is None:
            weights = [m.weight.detach() for m in self.members]
            self.packed = kernels.pack_weight(torch.cat(weights))
            if any(m.bias is not None for m in self.members):
                self.bias = torch.cat(
                    [
                        m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features)
                        for m in self.members
                    ]
                )
            else:
                self.bias = None
            self.key = key
            for weight in weights:  # the packed copy serves the forward: the originals need not stay resident
                kernels.release_pages(weight)
        return self.packed, self.bias

    def output(self, index: int, x: Tensor) -> Tensor:
        """Member ``index``'s output for ``x``: its slice of the group's product."""
        state = self.state
        if state is not None and state[0] is x and state[1] == _version(x):
            parts = state[2]
            part = parts[index]
            if part is not None:
                parts[index] = None
                if all(p is None for p in parts) and self.state is state:
                    self.state = None  # every slice handed out: keep neither the input nor the product alive
                return part
        if state is not None and any(p is not None for p in state[2]):
            self.wasted += 1
            if self.wasted > MAX_WASTED:
                self.dissolve()
                return self.members[index].forward(x)
        weight, bias = self._weight()
        fresh: list[Tensor | None] = list(kernels.onednn_linear(x, weight, bias).split(self.sizes, dim=-1))
        part = fresh[index]
        fresh[index] = None
        self.state = (x, _version(x), fresh)
        assert part is not None
        return part

    def dissolve(self) -> None:
        """Unlink the members: each computes its own product from then on."""
        for member in self.members:
            member.__dict__.pop("_onednn_group", None)
            member.__dict__.pop("_onednn_group_index", None)
        self.packed, self.bias, self.state = None, None, None


def _groupable(members: Sequence[nn.Module]) -> bool:
    if not all(type(m) is OneDNNLinear for m in members):
        return False
    first = members[0]
    assert isinstance(first, OneDNNLinear)
    return all(
        isinstance(m, OneDNNLinear)
        and m._onednn_pack
        and m.in_features == first.in_features
        and m.weight.dtype is torch.float32
        and m.weight.is_cpu
        and getattr(m, "_onednn_group", None) is None
        for m in members
    )


def group_sibling_linears(model: nn.Module) -> int:
    """Link the sibling projections (:data:`SIBLING_NAMES`) of every module of ``model`` that runs its linear layers
    on packed oneDNN weights into :class:`LinearGroup` s; returns how many groups."""
    count = 0
    for module in model.modules():
        for names in SIBLING_NAMES:
            members = [getattr(module, name, None) for name in names]
            if any(m is None for m in members) or not _groupable(members):  # type: ignore[arg-type]
                continue
            group = LinearGroup(members)  # type: ignore[arg-type]
            for index, member in enumerate(members):
                assert member is not None
                member._onednn_group = group
                member._onednn_group_index = index
            count += 1
    return count


def dissolve_groups(model: nn.Module) -> int:
    """Unlink every group of ``model`` (each layer computes alone again); returns how many."""
    groups = {id(g): g for m in model.modules() if (g := m.__dict__.get("_onednn_group")) is not None}
    for group in groups.values():
        group.dissolve()
    return len(groups)
