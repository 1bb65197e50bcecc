"""WebRTC (aiortc) integration: a track transformer that restores faces, keyframe tagging, PLI requests."""
from kfgan_daemon.webrtc.keyframe_flag import install as install_keyframe_tagging
from kfgan_daemon.webrtc.pli import KeyframeRequester, pli_supported
from kfgan_daemon.webrtc.transformer import RestoredVideoTrack

__all__ = ["KeyframeRequester", "RestoredVideoTrack", "install_keyframe_tagging", "pli_supported"]
