"""``kfgan-daemon pipe``: restore an H.264 RTP stream, out as RTP or y4m.

    from kfgan_daemon.rtpapps.pipe import run_pipe, EncoderOptions
    summary = await run_pipe("in.sdp", "rtp://127.0.0.1:5006", generator, output_sdp=Path("out.sdp"))

Modules: ``target`` (output URL parsing, output SDP), ``writer`` (the lazy
output writer and encoder options), ``metrics``, ``summary`` (per-frame
records and the closing summary), ``run`` (the orchestration).
"""
from kfgan_daemon.rtpapps.pipe.run import LOSS_POLICIES, PIPE_MAX_LATENCY, run_pipe
from kfgan_daemon.rtpapps.pipe.summary import PipeSummary, SentFrame
from kfgan_daemon.rtpapps.pipe.target import OutputTarget
from kfgan_daemon.rtpapps.pipe.writer import EncoderOptions, LazyWriter

__all__ = [
    "LOSS_POLICIES",
    "PIPE_MAX_LATENCY",
    "EncoderOptions",
    "LazyWriter",
    "OutputTarget",
    "PipeSummary",
    "SentFrame",
    "run_pipe",
]
