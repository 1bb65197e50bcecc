"""How coarsely a stream was quantised, as its decoder reports it.

FFmpeg's H.264 (and MPEG-2, VP9) decoders export every block's quantiser as
``VIDEO_ENC_PARAMS`` side data when opened with ``export_side_data=venc_params``;
PyAV turns it into a per-macroblock map. The restore command uses it to encode its
output finely enough that re-encoding costs the call almost nothing: a fixed CRF
that is transparent for a CRF-42 call loses several tenths of a dB on a CRF-32 one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import av
import numpy as np

from kfgan_daemon.errors import InputError
from kfgan_daemon.media.frame import EXPORT_QUANTISERS, frame_quantiser
from kfgan_daemon.media.source import ffmpeg_reason


@dataclass(frozen=True, slots=True)
class QuantiserProfile:
    """The mean macroblock quantiser of each probed frame (H.264's QP scale), in decoding order."""

    frame_qps: tuple[float, ...]

    @property
    def mean(self) -> float:
        return float(np.mean(self.frame_qps))

    @property
    def effective(self) -> float:
        """The quantiser whose inverse squared step is the frames' mean (H.264's step doubles
        every 6 QP). A re-encoding's cost to a frame, in dB, grows with the ratio of its own
        squared step to the frame's; averaged over frames, that is set by this harmonic mean.
        A few finely coded frames, such as the I-frames of a sender that spends its bits
        there, pull it well below the plain mean."""
        return float(-3.0 * np.log2(np.mean(np.exp2(-np.asarray(self.frame_qps) / 3.0))))


def probe_quantiser(path: str | os.PathLike[str], max_frames: int = 150) -> QuantiserProfile | None:
    """The quantisers of the first ``max_frames`` frames of ``path``'s video (None: its decoder
    exports none on a known scale, or the file has no video)."""
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:
        raise InputError(f"{path}: cannot open ({ffmpeg_reason(exc)})") from exc
    qps: list[float] = []
    with container:
        if not container.streams.video:
            return None
        stream = container.streams.video[0]
        stream.codec_context.options = dict(EXPORT_QUANTISERS)
        try:
            for frame in container.decode(stream):
                qp = frame_quantiser(frame)
                if qp is None:
                    return None
                qps.append(qp)
                if len(qps) >= max_frames:
                    break
        except av.error.FFmpegError as exc:
            raise InputError(f"{path}: cannot decode ({ffmpeg_reason(exc)})") from exc
    return QuantiserProfile(tuple(qps)) if qps else None
