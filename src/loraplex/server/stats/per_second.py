"""PerSecond: counts per whole second over the last `window_s` seconds, in a fixed ring of buckets, for the rates and
the shares of the stats (server/stats/tenants.py, shares.py). Used on the event loop only."""

from __future__ import annotations

from collections import deque


class PerSecond:
    def __init__(self, window_s: int, counters: int = 1) -> None:
        self.window_s = window_s
        self._counters = counters
        self._buckets: deque[list[int]] = deque(maxlen=window_s + 1)  # [second, count 0, count 1, ...]

    def add(self, now: float, counter: int, n: int) -> None:
        """`n` more of counter `counter` at monotonic time `now`."""
        second = int(now)
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append([second] + [0] * self._counters)
        self._buckets[-1][1 + counter] += n

    def sums(self, now: float) -> list[int]:
        """Each counter's total over the `window_s` whole seconds up to `now`."""
        recent = [b for b in self._buckets if b[0] > int(now) - self.window_s]
        return [sum(b[1 + i] for b in recent) for i in range(self._counters)]
