"""One face pipeline: restore, eval, eval --end-to-end and dataset build cut the same faces
(landmarks, alignments, keyframe choices) from one clip under one set of settings."""
from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from kfgan_daemon.eval.end_to_end import evaluate_end_to_end
from kfgan_daemon.eval.evaluate import _LoadedModel, evaluate_clip, original_crop, prepare_sample
from kfgan_daemon.media import FileSource
from kfgan_daemon.restore import RestoreSettings, StreamRestorer
from kfgan_daemon.restore.face_pipeline import FacePipeline, cut_differently, face_record
from kfgan_daemon.restore.file_job import restore_file
from kfgan_daemon.restore.job import FaceJob
from kfgan_daemon.restore.model_choice import warn_if_cut_differently
from kfgan_daemon.train import dataset as ds
from kfgan_daemon.train.face_tracks import FaceTracks, Replay
from tests.clips import write_synthetic_clip

# One face: crop landmarks, frame -> crop matrix, and the keyframe it was given (its frame index).
Cut = tuple[np.ndarray, np.ndarray, int]


class RecordingGenerator:
    """Hands each crop back unchanged and keeps the jobs it was given: what a path fed the model."""

    native_detail = None

    def __init__(self) -> None:
        self.jobs: list[FaceJob] = []

    def __call__(self, jobs: Sequence[FaceJob]) -> list[np.ndarray]:
        self.jobs.extend(jobs)
        return [job.compressed.astype(np.float32) for job in jobs]

    def cuts(self) -> list[Cut]:
        # The eval also asks for the reference-free ablation of every face (key id -1).
        return [(job.crop_landmarks, job.matrix, job.key_id) for job in self.jobs if job.key_id >= 0]


def dataset_cuts(samples: ds.VideoSamples) -> list[Cut]:
    arrays = samples.arrays
    return list(zip(arrays[ds.CROP_LANDMARKS], arrays[ds.MATRIX], (int(key) for key in arrays[ds.KEY_INDEX])))


def assert_same_cuts(name: str, cuts: list[Cut], expected: list[Cut]) -> None:
    assert len(cuts) == len(expected), f"{name}: {len(cuts)} faces against restore's {len(expected)}"
    for frame, ((landmarks, matrix, key), (want_landmarks, want_matrix, want_key)) in enumerate(zip(cuts, expected)):
        assert np.array_equal(landmarks, want_landmarks), f"{name}: landmarks of face {frame}"
        assert np.array_equal(matrix, want_matrix), f"{name}: alignment of face {frame}"
        assert key == want_key, f"{name}: keyframe of face {frame}"


def every_frame(settings: RestoreSettings, frames: int) -> ds.BuildOptions:
    """Dataset options that sample every frame with a face and a keyframe, as restore restores them."""
    return ds.BuildOptions(faces=settings, sample_every=1, sample_offset=0, max_frames=frames)


# -- real dlib, a real clip ---------------------------------------------------------------------

REAL_CLIP = "d12"  # heavy compression loses and finds the face again, and the identity check answers
REAL_FRAMES = 30
# Not the defaults, so that a path cutting faces with defaults of its own shows.
REAL_SETTINGS = RestoreSettings(keyframe_store_size=2, redetect_interval=10, smoothing_beta=5.0)


@pytest.mark.shared
@pytest.mark.slow
def test_restore_eval_end_to_end_and_dataset_cut_the_same_faces_of_a_real_clip(media_dir: Path, tmp_path: Path) -> None:
    clip = tmp_path / f"{REAL_CLIP}.mp4"
    shutil.copy(media_dir / clip.name, clip)
    settings = REAL_SETTINGS
    # eval --end-to-end compresses the clip as a call and restores it with and without keyframes.
    end_to_end = RecordingGenerator()
    evaluate_end_to_end(
        [clip], end_to_end, crf=42, senders=("stream",), max_frames=REAL_FRAMES, settings=settings,
        workdir=tmp_path / "e2e", rate_crfs=(),
    )
    compressed = tmp_path / "e2e" / f"{REAL_CLIP}-stream-crf42.mp4"
    restored = RecordingGenerator()
    restore_file(compressed, tmp_path / "restored.mp4", restored, settings, progress=False)  # type: ignore[arg-type]
    expected = restored.cuts()
    assert len(expected) >= REAL_FRAMES // 2 and len({key for *_, key in expected}) >= 2
    evaluated = RecordingGenerator()
    evaluate_clip(
        clip, compressed, [_LoadedModel("recorded", evaluated)], 42, max_frames=REAL_FRAMES,  # type: ignore[arg-type]
        settings=settings,
    )
    samples = ds.collect_samples(clip, compressed, every_frame(settings, REAL_FRAMES))
    assert_same_cuts("eval --end-to-end", end_to_end.cuts(), expected + expected)
    assert_same_cuts("eval", evaluated.cuts(), expected)
    assert_same_cuts("dataset build", dataset_cuts(samples), expected)


# -- recorded tracks on a synthetic clip: no dlib, no ../shared ---------------------------------

SYNTHETIC_FRAMES = 30
GOP = 3  # many keyframes for a store of two: which one leaves depends on the LFU counts
SYNTHETIC_SETTINGS = RestoreSettings(keyframe_store_size=2, identity_lost_seconds=0.1)


def _landmarks(index: int) -> np.ndarray:
    """68 points of a face that nods across a 160x128 frame."""
    rng = np.random.default_rng(7)
    points = np.column_stack([rng.uniform(50, 110, 68), rng.uniform(40, 100, 68)])
    points[36:42] = [[62 + 3 * i, 60] for i in range(6)]  # right eye
    points[42:48] = [[90 + 3 * i, 60] for i in range(6)]  # left eye
    points += [3 * np.sin(index / 3), 2 * np.cos(index / 4)]
    points[48:68, 1] += 4 * (index % 5)  # the mouth opens and closes: poses near different keyframes
    return points


def recorded_tracks() -> FaceTracks:
    """What dlib would have said: a face lost for frames 10-13 (longer than identity_lost_seconds)
    and found afresh, and a third descriptor of someone else."""
    tracks = FaceTracks({})
    source = "detected"
    for index in range(SYNTHETIC_FRAMES):
        if 10 <= index < 14:
            tracks.record(None, None)
            source = "detected"
            continue
        tracks.record(_landmarks(index), source)
        source = "followed"
    rng = np.random.default_rng(3)
    person, stranger = rng.normal(0, 0.05, 128), rng.normal(0, 0.05, 128) + 0.2
    tracks.descriptors = [person, person, stranger] + [stranger] * SYNTHETIC_FRAMES
    return tracks


def test_restore_eval_and_dataset_cut_the_same_faces_from_recorded_tracks(tmp_path: Path) -> None:
    clip = write_synthetic_clip(tmp_path / "synthetic.mp4", frames=SYNTHETIC_FRAMES, gop=GOP)
    settings = SYNTHETIC_SETTINGS
    tracks = tmp_path / "synthetic.tracks.npz"

    def replay() -> Replay:
        return Replay.of(recorded_tracks(), tracks)

    restorer = StreamRestorer(settings, tracker=replay().tracker, describer=replay().describer)
    evaluated = FacePipeline(settings, original_crop, tracker=replay().tracker, describer=replay().describer)
    restored, samples = [], []
    with FileSource(clip) as source:
        for frame in source:
            job = restorer.prepare(frame)
            restored.append(None if job is None else (job.crop_landmarks, job.matrix, job.key_id))
            sample = prepare_sample(evaluated, frame, frame)
            samples.append(None if sample is None or sample.job is None else sample.job)
    expected = [cut for cut in restored if cut is not None]
    assert restorer.stats.store_clears >= 1 and restorer.identity.stats.changes == 1
    assert len({key for *_, key in expected}) >= 4
    eval_cuts = [(job.crop_landmarks, job.matrix, job.key_id) for job in samples if job is not None]
    assert_same_cuts("eval", eval_cuts, expected)
    every = ds.collect_samples(clip, clip, every_frame(settings, SYNTHETIC_FRAMES), replay())
    assert_same_cuts("dataset build", dataset_cuts(every), expected)
    # Sampling every fourth frame changes nothing the store decides: unsampled frames still select.
    sparse = ds.collect_samples(
        clip, clip, ds.BuildOptions(faces=settings, sample_every=4, sample_offset=1, max_frames=SYNTHETIC_FRAMES),
        replay(),
    )
    by_frame = {int(index): n for n, index in enumerate(every.arrays[ds.FRAME_INDEX])}
    for index, key in zip(sparse.arrays[ds.FRAME_INDEX], sparse.arrays[ds.KEY_INDEX]):
        assert key == every.arrays[ds.KEY_INDEX][by_frame[int(index)]]


def test_the_hook_decides_what_a_keyframe_entry_holds(tmp_path: Path) -> None:
    clip = write_synthetic_clip(tmp_path / "synthetic.mp4", frames=4, gop=GOP)
    tracker = Replay.of(recorded_tracks(), tmp_path / "synthetic.tracks.npz").tracker
    faces = FacePipeline(RestoreSettings(identity_check=False), ds.both_crops, tracker=tracker)
    with FileSource(clip) as source:
        frame = next(iter(source))
    # The original is another picture: the dataset's entry holds both, cut with one matrix.
    face = faces.follow(frame, replace(frame, y=255 - frame.y))
    assert face is not None and frame.is_keyframe
    (entry,) = faces.store.entries
    assert entry.crop.shape == (2, 256, 256, 3)
    assert np.array_equal(entry.crop[0], face.truth) and np.array_equal(entry.crop[1], face.aligned.crop)
    assert not np.array_equal(face.truth, face.aligned.crop)


# -- the record of how faces were cut ----------------------------------------------------------


def test_a_model_cut_otherwise_is_warned_about_once_naming_the_fields(caplog: pytest.LogCaptureFixture) -> None:
    record = face_record(RestoreSettings())
    assert record["crop_size"] == 256 and record["alignment"] == "subpixel"
    served = RestoreSettings(alignment="published", keyframe_store_size=4, redetect_interval=5)
    # The redetect interval changes which frames have a face, not what a face looks like.
    assert cut_differently(record, served) == ["alignment: 'subpixel' -> 'published'", "keyframe_store_size: 10 -> 4"]
    with caplog.at_level(logging.WARNING):
        warn_if_cut_differently(record, served, Path("model.safetensors"))
        warn_if_cut_differently(record, RestoreSettings(paste_mode="replace"), Path("model.safetensors"))
        warn_if_cut_differently(None, served, Path("published.pth"))
    (warning,) = caplog.records
    assert "model.safetensors" in warning.message and "alignment" in warning.message
    assert "keyframe_store_size" in warning.message and "redetect" not in warning.message


def test_the_model_file_and_the_manifest_record_the_face_settings(tmp_path: Path) -> None:
    from kfgan_daemon.model import LiteGenerator, read_checkpoint, save_safetensors

    options = ds.BuildOptions(faces=RestoreSettings(warp_mode="published"))
    recorded = options.record()["faces"]
    assert recorded == face_record(options.faces) and recorded["warp_mode"] == "published"
    manifest = ds.DatasetManifest(options=options.record(), splits={})
    manifest.write(tmp_path)
    assert ds.DatasetManifest.read(tmp_path).face_settings == recorded
    model = save_safetensors(LiteGenerator(), tmp_path / "m.safetensors", "lite", face_settings=recorded)
    assert read_checkpoint(model).face_settings == recorded
    assert read_checkpoint(save_safetensors(LiteGenerator(), tmp_path / "old.safetensors", "lite")).face_settings is None
