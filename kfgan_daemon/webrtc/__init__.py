"""WebRTC (aiortc) integration: a track transformer that restores faces (and its view of the call as
received), what aiortc's decoders drop (keyframe flags, quantisers), PLI requests."""
from kfgan_daemon.webrtc.decoder import install as install_received_video_decoding
from kfgan_daemon.webrtc.pli import KeyframeRequester, pli_supported
from kfgan_daemon.webrtc.received import ReceivedVideoTrack
from kfgan_daemon.webrtc.transformer import RestoredVideoTrack

__all__ = [
    "KeyframeRequester",
    "ReceivedVideoTrack",
    "RestoredVideoTrack",
    "install_received_video_decoding",
    "pli_supported",
]
