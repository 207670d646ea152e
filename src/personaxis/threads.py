"""Threads for a machine that others use too.

PyTorch's CPU kernels run on OpenMP threads, one per core by default, and their threads meet at a barrier after
every operation. When another process holds one of those cores, every barrier waits for the thread the scheduler
parked, and a 2-thread decode step takes several scheduler time slices instead of a few milliseconds: generation
on a 2-core machine with one other CPU-bound process ran at a small fraction of its speed. So:

- :func:`prefer_passive_waiting` makes idle OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``,
  ``KMP_BLOCKTIME=0``; only before torch is imported). It is not the default: measured on the 2-core VM it cost
  35-60 % of quiet generation throughput (every operation's barrier then waits for a thread to wake up), while
  giving up the contended thread (below) recovers the busy case without it;
- :class:`ThreadBudget` gives torch as many threads as there are CPUs this process may run on
  (``os.sched_getaffinity``) that other processes leave idle, measured from ``/proc/stat`` between two calls (no
  sleeping), and says when the machine is oversubscribed.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

# CPUs other processes must keep busy on average before a thread is given up, and the share of a CPU that has to
# come free again before it is taken back (hysteresis: a thread count that flips every chunk would cost more).
GIVE_UP_AT = 0.6
TAKE_BACK_AT = 0.3
THREADS_ENV = "PERSONAXIS_THREADS"


def prefer_passive_waiting() -> None:
    """Idle OpenMP threads sleep rather than spin (only effective before torch is imported; environment wins)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("KMP_BLOCKTIME", "0")


def available_cpus() -> list[int]:
    """The CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return list(range(os.cpu_count() or 1))


def _busy_jiffies(cpus: list[int]) -> tuple[float, float] | None:
    """Busy and total clock ticks so far of ``cpus`` (from /proc/stat), or None where unreadable."""
    wanted = {f"cpu{c}" for c in cpus}
    busy = total = 0.0
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            for line in handle:
                fields = line.split()
                if fields and fields[0] in wanted:
                    values = [float(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
                    idle = values[3] + values[4]
                    total += sum(values)
                    busy += sum(values) - idle
    except (OSError, ValueError):
        return None
    return (busy, total) if total > 0 else None


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


class ThreadBudget:
    """Chooses torch's thread count from the CPUs this process has and how busy other processes keep them.

    Call :meth:`update` between pieces of work (generation chunks): it measures the other processes' load since the
    previous call and sets ``torch.set_num_threads``. ``PERSONAXIS_THREADS=N`` fixes the count instead.
    """

    def __init__(self, log: Callable[[str], None] | None = None) -> None:
        self.log = log or (lambda message: None)
        self.cpus = available_cpus()
        self.threads = len(self.cpus)
        self.others = 0.0  # CPUs' worth of work by other processes at the last measurement
        self._fixed = self._fixed_threads()
        self._last = self._sample()

    @staticmethod
    def _fixed_threads() -> int | None:
        value = os.environ.get(THREADS_ENV, "").strip()
        if not value:
            return None
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{THREADS_ENV} must be a positive whole number, got {value!r}")
        return int(value)

    def _sample(self) -> tuple[float, float, float, float] | None:
        jiffies = _busy_jiffies(self.cpus)
        if jiffies is None:
            return None
        return (*jiffies, _own_cpu_seconds(), time.monotonic())

    def measure(self) -> float | None:
        """CPUs' worth of work other processes did since the last call (None when unknown or too soon)."""
        now = self._sample()
        last, self._last = self._last, now if now is not None else self._last
        if now is None or last is None:
            return None
        busy, total = now[0] - last[0], now[1] - last[1]
        wall = now[3] - last[3]
        if total <= 0 or wall < 0.2:
            self._last = last  # keep measuring from the earlier sample
            return None
        n = len(self.cpus)
        busy_cpus = n * busy / total
        mine = (now[2] - last[2]) / wall
        return max(0.0, busy_cpus - mine)

    def choose(self, others: float) -> int:
        """Threads to use when other processes keep ``others`` CPUs busy: one fewer for each CPU they hold from
        ``GIVE_UP_AT`` of it, taken back when they hold less than ``TAKE_BACK_AT`` of it; at least one."""
        n = len(self.cpus)
        down = n - math.floor(others + 1 - GIVE_UP_AT)
        up = n - math.floor(others + 1 - TAKE_BACK_AT)
        if down < self.threads:
            return max(1, down)
        if up > self.threads:
            return min(n, up)
        return self.threads

    def settle(self, seconds: float = 0.3) -> int:
        """Measure over ``seconds`` now (at start-up, before any work) and set the thread count."""
        self._last = self._sample()
        time.sleep(seconds)
        return self.update()

    def update(self) -> int:
        """Measure, set torch's thread count, and log a change; return the count."""
        import torch

        if self._fixed is not None:
            if torch.get_num_threads() != self._fixed:
                torch.set_num_threads(self._fixed)
            return self._fixed
        others = self.measure()
        if others is None:
            return self.threads
        self.others = others
        threads = self.choose(others)
        if threads != self.threads or torch.get_num_threads() != threads:
            n = len(self.cpus)
            if threads < n:
                self.log(
                    f"the machine is busy: other processes keep {others:.1f} of this process's {n} CPUs busy; "
                    f"running on {threads} thread(s)"
                )
            elif threads != self.threads:
                self.log(f"the machine is quiet again: running on {threads} threads")
            self.threads = threads
            torch.set_num_threads(threads)
        return threads
