"""The bitrate a plain sender needs for a face quality, read off its rate curve, and the saving it implies."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from clips import write_synthetic_clip
from kfgan_daemon.eval.bandwidth import RatePoint, rate_for_quality, saving, video_kbps
from kfgan_daemon.eval.end_to_end import (
    INPUT_ROW,
    MODEL_ROW,
    NO_REFERENCE_ROW,
    ClipScores,
    RowScores,
    bandwidth,
    render_markdown,
)

# A made-up plain sender: every doubling of the bitrate buys 3 dB of face PSNR.
CURVE = tuple(RatePoint(crf=44 - 6 * k, kbps=100.0 * 2**k, face_psnr=30.0 + 3 * k) for k in range(4))


def test_quality_between_two_points_is_interpolated_on_log_bitrate() -> None:
    # Half-way in dB between 100 and 200 kbit/s is their geometric mean, not their average.
    assert rate_for_quality(CURVE, 31.5) == pytest.approx(100 * math.sqrt(2))
    assert rate_for_quality(CURVE, 37.0) == pytest.approx(400 * 2 ** (1 / 3))
    # The curve's own points come back as they are, in any order.
    assert rate_for_quality(CURVE[::-1], 33.0) == pytest.approx(200.0)
    assert rate_for_quality(CURVE, 30.0) == pytest.approx(100.0)


def test_quality_off_the_curve_has_no_rate() -> None:
    assert rate_for_quality(CURVE, 29.9) is None
    assert rate_for_quality(CURVE, 39.1) is None
    assert rate_for_quality(CURVE, math.inf) is None
    assert rate_for_quality((), 33.0) is None


def test_a_curve_that_dips_is_read_at_its_first_crossing() -> None:
    dipping = (
        RatePoint(44, 100.0, 30.0), RatePoint(42, 200.0, 34.0), RatePoint(40, 400.0, 33.0), RatePoint(38, 800.0, 36.0)
    )
    # 33.5 dB is first reached between 100 and 200 kbit/s; the later dip does not make it dearer.
    assert rate_for_quality(dipping, 33.5) == pytest.approx(100 * 2 ** (3.5 / 4))
    # 35 dB lies beyond the dip: between the 400 and the 800 kbit/s points.
    assert rate_for_quality(dipping, 35.0) == pytest.approx(400 * 2 ** (2 / 3))


def test_saving_is_the_share_of_the_plain_rate_not_spent() -> None:
    assert saving(95.0, 100.0) == pytest.approx(0.05)
    assert saving(120.0, 100.0) == pytest.approx(-0.2)
    assert saving(95.0, None) is None


def _row(face_psnr: float) -> RowScores:
    return RowScores(face_psnr=face_psnr, face_ssim=0.9, frame_psnr=35.0, face_flicker=2.0)


def test_savings_per_sender_average_the_clips_on_the_curve() -> None:
    def clip(name: str, sender: str, kbps: float, received: float, restored: float) -> ClipScores:
        rows = {INPUT_ROW: _row(received), MODEL_ROW: _row(restored), NO_REFERENCE_ROW: _row(received)}
        return ClipScores(name, sender, 60, 60, rows, kbps=kbps, curve=CURVE)

    results = [
        # A plain call at 100 kbit/s restored to the quality the curve gives at 200 kbit/s: half the bits.
        clip("a", "stream", 100.0, 30.0, 33.0),
        clip("b", "stream", 100.0, 30.0, 31.5),
        # A sender that spent 300 kbit/s for what a plain one gets at 200: a third more than needed.
        clip("a", "hq", 300.0, 32.0, 33.0),
        clip("b", "hq", 300.0, 32.0, 45.0),  # restored beyond the curve: left out, and counted
    ]
    plain = bandwidth(results, "stream")
    assert plain[INPUT_ROW].saving == pytest.approx(0.0)
    assert plain[MODEL_ROW].saving == pytest.approx(((1 - 100 / 200) + (1 - 100 / (100 * math.sqrt(2)))) / 2)
    assert plain[MODEL_ROW].needed_kbps == pytest.approx((200 + 100 * math.sqrt(2)) / 2)
    hq = bandwidth(results, "hq")
    assert (hq[MODEL_ROW].clips, hq[MODEL_ROW].off_curve) == (1, 1)
    assert hq[MODEL_ROW].saving == pytest.approx(1 - 300 / 200)
    markdown = render_markdown(results, 42)
    assert "| stream | restored | 100.0 | 170.7 | +39.6% | 2 |" in markdown
    assert "| hq | restored | 300.0 | 200.0 | -50.0% | 1 (1 off the curve) |" in markdown


def test_video_bitrate_of_a_file(tmp_path: Path) -> None:
    clip = write_synthetic_clip(tmp_path / "clip.mp4", frames=25, fps=25)
    kbps = video_kbps(clip)
    # One second of video: its bitrate is its packets' bits, less than the file's (the container adds an index).
    file_kbps = 8 * clip.stat().st_size / 1000
    assert 0.8 * file_kbps < kbps < file_kbps
