"""Exception types users see; each message says what to do next.

Which error says what went wrong, by who can fix it:

- :class:`InputError` (and its subclasses): input *data* that cannot be read or
  used as what it claims to be: a file, stream, packet, SDP, dataset or track
  file that is missing, corrupt, truncated, undecodable, or holds nothing the
  job needs (no video stream, no frames, no faces). The user fixes the input.
  The command line exits 1.
- :class:`ConfigError`: a *value a user chose* is invalid: a command-line
  option, a config-file field, or a field of a settings object that carries
  them (``RestoreSettings``, ``TrainConfig``, the dataset's build options). The
  message names the option or field. The command line exits 2, as for any
  usage error. It is a ``ValueError`` too, so code that guards a value with
  ``except ValueError`` keeps working.
- plain ``ValueError``: a caller broke a function's contract (an array of the
  wrong shape, a parameter no user setting reaches): a bug in the calling code,
  reported with its traceback.

A choice (overload policy, warp mode, alignment, keyframe policy, loss policy
...) is checked once, where the user's value enters: the command line's typed
choices, the service's config model, ``RestoreSettings``; the modules that act
on it trust their ``Literal``-typed parameters.
"""
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


class ConfigError(KfganError, ValueError):
    """A value a user chose (option, config field, settings field) is invalid; the message names it."""


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
