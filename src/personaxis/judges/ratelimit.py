"""A thread-safe token bucket: at most ``burst + rate * t`` acquisitions in any window of ``t`` seconds."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class TokenBucket:
    """Requests-per-minute limiter shared by all worker threads of a judge.

    ``acquire()`` reserves a token and sleeps until it is due, outside the lock, so waiting callers queue up in order
    of arrival. With ``burst=1`` requests are spaced at least ``60 / requests_per_minute`` seconds apart.
    """

    def __init__(
        self,
        requests_per_minute: float,
        *,
        burst: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if requests_per_minute <= 0:
            raise ValueError(f"requests_per_minute must be positive, got {requests_per_minute}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst}")
        self.rate = requests_per_minute / 60.0  # tokens per second
        self.capacity = float(burst)
        self._tokens = float(burst)
        self._clock = clock
        self._sleep = sleep
        self._last = clock()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"TokenBucket(requests_per_minute={self.rate * 60:g}, burst={self.capacity:g})"

    def acquire(self) -> float:
        """Take one token, waiting as long as needed; returns the seconds waited."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= 1.0
            wait = 0.0 if self._tokens >= 0 else -self._tokens / self.rate
        if wait > 0:
            self._sleep(wait)
        return wait
