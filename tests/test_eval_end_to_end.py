"""`kfgan-daemon eval --end-to-end`: clips compressed as a call, restored by `restore`, measured on decoded luma."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kfgan_daemon.eval.end_to_end import (
    INPUT_ROW,
    MODEL_ROW,
    NO_REFERENCE_ROW,
    WithoutReference,
    evaluate_end_to_end,
    measure,
    render_markdown,
    write_reports,
)
from kfgan_daemon.media.encode import degrade_like_a_call
from kfgan_daemon.eval.vmaf import vmaf_unavailable_reason
from kfgan_daemon.restore.generator import CropGenerator
from kfgan_daemon.restore.job import FaceJob

FRAMES = 30  # two I-frames at 25 FPS: the hq sender's second one is finer than the plain sender's


class Unchanged(nn.Module):
    def forward(self, compressed: torch.Tensor, reference: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        return compressed


class ReferenceOnly(nn.Module):
    """Returns the warped keyframe: shows whether the ablation really withholds it."""

    def forward(self, compressed: torch.Tensor, reference: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        return reference


@pytest.fixture(scope="module")
def clip(media_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("clips")
    (folder / "d12.mp4").symlink_to(media_dir / "d12.mp4")
    return folder / "d12.mp4"


@pytest.mark.shared
@pytest.mark.slow
def test_unchanged_generator_scores_as_its_input_and_reports_are_written(clip: Path, tmp_path: Path) -> None:
    results = evaluate_end_to_end([clip], CropGenerator(Unchanged()), crf=42, max_frames=FRAMES, workdir=tmp_path,
                                  rate_crfs=(40, 42, 44))
    assert [(r.clip, r.sender) for r in results] == [("d12", "hq"), ("d12", "stream")]
    for result in results:
        assert result.frames == FRAMES and result.face_frames == FRAMES
        base = result.rows[INPUT_ROW]
        for key in (MODEL_ROW, NO_REFERENCE_ROW):
            # Only the default output encode (its CRF follows the input) stands between input and output.
            assert abs(result.rows[key].face_psnr - base.face_psnr) < 0.1
            assert abs(result.rows[key].frame_psnr - base.frame_psnr) < 0.1
            assert result.rows[key].face_flicker == pytest.approx(base.face_flicker, abs=0.05)
        assert 25 < base.face_psnr < 45 and 0.5 < base.face_ssim < 1
        assert base.vmaf is None and base.vmaf_neg is None
    hq, stream = (r.rows[INPUT_ROW] for r in results)
    # The hq sender's later I-frames are quantised much finer, so its input is better.
    assert hq.face_psnr > stream.face_psnr
    # The plain sender's rate curve: dearer with every finer CRF, and its CRF-42 point is the plain call itself.
    hq_scores, stream_scores = results
    curve = stream_scores.curve
    assert [p.crf for p in curve] == [40, 42, 44] and curve == hq_scores.curve
    assert curve[0].kbps > curve[1].kbps > curve[2].kbps and curve[0].face_psnr > curve[2].face_psnr
    assert stream_scores.kbps == pytest.approx(curve[1].kbps)
    assert stream_scores.plain_kbps_for(INPUT_ROW) == pytest.approx(stream_scores.kbps)
    assert hq_scores.kbps > stream_scores.kbps  # finer I-frames cost bits
    write_reports(results, 42, tmp_path / "report")
    payload = json.loads((tmp_path / "report" / "end_to_end.json").read_text())
    assert set(payload["averages"]) == {"hq", "stream"} == set(payload["bandwidth"])
    assert payload["bandwidth"]["stream"][INPUT_ROW]["saving"] == pytest.approx(0.0, abs=1e-9)
    markdown = (tmp_path / "report" / "end_to_end.md").read_text()
    assert "| hq | restored, no reference |" in markdown and "| d12 | stream | 30 |" in markdown
    assert "| stream | input |" in markdown.split("Bandwidth at equal face quality")[1]


@pytest.mark.shared
@pytest.mark.skipif(vmaf_unavailable_reason() is not None, reason=vmaf_unavailable_reason() or "")
def test_vmaf_of_each_row_on_a_tiny_clip(clip: Path, tmp_path: Path) -> None:
    frames = 6
    received, again = tmp_path / "received.mp4", tmp_path / "again.mp4"
    degrade_like_a_call(clip, received, 42, max_frames=frames, audio=False)
    degrade_like_a_call(received, again, 42, audio=False)
    rows = {INPUT_ROW: received, MODEL_ROW: again, NO_REFERENCE_ROW: again}
    result = measure(clip, rows, "d12", "stream", vmaf=True)
    assert result.frames == frames
    once, twice = result.rows[INPUT_ROW], result.rows[MODEL_ROW]
    assert once.vmaf is not None and once.vmaf_neg is not None and twice.vmaf_neg is not None
    # CRF 42 is a visibly degraded call: below transparent (about 95), far above useless; NEG never exceeds VMAF.
    assert 20 < once.vmaf_neg <= once.vmaf < 95
    # Compressing the call a second time can only lose more.
    assert twice.vmaf_neg < once.vmaf_neg
    assert "| VMAF-NEG |" in render_markdown([result], 42)


def test_the_ablation_withholds_the_keyframe() -> None:
    rng = np.random.default_rng(0)
    compressed, reference = (rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(2))
    job = FaceJob(
        compressed=compressed,
        reference=reference,
        landmark_image=np.zeros((256, 256, 3), np.uint8),
        matrix=np.eye(2, 3),
        crop_landmarks=np.zeros((68, 2), np.int64),
        key_id=0,
    )
    generator = CropGenerator(ReferenceOnly())
    (with_keyframe,) = generator([job])
    (without,) = WithoutReference(generator)([job])
    np.testing.assert_array_equal(with_keyframe, reference)
    np.testing.assert_array_equal(without, compressed)
