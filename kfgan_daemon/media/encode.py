"""Re-encoding a clip with libx264: the degraded streams of tests, datasets and evaluation."""
from __future__ import annotations

import os
from collections.abc import Mapping

from kfgan_daemon.media.frame import DecodedFrame
from kfgan_daemon.media.sink import FileSink
from kfgan_daemon.media.source import FileSource

# How a call's sender sets up libx264 (extra x264 options on top of CRF and keyframe interval).
# "hq": I-frames quantised 6 * log2(ipratio) = 12 steps finer than P-frames, the sender the
# paper assumes. The very first frame has no P-frame quantiser to be finer than and would be
# coded at the CRF's own level (QP 42 at CRF 42 where later I-frames get 31), so a zone gives
# it the same factor. "stream": a plain x264 sender; its I-frames are as good as the CRF makes them.
SENDERS: dict[str, dict[str, str]] = {"hq": {"x264-params": "ipratio=4:zones=0,0,b=4"}, "stream": {}}


def encode_h264_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    crf: int,
    gop: int | None = None,
    preset: str = "medium",
    max_frames: int | None = None,
    *,
    keyint_min: int | None = None,
    scenecut: bool | int | None = None,
    bitrate: int | None = None,
    tune: str | None = None,
    audio: bool = True,
    x264_options: Mapping[str, str] | None = None,
) -> int:
    """Encode ``src``'s video into ``dst`` at ``crf`` and return the number of frames written.

    The decoded YUV pictures go to the encoder directly (no BGR round trip), with
    their timestamps. ``gop`` is the maximum keyframe interval, ``keyint_min``
    the minimum; ``scenecut=False`` turns x264's scene-cut keyframes off (then
    I-frames fall exactly every ``gop`` frames), an int sets its threshold.
    ``max_frames`` stops early (audio is then trimmed to the video). Audio is
    copied unchanged when ``audio`` is true and the clip has some. An odd frame
    size is scaled to the even size just below it (yuv420p needs even sizes).
    Pixels and colour tags are kept: the planes go to the encoder unconverted.
    """
    options: dict[str, str] = {}
    if keyint_min is not None:
        options["keyint_min"] = str(keyint_min)
    if scenecut is False:
        options["sc_threshold"] = "0"
    elif scenecut is not None and scenecut is not True:
        options["sc_threshold"] = str(scenecut)
    options.update(x264_options or {})
    with FileSource(src) as source:
        width, height = source.width - source.width % 2, source.height - source.height % 2
        sink = FileSink.like(
            source,
            dst,
            width=width,
            height=height,
            crf=crf,
            bitrate=bitrate,
            preset=preset,
            gop=gop,
            tune=tune,
            audio_from=source.path if audio and source.has_audio else None,
            x264_options=options,
            trim_audio=max_frames is not None,
        )
        with sink:
            for picture in source.pictures():
                if max_frames is not None and sink.frames_written >= max_frames:
                    break
                if (picture.width, picture.height) != (width, height):
                    scaled = picture.reformat(width=width, height=height)
                    scaled.pts, scaled.time_base = picture.pts, picture.time_base
                    picture = scaled
                if picture.format.name == "yuv420p":
                    sink.encode_picture(picture)
                else:
                    # yuvj420p keeps its full-range levels (the sink is tagged full range); others become yuv420p.
                    sink.encode_picture(DecodedFrame.from_av(picture, colour=sink.colour).to_av())
        return sink.frames_written


def degrade_like_a_call(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    crf: int,
    gop_seconds: float = 1.0,
    max_frames: int | None = None,
    audio: bool = True,
    x264_options: Mapping[str, str] | None = None,
    preset: str = "medium",
) -> int:
    """``src`` as a call would deliver it: libx264 at ``crf`` with an I-frame at least every
    ``gop_seconds`` (x264's scene cuts may add more); returns the frames written.
    ``x264_options`` shape the sender further (e.g. ``SENDERS["hq"]``)."""
    with FileSource(src) as source:
        gop = max(1, round(float(source.frame_rate) * gop_seconds))
    return encode_h264_file(
        src, dst, crf=crf, gop=gop, preset=preset, max_frames=max_frames, audio=audio, x264_options=x264_options
    )
