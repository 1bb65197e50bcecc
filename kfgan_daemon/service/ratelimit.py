"""Per-client-address request limits (a moving window kept in memory by ``limits``)."""
from __future__ import annotations

import math
import time

import limits
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter


class AddressRateLimit:
    """At most ``rate`` (``"30/minute"``, ``"5/second"``) requests from one client address.

    Addresses that stop asking are forgotten when their window expires, so a
    stream of one-off callers does not grow the table.
    """

    def __init__(self, rate: str) -> None:
        self.rate = rate
        self._item = limits.parse(rate)
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    def hit(self, address: str) -> int | None:
        """Count one request from ``address``: None when it is allowed, else whole seconds until one will be."""
        if self._limiter.hit(self._item, address):
            return None
        reset = self._limiter.get_window_stats(self._item, address).reset_time
        return max(1, math.ceil(reset - time.time()))
