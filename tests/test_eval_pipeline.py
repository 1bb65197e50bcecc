"""The evaluation pipeline end to end: every row present, on a real talking head and on a clip with no face."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from kfgan_daemon.errors import ConfigError, InputError, MetricUnavailableError
from kfgan_daemon.eval.evaluate import (
    INPUT_KEY,
    NO_REFERENCE_SUFFIX,
    ModelSpec,
    compress_clip,
    evaluate,
    list_clips,
    parse_model_option,
    prepare_sample,
    reference_pipeline,
)
from kfgan_daemon.eval.vmaf import vmaf_unavailable_reason
from kfgan_daemon.media import FileSource
from kfgan_daemon.model.lite import LiteGenerator
from kfgan_daemon.restore.settings import RestoreSettings
from tests.clips import write_synthetic_clip
from tests.test_eval_lpips import write_random_lpips_weights

SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "models" / "kfgan-lite.safetensors"
REAL_CLIP = "d0.mp4"  # the shortest close-up


def _random_lite() -> LiteGenerator:
    """A LiteGenerator whose output differs from its input (the default init starts at the identity)."""
    torch.manual_seed(0)
    model = LiteGenerator(channels=8, blocks=1)
    torch.nn.init.normal_(model.tail.weight, std=0.01)
    return model.eval()


def _model_under_test() -> ModelSpec:
    if SHIPPED_MODEL.is_file():
        return ModelSpec("kfgan-lite", SHIPPED_MODEL)
    return ModelSpec("lite-random", _random_lite())


def _keys(rows) -> list[str]:
    return [row.key for row in rows]


@pytest.fixture(scope="module")
def real_clip(media_dir: Path) -> Path:
    clip = media_dir / REAL_CLIP
    if not clip.is_file():
        pytest.skip(f"{clip} not found")
    return clip


@pytest.mark.shared
@pytest.mark.slow
def test_eval_on_a_real_clip_produces_every_row(real_clip, tmp_path):
    spec = _model_under_test()
    lpips = write_random_lpips_weights(tmp_path)
    report = evaluate([real_clip], crf=42, models=[spec], out_dir=tmp_path, reference_mode="hq", max_frames=4, lpips=lpips)
    (clip,) = report.clips
    assert clip.frames == 4 and clip.keyframes >= 1
    assert clip.face_frames >= 3, "the HOG tracker should find the close-up face"
    expected = [INPUT_KEY, spec.name, spec.name + NO_REFERENCE_SUFFIX]
    assert _keys(clip.rows) == expected and _keys(report.average) == expected
    source, restored, ablation = clip.rows
    # CRF 42 really degrades: the compressed face is measurably off, yet recognisably the same picture.
    assert 20.0 < source.crop_psnr < 45.0 and 0.5 < source.crop_ssim < 0.99
    assert 20.0 < source.frame_psnr < 45.0
    for row in (source, restored, ablation):
        assert row.crop_psnr is not None and row.frame_ssim is not None and row.crop_lpips > 0
    assert ablation.restored_frames == clip.face_frames
    # The first frame is an I-frame with a face, so every face frame has a keyframe reference.
    assert restored.restored_frames == clip.face_frames and restored.note is None
    assert restored.crop_psnr != pytest.approx(source.crop_psnr, abs=1e-6)

    data = json.loads((tmp_path / "eval.json").read_text())
    assert [r["key"] for r in data["clips"][0]["rows"]] == expected
    markdown = (tmp_path / "eval.md").read_text()
    assert f"{spec.name} + hq keyframes" in markdown and f"{spec.name}, no reference" in markdown
    assert "crop LPIPS" in markdown and "LPIPS-alex" in markdown and "crop ΔY" in markdown
    assert abs(source.crop_luma_bias) < 5.0
    grid = cv2.imread(str(tmp_path / "grid.png"))
    assert grid.shape == (256 + 22, 5 * 256, 3)


@pytest.mark.shared
def test_hq_references_come_from_the_original_and_stream_ones_from_the_decoded_frame(real_clip, tmp_path):
    compressed_path = tmp_path / "c.mp4"
    compress_clip(real_clip, compressed_path, crf=42, gop_seconds=1.0, max_frames=1)
    with FileSource(real_clip) as originals, FileSource(compressed_path) as compresseds:
        original, compressed = next(iter(originals)), next(iter(compresseds))
    assert compressed.is_keyframe
    samples = {
        mode: prepare_sample(reference_pipeline(RestoreSettings(), mode), compressed, original) for mode in ("hq", "stream")
    }
    hq, stream = samples["hq"], samples["stream"]
    # On the keyframe itself the reference is the stored crop warped onto its own landmarks (about the identity).
    assert np.abs(hq.job.reference.astype(int) - hq.truth).mean() < 3.0
    assert np.abs(stream.job.reference.astype(int) - stream.compressed).mean() < 3.0
    assert np.abs(hq.truth.astype(int) - hq.compressed).mean() > 1.0, "CRF 42 should change the crop"
    # The ablation feeds the degraded crop as its own reference.
    assert np.array_equal(hq.ablation.reference, hq.compressed)
    assert np.array_equal(hq.matrix, stream.matrix)


def test_eval_without_a_face_keeps_every_row_and_reports_face_metrics_as_missing(tmp_path):
    clip = write_synthetic_clip(tmp_path / "noface.mp4", frames=12, width=160, height=128, fps=10)
    report = evaluate(tmp_path / "noface.mp4", crf=42, models=[ModelSpec("lite-random", _random_lite())], out_dir=tmp_path / "out")
    (result,) = report.clips
    assert result.clip == "noface" and result.frames == 12 and result.face_frames == 0
    assert _keys(result.rows) == [INPUT_KEY, "lite-random", "lite-random" + NO_REFERENCE_SUFFIX]
    for row in result.rows:
        assert row.crop_psnr is None and row.crop_ssim is None
        assert "no face found" in row.note
        assert 10.0 < row.frame_psnr < 60.0 and 0.0 < row.frame_ssim < 1.0
        assert row.restored_frames == 0
    # Every row passed the frames through, so whole-frame numbers are the compressed input's.
    assert len({row.frame_psnr for row in result.rows}) == 1
    assert "no face found" in result.note
    data = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert all(row["crop_psnr"] is None for row in data["average"])
    assert "n/a" in (tmp_path / "out" / "eval.md").read_text()
    assert not (tmp_path / "out" / "grid.png").exists()
    assert clip.is_file()


def test_eval_refuses_bad_requests(tmp_path):
    with pytest.raises(ConfigError, match="reference mode"):
        evaluate(tmp_path, crf=42, models=[], out_dir=tmp_path, reference_mode="best")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="CRF"):
        evaluate(tmp_path, crf=60, models=[], out_dir=tmp_path)
    with pytest.raises(InputError, match="no video clips"):
        list_clips(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        parse_model_option(f"mine={tmp_path / 'missing.safetensors'}")
    if vmaf_unavailable_reason() is not None:
        with pytest.raises(MetricUnavailableError, match="vmaf-torch"):
            evaluate(tmp_path, crf=42, models=[], out_dir=tmp_path, vmaf=True)


def test_model_option_takes_an_optional_name(tmp_path):
    checkpoint = tmp_path / "kfgan-lite.safetensors"
    checkpoint.write_bytes(b"not read here")
    assert parse_model_option(str(checkpoint)) == ModelSpec("kfgan-lite", checkpoint)
    assert parse_model_option(f"mine={checkpoint}") == ModelSpec("mine", checkpoint)


@pytest.mark.shared
def test_stream_mode_builds_the_same_generator_inputs_as_the_daemon(real_clip, tmp_path):
    from kfgan_daemon.restore import StreamRestorer

    compressed_path = tmp_path / "c.mp4"
    compress_clip(real_clip, compressed_path, crf=42, gop_seconds=0.2, max_frames=8)
    settings = RestoreSettings()
    restorer = StreamRestorer(settings)
    faces = reference_pipeline(settings, "stream")
    compared = 0
    with FileSource(real_clip) as originals, FileSource(compressed_path) as compresseds:
        for original, compressed in zip(originals, compresseds):
            daemon_job, sample = restorer.prepare(compressed), prepare_sample(faces, compressed, original)
            if daemon_job is None:
                assert sample is None or sample.job is None
                continue
            assert sample.job.key_id == daemon_job.key_id
            for name in ("compressed", "reference", "landmark_image", "matrix", "crop_landmarks", "quantiser"):
                assert np.array_equal(getattr(sample.job, name), getattr(daemon_job, name)), name
            compared += 1
    assert compared >= 6 and restorer.stats.keyframes_stored >= 2


def test_default_model_is_the_one_restore_uses(monkeypatch, tmp_path):
    checkpoint = tmp_path / "chosen.safetensors"
    checkpoint.write_bytes(b"not read here")
    monkeypatch.setenv("KFGAN_MODEL", str(checkpoint))
    assert ModelSpec.default() == ModelSpec("chosen", checkpoint)
