"""``kfgan-daemon pipe``: restore an H.264 RTP stream, out as RTP or y4m.

    from kfgan_daemon.rtpapps.pipe import PipeOptions, run_pipe
    summary = await run_pipe("in.sdp", "rtp://127.0.0.1:5006", generator, PipeOptions(output_sdp=Path("out.sdp")))

Modules: ``target`` (output URL parsing, output SDP), ``writer`` (the lazy
output writer and the output's default encoding, ``PIPE_ENCODE``), ``metrics``, ``summary`` (per-frame
records and the closing summary), ``run`` (:class:`RtpPipe`, one stream through an engine, and the
``pipe`` command's mode of :class:`~kfgan_daemon.process.DaemonProcess`).
"""
from kfgan_daemon.rtpapps.pipe.run import (
    PIPE_MAX_LATENCY,
    PipeHooks,
    PipeMode,
    PipeOptions,
    RtpPipe,
    run_pipe,
)
from kfgan_daemon.rtpapps.pipe.summary import PipeSummary, SentFrame
from kfgan_daemon.rtpapps.pipe.target import OutputTarget
from kfgan_daemon.rtpapps.pipe.writer import PIPE_ENCODE, LazyWriter

__all__ = [
    "PIPE_MAX_LATENCY",
    "PIPE_ENCODE",
    "LazyWriter",
    "OutputTarget",
    "PipeHooks",
    "PipeMode",
    "PipeOptions",
    "PipeSummary",
    "RtpPipe",
    "SentFrame",
    "run_pipe",
]
