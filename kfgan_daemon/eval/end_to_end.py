"""What a receiver sees: clips compressed as a call, restored by ``kfgan-daemon restore``, compared on decoded luma.

For each clip and sender, the clip is compressed with libx264 (CRF, an I-frame a
second), the compressed file is restored exactly as ``restore`` does it (the
restorer's default settings, the default output encode), and the original, the
compressed and the restored files are decoded in lockstep and compared on their
Y planes: no crop, no RGB anywhere. The face is the bounding box of the 68
landmarks tracked on the original, so no row picks the region it is judged on.

Senders (:data:`kfgan_daemon.media.encode.SENDERS`): ``stream`` is a plain x264
sender (its I-frames are as good as the CRF makes them); ``hq`` gives every
I-frame a much lower quantiser, the sender the paper assumes. Rows: the
compressed input, the model, and the model with its keyframe replaced by the
compressed crop (the reference-free ablation that shows what keyframes add). With ``vmaf=True`` (needs the optional
vmaf-torch) every row also gets VMAF and VMAF-NEG over whole decoded Y planes.

Every clip is also encoded by a plain sender at several CRFs around the
evaluated one (:mod:`kfgan_daemon.eval.bandwidth`): the bitrate that sender
needs for each row's face PSNR, against what the row's sender spent, is the
saving at equal face quality.
"""
from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from skimage.metrics import structural_similarity

from kfgan_daemon.errors import MetricUnavailableError
from kfgan_daemon.eval.bandwidth import RATE_CURVE_OFFSETS, RatePoint, rate_for_quality, saving, video_kbps
from kfgan_daemon.eval.flicker import FlickerMeter
from kfgan_daemon.eval.vmaf import VmafMeter, vmaf_unavailable_reason
from kfgan_daemon.media import DecodedFrame, FileSource
from kfgan_daemon.media.colour import Box
from kfgan_daemon.media.encode import SENDERS, degrade_like_a_call
from kfgan_daemon.restore.file_job import restore_file
from kfgan_daemon.restore.generator import CropGenerator
from kfgan_daemon.restore.face_pipeline import face_tracker
from kfgan_daemon.restore.job import FaceJob
from kfgan_daemon.restore.settings import RestoreSettings

log = logging.getLogger(__name__)

INPUT_ROW = "input"
MODEL_ROW = "restored"
NO_REFERENCE_ROW = "restored, no reference"
# The sender whose rate curve prices every row (kfgan_daemon.media.encode.SENDERS).
PLAIN_SENDER = "stream"


class WithoutReference:
    """A generator whose keyframe is replaced by the compressed crop itself (the ablation)."""

    def __init__(self, generator: CropGenerator) -> None:
        self.generator = generator
        # The same model without its keyframe: everything else, the paste's filter included, stays.
        self.native_detail = generator.native_detail

    def __call__(self, jobs: Sequence[FaceJob]) -> list[np.ndarray]:
        return self.generator([replace(job, reference=job.compressed) for job in jobs])


@dataclass
class _Errors:
    face_squared: float = 0.0
    face_pixels: int = 0
    frame_squared: float = 0.0
    frame_pixels: int = 0
    face_ssim: list[float] = field(default_factory=list)

    def add(self, luma: np.ndarray, truth: np.ndarray, box: Box | None, ssim: bool = True) -> None:
        error = luma.astype(np.float64) - truth
        self.frame_squared += float(np.square(error).sum())
        self.frame_pixels += error.size
        if box is None:
            return
        x0, y0, x1, y1 = box
        face = error[y0:y1, x0:x1]
        self.face_squared += float(np.square(face).sum())
        self.face_pixels += face.size
        if ssim:
            self.face_ssim.append(
                float(structural_similarity(luma[y0:y1, x0:x1], truth[y0:y1, x0:x1], data_range=255))
            )


def _psnr(squared: float, pixels: int) -> float:
    return 10 * math.log10(255**2 * pixels / squared) if squared > 0 else math.inf


@dataclass(frozen=True, slots=True)
class RowScores:
    face_psnr: float
    face_ssim: float
    frame_psnr: float
    face_flicker: float | None
    vmaf: float | None = None
    vmaf_neg: float | None = None


@dataclass(frozen=True, slots=True)
class ClipScores:
    clip: str
    sender: str
    frames: int
    face_frames: int
    rows: dict[str, RowScores]
    # The video bitrate of the call as this sender delivered it, and the plain sender's rate
    # curve on the same clip (see kfgan_daemon.eval.bandwidth); absent where not measured.
    kbps: float | None = None
    curve: tuple[RatePoint, ...] = ()

    def plain_kbps_for(self, row: str) -> float | None:
        """The bitrate a plain sender needs for this row's face PSNR (None: off the curve)."""
        return rate_for_quality(self.curve, self.rows[row].face_psnr)


def _face_box(landmarks: np.ndarray, height: int, width: int) -> Box:
    x0, y0 = np.floor(landmarks.min(axis=0)).astype(int)
    x1, y1 = np.ceil(landmarks.max(axis=0)).astype(int) + 1
    return max(int(x0), 0), max(int(y0), 0), min(int(x1), width), min(int(y1), height)


@dataclass(frozen=True, slots=True)
class ComparedFrame:
    """One frame of the original and of every compared file, decoded, and the face box it is judged on
    (the 68 landmarks tracked on the original; None where it shows no face)."""

    truth: DecodedFrame
    rows: dict[str, DecodedFrame]
    box: Box | None


def compare_decoded(
    original: Path, rows: Mapping[str, Path], settings: RestoreSettings | None = None
) -> Iterator[ComparedFrame]:
    """The original and every row decoded in lockstep (up to the shortest file), with the face box
    (tracked as ``settings`` track, raw landmarks: the judge's box follows no smoothing of its own)."""
    tracker = face_tracker(settings or RestoreSettings())
    with ExitStack() as files:
        truth_source = files.enter_context(FileSource(original))
        sources = {key: files.enter_context(FileSource(path)) for key, path in rows.items()}
        for truth, *decoded in zip(truth_source, *sources.values()):
            landmarks = tracker.update(truth.luma)
            box = None if landmarks is None else _face_box(landmarks, truth.height, truth.width)
            frames = dict(zip(sources, decoded))
            for key, frame in frames.items():
                if frame.luma.shape != truth.luma.shape:
                    raise ValueError(
                        f"{rows[key]}: {frame.luma.shape} frames against the original's {truth.luma.shape}"
                    )
            yield ComparedFrame(truth, frames, box)


def face_psnr(luma: np.ndarray, truth: np.ndarray, box: Box | None) -> float | None:
    """One frame's face PSNR (dB) on luma, as :func:`measure` takes it over a clip; None without a face."""
    if box is None:
        return None
    errors = _Errors()
    errors.add(luma, truth, box, ssim=False)
    return _psnr(errors.face_squared, errors.face_pixels)


def measure(
    original: Path, rows: dict[str, Path], clip: str, sender: str, vmaf: bool = False,
    settings: RestoreSettings | None = None,
) -> ClipScores:
    """Compare each row's decoded luma with the original's, frame by frame (up to the shortest file).

    ``vmaf`` adds VMAF and VMAF-NEG (raises MetricUnavailableError without vmaf-torch); the face
    box is tracked as ``settings`` track.
    """
    errors = {key: _Errors() for key in rows}
    flicker = FlickerMeter()
    vmaf_meter = VmafMeter() if vmaf else None
    frames = face_frames = 0
    for compared in compare_decoded(original, rows, settings):
        truth, box = compared.truth, compared.box
        lumas = {key: frame.luma for key, frame in compared.rows.items()}
        for key, luma in lumas.items():
            errors[key].add(luma, truth.luma, box)
        mask = None
        if box is not None:
            mask = np.zeros(truth.luma.shape, bool)
            mask[box[1]:box[3], box[0]:box[2]] = True
            face_frames += 1
        flicker.add(truth.luma, lumas, mask)
        if vmaf_meter is not None:
            vmaf_meter.add(truth.luma, lumas)
        frames += 1
    video = vmaf_meter.scores() if vmaf_meter is not None else {}
    scores = {
        key: RowScores(
            face_psnr=_psnr(e.face_squared, e.face_pixels),
            face_ssim=float(np.mean(e.face_ssim)) if e.face_ssim else math.nan,
            frame_psnr=_psnr(e.frame_squared, e.frame_pixels),
            face_flicker=flicker.flicker(key),
            vmaf=video.get(key, {}).get("vmaf"),
            vmaf_neg=video.get(key, {}).get("vmaf_neg"),
        )
        for key, e in errors.items()
    }
    return ClipScores(clip, sender, frames, face_frames, scores)


def evaluate_end_to_end(
    clips: Iterable[Path],
    generator: CropGenerator,
    crf: int = 42,
    senders: Sequence[str] = tuple(SENDERS),
    max_frames: int | None = None,
    settings: RestoreSettings | None = None,
    workdir: Path | None = None,
    vmaf: bool = False,
    rate_crfs: Sequence[int] | None = None,
) -> list[ClipScores]:
    """Compress, restore (with and without keyframes) and measure every clip for every sender.

    ``rate_crfs`` are the CRFs of the plain sender's rate curve (default: :data:`RATE_CURVE_OFFSETS`
    around ``crf``; empty: no curve, no bitrates).
    """
    if vmaf and (reason := vmaf_unavailable_reason()) is not None:
        raise MetricUnavailableError(reason)
    if rate_crfs is None:
        rate_crfs = sorted({min(51, max(0, crf + offset)) for offset in RATE_CURVE_OFFSETS})
    results = []
    with ExitStack() as scratch:
        folder = workdir or Path(scratch.enter_context(tempfile.TemporaryDirectory(prefix="kfgan-eval-")))
        folder.mkdir(parents=True, exist_ok=True)
        for clip in clips:
            curve = rate_curve(clip, rate_crfs, folder, max_frames, settings)
            for sender in senders:
                stem = f"{clip.stem}-{sender}-crf{crf}"
                received = folder / f"{stem}.mp4"
                degrade_like_a_call(clip, received, crf, max_frames=max_frames, audio=False,
                                    x264_options=SENDERS[sender])
                restored, ablation = folder / f"{stem}-restored.mp4", folder / f"{stem}-noref.mp4"
                restore_file(received, restored, generator, settings, progress=False)
                restore_file(received, ablation, WithoutReference(generator), settings, progress=False)  # type: ignore[arg-type]
                rows = {INPUT_ROW: received, MODEL_ROW: restored, NO_REFERENCE_ROW: ablation}
                scores = measure(clip, rows, clip.stem, sender, vmaf=vmaf, settings=settings)
                scores = replace(scores, kbps=video_kbps(received) if curve else None, curve=curve)
                log.info("end-to-end %s (%s sender, %s kbit/s): %s", clip.stem, sender, scores.kbps, scores.rows)
                results.append(scores)
    return results


def rate_curve(
    clip: Path, crfs: Sequence[int], folder: Path, max_frames: int | None = None, settings: RestoreSettings | None = None
) -> tuple[RatePoint, ...]:
    """The plain sender's bitrate and face PSNR on ``clip`` at each CRF, measured as every row is."""
    if not crfs:
        return ()
    encoded = {}
    for crf in crfs:
        encoded[f"crf{crf}"] = path = folder / f"{clip.stem}-{PLAIN_SENDER}-curve-crf{crf}.mp4"
        degrade_like_a_call(clip, path, crf, max_frames=max_frames, audio=False, x264_options=SENDERS[PLAIN_SENDER])
    scores = measure(clip, encoded, clip.stem, PLAIN_SENDER, settings=settings)
    curve = tuple(RatePoint(crf, video_kbps(encoded[f"crf{crf}"]), scores.rows[f"crf{crf}"].face_psnr) for crf in crfs)
    log.info("rate curve of %s (plain sender): %s", clip.stem, curve)
    return curve


def averages(results: Sequence[ClipScores], sender: str) -> dict[str, RowScores]:
    """Means over the clips of one sender (PSNR averaged in dB, as per-clip figures are)."""
    chosen = [r for r in results if r.sender == sender]
    keys = chosen[0].rows if chosen else {}
    out = {}
    for key in keys:
        rows = [r.rows[key] for r in chosen]
        out[key] = RowScores(
            face_psnr=float(np.mean([row.face_psnr for row in rows])),
            face_ssim=float(np.mean([row.face_ssim for row in rows])),
            frame_psnr=float(np.mean([row.frame_psnr for row in rows])),
            face_flicker=_mean_of_known(row.face_flicker for row in rows),
            vmaf=_mean_of_known(row.vmaf for row in rows),
            vmaf_neg=_mean_of_known(row.vmaf_neg for row in rows),
        )
    return out


def _mean_of_known(values: Iterable[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return float(np.mean(known)) if known else None


@dataclass(frozen=True, slots=True)
class BandwidthRow:
    """One sender's row priced in bits, over the clips whose plain rate curve reaches its quality.

    ``saving`` is the mean of the clips' 1 - sent / needed; ``off_curve`` counts the clips
    left out because their row lies outside the curve's face PSNR range.
    """

    clips: int
    off_curve: int
    sent_kbps: float | None
    needed_kbps: float | None
    saving: float | None


def bandwidth(results: Sequence[ClipScores], sender: str) -> dict[str, BandwidthRow]:
    """Per row of one sender: what it spent, what a plain sender needs for its face quality, the saving."""
    chosen = [r for r in results if r.sender == sender and r.kbps is not None and r.curve]
    out = {}
    for key in chosen[0].rows if chosen else {}:
        priced = [(r.kbps, needed) for r in chosen if (needed := r.plain_kbps_for(key)) is not None]
        out[key] = BandwidthRow(
            clips=len(priced),
            off_curve=len(chosen) - len(priced),
            sent_kbps=_mean_of_known(sent for sent, _ in priced),
            needed_kbps=_mean_of_known(needed for _, needed in priced),
            saving=_mean_of_known(saving(sent, needed) for sent, needed in priced),
        )
    return out


def _cell(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _percent(value: float | None) -> str:
    # + 0.0 turns the -0.0 that rounding a tiny negative leaves into 0.0.
    return "off the curve" if value is None else f"{round(100 * value, 1) + 0.0:+.1f}%"


def render_markdown(results: Sequence[ClipScores], crf: int) -> str:
    lines = [
        f"End to end through `restore`, CRF {crf}, decoded Y planes against the original "
        "(face: landmark box tracked on the original).",
        "",
        "| sender | row | face PSNR (dB) | face SSIM | face flicker | frame PSNR (dB) | VMAF | VMAF-NEG |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    senders = list(dict.fromkeys(r.sender for r in results))
    for sender in senders:
        for key, row in averages(results, sender).items():
            lines.append(f"| {sender} | {key} | {row.face_psnr:.2f} | {row.face_ssim:.4f} | "
                         f"{_cell(row.face_flicker, 3)} | {row.frame_psnr:.2f} | {_cell(row.vmaf, 2)} | "
                         f"{_cell(row.vmaf_neg, 2)} |")
    lines += ["", "| clip | sender | frames | input face PSNR | restored (gain) | no reference (gain) |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        base = r.rows[INPUT_ROW].face_psnr
        model, noref = r.rows[MODEL_ROW].face_psnr, r.rows[NO_REFERENCE_ROW].face_psnr
        lines.append(f"| {r.clip} | {r.sender} | {r.frames} | {base:.2f} | {model:.2f} ({model - base:+.2f}) | "
                     f"{noref:.2f} ({noref - base:+.2f}) |")
    priced = [r for r in results if r.curve and r.kbps is not None]
    if priced:
        lines += _render_bandwidth(priced, senders)
    return "\n".join(lines) + "\n"


def _render_bandwidth(results: Sequence[ClipScores], senders: Sequence[str]) -> list[str]:
    crfs = sorted({point.crf for r in results for point in r.curve})
    lines = [
        "",
        f"Bandwidth at equal face quality: the bitrate a plain sender needs for each row's face PSNR (its "
        f"rate curve on the same clip at CRF {crfs[0]}-{crfs[-1]}, face PSNR on decoded luma, interpolated "
        "on log bitrate) against what the row's sender spent; saving = 1 - sent / needed, averaged over "
        "clips (negative: the sender spent more than a plain one needs for that quality).",
        "",
        "| sender | row | sent (kbit/s) | plain sender needs (kbit/s) | saving at equal face quality | clips |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for sender in senders:
        for key, row in bandwidth(results, sender).items():
            off = f" ({row.off_curve} off the curve)" if row.off_curve else ""
            lines.append(f"| {sender} | {key} | {_cell(row.sent_kbps, 1)} | {_cell(row.needed_kbps, 1)} | "
                         f"{_percent(row.saving)} | {row.clips}{off} |")
    lines += [
        "",
        "| clip | sender | sent (kbit/s) | plain needs for input / restored (kbit/s) | saving, input / restored |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in results:
        needs = [r.plain_kbps_for(key) for key in (INPUT_ROW, MODEL_ROW)]
        lines.append(f"| {r.clip} | {r.sender} | {r.kbps:.1f} | {' / '.join(_cell(n, 1) for n in needs)} | "
                     f"{' / '.join(_percent(saving(r.kbps, n)) for n in needs)} |")
    return lines


def write_reports(results: Sequence[ClipScores], crf: int, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    senders = list(dict.fromkeys(r.sender for r in results))
    payload = {
        "crf": crf,
        "clips": [asdict(r) for r in results],
        "averages": {s: {k: asdict(v) for k, v in averages(results, s).items()} for s in senders},
        "bandwidth": {s: {k: asdict(v) for k, v in bandwidth(results, s).items()} for s in senders},
    }
    (out / "end_to_end.json").write_text(json.dumps(payload, indent=2))
    (out / "end_to_end.md").write_text(render_markdown(results, crf))
