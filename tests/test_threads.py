"""Thread counts follow the CPUs this process has and how busy other processes keep them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from personaxis import threads
from personaxis.threads import ThreadBudget


def _budget(n_cpus: int, monkeypatch) -> ThreadBudget:
    monkeypatch.setattr(threads, "available_cpus", lambda: list(range(n_cpus)))
    monkeypatch.delenv(threads.THREADS_ENV, raising=False)
    return ThreadBudget()


def test_threads_given_up_and_taken_back_with_hysteresis(monkeypatch):
    budget = _budget(2, monkeypatch)
    assert budget.threads == 2
    assert budget.choose(0.5) == 2  # half a CPU busy elsewhere: keep both
    assert budget.choose(1.0) == 1  # one CPU-bound process: one thread
    budget.threads = 1
    assert budget.choose(0.5) == 1  # not free enough to take it back
    assert budget.choose(0.1) == 2
    assert budget.choose(5.0) == 1  # never fewer than one
    many = _budget(16, monkeypatch)
    assert many.choose(1.0) == 15 and many.choose(3.7) == 12


def test_update_sets_torch_threads_and_says_the_machine_is_busy(monkeypatch):
    messages: list[str] = []
    budget = _budget(2, monkeypatch)
    budget.log = messages.append
    monkeypatch.setattr(budget, "measure", lambda: 1.1)
    before = torch.get_num_threads()
    try:
        assert budget.update() == 1 and torch.get_num_threads() == 1
        assert messages and "the machine is busy" in messages[0] and "1 thread" in messages[0]
        monkeypatch.setattr(budget, "measure", lambda: 0.0)
        assert budget.update() == 2 and "quiet again" in messages[-1]
    finally:
        torch.set_num_threads(before)


def test_measure_counts_other_processes_only(monkeypatch):
    """Measured between two calls: this process's own CPU time is not counted as other processes' load."""
    budget = ThreadBudget()
    x = torch.randn(256, 256)
    budget._last = budget._sample()
    for _ in range(200):
        x = torch.tanh(x @ x)
    others = budget.measure()
    if others is not None:  # None on machines without /proc/stat
        assert 0 <= others <= len(budget.cpus)


def test_fixed_thread_count_and_bad_value(monkeypatch):
    monkeypatch.setenv(threads.THREADS_ENV, "1")
    before = torch.get_num_threads()
    try:
        assert ThreadBudget().update() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    monkeypatch.setenv(threads.THREADS_ENV, "many")
    with pytest.raises(ValueError, match="must be a positive whole number"):
        ThreadBudget()


def test_passive_waiting_is_asked_for_only_when_wanted():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME")}
    code = (
        "import os, personaxis.cli; print(os.environ.get('OMP_WAIT_POLICY'));"
        "from personaxis.threads import prefer_passive_waiting; prefer_passive_waiting();"
        "print(os.environ['OMP_WAIT_POLICY'], os.environ['KMP_BLOCKTIME'])"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["None", "PASSIVE", "0"]  # the command leaves OpenMP's default (spinning is faster quiet)
