"""Exception types users see; each message says what to do next."""
from __future__ import annotations


class KfganError(Exception):
    """Base class of every error the daemon reports to a user."""


class InputError(KfganError):
    """An input file or stream cannot be read (missing, corrupt, truncated)."""


class NoVideoStreamError(InputError):
    """The input holds no video stream."""


class OutputError(KfganError):
    """An output cannot be opened or written."""


class ModelError(KfganError):
    """A model or checkpoint is missing, unreadable or does not fit the architecture."""


class FaceModelError(KfganError):
    """A dlib model file (detector, shape predictor) cannot be found or loaded."""


class ConfigError(KfganError):
    """A configuration value is invalid; the message names the field."""


class EngineError(KfganError):
    """The streaming engine cannot do what was asked (not started, stream id taken, too many streams)."""


class StreamClosedError(EngineError):
    """A frame was submitted to, or a result read from, a stream that has been closed."""


class RtpPacketError(InputError):
    """An RTP packet or payload is truncated or malformed; the packet is dropped and counted."""


class SdpError(InputError):
    """A session description cannot be used (not SDP, no H.264 video, unsupported mode)."""


class MetricUnavailableError(KfganError):
    """A quality metric was asked for but no implementation of it is installed (VMAF, LPIPS weights)."""
