"""What carrying the last restored correction forward costs, measured on a real clip.

The live engine restores what it can in time and carries the last restored
frame's correction, moved with the face, onto the frames in between. This
replays that on a clip with the generator restoring every k-th frame (k = 1 is
every frame) and compares the face region of every output frame with the
original, on the decoded Y plane:

- face PSNR: PSNR of the Y samples inside the face region (the aligned crop's
  footprint, found once on the compressed stream so that every variant is
  judged on the same pixels), averaged over the frames that have a face;
- face flicker: :mod:`kfgan_daemon.eval.flicker`'s measure, the mean change of
  the output's error from one frame to the next inside the face region: restored
  and unrestored frames alternating make it grow.

The compressed stream itself is the row with nothing restored. Rows marked
"unfollowed" carry the correction with the alignment of the last restored
frame instead of following the face on the frames in between: what the engine
does when there is no time even for the face tracker. Rows marked "unrestored
between" send the frames in between as they came: what carrying forward
replaces.
"""
from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from kfgan_daemon.eval import image_quality
from kfgan_daemon.eval.flicker import FlickerMeter, face_region_mask
from kfgan_daemon.media import FileSource
from kfgan_daemon.media.encode import degrade_like_a_call
from kfgan_daemon.media.frame import DecodedFrame
from kfgan_daemon.restore.generator import CropGenerator
from kfgan_daemon.restore.settings import RestoreSettings
from kfgan_daemon.restore.stream import StreamRestorer


Between = Literal["followed", "unfollowed", "unrestored"]
BETWEEN: tuple[Between, ...] = ("followed", "unfollowed", "unrestored")


@dataclass(slots=True)
class CarryForwardRow:
    restore_every: int | None  # None: nothing restored (the compressed stream)
    between: "Between"  # what the frames between restored ones got
    frames: int
    restored: int
    carried_forward: int
    face_frames: int
    face_psnr_db: float
    face_flicker: float

    @property
    def label(self) -> str:
        if self.restore_every is None:
            return "compressed"
        if self.restore_every == 1:
            return "every frame"
        label = f"every {self.restore_every}"
        return {"followed": label, "unfollowed": f"{label}, unfollowed", "unrestored": f"{label}, unrestored between"}[
            self.between
        ]


def render_rows(rows: Sequence[CarryForwardRow], crf: int) -> str:
    lines = [
        f"carry-forward quality (CRF {crf}; face region, Y plane, against the original)",
        f"  {'restored':<30} {'restored':>8} {'carried':>8} {'face PSNR':>10} {'flicker':>8}",
    ]
    for row in rows:
        lines.append(
            f"  {row.label:<30} {row.restored:8d} {row.carried_forward:8d} {row.face_psnr_db:8.2f} dB "
            f"{row.face_flicker:8.3f}"
        )
    return "\n".join(lines)


def measure_carry_forward(
    clip: Path,
    generator: CropGenerator,
    *,
    crf: int = 42,
    gop_seconds: float = 1.0,
    intervals: Sequence[int] = (1, 2, 3, 4, 5),
    max_frames: int = 100,
    settings: RestoreSettings | None = None,
) -> list[CarryForwardRow]:
    """Compress ``clip`` like a call, then restore it every k-th frame for each k in ``intervals``,
    carrying the correction forward in between; one row per k, plus the compressed stream first."""
    settings = settings or RestoreSettings()
    with tempfile.TemporaryDirectory(prefix="kfgan-carry-") as folder:
        compressed_path = Path(folder) / "compressed.mp4"
        degrade_like_a_call(clip, compressed_path, crf, gop_seconds, max_frames, audio=False)
        originals = _frames(clip, max_frames)
        compressed = _frames(compressed_path, max_frames)
    count = min(len(originals), len(compressed))
    originals, compressed = originals[:count], compressed[:count]
    faces = _face_regions(compressed, settings)
    rows = [_measure(None, "unrestored", compressed, originals, faces, 0, 0)]
    for every in intervals:
        for between in BETWEEN if every > 1 else ("followed",):
            outputs, restored, carried = _replay(compressed, generator, settings, every, between)
            rows.append(_measure(every, between, outputs, originals, faces, restored, carried))
    return rows


def _frames(path: Path, limit: int) -> list[DecodedFrame]:
    frames = []
    with FileSource(path) as source:
        for frame in source:
            frames.append(frame)
            if len(frames) == limit:
                break
    return frames


def _face_regions(frames: Sequence[DecodedFrame], settings: RestoreSettings) -> list[np.ndarray | None]:
    restorer = StreamRestorer(settings)
    regions: list[np.ndarray | None] = []
    for frame in frames:
        matrix = restorer.locate(frame)
        regions.append(None if matrix is None else face_region_mask(matrix, frame.height, frame.width))
    return regions


def _replay(
    frames: Sequence[DecodedFrame], generator: CropGenerator, settings: RestoreSettings, every: int, between: "Between"
) -> tuple[list[DecodedFrame], int, int]:
    """The engine's choices, scripted: prepare and restore every ``every``-th frame; the others get
    ``between``: the last correction at their own face, at the last followed face, or nothing."""
    restorer = StreamRestorer(settings, native_detail=generator.native_detail)
    outputs: list[DecodedFrame] = []
    restored = carried = 0
    for n, frame in enumerate(frames):
        if n % every == 0:
            job = restorer.prepare(frame)
            if job is not None:
                (crop,) = generator([job])
                outputs.append(restorer.complete(frame, job, crop))
                restored += 1
                continue
            outputs.append(frame)
            continue
        if between == "followed":
            matrix = restorer.locate(frame)
            moved = None if matrix is None else restorer.carry_forward(frame, matrix)
        elif between == "unfollowed":
            moved = restorer.carry_forward(frame)
        else:
            restorer.locate(frame)  # the engine follows the face of a frame it cannot restore
            moved = None
        if moved is not None:
            carried += 1
        outputs.append(moved if moved is not None else frame)
    return outputs, restored, carried


def _measure(
    every: int | None,
    between: "Between",
    outputs: Sequence[DecodedFrame],
    originals: Sequence[DecodedFrame],
    faces: Sequence[np.ndarray | None],
    restored: int,
    carried: int,
) -> CarryForwardRow:
    psnrs = []
    meter = FlickerMeter()
    for out, original, face in zip(outputs, originals, faces):
        meter.add(original.y, {"out": out.y}, face)
        if face is None or not face.any():
            continue
        psnrs.append(image_quality.psnr(out.y[face], original.y[face]))
    flicker = meter.flicker("out")
    return CarryForwardRow(
        restore_every=every,
        between=between,
        frames=len(outputs),
        restored=restored,
        carried_forward=carried,
        face_frames=len(psnrs),
        face_psnr_db=float(np.mean(psnrs)) if psnrs else float("nan"),
        face_flicker=float("nan") if flicker is None else flicker,
    )
