"""Reading a recorded video file into tagged frames.

Damage policy: a file that is corrupt or truncated part-way is not an error
until the damage is reached. Frames decoded before it are yielded normally;
then, by default (``strict=True``), iteration raises :class:`InputError` naming
the file and the problem, so that a caller writing an output file (whose
:class:`FileSink` removes the partial output on an exception) never leaves
half a video behind silently. With ``strict=False`` undecodable packets are
skipped, damaged pictures are yielded as the decoder concealed them, and the
problems are listed in :attr:`FileSource.errors` (``truncated`` tells whether
the video ended early), for callers that prefer a partial result they report.

Truncation is detected from what the muxer wrote: a frame count (MP4) or a
stream duration (Matroska's DURATION tag) that the decoded pictures fall short
of by more than a quarter second (three frames at least); a shorter cut, or one in a
container that declares neither (raw H.264), is noticed only when the last
packet is damaged.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import av.error

from kfgan_daemon.errors import InputError, NoVideoStreamError
from kfgan_daemon.media.colour import ColourSpace
from kfgan_daemon.media.frame import EXPORT_QUANTISERS, DecodedFrame

log = logging.getLogger(__name__)

# A video that ends this much (or three frame intervals, if longer) short of the
# frame count or duration its container declares is reported as truncated.
_TRUNCATION_TOLERANCE_S = 0.25


def ffmpeg_reason(exc: BaseException) -> str:
    """The human part of a PyAV error ("Invalid data found when processing input")."""
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _parse_duration_tag(value: str | None) -> float | None:
    """Matroska's per-stream ``DURATION`` tag, ``HH:MM:SS.nnnnnnnnn``."""
    if not value:
        return None
    try:
        hours, minutes, seconds = value.split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except ValueError:
        return None


class FileSource:
    """A video file decoded frame by frame; a context manager, iterated once.

    Each :class:`DecodedFrame` holds the decoded yuv420p planes as they are,
    in the stream's :attr:`colour` space, with the decoder's pts and time base; ``is_keyframe`` is the decoder's verdict (picture type I, IDR or not),
    ``index`` counts frames in presentation order from 0.
    """

    def __init__(self, path: str | os.PathLike[str], *, strict: bool = True, threads: bool = True) -> None:
        self.path = Path(path)
        self.strict = strict
        self.errors: list[str] = []
        self.truncated = False
        self.frames_decoded = 0
        self._iterated = False
        self._container, self._stream = self._open()
        if threads:
            # Slices only: under frame threading FFmpeg attaches another frame's block
            # quantisers to about one picture in a hundred (DecodedFrame.quantiser).
            self._stream.thread_type = "SLICE"

    def _open(self) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
        if not self.path.exists():
            raise InputError(f"{self.path}: no such file")
        if self.path.is_dir():
            raise InputError(f"{self.path}: is a directory, not a video file")
        try:
            container = av.open(str(self.path), mode="r")
        except av.error.InvalidDataError as exc:
            raise InputError(
                f"{self.path}: not a readable media file ({ffmpeg_reason(exc)}; a truncated MP4 loses its index)"
            ) from exc
        except (av.error.FFmpegError, OSError) as exc:
            raise InputError(f"{self.path}: cannot open ({ffmpeg_reason(exc)})") from exc
        # Cover art is stored as a one-picture video stream; it is not the video.
        videos = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
        if not videos:
            kinds = ", ".join(
                "cover picture" if stream.disposition & av.stream.Disposition.attached_pic else stream.type
                for stream in container.streams
            ) or "none"
            container.close()
            raise NoVideoStreamError(f"{self.path}: no video stream (streams found: {kinds})")
        if videos[0].codec_context is None:
            container.close()
            raise InputError(f"{self.path}: FFmpeg has no decoder for its video codec")
        videos[0].codec_context.options = dict(EXPORT_QUANTISERS)
        return container, videos[0]

    # -- properties ---------------------------------------------------------------

    @property
    def width(self) -> int:
        return self._stream.codec_context.width

    @property
    def height(self) -> int:
        return self._stream.codec_context.height

    @property
    def frame_rate(self) -> Fraction:
        rate = self._stream.average_rate or self._stream.guessed_rate or self._stream.base_rate
        # Only a stream with no rate at all gets 25: pts still come from the decoder,
        # the rate only times an output whose frames carry none.
        return Fraction(rate) if rate else Fraction(25)

    @property
    def time_base(self) -> Fraction:
        return Fraction(self._stream.time_base)

    @property
    def frame_count(self) -> int | None:
        """Frames the container declares (MP4 does, Matroska does not)."""
        return self._stream.frames or None

    @property
    def duration(self) -> float | None:
        """Video duration in seconds as the file declares it (or FFmpeg estimates it), else None."""
        declared = self._declared_video_duration()
        if declared is not None:
            return declared
        if self._container.duration:
            return self._container.duration / av.time_base
        return None

    def _declared_video_duration(self) -> float | None:
        # Only durations written by the muxer count for truncation checks; the
        # container-level one may be an estimate from the bitrate (raw H.264, TS).
        stream = self._stream
        if stream.duration:
            return float(stream.duration * stream.time_base)
        return _parse_duration_tag(stream.metadata.get("DURATION"))

    @property
    def has_audio(self) -> bool:
        return bool(self._container.streams.audio)

    @property
    def codec_name(self) -> str:
        return self._stream.codec_context.name

    @property
    def colour(self) -> ColourSpace:
        """The stream's colour space as tagged (untagged: the FFmpeg convention for its height)."""
        return ColourSpace.of(self._stream.codec_context, self.height)

    @property
    def complete(self) -> bool:
        """True once the whole video was decoded without any problem."""
        return self._iterated and not self.errors and not self.truncated

    # -- iteration ----------------------------------------------------------------

    def __iter__(self) -> Iterator[DecodedFrame]:
        stream_colour = self.colour
        for picture in self.pictures():
            # A picture may lack tags that only the stream carries.
            colour = ColourSpace.of(picture, fallback=stream_colour)
            yield DecodedFrame.from_av(picture, self.frames_decoded - 1, time_base=self.time_base, colour=colour)

    def pictures(self) -> Iterator[av.VideoFrame]:
        """The decoded PyAV pictures themselves, with the same damage policy."""
        if self._iterated:
            raise RuntimeError(f"{self.path}: a FileSource is iterated once; open the file again")
        self._iterated = True
        return self._pictures()

    def _pictures(self) -> Iterator[av.VideoFrame]:
        interval = float(1 / self.frame_rate)
        last_end: float | None = None
        packets = self._container.demux(self._stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except (av.error.FFmpegError, OSError) as exc:
                self.truncated = True
                self._problem(f"read error after frame {self.frames_decoded} ({ffmpeg_reason(exc)})")
                break
            if packet.is_corrupt:
                self._problem(f"damaged or truncated video data at frame {self.frames_decoded} (packet flagged corrupt)")
                continue
            try:
                pictures = packet.decode()
            except (av.error.FFmpegError, OSError) as exc:
                self._problem(f"corrupt video data at frame {self.frames_decoded} ({ffmpeg_reason(exc)})")
                continue
            for picture in pictures:
                if picture.is_corrupt:
                    self._problem(f"corrupt picture at frame {self.frames_decoded} (decoder concealed errors)")
                if picture.time_base is None:
                    picture.time_base = self._stream.time_base
                if picture.pts is not None:
                    duration = float(picture.duration * picture.time_base) if picture.duration else interval
                    last_end = float(picture.pts * picture.time_base) + duration
                self.frames_decoded += 1
                yield picture
        self._check_complete(last_end)

    def _check_complete(self, last_end: float | None) -> None:
        # Edit lists legitimately hide a few declared frames, hence the tolerance.
        tolerance_s = max(_TRUNCATION_TOLERANCE_S, 3.0 / float(self.frame_rate))
        declared = self.frame_count
        if declared is not None:
            if declared - self.frames_decoded > tolerance_s * float(self.frame_rate):
                self.truncated = True
                self._problem(f"truncated: {self.frames_decoded} of {declared} frames could be decoded")
            return
        expected = self._declared_video_duration()
        if expected is not None and last_end is not None:
            start = float(self._stream.start_time * self._stream.time_base) if self._stream.start_time else 0.0
            if last_end - start < expected - tolerance_s:
                self.truncated = True
                self._problem(
                    f"truncated: video ends at {last_end - start:.2f} s but the file declares {expected:.2f} s"
                )

    def _problem(self, message: str) -> None:
        self.errors.append(message)
        if self.strict:
            raise InputError(f"{self.path}: {message}")
        log.warning("%s: %s", self.path, message)

    # -- lifetime -----------------------------------------------------------------

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> "FileSource":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FileSource({str(self.path)!r}, {self.width}x{self.height} @ {self.frame_rate} fps)"
