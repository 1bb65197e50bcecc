"""Restoring a recorded call: file in, file out, every frame processed."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kfgan_daemon.media import FileSink, FileSource
from kfgan_daemon.restore.generator import CropGenerator
from kfgan_daemon.restore.settings import RestoreSettings
from kfgan_daemon.restore.stream import RestoreStats, StreamRestorer

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EncodeOptions:
    """Output encoding: visually lossless CRF 18 unless the user asks for a bitrate."""

    crf: int = 18
    bitrate: int | None = None
    preset: str = "medium"
    gop: int | None = None


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


def side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    return np.concatenate([left, right], axis=1)


def restore_file(
    source_path: Path,
    output_path: Path,
    generator: CropGenerator,
    settings: RestoreSettings | None = None,
    encode: EncodeOptions = EncodeOptions(),
    compare: bool = False,
    progress: bool = True,
) -> RestoreSummary:
    """Restore every frame of ``source_path`` into ``output_path``.

    With ``compare`` the output shows input and restored frames side by side.
    Audio is copied unchanged; frame rate and timestamps are kept.
    """
    restorer = StreamRestorer(settings)
    start = time.perf_counter()
    with FileSource(source_path) as source:
        sink = FileSink.like(
            source,
            output_path,
            width=source.width * (2 if compare else 1),
            crf=encode.crf,
            bitrate=encode.bitrate,
            preset=encode.preset,
            gop=encode.gop,
        )
        with sink, tqdm(total=source.frame_count, unit="frame", disable=not progress, desc="restore") as bar:
            for frame in source:
                restored = restorer.restore(frame, generator)
                if compare:
                    restored = frame.with_image(side_by_side(frame.image, restored.image))
                with restorer.stats.timer.stage("encode"):
                    sink.write(restored)
                bar.update(1)
    return summarize(restorer.stats, time.perf_counter() - start)


def summarize(stats: RestoreStats, seconds: float) -> RestoreSummary:
    return RestoreSummary(
        frames=stats.frames,
        restored=stats.restored,
        passed_through=stats.passed_through,
        keyframes_seen=stats.keyframes_seen,
        seconds=seconds,
        stage_ms=stats.timer.mean_ms(),
    )
