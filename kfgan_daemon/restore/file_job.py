"""Restoring a recorded call: file in, file out, every frame processed."""
from __future__ import annotations

import logging
import math
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kfgan_daemon.media import FileSink, FileSource
from kfgan_daemon.media.encode import degrade_like_a_call
from kfgan_daemon.media.quantiser import QuantiserProfile, probe_quantiser
from kfgan_daemon.media.x264 import EncodeOptions
from kfgan_daemon.restore.generator import CropGenerator
from kfgan_daemon.restore.settings import RestoreSettings
from kfgan_daemon.restore.stream import RestoreStats, StreamRestorer

log = logging.getLogger(__name__)


# The output's CRF is this many quantiser steps below the input's effective quantiser. Measured on
# s18 and d3 from CRF 27 to 42 with both senders (60 frames each), 26 steps below the plain mean
# kept the re-encoding's cost to about 0.1 dB of face and frame luma PSNR at most, and 22 steps
# cost up to 0.2 dB on calls above 40 dB; the effective quantiser sits 0.5 (plain sender) to 2.7
# (fine I-frames) steps below the mean, which is where the sender with fine I-frames needed it.
OUTPUT_QP_MARGIN = 26
# The coarsest automatic output (a CRF-42 call gets CRF 12-15) and the one for inputs whose
# decoder reports no quantiser.
MAX_AUTO_CRF = 18


def output_crf(profile: QuantiserProfile | None) -> int:
    """The CRF at which re-encoding a call quantised as ``profile`` costs it almost nothing."""
    if profile is None:
        return MAX_AUTO_CRF
    return int(np.clip(math.floor(profile.effective - OUTPUT_QP_MARGIN), 0, MAX_AUTO_CRF))


@dataclass(slots=True)
class RestoreSummary:
    frames: int
    restored: int
    passed_through: int
    keyframes_seen: int
    seconds: float
    stage_ms: dict[str, float]
    # How the output was encoded: "CRF 7", "lossless", "1000000 bit/s".
    output: str = ""

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        return (
            f"{self.frames} frames, {self.restored} restored, {self.passed_through} passed through, "
            f"{self.keyframes_seen} keyframes seen, {self.fps:.2f} FPS" + (f", output {self.output}" if self.output else "")
        )


def restore_file(
    source_path: Path,
    output_path: Path,
    generator: CropGenerator,
    settings: RestoreSettings | None = None,
    encode: EncodeOptions = EncodeOptions(),
    progress: bool = True,
    degrade_crf: int | None = None,
) -> RestoreSummary:
    """Restore every frame of ``source_path`` into ``output_path``.

    With ``degrade_crf`` the input is first compressed as a call would deliver it (libx264
    at that CRF, an I-frame a second) and that is what gets restored.
    Audio is copied unchanged; frame rate and timestamps are kept.
    """
    restorer = StreamRestorer(settings, native_detail=generator.native_detail)
    start = time.perf_counter()
    with ExitStack() as scratch:
        if degrade_crf is not None:
            folder = Path(scratch.enter_context(tempfile.TemporaryDirectory(prefix="kfgan-received-")))
            received = folder / f"{Path(source_path).stem}-crf{degrade_crf}.mp4"
            degrade_like_a_call(source_path, received, degrade_crf)
            source_path = received
        encode = resolve_output(encode, source_path)
        _restore_frames(source_path, output_path, generator, restorer, encode, progress)
    summary = summarize(restorer.stats, time.perf_counter() - start)
    summary.output = encode.describe()
    return summary


def resolve_output(encode: EncodeOptions, source_path: Path) -> EncodeOptions:
    """``encode`` with its CRF chosen from the input's quantiser when the user set none.

    A fixed CRF cannot keep every call: CRF 18 costs a CRF-42 call 0.04-0.1 dB of luma
    PSNR but a CRF-32 one 0.2-0.4 dB, because a better call has less error of its own for
    the re-encoding's to hide in. So by default the output's CRF is
    :data:`OUTPUT_QP_MARGIN` steps finer than the input's effective quantiser (see
    :func:`output_crf`); files of good calls grow accordingly.
    """
    if encode.crf is not None:
        return encode
    if encode.lossless or encode.bitrate is not None:
        return replace(encode, crf=MAX_AUTO_CRF)  # unused: qp 0 or the bitrate rules
    profile = probe_quantiser(source_path)
    crf = output_crf(profile)
    if profile is None:
        log.info("output CRF %d: %s reports no quantiser", crf, source_path)
    else:
        log.info("output CRF %d: the input's effective quantiser is %.1f (mean %.1f)", crf, profile.effective, profile.mean)
    return replace(encode, crf=crf)


def _restore_frames(
    source_path: Path,
    output_path: Path,
    generator: CropGenerator,
    restorer: StreamRestorer,
    encode: EncodeOptions,
    progress: bool,
) -> None:
    with FileSource(source_path) as source:
        sink = open_sink(source, output_path, encode)
        with sink, tqdm(total=source.frame_count, unit="frame", disable=not progress, desc="restore") as bar:
            for frame in source:
                restored = restorer.restore(frame, generator)
                with restorer.stats.timer.stage("encode"):
                    sink.write(restored)
                bar.update(1)


def open_sink(source: FileSource, output_path: Path, encode: EncodeOptions, **size: int) -> FileSink:
    """A sink like ``source`` (timing, colour, audio) encoding as ``encode`` says; ``size`` overrides width/height."""
    return FileSink.like(source, output_path, **encode.sink_options(MAX_AUTO_CRF), **size)


def summarize(stats: RestoreStats, seconds: float) -> RestoreSummary:
    return RestoreSummary(
        frames=stats.frames,
        restored=stats.restored,
        passed_through=stats.passed_through,
        keyframes_seen=stats.keyframes_seen,
        seconds=seconds,
        stage_ms=stats.timer.mean_ms(),
    )
