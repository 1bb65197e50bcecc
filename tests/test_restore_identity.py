"""One person's keyframes never restore another: the identity watch on a real cut between two people."""
from __future__ import annotations

import time
from concurrent.futures import Future
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from kfgan_daemon.face.identity import SAME_PERSON_DISTANCE, descriptor_distance
from kfgan_daemon.media import FileSource
from kfgan_daemon.media.encode import degrade_like_a_call
from kfgan_daemon.restore import RestoreSettings, StreamRestorer
from kfgan_daemon.restore.face_pipeline import FacePipeline
from kfgan_daemon.restore.identity import IdentityWatch

FRAMES_EACH = 50
FPS = 25


def _pictures(path: Path, count: int) -> list[av.VideoFrame]:
    with av.open(str(path)) as container:
        pictures = []
        for picture in container.decode(video=0):
            pictures.append(picture.reformat(format="yuv420p"))
            if len(pictures) == count:
                return pictures
    pytest.skip(f"{path} has fewer than {count} frames")


def _join_as_a_call(first: Path, second: Path, destination: Path, preset: str = "medium") -> int:
    """The first clip's frames then the second's, one H.264 stream at CRF 42 with an I-frame a second
    (x264 also puts one at the cut, as any encoder with scene-cut detection does); returns the cut's index."""
    pictures = _pictures(first, FRAMES_EACH) + _pictures(second, FRAMES_EACH)
    with av.open(str(destination), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = pictures[0].width, pictures[0].height, "yuv420p"
        stream.options = {"crf": "42", "g": str(FPS), "bf": "0", "preset": preset}
        for index, picture in enumerate(pictures):
            picture.pts, picture.time_base = index, Fraction(1, FPS)
            container.mux(stream.encode(picture))
        container.mux(stream.encode(None))
    return FRAMES_EACH


@pytest.mark.shared
def test_no_frame_of_the_second_person_is_restored_with_a_keyframe_of_the_first(
    media_dir: Path, tmp_path: Path
) -> None:
    joined = tmp_path / "joined.mp4"
    cut = _join_as_a_call(media_dir / "d12.mp4", media_dir / "d3.mp4", joined)
    restorer = StreamRestorer(RestoreSettings())
    jobs = {}
    with FileSource(joined) as source:
        for frame in source:
            job = restorer.prepare(frame)
            if job is not None:
                jobs[frame.index] = job
    first = {index: job for index, job in jobs.items() if index < cut}
    second = {index: job for index, job in jobs.items() if index >= cut}
    assert len(first) > FRAMES_EACH // 2 and len(second) > FRAMES_EACH // 2, "both faces should be restored"
    borrowed = {index: job.key_id for index, job in second.items() if job.key_id < cut}
    assert not borrowed, f"second person's frames restored with the first person's keyframes: {borrowed}"
    assert {job.store_epoch for job in second.values()}.isdisjoint({job.store_epoch for job in first.values()})
    assert restorer.identity.stats.changes >= 1 and restorer.stats.store_clears >= 1
    # Within one person the store is never emptied: every first-person job is of one epoch.
    assert len({job.store_epoch for job in first.values()}) == 1


@pytest.mark.shared
def test_descriptors_tell_the_two_people_apart_and_each_from_itself(media_dir: Path) -> None:
    from kfgan_daemon.face import FaceTracker, align_frame
    from kfgan_daemon.face.identity import FaceDescriber
    from kfgan_daemon.media.frame import DecodedFrame

    describer = FaceDescriber()
    tracker = FaceTracker()
    descriptors: dict[str, list[np.ndarray]] = {}
    for name in ("d12", "d3"):
        tracker.reset()
        for index, picture in enumerate(_pictures(media_dir / f"{name}.mp4", 31)):
            frame = DecodedFrame.from_av(picture, index)
            landmarks = tracker.update(frame.luma)
            if index % 15 == 0 and landmarks is not None:
                aligned = align_frame(frame, landmarks)
                descriptors.setdefault(name, []).append(describer.describe(aligned.crop, aligned.crop_landmarks))
    assert len(descriptors["d12"]) >= 2 and len(descriptors["d3"]) >= 2
    for person in descriptors.values():
        assert descriptor_distance(person[0], person[-1]) < SAME_PERSON_DISTANCE
    assert descriptor_distance(descriptors["d12"][0], descriptors["d3"][0]) > SAME_PERSON_DISTANCE


# A real-time sender's x264 speed. At CRF 42 it quantises some P-frames of d12 so coarsely (QP 44-46)
# that the tracker loses and finds the face again on them, and one such crop's descriptor lies 0.75
# from the person (its I-frames lie within 0.4): a single far answer emptied the store twice.
CALL_PRESET = "veryfast"


def _follow_clip(path: Path) -> tuple[FacePipeline, dict[int, int]]:
    """Every frame of ``path`` through the face pipeline, as files describe faces (inline); returns it
    and the store's epoch after each frame with a face."""
    faces: FacePipeline = FacePipeline(RestoreSettings())
    epochs = {}
    with FileSource(path) as source:
        for frame in source:
            if faces.follow(frame) is not None:
                epochs[frame.index] = faces.store_epoch
    return faces, epochs


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.parametrize("clip", ["d12", "d6"])
def test_one_person_at_crf_42_never_empties_the_store(media_dir: Path, tmp_path: Path, clip: str) -> None:
    degraded = tmp_path / f"{clip}-crf42.mp4"
    degrade_like_a_call(media_dir / f"{clip}.mp4", degraded, 42, max_frames=200, audio=False, preset=CALL_PRESET)
    faces, epochs = _follow_clip(degraded)
    stats = faces.identity.stats
    assert len(epochs) > 150 and stats.descriptors >= 5, "the face should be followed and checked"
    assert stats.changes == 0 and faces.stats.store_clears == 0 and faces.store_epoch == 0, (
        f"{clip}: one person judged to be another {stats.changes} times "
        f"({stats.doubts} far answers dispelled by a second look)"
    )


@pytest.mark.shared
@pytest.mark.slow
def test_a_cut_to_another_person_empties_the_store_within_two_frames(media_dir: Path, tmp_path: Path) -> None:
    joined = tmp_path / "joined.mp4"
    cut = _join_as_a_call(media_dir / "d12.mp4", media_dir / "d3.mp4", joined, preset=CALL_PRESET)
    faces, epochs = _follow_clip(joined)
    assert faces.identity.stats.changes == 1
    emptied = min(index for index, epoch in epochs.items() if epoch > 0)
    assert cut <= emptied <= cut + 2, f"the store was emptied at frame {emptied}, the cut is at {cut}"


class _Table:
    """Descriptors looked up by the crop's first pixel: 1 and 2 are one person, 9 another; ``held``
    answers wait until released, like a busy child process."""

    vectors = {1: np.zeros(128), 2: np.full(128, 0.02), 9: np.full(128, 0.2)}

    def __init__(self, held: bool = False) -> None:
        self.held = held
        self.waiting: list[tuple[Future, int]] = []

    def describe_async(self, crop: np.ndarray, landmarks: np.ndarray) -> Future:
        future: Future = Future()
        if self.held:
            self.waiting.append((future, int(crop[0, 0, 0])))
        else:
            future.set_result(self.vectors[int(crop[0, 0, 0])])
        return future

    def release(self) -> None:
        for future, tag in self.waiting:
            future.set_result(self.vectors[tag])
        self.waiting.clear()


def _crop(tag: int) -> np.ndarray:
    return np.full((256, 256, 3), tag, np.uint8)


def test_identity_watch_follows_the_first_person_and_flags_a_stranger_seen_twice() -> None:
    watch: IdentityWatch[str] = IdentityWatch(_Table(), lost_seconds=2.0, max_distance=SAME_PERSON_DISTANCE)
    marks = np.zeros((68, 2))

    def changed(tag: int) -> bool | None:
        """The answer's verdict; None: a far answer that waits for a second look."""
        watch.check(_crop(tag), marks)
        verdicts = watch.settle()
        return None if not verdicts else verdicts[0].changed

    assert changed(1) is False  # the first face becomes the person
    assert changed(2) is False  # 0.23 away: the same person
    assert changed(9) is None and watch.wants_check and watch.checking_new_face  # 2.3 away: a doubt
    assert changed(9) is True  # seen twice: someone else, who becomes the person
    assert not watch.wants_check and not watch.checking_new_face
    assert changed(9) is False
    assert (watch.stats.descriptors, watch.stats.changes, watch.stats.doubts) == (5, 1, 0)
    # Gone for 2 s exactly is not longer than the set time; a moment more is.
    assert not watch.face_missing(10.0) and not watch.face_missing(12.0) and watch.face_missing(12.1)
    assert not watch.face_missing(20.0), "one timeout per absence"
    assert not watch.face_present(20.1)
    assert changed(1) is False, "after a timeout the next face is taken as the person"


def test_one_far_answer_is_a_doubt_that_the_next_near_answer_dispels() -> None:
    """A heavily quantised crop's noisy descriptor neither empties the store nor becomes the person;
    the keyframe checked with it is held, then stored as the person's."""
    watch: IdentityWatch[str] = IdentityWatch(_Table(), lost_seconds=2.0, max_distance=SAME_PERSON_DISTANCE)
    marks = np.zeros((68, 2))
    watch.check(_crop(1), marks, keyframe="first I-frame")
    assert [(v.changed, v.keyframe) for v in watch.settle()] == [(False, "first I-frame")]
    watch.check(_crop(9), marks, keyframe="noisy I-frame")
    assert watch.settle() == [] and watch.checking_new_face and watch.wants_check
    watch.check(_crop(2), marks)  # the second look: the same person after all
    assert [(v.changed, v.keyframe) for v in watch.settle()] == [(False, "noisy I-frame")]
    assert (watch.stats.changes, watch.stats.doubts) == (0, 1)
    assert not watch.checking_new_face and not watch.wants_check
    # The noise did not enter the person: a face near the first one is still near.
    watch.check(_crop(1), marks)
    assert [v.changed for v in watch.settle()] == [False]
    # A timeout during a doubt drops it and its held keyframe (never shown to be anyone's).
    watch.check(_crop(9), marks, keyframe="doubted")
    assert watch.settle() == [] and watch.checking_new_face
    assert not watch.face_missing(30.0) and watch.face_missing(33.0)
    assert not watch.checking_new_face and not watch.wants_check


def test_answers_from_a_busy_describer_apply_in_order_and_hold_keyframes_until_known() -> None:
    table = _Table(held=True)
    watch: IdentityWatch[str] = IdentityWatch(table, lost_seconds=2.0, max_distance=SAME_PERSON_DISTANCE)
    marks = np.zeros((68, 2))
    watch.check(_crop(1), marks, keyframe="first person's I-frame", new_face=True)
    assert watch.checking_new_face and watch.settle() == []  # nothing stored before the answer
    table.release()
    assert [(v.changed, v.keyframe) for v in watch.settle()] == [(False, "first person's I-frame")]
    assert not watch.checking_new_face
    watch.check(_crop(9), marks, keyframe="stranger's I-frame")
    watch.check(_crop(9), marks, keyframe="stranger's next I-frame")
    assert not watch.wants_check, "a second look is already being computed"
    table.release()
    verdicts = watch.settle()
    # the second far answer confirms the first; the store is emptied before the stranger's keyframes enter it
    assert [(v.changed, v.keyframe) for v in verdicts] == [
        (True, "stranger's I-frame"),
        (False, "stranger's next I-frame"),
    ]
    failed: Future = Future()
    failed.set_exception(RuntimeError("the child process died"))
    table.describe_async = lambda crop, landmarks: failed  # type: ignore[method-assign]
    watch.check(_crop(1), marks, keyframe="unchecked")
    assert watch.settle() == [] and watch.stats.failed == 1  # an unknown face's keyframe is never stored


@pytest.mark.shared
def test_a_live_restorer_stores_no_keyframe_and_restores_nothing_before_the_child_answers(media_dir: Path) -> None:
    """The live path: descriptors from a child process, a frame never waits for them, and the store
    follows within one answer's time."""
    from kfgan_daemon.face.identity import DescriberProcess

    describer = DescriberProcess()
    try:
        describer.warm()
        restorer = StreamRestorer(RestoreSettings(), describer=describer)
        with FileSource(media_dir / "d12.mp4") as source:
            frames = [frame for _, frame in zip(range(30), source)]
        first = restorer.prepare(frames[0])  # an I-frame with a face found afresh
        assert first is None and restorer.skip_reason == "no_keyframe"
        assert len(restorer.store) == 0 and restorer.identity.checking_new_face
        started = time.monotonic()
        restored = None
        for frame in frames[1:]:
            time.sleep(0.04)  # frames keep coming at 25 FPS; none waits for the child
            restored = restorer.prepare(frame)
            if restored is not None:
                break
        # the bound: the child's answer (one descriptor, 80-180 ms on a CPU core), then the next frame
        assert restored is not None and restored.key_id == 0, "restored within 29 frames of the I-frame"
        assert restorer.identity.stats.descriptors >= 1
        print(f"first frame restored {1000 * (time.monotonic() - started):.0f} ms after the I-frame")
    finally:
        describer.close()
