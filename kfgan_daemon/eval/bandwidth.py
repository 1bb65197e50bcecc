"""What a restoration is worth in bits: the bitrate a plain sender would need for the same face quality.

A plain x264 sender's rate curve is the clip encoded at several CRFs, each point
its video bitrate and its face PSNR (decoded luma against the original, as
``eval --end-to-end`` measures every row). A row's face PSNR read off that curve,
piecewise linear in log bitrate, is the bitrate a plain sender needs to deliver
that quality without any restoration; set against the bitrate the row's sender
actually spent, it is the saving at equal face quality (negative: the sender
spent more than a plain one would have needed).
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import av

from kfgan_daemon.errors import InputError

# CRFs of the plain sender's rate curve, relative to the evaluated CRF: dense around it (a
# restoration gains tenths of a dB, about one CRF step) and reaching far enough below it for the
# hq sender, whose fine I-frames put its calls 2-3.5 dB above a plain sender's at the same CRF.
RATE_CURVE_OFFSETS = (-10, -8, -6, -5, -4, -3, -2, -1, 0, 1, 2)


@dataclass(frozen=True, slots=True)
class RatePoint:
    """One encode of a clip by the plain sender: its CRF, video bitrate and face PSNR (dB)."""

    crf: int
    kbps: float
    face_psnr: float


def video_kbps(path: str | os.PathLike[str]) -> float:
    """The video stream's bitrate in kbit/s: its packets' bytes over its frames' duration."""
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            sizes = [packet.size for packet in container.demux(stream) if packet.size]
            rate = stream.average_rate
    except (av.error.FFmpegError, IndexError) as exc:
        raise InputError(f"{path}: cannot read its video packets ({exc})") from exc
    if not sizes or not rate:
        raise InputError(f"{path}: no video packets, or no frame rate, to take a bitrate from")
    return 8 * sum(sizes) * float(rate) / len(sizes) / 1000


def rate_for_quality(curve: Sequence[RatePoint], face_psnr: float) -> float | None:
    """The least bitrate (kbit/s) at which the curve reaches ``face_psnr``; None outside its range.

    Between neighbouring points (by bitrate) the face PSNR is taken as linear in
    log bitrate. A curve that dips (x264's rate control is not perfectly monotone
    on a short clip) is read at its first crossing: a sender that reached the
    quality at that rate needs no more.
    """
    points = sorted(curve, key=lambda point: point.kbps)
    if not points or not math.isfinite(face_psnr) or face_psnr < points[0].face_psnr:
        return None
    if face_psnr == points[0].face_psnr:
        return points[0].kbps
    for low, high in zip(points, points[1:]):
        if low.face_psnr < face_psnr <= high.face_psnr:
            share = (face_psnr - low.face_psnr) / (high.face_psnr - low.face_psnr)
            return math.exp(math.log(low.kbps) + share * (math.log(high.kbps) - math.log(low.kbps)))
    return None


def saving(sent_kbps: float, needed_kbps: float | None) -> float | None:
    """The fraction of a plain sender's bitrate that was not spent: 1 - sent / needed."""
    return None if needed_kbps is None else 1 - sent_kbps / needed_kbps
