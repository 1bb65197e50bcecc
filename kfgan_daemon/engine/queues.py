"""The queues that keep one live stream's frames in input order and its memory bounded.

``pending`` holds every frame submitted and not yet emitted, in input order:
it bounds the stream (``put`` waits while it is full) and the emit task walks
it. ``inbox`` holds the ones the face task has not reached yet, always a subset
of ``pending``, in the same order. Two tasks reading the same order is what
lets the face stage of frame N+1 overlap the generator work of frame N while
the output order stays the input order. ``outbox`` holds finished frames the
consumer has not read; an evicting (real-time) stream whose consumer falls
behind loses its oldest frames there, never the end marker.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

from kfgan_daemon.engine.output import StreamOutput

R = TypeVar("R")


class _End:
    """Marks the end of a queue."""


_END = _End()


class StreamQueues(Generic[R]):
    """``pending_size`` frames at most in the stream, ``outbox_size`` finished ones at most unread.

    ``on_depths`` is given :meth:`depths` whenever they may have changed,
    ``on_evicted`` is called for each finished frame an evicting outbox discards.
    Neither may hold the stream that owns the queues: a closed stream is freed
    at once, without waiting for the cycle collector.
    """

    def __init__(
        self,
        pending_size: int,
        outbox_size: int,
        evicting: bool,
        on_depths: Callable[[dict[str, int]], None],
        on_evicted: Callable[[], None],
    ) -> None:
        self._pending: asyncio.Queue[R | _End] = asyncio.Queue(pending_size)
        self._inbox: asyncio.Queue[R | _End] = asyncio.Queue()
        self._outbox: asyncio.Queue[StreamOutput | _End] = asyncio.Queue(outbox_size)
        self._evicting = evicting
        self._on_depths = on_depths
        self._on_evicted = on_evicted
        self._ended = False  # the end marker is in the outbox

    # ---- in -----------------------------------------------------------------

    async def put(self, record: R) -> None:
        """Queue a frame for the face and the emit task; waits while the stream holds ``pending_size``."""
        await self._pending.put(record)
        self._inbox.put_nowait(record)
        self._changed()

    async def end_input(self) -> None:
        """No more frames: each task ends after the ones already queued."""
        await self._pending.put(_END)
        self._inbox.put_nowait(_END)

    async def next_for_face(self) -> R | None:
        """The next frame the face task has not reached; None at the end."""
        record = await self._inbox.get()
        self._changed()
        return None if isinstance(record, _End) else record

    async def next_to_emit(self) -> R | None:
        """The next frame to leave; None at the end."""
        record = await self._pending.get()
        self._changed()
        return None if isinstance(record, _End) else record

    @property
    def inbox_backlog(self) -> int:
        """Frames waiting for the face stage."""
        return self._inbox.qsize()

    def clear_input(self) -> list[R]:
        """Empty both input queues; returns the frames that were never emitted, in order."""
        abandoned: list[R] = []
        while not self._pending.empty():
            record = self._pending.get_nowait()
            if not isinstance(record, _End):
                abandoned.append(record)
        while not self._inbox.empty():
            self._inbox.get_nowait()
        return abandoned

    # ---- out ----------------------------------------------------------------

    async def put_output(self, output: StreamOutput | None) -> None:
        """The next finished frame, or None for the end; waits for the consumer unless evicting."""
        item: StreamOutput | _End = _END if output is None else output
        if self._evicting:
            self._put_evicting(item)
        else:
            await self._outbox.put(item)
        if output is None:
            self._ended = True
        self._changed()

    def end_output_nowait(self) -> None:
        """Ends the output now (a close, a failed task), discarding the oldest unread frame if need be."""
        if not self._ended:
            self._put_evicting(_END)
            self._ended = True
        self._changed()

    async def get_output(self) -> StreamOutput | None:
        """The next finished frame; None, for every reader, once the stream has ended."""
        item = await self._outbox.get()
        if isinstance(item, _End):
            self._outbox.put_nowait(item)  # let any other reader finish too
            return None
        self._changed()
        return item

    def _put_evicting(self, item: StreamOutput | _End) -> None:
        """A live consumer that falls behind loses its oldest frames, never the end marker."""
        while self._outbox.full():
            old = self._outbox.get_nowait()
            if isinstance(old, _End):
                self._outbox.put_nowait(old)
                return
            self._on_evicted()
        self._outbox.put_nowait(item)

    def _changed(self) -> None:
        self._on_depths(self.depths())

    def depths(self) -> dict[str, int]:
        """inbox: frames the face stage has not reached; pending: frames not yet emitted; outbox: not yet read."""
        return {"inbox": self._inbox.qsize(), "pending": self._pending.qsize(), "outbox": self._outbox.qsize()}
