"""The evaluation report and its three renderings: JSON, a Markdown table, a PNG grid of crops."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from kfgan_daemon.errors import OutputError

METRICS = (
    "crop_psnr",
    "crop_ssim",
    "crop_lpips",
    "crop_luma_bias",
    "face_flicker",
    "frame_psnr",
    "frame_ssim",
    "vmaf",
    "vmaf_neg",
)
# Shown only when some row has a value: optional packages, user-given weights, or a face to measure.
OPTIONAL_METRICS = ("crop_lpips", "crop_luma_bias", "face_flicker", "vmaf", "vmaf_neg")
_HEADINGS = {
    "crop_psnr": "crop PSNR (dB)",
    "crop_ssim": "crop SSIM",
    "crop_lpips": "crop LPIPS",
    "crop_luma_bias": "crop ΔY",
    "face_flicker": "face flicker (Y levels)",
    "frame_psnr": "frame PSNR (dB)",
    "frame_ssim": "frame SSIM",
    "vmaf": "VMAF",
    "vmaf_neg": "VMAF-NEG",
}


@dataclass(slots=True)
class RowResult:
    """One line of a table: the compressed input, a model, or a model's no-reference ablation.

    A metric is None when it could not be measured (no face found, VMAF not
    available); ``note`` then says why. Numbers are never made up for it.
    """

    key: str
    label: str
    model: str | None
    crop_psnr: float | None = None
    crop_ssim: float | None = None
    crop_lpips: float | None = None
    crop_luma_bias: float | None = None
    face_flicker: float | None = None
    frame_psnr: float | None = None
    frame_ssim: float | None = None
    vmaf: float | None = None
    vmaf_neg: float | None = None
    frames: int = 0
    face_frames: int = 0
    restored_frames: int = 0
    note: str | None = None


@dataclass(slots=True)
class ClipResult:
    clip: str
    width: int
    height: int
    frames: int
    face_frames: int
    keyframes: int
    seconds: float
    rows: list[RowResult]
    note: str | None = None


@dataclass(slots=True)
class Example:
    """Crops of one frame for the picture grid: what went in, and what each model made of it."""

    clip: str
    frame_index: int
    compressed: np.ndarray
    reference: np.ndarray
    original: np.ndarray
    restored: dict[str, np.ndarray] = field(default_factory=dict)
    restored_without_reference: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(slots=True)
class EvalReport:
    crf: int
    reference_mode: str
    gop_seconds: float
    max_frames: int | None
    models: list[str]
    conventions: dict[str, str]
    clips: list[ClipResult]
    average: list[RowResult]
    vmaf_note: str | None = None
    lpips_note: str | None = None
    examples: list[Example] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "crf": self.crf,
            "reference_mode": self.reference_mode,
            "gop_seconds": self.gop_seconds,
            "max_frames": self.max_frames,
            "models": list(self.models),
            "conventions": dict(self.conventions),
            "vmaf_note": self.vmaf_note,
            "lpips_note": self.lpips_note,
            "clips": [asdict(clip) for clip in self.clips],
            "average": [asdict(row) for row in self.average],
        }

    def row(self, key: str, clip: str | None = None) -> RowResult:
        """The average row with ``key``, or that clip's row."""
        rows = self.average if clip is None else next(c.rows for c in self.clips if c.clip == clip)
        for row in rows:
            if row.key == key:
                return row
        raise KeyError(key)


def average_rows(clips: list[ClipResult]) -> list[RowResult]:
    """Mean of each row over the clips that have a value for it (clips weigh equally)."""
    if not clips:
        return []
    averaged: list[RowResult] = []
    for template in clips[0].rows:
        rows = [row for clip in clips for row in clip.rows if row.key == template.key]
        result = RowResult(key=template.key, label=template.label, model=template.model)
        missing: list[str] = []
        for metric in METRICS:
            values = [getattr(row, metric) for row in rows if getattr(row, metric) is not None]
            setattr(result, metric, float(np.mean(values)) if values else None)
            if values and len(values) < len(rows) and metric.startswith(("crop_", "face_")):
                missing.append(metric)
        result.frames = sum(row.frames for row in rows)
        result.face_frames = sum(row.face_frames for row in rows)
        result.restored_frames = sum(row.restored_frames for row in rows)
        if missing:
            without = [clip.clip for clip in clips if clip.face_frames == 0]
            result.note = f"face metrics averaged over clips with a face only (none found in: {', '.join(without)})"
        elif result.crop_psnr is None:
            result.note = "no face found in any clip: face metrics not reported"
        averaged.append(result)
    return averaged


def write_json(report: EvalReport, path: Path) -> Path:
    text = json.dumps(report.to_dict(), indent=2, allow_nan=False)
    _write_text(path, text + "\n")
    return path


def _format(metric: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if metric.endswith(("ssim", "lpips")):
        return f"{value:.4f}"
    if metric.endswith("bias"):
        return f"{value:+.2f}"
    return f"{value:.2f}"


def measured_metrics(rows: list[RowResult]) -> list[str]:
    """Every core metric, and the optional ones that some row has a value for."""
    return [m for m in METRICS if m not in OPTIONAL_METRICS or any(getattr(r, m) is not None for r in rows)]


def markdown_table(rows: list[RowResult], metrics: list[str]) -> str:
    header = ["row", *(_HEADINGS[m] for m in metrics), "frames with face", "restored"]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    for row in rows:
        cells = [row.label, *(_format(m, getattr(row, m)) for m in metrics)]
        cells += [f"{row.face_frames}/{row.frames}", str(row.restored_frames) if row.model else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {row.label}: {row.note}" for row in rows if row.note]
    return "\n".join(lines + ([""] + notes if notes else []))


def render_summary(report: EvalReport) -> str:
    """The average table, for a terminal."""
    title = f"CRF {report.crf}, {report.reference_mode} references, {len(report.clips)} clip(s)"
    return title + "\n" + markdown_table(report.average, measured_metrics(report.average))


def render_markdown(report: EvalReport) -> str:
    metrics = measured_metrics([row for clip in report.clips for row in clip.rows])
    gop = f"{report.gop_seconds:g} s"
    limit = f", first {report.max_frames} frames of each clip" if report.max_frames else ""
    parts = [
        f"# Evaluation: libx264 CRF {report.crf}, keyframe interval {gop}, {report.reference_mode} references{limit}",
        "",
        f"Models: {', '.join(report.models) if report.models else 'none (compressed input only)'}.",
        "",
        f"## Average over {len(report.clips)} clip(s)",
        "",
        markdown_table(report.average, metrics),
    ]
    for clip in report.clips:
        parts += [
            "",
            f"## {clip.clip} ({clip.width}x{clip.height}, {clip.frames} frames, "
            f"{clip.face_frames} with a face, {clip.keyframes} I-frames)",
            "",
        ]
        if clip.note:
            parts += [f"Note: {clip.note}", ""]
        parts.append(markdown_table(clip.rows, metrics))
    parts += ["", "## How the numbers were computed", ""]
    parts += [f"- {name}: {text}" for name, text in report.conventions.items()]
    if report.vmaf_note:
        parts.append(f"- vmaf: {report.vmaf_note}")
    if report.lpips_note:
        parts.append(f"- lpips: {report.lpips_note}")
    return "\n".join(parts) + "\n"


def write_markdown(report: EvalReport, path: Path) -> Path:
    _write_text(path, render_markdown(report))
    return path


def _labelled(image: np.ndarray, text: str, height: int = 22) -> np.ndarray:
    banner = np.full((height, image.shape[1], 3), 255, np.uint8)
    cv2.putText(banner, text, (4, height - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([banner, image], axis=0)


def render_grid(examples: list[Example], models: list[str]) -> np.ndarray | None:
    """One row per example and model: input | reference | restored | restored without reference | original."""
    rows: list[np.ndarray] = []
    for example in examples:
        for model in models:
            if model not in example.restored:
                continue
            tiles = [
                _labelled(example.compressed, f"{example.clip} #{example.frame_index} input"),
                _labelled(example.reference, "reference (warped keyframe)"),
                _labelled(example.restored[model], f"{model}, with reference"),
                _labelled(example.restored_without_reference[model], f"{model}, no reference"),
                _labelled(example.original, "original"),
            ]
            rows.append(np.concatenate(tiles, axis=1))
    if not rows:
        return None
    return np.concatenate(rows, axis=0)


def write_grid(examples: list[Example], models: list[str], path: Path) -> Path | None:
    """Write the crop grid as PNG; None (and no file) when there is nothing to show."""
    grid = render_grid(examples, models)
    if grid is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), grid):
        raise OutputError(f"cannot write {path} (check the folder exists and is writable)")
    return path


def _write_text(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror}") from exc
