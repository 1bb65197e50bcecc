"""The report writers: JSON, Markdown and the PNG grid, including clips where no face was found."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from kfgan_daemon.eval.image_quality import conventions
from kfgan_daemon.eval.report import (
    ClipResult,
    EvalReport,
    Example,
    RowResult,
    average_rows,
    render_markdown,
    render_summary,
    write_grid,
    write_json,
    write_markdown,
)


def _rows(face: tuple[float, float] | None, frame: tuple[float, float], frames: int) -> list[RowResult]:
    face_frames = frames if face else 0
    note = None if face else f"no face found in any of the {frames} frames: face metrics not reported"
    rows = []
    for key, label, model, gain in (("input", "compressed input (CRF 42)", None, 0.0), ("lite", "lite + hq keyframes", "lite", 1.0)):
        rows.append(
            RowResult(
                key=key,
                label=label,
                model=model,
                crop_psnr=face[0] + gain if face else None,
                crop_ssim=face[1] + gain / 100 if face else None,
                frame_psnr=frame[0] + gain / 2,
                frame_ssim=frame[1],
                frames=frames,
                face_frames=face_frames,
                restored_frames=face_frames if model else 0,
                note=note,
            )
        )
    return rows


def _report() -> EvalReport:
    clips = [
        ClipResult("a", 64, 48, 10, 10, 1, 0.5, _rows((30.0, 0.80), (33.0, 0.90), 10)),
        ClipResult("b", 64, 48, 20, 20, 1, 0.5, _rows((32.0, 0.84), (35.0, 0.92), 20)),
        ClipResult("empty", 64, 48, 5, 0, 1, 0.1, _rows(None, (40.0, 0.95), 5), note="no face found"),
    ]
    return EvalReport(
        crf=42,
        reference_mode="hq",
        gop_seconds=1.0,
        max_frames=None,
        models=["lite"],
        conventions=conventions(),
        clips=clips,
        average=average_rows(clips),
    )


def test_average_weighs_clips_equally_and_skips_missing_face_metrics():
    report = _report()
    source = report.row("input")
    assert source.crop_psnr == pytest.approx(31.0)  # clips a and b only
    assert source.crop_ssim == pytest.approx(0.82)
    assert source.frame_psnr == pytest.approx((33.0 + 35.0 + 40.0) / 3)
    assert source.frames == 35 and source.face_frames == 30
    assert "empty" in source.note
    assert report.row("lite").crop_psnr == pytest.approx(32.0)
    assert report.row("lite", clip="empty").crop_psnr is None


def test_average_of_clips_without_any_face_reports_no_face_metrics():
    clips = [ClipResult("x", 8, 8, 3, 0, 1, 0.1, _rows(None, (30.0, 0.9), 3))]
    (source, model) = average_rows(clips)
    assert source.crop_psnr is None and source.crop_ssim is None
    assert source.frame_psnr == pytest.approx(30.0)
    assert "no face" in source.note


def test_json_is_strict_and_keeps_missing_values_as_null(tmp_path):
    path = write_json(_report(), tmp_path / "out" / "eval.json")
    data = json.loads(path.read_text())  # the writer refuses NaN/Infinity, so this is strict JSON
    assert data["crf"] == 42 and data["reference_mode"] == "hq"
    assert "ssim" in data["conventions"]
    empty = next(c for c in data["clips"] if c["clip"] == "empty")
    assert [r["key"] for r in empty["rows"]] == ["input", "lite"]
    assert all(r["crop_psnr"] is None and r["frame_psnr"] is not None for r in empty["rows"])
    assert [r["key"] for r in data["average"]] == ["input", "lite"]


def test_markdown_has_a_table_per_clip_an_average_and_the_conventions(tmp_path):
    text = write_markdown(_report(), tmp_path / "eval.md").read_text()
    assert text.count("| row |") == 4  # average + three clips
    assert "## Average over 3 clip(s)" in text
    assert "| lite + hq keyframes | 32.00 | 0.8300 |" in text  # face ΔY column absent: no row measured it
    empty_section = text.split("## empty")[1].split("##")[0]
    assert "| compressed input (CRF 42) | n/a | n/a | 40.00 | 0.9500 | 0/5 | - |" in empty_section
    assert "no face found" in empty_section
    assert "VMAF" not in text.split("## How")[0]  # no column when nothing measured it
    assert "Gaussian window sigma 1.5" in text


def test_markdown_shows_vmaf_columns_when_measured():
    report = _report()
    report.clips[0].rows[0].vmaf = 55.5
    assert "VMAF" in render_markdown(report)


def test_grid_has_one_row_per_example_and_model(tmp_path):
    tile = lambda v: np.full((256, 256, 3), v, np.uint8)  # noqa: E731
    examples = [
        Example("a", 7, tile(10), tile(20), tile(30), {"lite": tile(40), "full": tile(50)}, {"lite": tile(60), "full": tile(70)}),
        Example("b", 3, tile(10), tile(20), tile(30), {"lite": tile(40), "full": tile(50)}, {"lite": tile(60), "full": tile(70)}),
    ]
    path = write_grid(examples, ["lite", "full"], tmp_path / "grid.png")
    grid = cv2.imread(str(path))
    assert grid.shape[1] == 5 * 256
    assert grid.shape[0] == 4 * (256 + 22)
    # Second row (example a, model "full"): restored tile is 50, its no-reference tile 70, original 30.
    top = 256 + 22 + 22 + 100
    assert grid[top, 2 * 256 + 100].tolist() == [50, 50, 50]
    assert grid[top, 3 * 256 + 100].tolist() == [70, 70, 70]
    assert grid[top, 4 * 256 + 100].tolist() == [30, 30, 30]


def test_grid_is_not_written_without_examples(tmp_path):
    assert write_grid([], ["lite"], tmp_path / "grid.png") is None
    assert not (tmp_path / "grid.png").exists()


def test_summary_is_the_average_table():
    text = render_summary(_report())
    assert text.startswith("CRF 42, hq references, 3 clip(s)")
    assert "| lite + hq keyframes | 32.00 |" in text and "## " not in text
