"""H.264 over RTP: packets, (de)packetization, SDP, an asyncio receiver and a low-latency sender."""
from kfgan_daemon.media.rtp.decoder import H264AccessUnitDecoder
from kfgan_daemon.media.rtp.h264 import AccessUnit, H264Depacketizer, H264Packetizer
from kfgan_daemon.media.rtp.jitterbuffer import ReorderBuffer
from kfgan_daemon.media.rtp.packet import RtpPacket
from kfgan_daemon.media.rtp.receiver import ReceiverState, ReceiverStatus, RtpReceiver, RtpReceiverStats
from kfgan_daemon.media.rtp.sdp import H264SessionDescription, parse_sdp
from kfgan_daemon.media.rtp.sender import RtpSender, RtpSenderStats

__all__ = [
    "AccessUnit",
    "H264AccessUnitDecoder",
    "H264Depacketizer",
    "H264Packetizer",
    "H264SessionDescription",
    "ReceiverState",
    "ReceiverStatus",
    "ReorderBuffer",
    "RtpPacket",
    "RtpReceiver",
    "RtpReceiverStats",
    "RtpSender",
    "RtpSenderStats",
    "parse_sdp",
]
