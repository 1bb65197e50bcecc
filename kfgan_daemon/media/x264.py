"""The one place libx264 is set up: files, RTP streams and the degraded clips of tests and datasets.

Two classes, two jobs: :class:`EncodeOptions` is what a user asks of an output
(the command line's ``--crf``, ``--bitrate``, ``--gop``, ``--preset``,
``--lossless``); :class:`H264Settings` is the whole libx264 set-up a sink or
RTP sender builds from those and its own needs (tune, live profile, extra
options).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction

import av
from av.codec.context import Flags

from kfgan_daemon.media.colour import ColourSpace


@dataclass(frozen=True, slots=True)
class EncodeOptions:
    """What a user asks of an output's encoder: rate control, keyframe interval and preset.

    Rate control, first that applies: ``lossless`` (qp 0, yuv420p: every decoded
    plane comes back bit for bit), ``bitrate`` (bits/s), else ``crf``.
    ``crf=None`` leaves the CRF to the output: a restored file matches it to the
    input's quantiser, an RTP output takes the ``default_crf`` it passes to
    :meth:`sink_options`. ``gop`` is in frames (``None``: the output's default).
    """

    crf: int | None = None
    bitrate: int | None = None
    gop: int | None = None
    preset: str = "medium"
    lossless: bool = False

    def sink_options(self, default_crf: int) -> dict[str, object]:
        """Keywords for ``FileSink`` and ``RtpSender``: crf (``default_crf`` when unset), qp, bitrate, preset, gop."""
        return {
            "crf": self.crf if self.crf is not None else default_crf,
            "qp": 0 if self.lossless else None,
            "bitrate": self.bitrate,
            "preset": self.preset,
            "gop": self.gop,
        }

    def describe(self) -> str:
        """How the output is encoded, for summaries: "CRF 7", "lossless (qp 0)", "1000000 bit/s"."""
        if self.lossless:
            return "lossless (qp 0)"
        if self.bitrate is not None:
            return f"{self.bitrate} bit/s"
        return f"CRF {self.crf}" if self.crf is not None else "CRF (the output's default)"


@dataclass(frozen=True, slots=True)
class H264Settings:
    """How a yuv420p stream is encoded.

    Rate control, first that applies: ``qp`` (constant quantiser; 0 is
    mathematically lossless), ``bitrate`` (bits/s), else ``crf``.
    ``live`` is the low-latency profile of RTP and WebRTC: no B-frames, SPS/PPS
    in the extradata (for the SDP) and repeated before every IDR, and a VBV
    buffer of half a second when a bitrate is set. ``options`` go to the encoder
    as they are (``keyint_min``, ``sc_threshold``, ``x264-params`` ...).
    """

    crf: float = 18
    qp: int | None = None
    bitrate: int | None = None
    preset: str = "medium"
    tune: str | None = None
    gop: int | None = None
    live: bool = False
    options: Mapping[str, str] = field(default_factory=dict)

    def codec_options(self) -> dict[str, str]:
        options = {"preset": self.preset}
        if self.tune:
            options["tune"] = self.tune
        if self.qp is not None:
            options["qp"] = str(self.qp)
        elif self.bitrate is not None:
            if self.live:
                options["maxrate"] = str(int(self.bitrate))
                options["bufsize"] = str(int(self.bitrate) // 2)
        else:
            options["crf"] = f"{self.crf:g}"
        extra = dict(self.options)
        params = [extra.pop("x264-params", "")]
        if self.live:
            params.insert(0, "repeat-headers=1")
        if any(params):
            options["x264-params"] = ":".join(filter(None, params))
        options.update(extra)
        return options

    def configure(
        self,
        context: av.video.codeccontext.VideoCodecContext,
        width: int,
        height: int,
        time_base: Fraction,
        colour: ColourSpace,
        frame_rate: Fraction | None = None,
    ) -> None:
        """Set up an unopened libx264 codec context (a stream's, or one made with ``CodecContext.create``)."""
        context.width = width
        context.height = height
        context.pix_fmt = "yuv420p"
        context.time_base = time_base
        if frame_rate is not None:
            context.framerate = frame_rate
        if self.gop is not None:
            context.gop_size = int(self.gop)
        if self.qp is None and self.bitrate is not None:
            context.bit_rate = int(self.bitrate)
        if self.live:
            context.max_b_frames = 0
            # Global header: SPS/PPS available at once for the SDP; repeat-headers keeps them in-band too.
            context.flags |= Flags.global_header
        context.options = self.codec_options()
        colour.tag(context)
