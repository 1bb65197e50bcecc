"""The few received frames a stream has not taken yet: bounded, the newest win, I-frames stay.

aiortc's remote track queues every decoded picture without bound, so a stream
that falls behind (an overloaded machine) would build seconds of backlog that
no latency figure of the engine sees. A reader empties that queue at once into
a :class:`FrameBacklog`; when it is full, the oldest picture that is not an
I-frame gives way. I-frames are kept because everything the keyframe store
does depends on them; ``max_keyframes`` still bounds a stream made only of
I-frames.
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class BacklogClosed(Exception):
    """Raised by :meth:`FrameBacklog.get` once the backlog is closed and empty."""


class FrameBacklog(Generic[T]):
    """A FIFO of at most ``capacity`` frames (plus I-frames up to ``max_keyframes``) for one consumer."""

    def __init__(self, capacity: int = 2, max_keyframes: int = 8) -> None:
        if capacity < 1 or max_keyframes < 1:
            raise ValueError("capacity and max_keyframes must be at least 1")
        self.capacity = capacity
        self.max_keyframes = max_keyframes
        self.dropped = 0
        self._items: deque[tuple[T, bool]] = deque()
        self._ready = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, item: T, keyframe: bool) -> int:
        """Add the newest frame; returns how many older frames gave way for it."""
        if self._closed:
            raise BacklogClosed("the backlog is closed")
        self._items.append((item, keyframe))
        dropped = 0
        while len(self._items) > self.capacity and self._drop_oldest(keyframes=False):
            dropped += 1
        while sum(1 for _, key in self._items if key) > self.max_keyframes and self._drop_oldest(keyframes=True):
            dropped += 1
        self.dropped += dropped
        self._ready.set()
        return dropped

    async def get(self) -> T:
        """The oldest frame still held; waits for one, raises :class:`BacklogClosed` after :meth:`close`."""
        while not self._items:
            if self._closed:
                raise BacklogClosed("the backlog is closed")
            self._ready.clear()
            await self._ready.wait()
        item, _ = self._items.popleft()
        return item

    def close(self) -> None:
        """No more frames will come; what is held can still be taken."""
        self._closed = True
        self._ready.set()

    def clear(self) -> None:
        self._items.clear()

    def _drop_oldest(self, keyframes: bool) -> bool:
        # Never the newest frame: it is the one that wins.
        for position in range(len(self._items) - 1):
            if self._items[position][1] == keyframes:
                del self._items[position]
                return True
        return False
