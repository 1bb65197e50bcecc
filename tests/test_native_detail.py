"""The native detail filter: the band a close-up's crop cannot hold, its fit, its file, its paste."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from kfgan_daemon.errors import ModelError
from kfgan_daemon.face import align_frame, paste_face, paste_weights
from kfgan_daemon.face.native_detail import (
    ACTIVITY_EDGES,
    KERNEL_SIZE,
    NativeDetailFilter,
    activity_classes,
    band_strength,
)
from kfgan_daemon.face.paste import crop_scale, frame_band, native_detail_delta, paste_box
from kfgan_daemon.media.colour import ColourSpace
from kfgan_daemon.media.frame import DecodedFrame
from kfgan_daemon.model import LiteGenerator, attach_native_detail, load_generator, read_checkpoint, save_safetensors
from kfgan_daemon.restore.model_choice import open_generator
from kfgan_daemon.train.native_detail import BandStatistics, accumulate_video
from tests.test_face_align import synthetic_landmarks

SPACE = ColourSpace("bt709")
CLASSES = len(ACTIVITY_EDGES) + 1


def _centred(gain: float = 1.0) -> NativeDetailFilter:
    kernel = np.zeros((KERNEL_SIZE, KERNEL_SIZE), np.float32)
    kernel[KERNEL_SIZE // 2, KERNEL_SIZE // 2] = 1.0
    return NativeDetailFilter(kernel, np.full(CLASSES, gain), np.array(ACTIVITY_EDGES))


def _per_class_kernels(detail: NativeDetailFilter) -> np.ndarray:
    """classes x weights: what the filter does to each class's band patch."""
    return detail.gains[:, None].astype(np.float64) * detail.kernel.reshape(1, -1)


def _close_up(seed: int = 7, eye_distance: float = 200.0) -> tuple[DecodedFrame, np.ndarray]:
    rgb = np.random.default_rng(seed).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    frame = DecodedFrame.from_rgb(cv2.GaussianBlur(rgb, (0, 0), 1.2), SPACE)
    return frame, synthetic_landmarks(center=(320.0, 240.0), eye_distance=eye_distance)


def test_centred_kernel_returns_the_band_and_gains_follow_activity() -> None:
    band = np.zeros((40, 40), np.float32)
    band[:, 20:] = np.random.default_rng(0).normal(0.0, 8.0, size=(40, 20))
    assert np.array_equal(_centred()(band), band)
    classes = activity_classes(band)
    assert (classes[:, :15] == 0).all()
    assert (classes[:, 26:] == CLASSES - 1).mean() > 0.9
    kernel = _centred().kernel
    by_class = NativeDetailFilter(kernel, np.arange(CLASSES, dtype=np.float32), np.array(ACTIVITY_EDGES))
    assert np.allclose(by_class(band), band * classes)


def test_strength_takes_the_filtered_band_part_of_the_way_from_the_band() -> None:
    band = np.random.default_rng(1).normal(0.0, 4.0, size=(32, 32)).astype(np.float32)
    halved = _centred(gain=0.5)
    assert np.array_equal(halved.with_strength(0.0)(band), band)
    assert np.allclose(halved.with_strength(0.5)(band), 0.75 * band, atol=1e-6)
    assert np.array_equal(halved.with_strength(1.0)(band), halved(band))
    with pytest.raises(ModelError, match="strength"):
        halved.with_strength(1.5)


def test_filter_rejects_kernels_gains_and_edges_that_do_not_match() -> None:
    with pytest.raises(ModelError, match="increasing activity edges"):
        NativeDetailFilter(np.zeros((7, 7)), np.ones(3), np.array([1.0]))
    with pytest.raises(ModelError, match="odd side"):
        NativeDetailFilter(np.zeros((6, 6)), np.ones(2), np.array([1.0]))


def test_least_squares_fit_learns_to_take_block_edges_out_of_a_band() -> None:
    # A band that is true detail plus a 4x4 block-edge pattern (the codec's part): the fitted
    # filter must keep most of the detail and drop most of the pattern, on data it did not see.
    rng = np.random.default_rng(3)

    def sample(seed: int) -> tuple[np.ndarray, np.ndarray]:
        detail = cv2.GaussianBlur(np.random.default_rng(seed).normal(0, 6, (96, 96)).astype(np.float32), (0, 0), 0.8)
        edges = np.zeros((96, 96), np.float32)
        edges[:, 3::4] += 3.0
        edges[:, 4::4] -= 3.0
        return detail + edges * np.sign(np.random.default_rng(seed + 1).normal(size=(1, 96))), detail

    statistics = BandStatistics()
    for seed in range(6):
        band, detail = sample(10 * seed)
        statistics.add(band, detail, np.ones(band.shape, bool), rng, samples=4000)
    fitted = statistics.solve()
    band, detail = sample(999)
    before = np.mean((band - detail)[8:-8, 8:-8] ** 2)
    after = np.mean((fitted(band) - detail)[8:-8, 8:-8] ** 2)
    assert after < 0.5 * before, (before, after)


def test_paste_applies_the_filter_only_to_faces_larger_than_the_crop() -> None:
    zero = _centred(gain=0.0)
    # A face smaller than the crop: the band is only resampling error and stays as it is.
    frame, landmarks = _close_up(eye_distance=60.0)
    aligned = align_frame(frame, landmarks)
    assert crop_scale(aligned.matrix) > 1.0 and band_strength(crop_scale(aligned.matrix)) == 0.0
    assert native_detail_delta(frame, aligned.matrix, (256, 256), zero) is None
    # A close-up: the centred kernel keeps the frame bit for bit; zero gains drop the band, so
    # under full weight the output is the frame resampled through the crop.
    frame, landmarks = _close_up()
    aligned = align_frame(frame, landmarks)
    assert band_strength(crop_scale(aligned.matrix)) == 1.0

    def pasted(detail: NativeDetailFilter) -> DecodedFrame:
        delta = native_detail_delta(frame, aligned.matrix, (256, 256), detail)
        return paste_face(frame, aligned.crop, aligned.matrix, compressed=aligned.crop, luma_detail=delta)

    assert pasted(_centred()).same_pixels(frame)
    dropped = pasted(zero)
    box = paste_box(aligned.matrix, (256, 256), frame.width, frame.height)
    assert box is not None
    x0, y0, x1, y1 = box
    band = frame_band(frame, aligned.matrix, (256, 256), box)
    inside = paste_weights(aligned.matrix, (256, 256), box) > 0.999
    resampled = frame.y[y0:y1, x0:x1].astype(np.float32) - band
    assert np.abs(dropped.y[y0:y1, x0:x1][inside] - resampled[inside]).max() <= 0.5 + 1e-3
    assert np.abs(band[inside]).mean() > 2.0
    # Outside the paste box nothing moved.
    outside = np.ones(frame.y.shape, bool)
    outside[y0:y1, x0:x1] = False
    assert np.array_equal(dropped.y[outside], frame.y[outside])
    with pytest.raises(ValueError, match="luma_detail"):
        paste_face(frame, aligned.crop, aligned.matrix, compressed=aligned.crop, luma_detail=band[1:])
    with pytest.raises(ValueError, match="correction paste only"):
        paste_face(frame, aligned.crop, aligned.matrix, mode="replace", luma_detail=band)


def test_model_file_carries_the_filter_beside_the_generator(tmp_path: Path) -> None:
    path = save_safetensors(LiteGenerator(), tmp_path / "lite.safetensors", "lite")
    assert read_checkpoint(path).native_detail is None
    assert open_generator(path).native_detail is None
    fitted = _centred(gain=0.5)
    attach_native_detail(path, fitted, {"videos": ["synthetic"]})
    attach_native_detail(path, _centred(), {"videos": ["again"]})  # replaces, does not add
    checkpoint = read_checkpoint(path)
    assert not any(key.startswith("native_detail.") for key in checkpoint.state_dict)
    assert checkpoint.native_detail is not None
    assert np.array_equal(checkpoint.native_detail.gains, _centred().gains)
    assert checkpoint.native_detail.strength == 1.0
    attach_native_detail(path, _centred().with_strength(0.25), {"videos": ["weaker"]})
    assert read_checkpoint(path).native_detail.strength == 0.25
    load_generator(path)  # the generator's strict load sees only its own weights
    generator = open_generator(path)
    assert generator.native_detail is not None
    with pytest.raises(ModelError, match="only"):
        attach_native_detail(tmp_path / "model.pth", fitted, {})


def test_fitted_band_filter_helps_a_close_up_it_never_saw(media_dir: Path, tmp_path: Path) -> None:
    # Fit on three persons' close-ups, measure on a fourth's (d3): the filtered band must bring
    # the received close-up nearer the original than the band as received.
    from kfgan_daemon.media.encode import degrade_like_a_call

    def received(name: str) -> Path:
        path = tmp_path / f"{name}.mp4"
        degrade_like_a_call(media_dir / f"{name}.mp4", path, 42, max_frames=24, audio=False)
        return path

    statistics = BandStatistics()
    for name in ("d12", "d14", "d0"):
        assert accumulate_video(media_dir / f"{name}.mp4", received(name), statistics, np.random.default_rng(0)) >= 20
    fitted = statistics.solve()
    held_out = BandStatistics()
    assert accumulate_video(media_dir / "d3.mp4", received("d3"), held_out, np.random.default_rng(1), None) >= 20
    # A kernel k's squared error on the held-out samples is k'Gk - 2k'c + |t|^2: compare ours with
    # the centred kernel (the band as received) through the same normal equations.
    centred, ours = _per_class_kernels(_centred()), _per_class_kernels(fitted)
    gain = sum(
        (c @ g @ c - 2 * c @ x) - (k @ g @ k - 2 * k @ x)
        for c, k, g, x in zip(centred, ours, held_out.gram, held_out.cross)
    )
    # Per sample, in squared luma levels (the received band's own error there is about 25).
    assert gain / held_out.counts.sum() > 0.2, gain / held_out.counts.sum()


def test_a_filter_stored_without_a_strength_applies_in_full(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = save_safetensors(LiteGenerator(), tmp_path / "lite.safetensors", "lite")
    attach_native_detail(path, _centred(gain=0.5).with_strength(0.5), {"videos": ["synthetic"]})
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = {k: v for k, v in load_file(str(path)).items() if k != "native_detail.strength"}
    save_file(tensors, str(path), metadata=metadata)
    assert read_checkpoint(path).native_detail.strength == 1.0
