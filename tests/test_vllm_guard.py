"""Guard mode on vLLM (personaxis.backends.vllm_guard).

On CPU: the hooks and the row table against a stand-in decoder stack whose blocks return ``(hidden, residual)`` as
vLLM's do, driven by vLLM-style batch updates (rows added, moved, removed). With vLLM and a CUDA GPU: the real engine
through the GPU check's section (skipped elsewhere, with the reason)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from personaxis.backends import vllm_guard
from personaxis.backends.vllm_guard import GuardHooks, GuardRows, GuardSpec
from personaxis.guard import GuardPlan
from personaxis.interventions import Add, FloorCap

HIDDEN, LAYERS, MONITORED, TAU, WINDOW = 8, 4, 2, 50.0, 3


class Block(torch.nn.Module):
    """Like a vLLM decoder layer: returns its output and the residual it has not added yet."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(HIDDEN, HIDDEN)
        torch.nn.init.normal_(self.linear.weight, generator=torch.Generator().manual_seed(seed))

    def forward(self, hidden, residual):
        stream = hidden if residual is None else hidden + residual
        return torch.tanh(self.linear(stream)), stream


class Stack(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(Block(i) for i in range(LAYERS))

    def forward(self, input_ids, positions=None):
        hidden, residual = torch.nn.functional.one_hot(input_ids, HIDDEN).float(), None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        return hidden + residual


@dataclass
class Params:
    extra_args: dict


@dataclass
class Update:
    batch_size: int
    removed: list = field(default_factory=list)
    added: list = field(default_factory=list)
    moved: list = field(default_factory=list)


def _request(mode: str, name: str) -> tuple[Params, list[int]]:
    return Params({"personaxis": {"mode": mode, "id": name}}), []


def _spec() -> tuple[torch.Tensor, GuardSpec]:
    """Steering on layer 1, a floor cap on the monitored layer, along the first coordinate."""
    unit = torch.zeros(HIDDEN)
    unit[0] = 1.0
    spec = GuardSpec(
        steering={1: [Add(unit, alpha=0.5)]},
        plan=GuardPlan({MONITORED: [FloorCap(unit, tau=TAU)]}, threshold=TAU, window=WINDOW, hysteresis=1.0),
        layer=MONITORED,
        unit=unit,
    )
    return unit, spec


def test_hooks_treat_each_row_as_its_request_says_and_follow_moves():
    unit, spec = _spec()
    plain, guarded = Stack(), Stack()
    guarded.load_state_dict(plain.state_dict())
    GuardHooks(spec).attach(guarded.layers, guarded)
    rows = GuardRows()
    requests = {m: _request(m, m) for m in ("off", "always", "auto")}
    rows.update_state(Update(3, added=[(i, p, None, out) for i, (p, out) in enumerate(requests.values())]))
    ids = torch.tensor([1, 2, 3])
    for step in range(6):
        for _, out in requests.values():
            out.append(step)  # a decoding step: each row feeds its newest token
        if step == 4:  # vLLM condenses the batch: rows 0 and 2 swap places
            rows.update_state(Update(3, moved=[(0, 2, "MoveDirectionality.SWAP")]))
            ids = ids[[2, 1, 0]]
        got, want = guarded(ids), plain(ids)
        off = 0 if step < 4 else 2
        assert torch.equal(got[off], want[off])  # an "off" row is untouched, bit for bit
    off, always, auto = (vllm_guard.report(m) for m in ("off", "always", "auto"))
    assert off.switches == [] and off.capped_tokens == 0 and max(off.projections) < TAU
    assert always.capped_tokens == 6 and min(always.projections) >= TAU - 1e-4
    assert auto.switches[0][:2] == (True, WINDOW) and len(auto.switches) == 1
    assert auto.capped_tokens == 6 - WINDOW and min(auto.projections[WINDOW:]) >= TAU - 1e-4
    rows.update_state(Update(2, removed=[1]))  # a request that leaves keeps its report
    assert vllm_guard.report("always") is always and 1 not in vllm_guard.TABLE.rows
    assert vllm_guard.TABLE.unmapped_steps == 0


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="personaxis mode must be one of"):
        GuardRows.validate_params(Params({"personaxis": {"mode": "sometimes"}}))


def test_guarded_vllm_engine(tmp_path: Path):
    if not torch.cuda.is_available():
        pytest.skip("the vLLM guard runs on a CUDA GPU; none is visible here")
    pytest.importorskip("vllm", reason="the vLLM guard needs the vllm package (pip install 'personaxis[vllm]')")
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from vllm_guard_check import section_vllm_guard

    result = section_vllm_guard(tmp_path)
    assert result["ok"], result


def test_spec_file_round_trips_through_a_weights_only_load(tmp_path):
    unit, spec = _spec()
    path = spec.save(tmp_path / "spec.pt")
    torch.load(path, weights_only=True)  # plain data only: nothing is unpickled
    back = GuardSpec.load(path)
    assert (back.layer, back.plan.threshold, back.plan.window, back.plan.hysteresis) == (MONITORED, TAU, WINDOW, 1.0)
    (add,) = back.steering[1]
    (cap,) = back.plan.interventions[MONITORED]
    assert type(add) is Add and add.alpha == 0.5 and torch.equal(add.vector, unit)
    assert type(cap) is FloorCap and cap.tau == TAU and torch.equal(cap.vector, unit)
    assert torch.equal(back.unit, unit)
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(TypeError, match="no guard spec"):
        GuardSpec.load(tmp_path / "other.pt")
