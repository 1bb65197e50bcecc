"""The one wrapper around aiortc's private PLI call: real RTCP on the wire, rate limited."""
from __future__ import annotations

import logging

import pytest
from aiortc import RTCCertificate, RTCDtlsTransport, RTCIceGatherer, RTCIceTransport, RTCRtpReceiver
from aiortc.rtp import RTCP_PSFB_PLI, RtcpPacket, RtcpPsfbPacket, RtpPacket

from kfgan_daemon.webrtc.pli import KeyframeRequester, pli_supported

SENDER_SSRC = 0x1234ABCD
OUR_RTCP_SSRC = 4242


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def receiver():
    """A real aiortc receiver whose outgoing RTCP is captured instead of encrypted and sent."""
    transport = RTCDtlsTransport(RTCIceTransport(RTCIceGatherer()), [RTCCertificate.generateCertificate()])
    receiver = RTCRtpReceiver("video", transport)
    receiver._set_rtcp_ssrc(OUR_RTCP_SSRC)
    sent: list[bytes] = []

    async def capture(data: bytes) -> None:
        sent.append(data)

    transport._send_rtp = capture
    receiver.sent = sent
    yield receiver
    await transport.stop()


async def receive_packet_from(receiver: RTCRtpReceiver, ssrc: int) -> None:
    # An RTP packet of a payload type the receiver does not know: aiortc still records its SSRC as active.
    await receiver._handle_rtp_packet(RtpPacket(payload_type=120, ssrc=ssrc, payload=b"\x00"), arrival_time_ms=0)


def plis(receiver) -> list[RtcpPsfbPacket]:
    packets = [packet for data in receiver.sent for packet in RtcpPacket.parse(data)]
    return [p for p in packets if isinstance(p, RtcpPsfbPacket) and p.fmt == RTCP_PSFB_PLI]


async def test_sends_a_real_pli_to_the_active_sender(receiver) -> None:
    assert pli_supported(receiver)
    await receive_packet_from(receiver, SENDER_SSRC)
    requester = KeyframeRequester(receiver, min_interval=1.0)
    assert requester.media_ssrc() == SENDER_SSRC
    assert await requester.request()
    (pli,) = plis(receiver)
    assert pli.media_ssrc == SENDER_SSRC and pli.ssrc == OUR_RTCP_SSRC
    assert requester.sent == 1 and requester.last_sent is not None


async def test_rate_limited_to_one_per_interval(receiver) -> None:
    await receive_packet_from(receiver, SENDER_SSRC)
    clock = FakeClock()
    requester = KeyframeRequester(receiver, min_interval=1.0, clock=clock)
    assert await requester.request()
    for step in (0.25, 0.5, 0.125):
        clock.now += step
        assert not requester.ready()
        assert not await requester.request()
    clock.now += 0.125  # exactly one interval after the first
    assert await requester.request()
    assert len(plis(receiver)) == 2
    assert (requester.sent, requester.suppressed) == (2, 3)
    assert requester.sent_at == [100.0, 101.0]


async def test_nothing_sent_before_any_packet_arrived(receiver) -> None:
    requester = KeyframeRequester(receiver)
    assert requester.media_ssrc() is None
    assert not await requester.request()
    assert receiver.sent == [] and requester.sent == 0
    # A failed attempt does not start the rate-limit window.
    assert requester.ready()


async def test_explicit_ssrc(receiver) -> None:
    requester = KeyframeRequester(receiver)
    assert await requester.request(media_ssrc=77)
    assert plis(receiver)[0].media_ssrc == 77


async def test_missing_private_call_disables_requests_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    class OtherReceiver:
        """What an aiortc without ``_send_rtcp_pli`` would look like."""

        def getSynchronizationSources(self):
            from aiortc.rtcrtpreceiver import RTCRtpSynchronizationSource
            import datetime

            return [RTCRtpSynchronizationSource(timestamp=datetime.datetime.now(), source=5)]

    requester = KeyframeRequester(OtherReceiver())
    assert not pli_supported(OtherReceiver())
    with caplog.at_level(logging.WARNING, logger="kfgan_daemon.webrtc.pli"):
        assert not await requester.request()
        assert not await requester.request()
    assert len([r for r in caplog.records if "_send_rtcp_pli" in r.getMessage()]) == 1


def test_interval_must_be_positive(receiver) -> None:
    with pytest.raises(ValueError):
        KeyframeRequester(receiver, min_interval=0)
