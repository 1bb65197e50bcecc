"""`kfgan-daemon bench`: where the time of one frame goes, stage by stage.

Beside the figures, both benches (this one and ``--live``) report the
generator's milliseconds per crop on one torch thread: a short, separate
measurement of how fast the machine itself is, so that figures from different
machines (and from one machine under different loads) can be compared.
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kfgan_daemon.face import crop_footprint, mls_warp
from kfgan_daemon.face.models import warm_face_models
from kfgan_daemon.media import DecodedFrame, FileSink, FileSource
from kfgan_daemon.restore.generator import SPEED_CALLS, CropGenerator, seconds_per_crop
from kfgan_daemon.restore.job import FaceJob
from kfgan_daemon.restore.settings import RestoreSettings
from kfgan_daemon.restore.stream import StreamRestorer
from kfgan_daemon.restore.timing import median_seconds

# Stages every face frame pays; "identity" (a face descriptor) runs only on I-frames and new faces.
FACE_STAGES = ("track", "align", "select", "warp", "paste")
STAGE_ORDER = ("decode", "track", "align", "identity", "select", "warp", "generator", "native_detail", "paste", "encode")


@dataclass
class BenchReport:
    clip: Path
    width: int
    height: int
    frames: int
    clip_frames: int | None  # how many frames the clip holds (None: the container does not say)
    restored: int
    seconds: float
    stage_ms: dict[str, float]
    stage_calls: dict[str, int]
    detector_calls: int | None
    micro_ms: dict[str, float] = field(default_factory=dict)
    # The colour work of a restored frame: the face region converted to RGB for alignment,
    # plus the paste into the YUV planes (nothing else in the path converts colour).
    region_rgb_ms: float | None = None
    # The machine's speed: generator ms per crop, batch 1, one torch thread (see the module docstring).
    generator_ms_one_thread: float | None = None

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0

    @property
    def face_path_ms(self) -> float:
        return sum(self.stage_ms.get(stage, 0.0) for stage in FACE_STAGES)

    def render(self) -> str:
        of = f" of the clip's {self.clip_frames}" if self.clip_frames else ""
        lines = [f"clip {self.clip.name} {self.width}x{self.height}: timed {self.frames}{of} frames, {self.restored} restored"]
        if self.generator_ms_one_thread is not None:
            lines.append(f"machine: {describe_machine_speed(self.generator_ms_one_thread)}")
        lines.append("stage           ms per call   calls")
        for stage in STAGE_ORDER:
            if stage in self.stage_ms:
                lines.append(f"  {stage:<13} {self.stage_ms[stage]:8.2f}   {self.stage_calls[stage]:6d}")
        lines.append(f"  {'face path':<13} {self.face_path_ms:8.2f}   ({'+'.join(FACE_STAGES)})")
        if self.detector_calls is not None:
            lines.append(f"detector ran on {self.detector_calls} of {self.frames} frames")
        if self.region_rgb_ms is not None and "paste" in self.stage_ms:
            total = self.region_rgb_ms + self.stage_ms["paste"]
            lines.append(
                f"colour conversion + paste per restored frame: {total:.2f} ms "
                f"(face region to RGB {self.region_rgb_ms:.2f} + paste {self.stage_ms['paste']:.2f}; "
                "decode and encode pass the YUV planes through unconverted)"
            )
        for name, value in self.micro_ms.items():
            lines.append(f"{name}: {value:.2f} ms")
        lines.append(f"end-to-end: {self.fps:.2f} FPS ({1000.0 / self.fps if self.fps else float('inf'):.1f} ms/frame)")
        return "\n".join(lines)


def _median_ms(fn, repeats: int) -> float:
    return 1000.0 * median_seconds(fn, repeats)


def describe_machine_speed(ms: float) -> str:
    """The one-thread generator figure as both benches print it."""
    return f"generator {ms:.1f} ms per crop on one torch thread (batch 1, median of {SPEED_CALLS} calls)"


def measure_generator_ms_one_thread(generator: Callable[[Sequence[FaceJob]], list[np.ndarray]]) -> float:
    """Median ms of batch-1 calls of ``generator`` on one torch thread, after one unmeasured call.

    Call it while nothing else uses torch: the thread count is process-wide, and
    is set back to what it was afterwards. A generator under ONNX Runtime runs on
    its own configured threads (one unless asked otherwise).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return 1000.0 * seconds_per_crop(generator)
    finally:
        torch.set_num_threads(threads)


def micro_benchmarks(job: FaceJob, generator: CropGenerator, src_landmarks: np.ndarray) -> dict[str, float]:
    """Isolated timings of the warp (both modes) and of one generator call on a real crop."""
    dst = job.crop_landmarks
    crop = job.compressed
    return {
        "mls warp fast (256x256)": _median_ms(lambda: mls_warp(crop, src_landmarks, dst, mode="fast"), 20),
        "mls warp published (256x256)": _median_ms(lambda: mls_warp(crop, src_landmarks, dst, mode="published"), 3),
        "generator, batch 1": _median_ms(lambda: generator([job]), 3),
    }


def region_conversion_ms(frame: DecodedFrame, job: FaceJob) -> float:
    """Median time to convert the face's footprint (what alignment reads) from YUV to RGB."""
    size = job.compressed.shape[:2]
    box = crop_footprint(job.matrix, size, frame.width, frame.height)
    return _median_ms(lambda: frame.rgb(box), 20) if box is not None else 0.0


def run_offline_bench(
    clip: Path, generator: CropGenerator, max_frames: int = 100, detector: str = "hog"
) -> BenchReport:
    """Decode, restore and encode up to ``max_frames`` frames, timing every stage."""
    settings = RestoreSettings(detector=detector)
    # Face models are built once per process (as the daemon does before its first call), not
    # inside the first frame's "track".
    warm_face_models(detector, 1, recognizer=settings.identity_check)
    restorer = StreamRestorer(settings, native_detail=generator.native_detail)
    timer = restorer.stats.timer
    last_job: FaceJob | None = None
    last_face_frame: DecodedFrame | None = None
    with FileSource(clip) as source, tempfile.TemporaryDirectory() as tmp:
        width, height, clip_frames = source.width, source.height, source.frame_count
        sink = FileSink.like(source, Path(tmp) / "bench.mp4", audio_from=None)
        frames = iter(source)
        start = time.perf_counter()
        with sink:
            for _ in range(max_frames):
                with timer.stage("decode"):
                    frame = next(frames, None)
                if frame is None:
                    break
                job = restorer.prepare(frame)
                if job is not None:
                    with timer.stage("generator"):
                        (crop,) = generator([job])
                    last_job, last_face_frame = job, frame
                    frame = restorer.complete(frame, job, crop)
                with timer.stage("encode"):
                    sink.write(frame)
        seconds = time.perf_counter() - start
    stats = restorer.stats
    micro: dict[str, float] = {}
    region_rgb_ms = None
    if last_job is not None and last_face_frame is not None:
        entry = restorer.store.select(last_job.crop_landmarks)
        micro = micro_benchmarks(last_job, generator, entry.landmarks)
        region_rgb_ms = region_conversion_ms(last_face_frame, last_job)
    return BenchReport(
        clip=clip,
        width=width,
        height=height,
        frames=stats.frames,
        clip_frames=clip_frames,
        restored=stats.restored,
        seconds=seconds,
        stage_ms=stats.timer.mean_ms(),
        stage_calls={name: total.count for name, total in stats.timer.totals.items()},
        detector_calls=restorer.tracker.stats.detector_runs,
        micro_ms=micro,
        region_rgb_ms=region_rgb_ms,
        generator_ms_one_thread=measure_generator_ms_one_thread(generator),
    )
