"""The call as the daemon received it: a track of the decoded pictures, before restoration.

A :class:`RestoredVideoTrack` hands each picture it received to its received view
when that picture's restored output leaves, so a peer that shows both tracks side
by side sees the same frame, compressed and restored, at the same moment (the
demo page does). Pictures nobody takes in time give way to newer ones: a slow
consumer of the view never holds up the restored track.
"""
from __future__ import annotations

import asyncio
from collections import deque

import av
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

# Pictures the view holds for its sender; beyond this the oldest is dropped.
VIEW_BACKLOG = 2


class ReceivedVideoTrack(MediaStreamTrack):
    """Decoded, unrestored pictures, in the order :meth:`show` is given them."""

    kind = "video"

    def __init__(self, backlog: int = VIEW_BACKLOG) -> None:
        super().__init__()
        self._pictures: deque[av.VideoFrame] = deque(maxlen=backlog)
        self._arrived = asyncio.Event()
        self.frames_shown = 0
        self.frames_out = 0

    def show(self, picture: av.VideoFrame) -> None:
        """Queue ``picture``, a picture of the view's own (each sender's encoder marks the ones it forces to
        be I-frames)."""
        if self.readyState != "live":
            return
        self._pictures.append(picture)
        self.frames_shown += 1
        self._arrived.set()

    async def recv(self) -> av.VideoFrame:
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            if self._pictures:
                self.frames_out += 1
                return self._pictures.popleft()
            self._arrived.clear()
            await self._arrived.wait()

    def stop(self) -> None:
        super().stop()
        self._pictures.clear()
        # Wakes a pending recv(), which then sees the track has ended.
        self._arrived.set()
