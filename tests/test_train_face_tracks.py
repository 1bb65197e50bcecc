"""Kept face tracks: what is saved comes back, a replay hands it out frame by frame and refuses a video of another length."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kfgan_daemon.errors import InputError
from kfgan_daemon.face.landmarks import PREDICTOR_BOX
from kfgan_daemon.train.face_tracks import FaceTracks, Replay, ReplayedTracker

SETTINGS = {"crf": 42, "sender": "hq", "keyint_seconds": 1.0, "preset": "medium", "max_frames": None, "detector": "hog"}


def recorded(frames: int = 5) -> FaceTracks:
    rng = np.random.default_rng(0)
    tracks = FaceTracks(dict(SETTINGS))
    for index in range(frames):
        landmarks = None if index == 2 else rng.uniform(0, 500, (68, 2))
        tracks.record(landmarks, {0: "detected", 3: "redetected"}.get(index, "followed"))
    tracks.descriptors = [rng.normal(size=128), np.full(128, np.nan)]  # the second check failed
    return tracks


def test_saved_tracks_come_back_as_they_were(tmp_path: Path) -> None:
    tracks = recorded()
    path = tmp_path / "v_crf42_hq.tracks.npz"
    tracks.save(path)
    loaded = FaceTracks.load(path)
    assert loaded.settings == SETTINGS
    assert loaded.sources == ["detected", "followed", None, "redetected", "followed"]
    assert loaded.landmarks[2] is None
    for saved, back in zip(tracks.landmarks, loaded.landmarks):
        assert (saved is None and back is None) or np.array_equal(saved, back)
    assert np.array_equal(np.array(loaded.descriptors), np.array(tracks.descriptors), equal_nan=True)
    assert not list(tmp_path.glob("*partial*"))


def test_a_replay_hands_out_each_frame_and_checks_the_length(tmp_path: Path) -> None:
    tracks = recorded()
    replay = ReplayedTracker(tracks, tmp_path / "t.tracks.npz")
    luma = np.zeros((8, 8), np.uint8)
    outputs = [replay.update(luma) for _ in range(4)]
    assert outputs[2] is None and replay.source == "redetected"
    assert np.array_equal(outputs[0], tracks.landmarks[0])
    # The box the pipeline compares across a new detection is the one FaceTracker gives.
    assert replay.face_box == PREDICTOR_BOX.box_for(tracks.landmarks[3])
    with pytest.raises(InputError, match="hold 5 frames but the video 4"):
        replay.finish()
    replay.update(luma)
    replay.finish()
    with pytest.raises(InputError, match="the tracks end at frame 5"):
        replay.update(luma)


def test_damaged_tracks_are_named(tmp_path: Path) -> None:
    path = tmp_path / "v.tracks.npz"
    recorded().save(path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(InputError, match="v.tracks.npz: unreadable face tracks"):
        FaceTracks.load(path)


def test_a_replay_hands_out_the_descriptors_in_order_and_a_failed_one_fails_again(tmp_path: Path) -> None:
    tracks = recorded()
    describer = Replay.of(tracks, tmp_path / "t.tracks.npz").describer
    crop, points = np.zeros((256, 256, 3), np.uint8), np.zeros((68, 2))
    assert np.array_equal(describer.describe_async(crop, points).result(), tracks.descriptors[0])
    assert isinstance(describer.describe_async(crop, points).exception(), InputError)
    with pytest.raises(InputError, match="2 face descriptors but the build asks for more"):
        describer.describe_async(crop, points)
