"""StreamRestorer's composition: keyframes in, references out, pass-through rules, PLI need."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from kfgan_daemon.face.detector import FaceBox
from kfgan_daemon.face.landmarks import PREDICTOR_BOX
from kfgan_daemon.keyframes import KeyframeStore
from kfgan_daemon.media.colour import ColourSpace
from kfgan_daemon.media.frame import DecodedFrame
from kfgan_daemon.restore import RestoreSettings, StreamRestorer


def _template_landmarks(shift: float = 0.0, yaw: float = 0.0) -> np.ndarray:
    """68 points laid out like a face in a 320x240 frame; ``yaw`` squeezes one side as a head turn does."""
    rng = np.random.default_rng(7)
    points = np.column_stack([rng.uniform(110, 210, 68), rng.uniform(90, 200, 68)])
    points[36:42] = [[130 + 4 * i, 120] for i in range(6)]  # right eye
    points[42:48] = [[176 + 4 * i, 120] for i in range(6)]  # left eye
    points[:, 0] += shift
    points[:17, 0] += yaw * np.linspace(0, 1, 17)
    return points


class ScriptedTracker:
    """Returns prepared landmarks (None = no face), standing in for dlib on synthetic pictures."""

    def __init__(self, script: list[np.ndarray | None]) -> None:
        self.script = list(script)
        self.source: str | None = None
        self.landmarks: np.ndarray | None = None

    def update(self, luma: np.ndarray) -> np.ndarray | None:
        assert luma.ndim == 2, "the tracker is given the Y plane"
        self.landmarks = self.script.pop(0)
        self.source = None if self.landmarks is None else "followed"
        return self.landmarks

    @property
    def face_box(self) -> FaceBox | None:
        return None if self.landmarks is None else PREDICTOR_BOX.box_for(self.landmarks)


def _frame(index: int, keyframe: bool) -> DecodedFrame:
    rng = np.random.default_rng(index)
    image = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    return DecodedFrame.from_rgb(
        image, ColourSpace("bt601"), pts=index, time_base=Fraction(1, 25), is_keyframe=keyframe, index=index
    )


def _restorer(script: list[np.ndarray | None], **settings: object) -> StreamRestorer:
    options = RestoreSettings(**settings)
    return StreamRestorer(options, tracker=ScriptedTracker(script), store=KeyframeStore(options.keyframe_store_size))


def test_frames_pass_through_until_a_keyframe_with_a_face_arrives() -> None:
    marks = _template_landmarks()
    restorer = _restorer([None, marks, marks, marks])
    assert restorer.prepare(_frame(0, keyframe=True)) is None  # keyframe, but no face
    assert restorer.prepare(_frame(1, keyframe=False)) is None  # face, but nothing stored yet
    assert restorer.needs_keyframe
    job = restorer.prepare(_frame(2, keyframe=True))
    assert job is not None and job.key_id == 2
    assert restorer.prepare(_frame(3, keyframe=False)).key_id == 2
    stats = restorer.stats
    assert (stats.frames, stats.no_face, stats.no_keyframe, stats.passed_through) == (4, 1, 1, 2)
    assert (stats.keyframes_seen, stats.keyframes_stored) == (2, 1)


def test_job_holds_aligned_crops_and_the_warped_reference() -> None:
    marks = _template_landmarks()
    restorer = _restorer([marks, _template_landmarks(shift=3.0)])
    restorer.prepare(_frame(0, keyframe=True))
    job = restorer.prepare(_frame(1, keyframe=False))
    assert job.compressed.shape == job.reference.shape == job.landmark_image.shape == (256, 256, 3)
    assert job.matrix.shape == (2, 3)
    # the landmark image marks exactly the crop landmarks
    lit = np.argwhere(job.landmark_image[..., 0] == 255)
    assert len(lit) == len({tuple(p) for p in np.clip(job.crop_landmarks, 0, 255)[:, ::-1].tolist()})


def test_the_job_carries_the_frames_quantiser() -> None:
    marks = _template_landmarks()
    restorer = _restorer([marks, marks, marks])
    restorer.prepare(_frame(0, keyframe=True))
    coded = _frame(1, keyframe=False)
    coded.quantiser = 38.5  # as the decoder reported it
    assert restorer.prepare(coded).quantiser == 38.5
    assert restorer.prepare(_frame(2, keyframe=False)).quantiser is None


def test_complete_pastes_the_crop_back_into_the_face_region_only() -> None:
    marks = _template_landmarks()
    restorer = _restorer([marks])
    frame = _frame(0, keyframe=True)
    job = restorer.prepare(frame)
    gray = np.full((256, 256, 3), 128, np.uint8)
    out = restorer.complete(frame, job, gray)
    changed = out.y != frame.y
    assert changed.any()
    ys, xs = np.nonzero(changed)
    assert xs.min() > 60 and xs.max() < 260  # around the face, not the whole frame
    # Outside that neighbourhood every plane is the input's, bit for bit.
    assert np.array_equal(out.y[:, :50], frame.y[:, :50]) and np.array_equal(out.u[:, :25], frame.u[:, :25])
    assert out.pts == frame.pts and out.is_keyframe and restorer.stats.restored == 1


def test_needs_keyframe_when_the_pose_is_far_from_every_stored_one() -> None:
    near, far = _template_landmarks(), _template_landmarks(yaw=-60.0)
    restorer = _restorer([near, near, far], pli_distance_threshold=4.0)
    restorer.prepare(_frame(0, keyframe=True))
    restorer.prepare(_frame(1, keyframe=False))
    assert not restorer.needs_keyframe
    restorer.prepare(_frame(2, keyframe=False))
    assert restorer.needs_keyframe


def test_observe_keyframe_stores_only_i_frames() -> None:
    marks = _template_landmarks()
    restorer = _restorer([marks])
    restorer.observe_keyframe(_frame(0, keyframe=False))  # tracker not even consulted
    assert len(restorer.store) == 0
    restorer.observe_keyframe(_frame(1, keyframe=True))
    assert len(restorer.store) == 1 and restorer.stats.keyframes_stored == 1


@pytest.mark.parametrize("policy", ["lfu", "max_distance"])
def test_store_size_bounds_the_references(policy: str) -> None:
    script = [_template_landmarks(shift=float(i)) for i in range(6)]
    restorer = _restorer(script, keyframe_store_size=3, keyframe_policy=policy)
    for i in range(6):
        restorer.prepare(_frame(i, keyframe=True))
    assert len(restorer.store) == 3


@pytest.mark.parametrize(("missing_frames", "cleared"), [(20, False), (60, True)])
def test_a_face_gone_for_longer_than_the_set_time_empties_the_store(missing_frames: int, cleared: bool) -> None:
    marks = _template_landmarks()
    script = [marks] + [None] * missing_frames + [marks, marks]
    # 1 s at 25 frames per second: 20 missing frames are within it, 60 are not.
    restorer = _restorer(script, identity_check=False, identity_lost_seconds=1.0)
    restorer.prepare(_frame(0, keyframe=True))
    for index in range(1, missing_frames + 1):
        assert restorer.prepare(_frame(index, keyframe=False)) is None
    back = missing_frames + 1
    job = restorer.prepare(_frame(back, keyframe=False))
    if cleared:
        # Whoever came back may be someone else: nothing of the earlier face is used.
        assert job is None and len(restorer.store) == 0
        assert restorer.store_epoch == 1 and restorer.stats.store_clears == 1
        job = restorer.prepare(_frame(back + 1, keyframe=True))
        assert job.key_id == back + 1 and job.store_epoch == 1
    else:
        assert job.key_id == 0 and job.store_epoch == 0 and restorer.stats.store_clears == 0
