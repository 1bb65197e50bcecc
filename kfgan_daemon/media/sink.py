"""Writing frames to an H.264 file, with the input's timing and audio.

The file is written under a hidden temporary name beside the destination and
renamed when the sink closes successfully, so the destination name never holds
half a video: on any failure (in the sink or in the caller's ``with`` block)
the temporary file is removed.
"""
from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator, Mapping
from fractions import Fraction
from pathlib import Path

import av
import av.error

from kfgan_daemon.errors import OutputError
from kfgan_daemon.media.colour import ColourSpace, convert_planes
from kfgan_daemon.media.frame import DecodedFrame
from kfgan_daemon.media.source import FileSource, ffmpeg_reason
from kfgan_daemon.media.x264 import H264Settings

log = logging.getLogger(__name__)

# Audio is muxed up to this far ahead of the last video packet, which keeps the
# interleaving close without buffering the whole audio track.
_AUDIO_LEAD_S = 0.5


class FileSink:
    """libx264 yuv420p encoder into a file (format from the extension); a context manager.

    Rate control as :class:`H264Settings`: ``qp`` (0: lossless), else
    ``bitrate`` (bits/s), else ``crf`` (default 18). Frames keep their pts
    (rescaled when their time base differs from ``time_base``); frames without
    pts are timed by ``frame_rate``. ``audio_from`` is a media file whose first
    audio stream is copied packet for packet (no re-encode), interleaved with
    the video. Frames' planes are encoded as they are; ``colour`` is the
    stream's tag (default: the first frame's), and a frame in another colour
    space is converted to it. ``x264_options`` are passed to the encoder as
    they are (``keyint_min``, ``sc_threshold``, ``x264-params`` ...).
    ``trim_audio`` drops audio after the last video frame.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        width: int,
        height: int,
        frame_rate: Fraction | int | float,
        time_base: Fraction | None = None,
        crf: int = 18,
        bitrate: int | None = None,
        preset: str = "medium",
        gop: int | None = None,
        audio_from: str | os.PathLike[str] | None = None,
        tune: str | None = None,
        *,
        qp: int | None = None,
        colour: ColourSpace | None = None,
        x264_options: Mapping[str, str] | None = None,
        trim_audio: bool = False,
    ) -> None:
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise OutputError(f"{path}: yuv420p H.264 needs an even, positive size, not {width}x{height}")
        self.path = Path(path)
        self.width = width
        self.height = height
        self.frame_rate = Fraction(frame_rate).limit_denominator(1001000)
        self.time_base = Fraction(time_base) if time_base is not None else 1 / self.frame_rate
        self.colour = colour
        self.trim_audio = trim_audio
        self.frames_written = 0
        self._last_pts: int | None = None
        self._last_end: float = 0.0
        self._closed = False
        if not self.path.parent.is_dir():
            raise OutputError(f"{self.path}: folder {self.path.parent} does not exist")
        self._temp_path = self.path.with_name(f".{self.path.stem}.{secrets.token_hex(4)}.partial{self.path.suffix}")
        try:
            self._container = av.open(str(self._temp_path), mode="w")
        except (av.error.FFmpegError, OSError, ValueError) as exc:
            self._temp_path.unlink(missing_ok=True)
            raise OutputError(f"{self.path}: cannot create ({ffmpeg_reason(exc)})") from exc
        self._audio_input: av.container.InputContainer | None = None
        self._audio_packets: Iterator[av.Packet] | None = None
        self._pending_audio: av.Packet | None = None
        try:
            self.settings = H264Settings(
                crf=crf, qp=qp, bitrate=bitrate, preset=preset, tune=tune, gop=gop, options=dict(x264_options or {})
            )
            self._stream = self._container.add_stream("libx264", rate=self.frame_rate)
            self._stream.time_base = self.time_base
            self._audio_stream = self._add_audio_stream(audio_from) if audio_from is not None else None
        except BaseException:
            self._discard()
            raise

    @classmethod
    def like(cls, source: FileSource, path: str | os.PathLike[str], **options: object) -> "FileSink":
        """A sink with ``source``'s size, frame rate, time base, colour space and audio; ``options`` override."""
        settings: dict[str, object] = {
            "width": source.width,
            "height": source.height,
            "frame_rate": source.frame_rate,
            "time_base": source.time_base,
            "colour": source.colour,
            "audio_from": source.path if source.has_audio else None,
        }
        settings.update(options)
        return cls(path, **settings)

    def _add_audio_stream(self, audio_from: str | os.PathLike[str]) -> av.audio.stream.AudioStream | None:
        try:
            self._audio_input = av.open(str(audio_from), mode="r")
        except (av.error.FFmpegError, OSError) as exc:
            raise OutputError(f"{self.path}: cannot read audio from {audio_from} ({ffmpeg_reason(exc)})") from exc
        if not self._audio_input.streams.audio:
            log.info("%s has no audio stream; writing video only", audio_from)
            return None
        source = self._audio_input.streams.audio[0]
        try:
            stream = self._container.add_stream_from_template(source)
        except (av.error.FFmpegError, ValueError) as exc:
            raise OutputError(
                f"{self.path}: cannot copy {source.codec_context.name} audio into this format ({ffmpeg_reason(exc)})"
            ) from exc
        self._audio_packets = self._audio_input.demux(source)
        return stream

    # -- writing ------------------------------------------------------------------

    def write(self, frame: DecodedFrame) -> None:
        """Encode one frame's planes (no colour conversion unless its colour space differs from the stream's)."""
        if (frame.width, frame.height) != (self.width, self.height):
            raise OutputError(
                f"{self.path}: frame is {frame.width}x{frame.height}, the sink was opened for {self.width}x{self.height}"
            )
        self._open_encoder(frame.colour)
        if frame.colour != self.colour:
            frame = frame.with_planes(*convert_planes(*frame.planes, frame.colour, self.colour), colour=self.colour)
        picture = frame.to_av()
        picture.pts = self._output_pts(frame)
        picture.time_base = self.time_base
        self.encode_picture(picture)

    def encode_picture(self, picture: av.VideoFrame) -> None:
        """Encode a PyAV picture whose pts is already in this sink's time base.

        Its picture type is cleared so that the encoder, not the source, chooses
        the frame types.
        """
        if self._closed:
            raise OutputError(f"{self.path}: sink already closed")
        self._open_encoder(ColourSpace.of(picture))
        picture.pict_type = av.video.frame.PictureType.NONE
        if picture.pts is None:
            picture.pts = round(self.frames_written / self.frame_rate / self.time_base)
        if self._last_pts is not None and picture.pts <= self._last_pts:
            log.debug("%s: pts %s not increasing; using %s", self.path, picture.pts, self._last_pts + 1)
            picture.pts = self._last_pts + 1
        self._last_pts = picture.pts
        try:
            packets = self._stream.encode(picture)
        except (av.error.FFmpegError, ValueError) as exc:
            raise OutputError(f"{self.path}: encoding frame {self.frames_written} failed ({ffmpeg_reason(exc)})") from exc
        self._mux_video(packets)
        self.frames_written += 1

    def _open_encoder(self, colour: ColourSpace) -> None:
        # The stream's codec context opens at its first frame; until then it can still be tagged.
        if self._stream.codec_context.is_open:
            return
        if self.colour is None:
            self.colour = colour
        self.settings.configure(self._stream.codec_context, self.width, self.height, self.time_base, self.colour)

    def _output_pts(self, frame: DecodedFrame) -> int | None:
        if frame.pts is None:
            return None  # timed by the frame rate in encode_picture
        if frame.time_base is None or frame.time_base == self.time_base:
            return frame.pts
        return round(frame.pts * frame.time_base / self.time_base)

    def _mux_video(self, packets: list[av.Packet]) -> None:
        for packet in packets:
            if packet.pts is not None:
                end = float((packet.pts + (packet.duration or 0)) * packet.time_base)
                self._last_end = max(self._last_end, end)
            self._mux(packet)
        self._mux_audio(until=self._last_end + (0.0 if self.trim_audio else _AUDIO_LEAD_S))

    def _mux_audio(self, until: float | None) -> None:
        """Copy audio packets that start before ``until`` seconds (all when None)."""
        if self._audio_stream is None or self._audio_packets is None:
            return
        while True:
            packet = self._pending_audio or next(self._audio_packets, None)
            self._pending_audio = None
            if packet is None:
                self._audio_packets = None
                return
            if packet.dts is None:  # the demuxer's end-of-stream marker
                continue
            start = float(packet.pts * packet.time_base) if packet.pts is not None else None
            if until is not None and start is not None and start > until:
                self._pending_audio = packet
                return
            packet.stream = self._audio_stream
            self._mux(packet)

    def _mux(self, packet: av.Packet) -> None:
        try:
            self._container.mux(packet)
        except (av.error.FFmpegError, OSError, ValueError) as exc:
            raise OutputError(f"{self.path}: writing failed ({ffmpeg_reason(exc)})") from exc

    # -- lifetime -----------------------------------------------------------------

    def close(self) -> None:
        """Flush the encoder, finish the file and move it to its final name."""
        if self._closed:
            return
        try:
            try:
                self._open_encoder(ColourSpace.untagged(self.height))
                packets = self._stream.encode(None)
            except (av.error.FFmpegError, ValueError) as exc:
                raise OutputError(f"{self.path}: flushing the encoder failed ({ffmpeg_reason(exc)})") from exc
            self._mux_video(packets)
            self._mux_audio(until=self._last_end if self.trim_audio else None)
            self._closed = True
            try:
                self._container.close()
            finally:
                if self._audio_input is not None:
                    self._audio_input.close()
            os.replace(self._temp_path, self.path)
        except BaseException as exc:
            self._discard()
            if isinstance(exc, (av.error.FFmpegError, OSError)):
                raise OutputError(f"{self.path}: finishing the file failed ({ffmpeg_reason(exc)})") from exc
            raise
        log.debug("%s: %d frames written", self.path, self.frames_written)

    def abort(self) -> None:
        """Stop without producing the file."""
        self._discard()

    def _discard(self) -> None:
        self._closed = True
        for container in (self._container, self._audio_input):
            if container is None:
                continue
            try:
                container.close()
            except (av.error.FFmpegError, OSError, ValueError):
                # The file is being thrown away; a failure to finish it is expected here.
                pass
        self._temp_path.unlink(missing_ok=True)

    def __enter__(self) -> "FileSink":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._discard()
