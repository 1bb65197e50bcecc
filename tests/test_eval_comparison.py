"""`restore --side-by-side --degrade-crf`: the original, the call as received and the restored call, each
panel's face PSNR the figure `eval --end-to-end` reports for the same clip; `--snapshot` as a PNG."""
from __future__ import annotations

import re
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from kfgan_daemon.cli import app
from kfgan_daemon.errors import ConfigError
from kfgan_daemon.eval.end_to_end import INPUT_ROW, MODEL_ROW, evaluate_end_to_end
from kfgan_daemon.eval.panels import caption_height
from kfgan_daemon.media import encode_h264_file
from kfgan_daemon.restore.model_choice import open_generator

pytestmark = pytest.mark.shared

FRAMES = 20  # an I-frame, then most of a second of P-frames at 25 FPS
SIZE = 512


@pytest.fixture(scope="module")
def short_clip(media_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's clip (d12), its first frames finely coded: the original a call is degraded from."""
    path = tmp_path_factory.mktemp("clip") / "d12-short.mp4"
    encode_h264_file(media_dir / "d12.mp4", path, crf=12, max_frames=FRAMES)
    return path


def _figures(output: str) -> dict[str, float]:
    found = re.search(
        r"face PSNR against the original on decoded luma: received ([\d.]+) dB, restored ([\d.]+) dB", output
    )
    assert found, output
    return {"received": float(found.group(1)), "restored": float(found.group(2))}


@pytest.mark.slow
def test_the_readme_command_shows_three_panels_whose_figures_are_the_evals(short_clip: Path, tmp_path: Path) -> None:
    out = tmp_path / "demo.mp4"
    command = ["restore", str(short_clip), str(out), "--degrade-crf", "42", "--side-by-side", "-q"]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    shown = _figures(result.output)

    (scores,) = evaluate_end_to_end([short_clip], open_generator(), crf=42, senders=("stream",), rate_crfs=())
    assert abs(shown["received"] - scores.rows[INPUT_ROW].face_psnr) <= 0.05
    assert abs(shown["restored"] - scores.rows[MODEL_ROW].face_psnr) <= 0.05
    assert shown["restored"] > shown["received"]  # the shipped model, on a CRF-42 call

    bar = caption_height(SIZE)
    with av.open(str(out)) as written, av.open(str(short_clip)) as source:
        pairs = list(zip(written.decode(video=0), source.decode(video=0)))
    assert len(pairs) == FRAMES
    shown_frame, original = (frame.to_ndarray(format="gray").astype(float) for frame in pairs[-1])
    assert shown_frame.shape == (bar + SIZE, 3 * SIZE)
    left, middle, right = (shown_frame[bar:, i * SIZE : (i + 1) * SIZE] for i in range(3))
    # Left to right: the original (only the output's own fine encode between), the CRF-42 call, its restoration.
    errors = [float(np.mean((panel - original) ** 2)) for panel in (left, middle, right)]
    assert errors[0] < errors[2] < errors[1], errors


def test_snapshot_of_a_frame_with_the_face_magnified(short_clip: Path, tmp_path: Path) -> None:
    picture_path = tmp_path / "frame.png"
    result = CliRunner().invoke(app, ["restore", str(short_clip), str(picture_path), "--degrade-crf", "42",
                                      "--snapshot", "12", "-q"])
    assert result.exit_code == 0, result.output
    bar = caption_height(SIZE)
    height = 2 * (bar + SIZE)
    assert f"snapshot of frame 12: 3 panels, face magnified, {3 * SIZE}x{height}" in result.output
    picture = cv2.imread(str(picture_path))
    assert picture.shape == (height, 3 * SIZE, 3)
    # Under the captioned panels, each panel magnified by whole pixels: 2 x 2 blocks of one colour.
    magnified = picture[2 * bar + SIZE :, :SIZE].astype(int)
    assert np.array_equal(magnified[0::2, 0::2], magnified[1::2, 1::2])
    assert not np.array_equal(magnified[:, :-1], magnified[:, 1:])  # a picture, not a flat fill

    result = CliRunner().invoke(app, ["restore", str(short_clip), str(tmp_path / "late.png"), "--snapshot", "99", "-q"])
    assert isinstance(result.exception, ConfigError) and "the call has 20 frames" in str(result.exception)
    assert not (tmp_path / "late.png").exists()
