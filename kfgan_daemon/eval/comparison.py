"""What ``kfgan-daemon restore --side-by-side`` shows: the original, the call as received, the restored call.

The call is restored into a file first, exactly as ``restore`` writes it, and the
panels are the decoded files, so the restored panel is what a viewer of that file
sees. With an original (``--degrade-crf``), every panel beside it carries its face
PSNR against the original on decoded luma: over the whole clip by
:func:`kfgan_daemon.eval.end_to_end.measure`, the very figure ``eval --end-to-end``
reports for this clip and its plain sender, and for the frame on screen. A
snapshot is one frame of the same panels, as a PNG, with each panel magnified
around the face under it.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import cv2
from tqdm import tqdm

from kfgan_daemon.errors import ConfigError, OutputError
from kfgan_daemon.eval.end_to_end import PLAIN_SENDER, ComparedFrame, compare_decoded, face_psnr, measure
from kfgan_daemon.eval.panels import Panel, caption_height, join_panels, snapshot_picture
from kfgan_daemon.media import FileSource
from kfgan_daemon.media.encode import degrade_like_a_call
from kfgan_daemon.media.x264 import EncodeOptions
from kfgan_daemon.restore.file_job import RestoreSummary, open_sink, resolve_output, restore_file
from kfgan_daemon.restore.generator import CropGenerator
from kfgan_daemon.restore.settings import RestoreSettings

ORIGINAL, RECEIVED, RESTORED = "original", "received", "restored"
PANEL_NAMES = (ORIGINAL, RECEIVED, RESTORED)


def default_panels(with_original: bool) -> tuple[str, ...]:
    """Every panel there is: the original only where the call was degraded from one."""
    return PANEL_NAMES if with_original else (RECEIVED, RESTORED)


def check_panels(panels: Sequence[str], with_original: bool) -> tuple[str, ...]:
    """``panels`` as given, if each is known, none repeats and the original exists where asked for."""
    unknown = [name for name in panels if name not in PANEL_NAMES]
    if unknown or not panels:
        raise ValueError(f"panels are {', '.join(PANEL_NAMES)}; not {', '.join(unknown) or 'none'}")
    if len(set(panels)) != len(panels):
        raise ValueError(f"a panel is named twice in {', '.join(panels)}")
    if ORIGINAL in panels and not with_original:
        raise ValueError("the original panel needs --degrade-crf: without it the input is the call as received")
    return tuple(panels)


@dataclass(slots=True)
class ComparisonSummary:
    """The restoration's summary, what was written, and each panel's face PSNR over the clip (dB)."""

    restore: RestoreSummary
    written: str
    face_psnr: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        text = f"{self.restore.describe()}; {self.written}"
        if self.face_psnr:
            figures = ", ".join(f"{name} {value:.2f} dB" for name, value in self.face_psnr.items())
            text += f"; face PSNR against the original on decoded luma: {figures}"
            if RECEIVED in self.face_psnr and RESTORED in self.face_psnr:
                text += f" ({self.face_psnr[RESTORED] - self.face_psnr[RECEIVED]:+.2f} dB)"
        return text


def write_comparison(
    source: Path,
    output: Path,
    generator: CropGenerator,
    *,
    panels: Sequence[str] | None = None,
    degrade_crf: int | None = None,
    settings: RestoreSettings | None = None,
    encode: EncodeOptions = EncodeOptions(),
    snapshot: int | None = None,
    snapshot_width: int | None = None,
    progress: bool = True,
) -> ComparisonSummary:
    """Restore ``source`` (first degraded at ``degrade_crf``, if given) and write the panels side by side.

    ``output`` is an H.264 video of every frame (encoded as the restored call is), or, with
    ``snapshot``, a PNG of that frame (counted from 0) with the face magnified, each panel
    ``snapshot_width`` pixels wide (default: the video's width).
    """
    with_original = degrade_crf is not None
    names = check_panels(panels or default_panels(with_original), with_original)
    if snapshot is not None:
        with FileSource(source) as probe:
            # Said before minutes of restoration where the file declares its length; checked again as it is read.
            if probe.frame_count is not None and snapshot >= probe.frame_count:
                raise ConfigError(_beyond_the_end(source, snapshot, probe.frame_count))
    with tempfile.TemporaryDirectory(prefix="kfgan-compare-") as scratch:
        folder = Path(scratch)
        received = source
        if degrade_crf is not None:
            received = folder / f"{source.stem}-crf{degrade_crf}.mp4"
            degrade_like_a_call(source, received, degrade_crf)
        restored = folder / f"{source.stem}-restored.mp4"
        encode = resolve_output(encode, received)
        summary = restore_file(received, restored, generator, settings, encode, progress=progress)
        files = {RECEIVED: received, RESTORED: restored}
        clip_psnr: dict[str, float] = {}
        if degrade_crf is not None:
            # The eval's own measurement, over the clip, before any frame is drawn with it.
            scores = measure(source, files, source.stem, PLAIN_SENDER, settings=settings)
            if scores.face_frames:
                clip_psnr = {name: scores.rows[name].face_psnr for name in names if name in scores.rows}
        titles = {ORIGINAL: "original", RECEIVED: f"received, CRF {degrade_crf}" if with_original else "input",
                  RESTORED: "restored"}
        drawing = _Drawing(names, titles, clip_psnr, with_original)
        # Without an original the received call is the reference the face is tracked on.
        compared = (
            compare_decoded(source, files, settings) if with_original
            else compare_decoded(received, {RESTORED: restored}, settings)
        )
        with closing(compared):
            if snapshot is not None:
                written = _write_snapshot(compared, drawing, snapshot, snapshot_width, output, received)
            else:
                written = _write_video(compared, drawing, output, received, encode, progress)
    return ComparisonSummary(summary, written, clip_psnr)


@dataclass(frozen=True, slots=True)
class _Drawing:
    """Which panels, titled how, with which clip figures."""

    names: tuple[str, ...]
    titles: dict[str, str]
    clip_psnr: dict[str, float]
    with_original: bool

    def panels(self, compared: ComparedFrame) -> list[Panel]:
        frames = {ORIGINAL if self.with_original else RECEIVED: compared.truth, **compared.rows}
        return [Panel(frames[name], self.titles[name], self._figures(name, compared)) for name in self.names]

    def _figures(self, name: str, compared: ComparedFrame) -> str:
        if not self.with_original:
            return ""
        if name == ORIGINAL:
            return "ground truth"
        if name not in self.clip_psnr:
            return "no face in the clip"
        frame = face_psnr(compared.rows[name].luma, compared.truth.luma, compared.box)
        this_frame = "no face" if frame is None else f"{frame:.2f}"
        return f"face PSNR {self.clip_psnr[name]:.2f} dB (this frame {this_frame})"


def _write_video(
    compared: Iterator[ComparedFrame],
    drawing: _Drawing,
    output: Path,
    received: Path,
    encode: EncodeOptions,
    progress: bool,
) -> str:
    with FileSource(received) as timing:
        width, height = timing.width * len(drawing.names), timing.height + caption_height(timing.height)
        sink = open_sink(timing, output, encode, width=width, height=height)
        frames = 0
        with sink, tqdm(total=timing.frame_count, unit="frame", disable=not progress, desc="compare") as bar:
            for frame in compared:
                # The received call's timing: its audio is the one the sink copies.
                sink.write(join_panels(drawing.panels(frame), timing=frame.rows.get(RECEIVED, frame.truth)))
                frames += 1
                bar.update(1)
    return f"{len(drawing.names)} panels ({', '.join(drawing.names)}), {width}x{height}, {frames} frames"


def _beyond_the_end(path: Path, index: int, frames: int) -> str:
    return f"snapshot: frame {index} was asked for, but the call has {frames} frames ({path})"


def _write_snapshot(
    compared: Iterator[ComparedFrame], drawing: _Drawing, index: int, width: int | None, output: Path, received: Path
) -> str:
    frames = 0
    for frame in compared:
        if frames == index:
            picture = snapshot_picture(drawing.panels(frame), frame.box, width)
            break
        frames += 1
    else:
        raise ConfigError(_beyond_the_end(received, index, frames))
    ok, png = cv2.imencode(".png", picture[:, :, ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        raise OutputError(f"{output}: PNG encoding failed")
    # Written beside the destination and renamed, so the name never holds half a picture.
    partial = output.with_name(f".{output.name}.partial")
    try:
        partial.write_bytes(png.tobytes())
        os.replace(partial, output)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise OutputError(f"{output}: cannot write the snapshot ({exc.strerror or exc})") from exc
    face = "" if frame.box is None else ", face magnified"
    size = f"{picture.shape[1]}x{picture.shape[0]}"
    return f"snapshot of frame {index}: {len(drawing.names)} panels{face}, {size}, {len(png)} bytes"
