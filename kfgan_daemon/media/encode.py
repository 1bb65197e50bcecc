"""Re-encoding a clip with libx264: the degraded streams of tests, datasets and evaluation."""
from __future__ import annotations

import os
from collections.abc import Mapping

from kfgan_daemon.media.sink import FileSink
from kfgan_daemon.media.source import FileSource


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
                if picture.format.name != "yuv420p" or (picture.width, picture.height) != (width, height):
                    converted = picture.reformat(width=width, height=height, format="yuv420p")
                    converted.pts, converted.time_base = picture.pts, picture.time_base
                    picture = converted
                sink.encode_picture(picture)
        return sink.frames_written
