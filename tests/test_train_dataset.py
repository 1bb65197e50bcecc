"""Dataset builder: sampling and split logic, and real samples cut from a real clip."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from kfgan_daemon.errors import ConfigError, InputError
from kfgan_daemon.train import dataset as ds

# -- logic, no media needed ------------------------------------------------------------------


def test_sampling_is_every_fifth_frame_from_the_fifth() -> None:
    assert ds.sample_indices(27) == [5, 10, 15, 20, 25]
    assert ds.sample_indices(5) == []
    assert ds.sample_indices(12, every=3, offset=0) == [0, 3, 6, 9]
    with pytest.raises(ConfigError):
        ds.sample_indices(10, every=0)


def test_explicit_validation_videos_are_held_out_whole() -> None:
    train, validation = ds.split_videos(["d0", "d12", "s32", "d3"], validation=["d12", "s32"])
    assert train == ["d0", "d3"] and validation == ["d12", "s32"]
    with pytest.raises(ConfigError, match="not found"):
        ds.split_videos(["d0"], validation=["d9"])


def test_automatic_split_is_seeded_disjoint_and_never_empty() -> None:
    names = [f"v{i}" for i in range(11)]
    train, validation = ds.split_videos(names, validation_fraction=0.2, seed=1)
    assert len(validation) == 3 and not set(train) & set(validation) and set(train) | set(validation) == set(names)
    assert ds.split_videos(names, validation_fraction=0.2, seed=1) == (train, validation)
    assert ds.split_videos(["a", "b"], validation_fraction=0.1)[1] != []
    assert ds.split_videos(["only"], validation_fraction=0.5) == (["only"], [])
    with pytest.raises(ConfigError, match="duplicate"):
        ds.split_videos(["a", "a"])


def test_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="crf"):
        ds.BuildOptions(crfs=(60,)).check()
    with pytest.raises(ConfigError, match="reference_mode"):
        ds.BuildOptions(reference_mode="best").check()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="keyint"):
        ds.BuildOptions(keyint_seconds=0).check()


def test_missing_inputs_are_named(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        ds.find_videos(tmp_path / "nope")
    with pytest.raises(InputError, match="no videos"):
        ds.find_videos(tmp_path)
    with pytest.raises(InputError, match="build the dataset first"):
        ds.DatasetManifest.read(tmp_path)


# -- real clips ------------------------------------------------------------------------------

FRAMES = 40  # two keyframes at 30 fps with a one-second interval; samples 5, 10, ..., 35


@pytest.fixture(scope="module")
def clips(media_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("clips")
    for name in ("d18", "d11"):
        if not (media_dir / f"{name}.mp4").is_file():
            pytest.skip(f"{name}.mp4 not in {media_dir}")
        shutil.copy(media_dir / f"{name}.mp4", folder)
    return folder


def _build(clips: Path, out: Path, mode: str) -> ds.DatasetManifest:
    return ds.build_dataset(
        clips, out, crfs=[42], reference_mode=mode, validation=["d11"], preset="veryfast",
        max_frames=FRAMES, progress=False,
    )


@pytest.fixture(scope="module")
def hq(clips: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hq")
    _build(clips, out, "hq")
    return out


@pytest.mark.slow
def test_split_by_video_in_the_manifest(hq: Path) -> None:
    manifest = ds.DatasetManifest.read(hq)
    assert manifest.train == ["d18"] and manifest.validation == ["d11"]
    assert manifest.files_of("train") == ["d18_crf42_hq.npz"]
    assert manifest.files_of("validation") == ["d11_crf42_hq.npz"]
    info = manifest.files["d18_crf42_hq.npz"]
    assert info["frames"] == FRAMES and info["keyframes"] >= 2 and info["samples"] == 7


@pytest.mark.slow
def test_crops_and_landmarks_agree(hq: Path) -> None:
    from kfgan_daemon.face import alignment_matrix, landmark_image

    with np.load(hq / "d18_crf42_hq.npz") as arrays:
        samples = {k: arrays[k] for k in arrays.files}
    assert list(samples[ds.FRAME_INDEX]) == ds.sample_indices(FRAMES)
    for i in range(len(samples[ds.FRAME_INDEX])):
        frame_points = samples[ds.FRAME_LANDMARKS][i]
        matrix = samples[ds.MATRIX][i]
        assert np.allclose(matrix, alignment_matrix(frame_points))
        crop_points = samples[ds.CROP_LANDMARKS][i]
        expected = np.rint(frame_points @ matrix[:, :2].T + matrix[:, 2])
        assert np.array_equal(crop_points, expected)
        # Aligned: the eye centres sit where the published alignment puts them (the
        # -180 degree turn puts the subject's left eye, 42-47, on the image's right).
        assert np.allclose(crop_points[36:42].mean(axis=0), (0.38 * 256, 0.45 * 256), atol=3)
        assert np.allclose(crop_points[42:48].mean(axis=0), (0.62 * 256, 0.45 * 256), atol=3)
        marks = landmark_image(crop_points)
        inside = crop_points[(crop_points >= 0).all(axis=1) & (crop_points < 256).all(axis=1)]
        assert (marks[inside[:, 1], inside[:, 0]] == 255).all()
        # Input and ground truth are the same face through the same matrix.
        error = np.abs(samples[ds.COMPRESSED][i].astype(float) - samples[ds.TARGET][i]).mean()
        assert error < 8.0


@pytest.mark.slow
def test_hq_references_come_from_the_original_video(hq: Path) -> None:
    with np.load(hq / "d18_crf42_hq.npz") as arrays:
        frame, key = arrays[ds.FRAME_INDEX], arrays[ds.KEY_INDEX]
        reference, target, compressed = arrays[ds.REFERENCE], arrays[ds.TARGET], arrays[ds.COMPRESSED]
    assert set(key) <= {0, 30} and (key <= frame).all()
    at_keyframe = np.flatnonzero(frame == key)
    assert len(at_keyframe) == 1  # frame 30 is both a sample and an I-frame
    i = int(at_keyframe[0])
    # The keyframe warped onto its own landmarks is the original crop itself.
    assert np.abs(reference[i].astype(float) - target[i]).mean() < 0.5
    assert np.abs(compressed[i].astype(float) - target[i]).mean() > 1.0


@pytest.mark.slow
def test_stream_references_are_the_decoded_keyframes(clips: Path, hq: Path, tmp_path: Path) -> None:
    only_one = tmp_path / "clips"
    only_one.mkdir()
    shutil.copy(clips / "d18.mp4", only_one)
    manifest = ds.build_dataset(
        only_one, tmp_path / "stream", crfs=[42], reference_mode="stream", validation_fraction=0.0,
        preset="veryfast", max_frames=FRAMES, progress=False,
    )
    assert list(manifest.files) == ["d18_crf42_stream.npz"]
    with np.load(tmp_path / "stream" / "d18_crf42_stream.npz") as stream, np.load(hq / "d18_crf42_hq.npz") as high:
        i = int(np.flatnonzero(stream[ds.FRAME_INDEX] == stream[ds.KEY_INDEX])[0])
        assert np.array_equal(stream[ds.COMPRESSED], high[ds.COMPRESSED])
        assert np.array_equal(stream[ds.TARGET], high[ds.TARGET])
        assert np.abs(stream[ds.REFERENCE][i].astype(float) - stream[ds.COMPRESSED][i]).mean() < 0.5
        # Elsewhere the stream reference is a CRF 42 picture: further from the truth than the hq one.
        others = stream[ds.FRAME_INDEX] != stream[ds.KEY_INDEX]
        stream_error = np.abs(stream[ds.REFERENCE][others].astype(float) - stream[ds.TARGET][others]).mean()
        hq_error = np.abs(high[ds.REFERENCE][others].astype(float) - high[ds.TARGET][others]).mean()
        assert stream_error > hq_error


@pytest.mark.slow
def test_an_interrupted_build_keeps_finished_files(clips: Path, hq: Path, tmp_path: Path) -> None:
    out = tmp_path / "again"
    shutil.copytree(hq, out)
    before = (out / "d18_crf42_hq.npz").stat().st_mtime_ns
    _build(clips, out, "hq")
    assert (out / "d18_crf42_hq.npz").stat().st_mtime_ns == before
