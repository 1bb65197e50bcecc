"""Ask a WebRTC sender for a new keyframe (RTCP Picture Loss Indication, RFC 4585 section 6.3.1).

aiortc sends PLIs on its own only after packet loss or a decode error and has
no public call for an application to request one. ``RTCRtpReceiver`` does have
a private coroutine, ``_send_rtcp_pli(media_ssrc)``; this module is the only
place in the project that calls it, so an aiortc upgrade that renames it breaks
one file, and the daemon then keeps running without keyframe requests.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

from aiortc import RTCRtpReceiver

log = logging.getLogger(__name__)

_PRIVATE_PLI = "_send_rtcp_pli"


def pli_supported(receiver: RTCRtpReceiver) -> bool:
    """Whether this aiortc build still has the private call we rely on."""
    return callable(getattr(receiver, _PRIVATE_PLI, None))


class KeyframeRequester:
    """Sends PLIs for one receiver, at most one per ``min_interval`` seconds.

    A keyframe costs the sender a burst of bits, and one takes a round trip to
    arrive; asking more often than that would only inflate the call's bitrate.
    """

    def __init__(
        self,
        receiver: RTCRtpReceiver,
        min_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if min_interval <= 0:
            raise ValueError("min_interval must be positive")
        self.receiver = receiver
        self.min_interval = min_interval
        self._clock = clock
        self._last_sent: float | None = None
        self._warned = False
        self.sent = 0
        self.suppressed = 0
        self.sent_at: list[float] = []

    @property
    def last_sent(self) -> float | None:
        """Clock reading of the last PLI sent, None before the first."""
        return self._last_sent

    def ready(self) -> bool:
        """True when a request now would not be rate-limited."""
        return self._last_sent is None or self._clock() - self._last_sent >= self.min_interval

    def media_ssrc(self) -> int | None:
        """The SSRC of the sender's stream that packets most recently arrived from."""
        sources = self.receiver.getSynchronizationSources()
        if not sources:
            return None
        return max(sources, key=lambda source: source.timestamp).source

    async def request(self, media_ssrc: int | None = None) -> bool:
        """Send a PLI unless one went out less than ``min_interval`` ago; True when one was sent."""
        if not self.ready():
            self.suppressed += 1
            return False
        ssrc = media_ssrc if media_ssrc is not None else self.media_ssrc()
        if ssrc is None:
            # Nothing received yet: the sender's first frame is a keyframe anyway.
            return False
        send = getattr(self.receiver, _PRIVATE_PLI, None)
        if not callable(send):
            if not self._warned:
                log.warning("this aiortc version has no RTCRtpReceiver.%s; keyframe requests are disabled", _PRIVATE_PLI)
                self._warned = True
            return False
        await send(ssrc)
        now = self._clock()
        self._last_sent = now
        self.sent += 1
        self.sent_at.append(now)
        del self.sent_at[:-16]
        log.debug("PLI sent to ssrc %d", ssrc)
        return True
