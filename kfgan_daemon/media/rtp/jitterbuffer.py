"""Putting RTP packets back in sequence order before depacketization.

Packets that arrive in order pass straight through (no added latency). When
one is missing, later packets are held until it arrives, until ``max_delay``
seconds have passed since the first of them arrived, or until ``max_packets``
are held; then the missing ones are declared lost and the held packets are
released. Packets older than what was already released (late or duplicate)
are dropped. A jump of more than ``reset_distance`` sequence numbers is taken
for a restarted sender and resynchronises the buffer.
"""
from __future__ import annotations

from dataclasses import dataclass

from kfgan_daemon.media.rtp.packet import RtpPacket, seq_add, seq_delta


@dataclass(slots=True)
class ReorderStats:
    lost: int = 0
    late: int = 0
    duplicates: int = 0
    reordered: int = 0
    resets: int = 0


class ReorderBuffer:
    def __init__(self, max_delay: float = 0.03, max_packets: int = 128, reset_distance: int = 3000) -> None:
        self.max_delay = max_delay
        self.max_packets = max_packets
        self.reset_distance = reset_distance
        self.stats = ReorderStats()
        self._expected: int | None = None
        self._held: dict[int, tuple[RtpPacket, float]] = {}

    @property
    def held(self) -> int:
        return len(self._held)

    @property
    def deadline(self) -> float | None:
        """When :meth:`expire` should next be called, or None when nothing is held."""
        if not self._held:
            return None
        return min(arrival for _, arrival in self._held.values()) + self.max_delay

    def push(self, packet: RtpPacket, now: float) -> list[RtpPacket]:
        """Add a packet; returns the packets that can now be released, in order."""
        sequence = packet.sequence_number
        if self._expected is None:
            self._expected = sequence
        distance = seq_delta(sequence, self._expected)
        released: list[RtpPacket] = []
        if abs(distance) > self.reset_distance:
            self.stats.resets += 1
            released = self._release_all()
            self._expected = sequence
            distance = 0
        if distance < 0:
            self.stats.late += 1
            return released
        if sequence in self._held:
            self.stats.duplicates += 1
            return released
        if distance == 0 and self._held:
            self.stats.reordered += 1  # it fills the gap later packets were waiting on
        self._held[sequence] = (packet, now)
        released += self._release_in_order()
        while len(self._held) > self.max_packets:
            released += self._skip_gap()
        return released

    def expire(self, now: float) -> list[RtpPacket]:
        """Give up on missing packets whose successors have waited ``max_delay``."""
        released: list[RtpPacket] = []
        while self._held and (deadline := self.deadline) is not None and now >= deadline:
            released += self._skip_gap()
        return released

    def reset(self) -> None:
        self._expected = None
        self._held.clear()

    def _release_in_order(self) -> list[RtpPacket]:
        released = []
        while self._expected in self._held:
            released.append(self._held.pop(self._expected)[0])
            self._expected = seq_add(self._expected, 1)
        return released

    def _skip_gap(self) -> list[RtpPacket]:
        """Declare the packets before the oldest held one lost and release what follows."""
        assert self._expected is not None
        first = min(self._held, key=lambda sequence: seq_delta(sequence, self._expected))
        self.stats.lost += seq_delta(first, self._expected)
        self._expected = first
        return self._release_in_order()

    def _release_all(self) -> list[RtpPacket]:
        released = []
        while self._held:
            released += self._skip_gap()
        return released
