"""Restoring a recorded call: file in, file out, every frame processed."""
from __future__ import annotations

import logging
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from kfgan_daemon.media import DecodedFrame, FileSink, FileSource
from kfgan_daemon.media.encode import degrade_like_a_call
from kfgan_daemon.restore.generator import CropGenerator
from kfgan_daemon.restore.settings import RestoreSettings
from kfgan_daemon.restore.stream import RestoreStats, StreamRestorer

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EncodeOptions:
    """Output encoding: CRF 18 unless the user asks for a bitrate or a lossless file.

    The decoded planes go to the encoder unconverted, so CRF 18 on a CRF 42 call
    costs about 0.04 dB of luma PSNR (d3, d12, s18); ``lossless`` (libx264 qp 0,
    yuv420p) costs nothing: every decoded plane comes back bit for bit.
    """

    crf: int = 18
    bitrate: int | None = None
    preset: str = "medium"
    gop: int | None = None
    lossless: bool = False


@dataclass(slots=True)
class RestoreSummary:
    frames: int
    restored: int
    passed_through: int
    keyframes_seen: int
    seconds: float
    stage_ms: dict[str, float]

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        return (
            f"{self.frames} frames, {self.restored} restored, {self.passed_through} passed through, "
            f"{self.keyframes_seen} keyframes seen, {self.fps:.2f} FPS"
        )


def side_by_side(left: DecodedFrame, right: DecodedFrame, labels: tuple[str, str] | None = None) -> DecodedFrame:
    """Two frames of one stream next to each other (planes joined, no conversion), each half
    optionally captioned in a bar across its top."""
    joined = right.with_planes(*(np.concatenate(pair, axis=1) for pair in zip(left.planes, right.planes)))
    if labels is not None:
        for offset, text in zip((0, left.width), labels):
            _caption(joined, offset, left.width, text)
    return joined


def _caption(frame: DecodedFrame, x0: int, width: int, text: str) -> None:
    """White text on a black bar at the top of the columns ``x0 .. x0 + width``, drawn in the planes."""
    black, white = (0, 255) if frame.colour.full_range else (16, 235)
    bar = max(16, frame.height // 16) & ~1
    luma = np.full((bar, width), black, np.uint8)
    scale = bar / 40.0
    origin = (bar // 3, bar * 3 // 4)
    cv2.putText(luma, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, white, max(1, bar // 20), cv2.LINE_AA)
    frame.y[:bar, x0 : x0 + width] = luma
    # Neutral chroma under the bar, so the caption is grey on every picture.
    frame.u[: bar // 2, x0 // 2 : (x0 + width) // 2] = 128
    frame.v[: bar // 2, x0 // 2 : (x0 + width) // 2] = 128


def restore_file(
    source_path: Path,
    output_path: Path,
    generator: CropGenerator,
    settings: RestoreSettings | None = None,
    encode: EncodeOptions = EncodeOptions(),
    compare: bool = False,
    progress: bool = True,
    degrade_crf: int | None = None,
) -> RestoreSummary:
    """Restore every frame of ``source_path`` into ``output_path``.

    With ``compare`` the output shows input and restored frames side by side, captioned.
    With ``degrade_crf`` the input is first compressed as a call would deliver it (libx264
    at that CRF, an I-frame a second) and that is what gets restored, so a comparison
    shows the call as received beside the restored call.
    Audio is copied unchanged; frame rate and timestamps are kept.
    """
    restorer = StreamRestorer(settings)
    start = time.perf_counter()
    labels = ("input", "restored")
    with ExitStack() as scratch:
        if degrade_crf is not None:
            folder = Path(scratch.enter_context(tempfile.TemporaryDirectory(prefix="kfgan-received-")))
            received = folder / f"{Path(source_path).stem}-crf{degrade_crf}.mp4"
            degrade_like_a_call(source_path, received, degrade_crf)
            source_path, labels = received, (f"received (CRF {degrade_crf})", "restored")
        _restore_frames(source_path, output_path, generator, restorer, encode, labels if compare else None, progress)
    return summarize(restorer.stats, time.perf_counter() - start)


def _restore_frames(
    source_path: Path,
    output_path: Path,
    generator: CropGenerator,
    restorer: StreamRestorer,
    encode: EncodeOptions,
    labels: tuple[str, str] | None,
    progress: bool,
) -> None:
    compare = labels is not None
    with FileSource(source_path) as source:
        sink = FileSink.like(
            source,
            output_path,
            width=source.width * (2 if compare else 1),
            crf=encode.crf,
            qp=0 if encode.lossless else None,
            bitrate=encode.bitrate,
            preset=encode.preset,
            gop=encode.gop,
        )
        with sink, tqdm(total=source.frame_count, unit="frame", disable=not progress, desc="restore") as bar:
            for frame in source:
                restored = restorer.restore(frame, generator)
                if compare:
                    restored = side_by_side(frame, restored, labels)
                with restorer.stats.timer.stage("encode"):
                    sink.write(restored)
                bar.update(1)


def summarize(stats: RestoreStats, seconds: float) -> RestoreSummary:
    return RestoreSummary(
        frames=stats.frames,
        restored=stats.restored,
        passed_through=stats.passed_through,
        keyframes_seen=stats.keyframes_seen,
        seconds=seconds,
        stage_ms=stats.timer.mean_ms(),
    )
