"""Putting RTP packets back in sequence order before depacketization, with RFC 3550 A.1 sequence validation.

Packets that arrive in order pass straight through (no added latency). When
one is missing, later packets are held until it arrives, until ``max_delay``
seconds have passed since the first of them arrived, or until ``max_packets``
are held; then the missing ones are declared lost and the held packets are
released. Packets a little older than what was already released (late or
duplicate, up to ``max_misorder`` behind) are dropped.

A packet further from the sequence than that, ahead by more than
``max_misorder`` or behind by more, is put on probation as in RFC 3550
appendix A.1: it is held aside, and only when the packet that follows it in
sequence arrives next is the jump taken for real (a restarted sender, a long
outage) and the sequence resynchronised to it, both packets kept. A lone stray
packet, far ahead or far behind, is thus dropped without disturbing the
stream, and a sender whose sequence really jumps loses nothing but the wait
for its second packet.
"""
from __future__ import annotations

from dataclasses import dataclass

from kfgan_daemon.media.rtp.packet import RtpPacket, seq_add, seq_delta

# RFC 3550 A.1: how far behind the newest packet one may still be a reordered one.
MAX_MISORDER = 100
# A packet on probation whose successor has not come within this many seconds was a stray.
PROBATION_TIMEOUT = 1.0


@dataclass(slots=True)
class ReorderStats:
    lost: int = 0
    late: int = 0
    duplicates: int = 0
    reordered: int = 0
    resets: int = 0  # sequence jumps confirmed on probation
    strays: int = 0  # packets put on probation and never confirmed


class ReorderBuffer:
    def __init__(self, max_delay: float = 0.03, max_packets: int = 128, max_misorder: int = MAX_MISORDER) -> None:
        # A packet held back behind a gap must never look like a jump from the newest one.
        max_misorder = max(max_misorder, max_packets)
        self.max_delay = max_delay
        self.max_packets = max_packets
        self.max_misorder = max_misorder
        self.stats = ReorderStats()
        self._expected: int | None = None
        self._highest: int | None = None
        self._held: dict[int, tuple[RtpPacket, float]] = {}
        self._probation: tuple[RtpPacket, float] | None = None
        self._jumped_to: RtpPacket | None = None

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
        if self._expected is None or self._highest is None:
            self._expected = self._highest = sequence
        if self._probation is not None and now - self._probation[1] > PROBATION_TIMEOUT:
            self._probation = None
            self.stats.strays += 1
        if abs(seq_delta(sequence, self._highest)) > self.max_misorder:
            return self._on_probation(packet, now)
        return self._accept(packet, now)

    def expire(self, now: float) -> list[RtpPacket]:
        """Give up on missing packets whose successors have waited ``max_delay``."""
        released: list[RtpPacket] = []
        while self._held and (deadline := self.deadline) is not None and now >= deadline:
            released += self._skip_gap()
        return released

    def starts_new_sequence(self, packet: RtpPacket) -> bool:
        """True for the first packet released after a confirmed jump: its number does not follow the last one's,
        yet nothing was lost in between."""
        if packet is self._jumped_to:
            self._jumped_to = None
            return True
        return False

    def reset(self) -> None:
        self._expected = None
        self._highest = None
        self._held.clear()
        self._probation = None
        self._jumped_to = None

    def _accept(self, packet: RtpPacket, now: float) -> list[RtpPacket]:
        assert self._expected is not None and self._highest is not None
        sequence = packet.sequence_number
        if seq_delta(sequence, self._expected) < 0:
            self.stats.late += 1
            return []
        if sequence in self._held:
            self.stats.duplicates += 1
            return []
        if sequence == self._expected and self._held:
            self.stats.reordered += 1  # it fills the gap later packets were waiting on
        if seq_delta(sequence, self._highest) > 0:
            self._highest = sequence
        self._held[sequence] = (packet, now)
        released = self._release_in_order()
        while len(self._held) > self.max_packets:
            released += self._skip_gap()
        return released

    def _on_probation(self, packet: RtpPacket, now: float) -> list[RtpPacket]:
        candidate = self._probation
        if candidate is None or packet.sequence_number != seq_add(candidate[0].sequence_number, 1):
            if candidate is not None:
                self.stats.strays += 1
            self._probation = (packet, now)
            return []
        # Two packets in sequence: the sender's sequence really moved there.
        self._probation = None
        self.stats.resets += 1
        released = self._release_all()
        self._expected = self._highest = candidate[0].sequence_number
        self._jumped_to = candidate[0]
        released += self._accept(candidate[0], candidate[1])
        released += self._accept(packet, now)
        return released

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
