"""Repeated warnings logged at most once per interval, with how many were held back.

A fault that hits every frame (a dead worker, a broken stream) must show in the
log without flooding it: at 25 frames a second per stream, one line per frame
is thousands of lines a minute and hides everything else.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

# Distinct keys remembered; the oldest are forgotten first (a closed stream's keys).
_MAX_KEYS = 512


@dataclass(slots=True)
class _Window:
    logged_at: float
    held_back: int = 0


class ThrottledLog:
    """Logs the first message of each ``key`` at once, then at most one per ``interval`` seconds.

    A message that follows held-back ones says how many were held back, so the
    log still tells how often the problem happened.
    """

    def __init__(
        self, logger: logging.Logger, interval: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.logger = logger
        self.interval = interval
        self._clock = clock
        self._windows: OrderedDict[Hashable, _Window] = OrderedDict()

    def warning(self, key: Hashable, message: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, message, *args)

    def error(self, key: Hashable, message: str, *args: object) -> bool:
        return self.log(logging.ERROR, key, message, *args)

    def log(self, level: int, key: Hashable, message: str, *args: object) -> bool:
        """Log now or count the message as held back; True when it was logged."""
        now = self._clock()
        window = self._windows.get(key)
        if window is not None and now - window.logged_at < self.interval:
            window.held_back += 1
            return False
        if window is not None and window.held_back:
            message = f"{message} (and {window.held_back} more like it in the last {now - window.logged_at:.0f} s)"
        self._windows[key] = _Window(now)
        self._windows.move_to_end(key)
        while len(self._windows) > _MAX_KEYS:
            self._windows.popitem(last=False)
        self.logger.log(level, message, *args)
        return True

    def held_back(self, key: Hashable) -> int:
        """Messages of ``key`` not logged since the last one that was."""
        window = self._windows.get(key)
        return window.held_back if window is not None else 0
