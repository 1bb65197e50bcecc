"""Training samples from real talking-head videos, made the way the daemon sees a call.

For each high-quality video and CRF: encode it with libx264 (fixed keyframe interval),
decode original and compressed in lockstep, track the face on the compressed frames,
keep I-frame crops in a :class:`KeyframeStore` (LFU, as in the paper), and for every
sampled frame write the degraded crop, the chosen keyframe MLS-warped onto the
frame's landmarks, and the ground truth aligned with the same matrix.

One ``.npz`` of uint8 arrays per (video, CRF) keeps loading fast; ``manifest.json``
says which videos went to training and which to validation (split by video, never by
frame, so that validation faces are faces the model has not seen).
"""
from __future__ import annotations

import json
import logging
import math
import random
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from kfgan_daemon.errors import ConfigError, InputError

log = logging.getLogger(__name__)

ReferenceMode = Literal["hq", "stream"]
REFERENCE_MODES: tuple[str, ...] = ("hq", "stream")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".y4m")
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1

# Keys of each sample file; the loader (train/samples.py) reads the same names.
COMPRESSED = "compressed"  # N x 256 x 256 x 3 uint8 BGR, aligned crop of the decoded compressed frame
REFERENCE = "reference"  # N x 256 x 256 x 3 uint8 BGR, keyframe crop warped onto the sample's landmarks
TARGET = "target"  # N x 256 x 256 x 3 uint8 BGR, original frame aligned with the same matrix
CROP_LANDMARKS = "crop_landmarks"  # N x 68 x 2 int16, crop coordinates (the landmark image is drawn from them)
FRAME_LANDMARKS = "frame_landmarks"  # N x 68 x 2 float32, frame coordinates on the compressed frame
MATRIX = "matrix"  # N x 2 x 3 float64, frame -> crop
FRAME_INDEX = "frame_index"  # N int32, decode order index of the sample
KEY_INDEX = "key_index"  # N int32, frame index of the keyframe used as reference
SAMPLE_ARRAYS = (COMPRESSED, REFERENCE, TARGET, CROP_LANDMARKS, FRAME_LANDMARKS, MATRIX, FRAME_INDEX, KEY_INDEX)


def sample_indices(frame_count: int, every: int = 5, offset: int = 5) -> list[int]:
    """Frame indices the paper samples: every ``every``-th frame starting at ``offset``."""
    if every < 1 or offset < 0:
        raise ConfigError(f"sampling needs every >= 1 and offset >= 0 (got every={every}, offset={offset})")
    return list(range(offset, max(frame_count, 0), every))


def split_videos(
    names: Sequence[str],
    validation: Sequence[str] | None = None,
    validation_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[list[str], list[str]]:
    """Split video names into (train, validation); a video never lands in both.

    Explicit ``validation`` names win; otherwise a seeded shuffle puts
    ``ceil(fraction * n)`` videos (at least one when there are two or more) in validation.
    """
    unique = sorted(set(names))
    if len(unique) != len(names):
        raise ConfigError(f"duplicate video names: {sorted(n for n in unique if list(names).count(n) > 1)}")
    if validation is not None:
        unknown = sorted(set(validation) - set(unique))
        if unknown:
            raise ConfigError(f"validation videos not found among the inputs: {unknown} (inputs: {unique})")
        held = sorted(set(validation))
    else:
        if not 0.0 <= validation_fraction < 1.0:
            raise ConfigError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
        count = math.ceil(validation_fraction * len(unique)) if len(unique) >= 2 else 0
        if validation_fraction > 0 and len(unique) >= 2:
            count = max(count, 1)
        shuffled = unique[:]
        random.Random(seed).shuffle(shuffled)
        held = sorted(shuffled[:count])
    train = [n for n in unique if n not in held]
    return train, held


def find_videos(videos_dir: Path) -> dict[str, Path]:
    """Video files directly inside ``videos_dir`` by stem, sorted."""
    if not videos_dir.is_dir():
        raise InputError(f"video folder {videos_dir} does not exist")
    found = {p.stem: p for p in sorted(videos_dir.iterdir()) if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES}
    if not found:
        raise InputError(f"no videos ({', '.join(VIDEO_SUFFIXES)}) in {videos_dir}")
    return found


@dataclass
class VideoSamples:
    """What one (video, CRF) pass produced, before it is written."""

    arrays: dict[str, np.ndarray]
    frames: int
    keyframes: int
    frames_with_face: int
    fps: float
    width: int
    height: int

    @property
    def count(self) -> int:
        return int(self.arrays[FRAME_INDEX].shape[0])


@dataclass
class BuildOptions:
    crfs: tuple[int, ...] = (42,)
    keyint_seconds: float = 1.0
    reference_mode: ReferenceMode = "hq"
    sample_every: int = 5
    sample_offset: int = 5
    validation: tuple[str, ...] | None = None
    validation_fraction: float = 0.2
    split_seed: int = 0
    store_size: int = 10
    store_policy: str = "lfu"
    warp_mode: str = "fast"
    detector: str = "hog"
    preset: str = "medium"
    max_frames: int | None = None

    def check(self) -> None:
        if not self.crfs:
            raise ConfigError("at least one --crf is needed")
        for crf in self.crfs:
            if not 0 <= crf <= 51:
                raise ConfigError(f"crf must be in [0, 51] for libx264, got {crf}")
        if self.keyint_seconds <= 0:
            raise ConfigError(f"keyint_seconds must be > 0, got {self.keyint_seconds}")
        if self.reference_mode not in REFERENCE_MODES:
            raise ConfigError(f"reference_mode must be one of {REFERENCE_MODES}, got {self.reference_mode!r}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ConfigError(f"max_frames must be >= 1, got {self.max_frames}")
        sample_indices(0, self.sample_every, self.sample_offset)


@dataclass
class DatasetManifest:
    """Contents of ``manifest.json``: the options used and where each video went."""

    options: dict
    train: list[str]
    validation: list[str]
    files: dict[str, dict] = field(default_factory=dict)  # file name -> {video, crf, split, samples, ...}
    version: int = MANIFEST_VERSION

    def files_of(self, split: str) -> list[str]:
        return [name for name, info in sorted(self.files.items()) if info["split"] == split]

    def write(self, out_dir: Path) -> Path:
        path = out_dir / MANIFEST_NAME
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def read(cls, data_dir: Path) -> "DatasetManifest":
        path = data_dir / MANIFEST_NAME
        if not path.is_file():
            raise InputError(f"{path} not found: build the dataset first (`kfgan-daemon dataset build`)")
        try:
            raw = json.loads(path.read_text())
            if raw.get("version") != MANIFEST_VERSION:
                raise InputError(f"{path} has version {raw.get('version')}, expected {MANIFEST_VERSION}; rebuild it")
            return cls(**raw)
        except (json.JSONDecodeError, TypeError) as exc:
            raise InputError(f"{path} is not a dataset manifest: {exc}") from exc


def _encode(source: Path, target: Path, crf: int, keyint_seconds: float, preset: str, max_frames: int | None) -> None:
    """Re-encode ``source`` with libx264 at ``crf``, an I-frame every ``keyint_seconds``, no audio."""
    from kfgan_daemon.media import FileSink, FileSource

    with FileSource(source) as frames:
        gop = max(1, round(float(frames.frame_rate) * keyint_seconds))
        with FileSink.like(frames, target, crf=crf, gop=gop, preset=preset, audio_from=None) as sink:
            for index, frame in enumerate(frames):
                if max_frames is not None and index >= max_frames:
                    break
                sink.write(frame)


def collect_samples(original: Path, compressed: Path, options: BuildOptions) -> VideoSamples:
    """Walk original and compressed frames in lockstep and cut the samples of one encoded video."""
    from kfgan_daemon.face import FaceTracker, align_face, mls_warp
    from kfgan_daemon.keyframes import KeyframeStore
    from kfgan_daemon.media import FileSource

    tracker = FaceTracker(detector=options.detector)
    store = KeyframeStore(options.store_size, policy=options.store_policy)
    rows: dict[str, list] = {name: [] for name in SAMPLE_ARRAYS}
    frames = keyframes = with_face = 0
    with FileSource(original) as hq_source, FileSource(compressed) as lq_source:
        fps = float(lq_source.frame_rate)
        width, height = lq_source.width, lq_source.height
        for index, (hq, lq) in enumerate(zip(hq_source, lq_source, strict=False)):
            if options.max_frames is not None and index >= options.max_frames:
                break
            frames += 1
            keyframes += int(lq.is_keyframe)
            landmarks = tracker.update(lq.image)
            if landmarks is None:
                continue
            with_face += 1
            aligned = align_face(lq.image, landmarks)
            if lq.is_keyframe:
                source_image = hq.image if options.reference_mode == "hq" else lq.image
                key_crop = aligned.crop if source_image is lq.image else align_face(source_image, landmarks).crop
                store.offer(index, aligned.crop_landmarks, key_crop)
            # Selection runs on every frame with a face, as in the stream, so that the
            # LFU usage counts (and thus evictions) follow the deployed behaviour.
            entry = store.select(aligned.crop_landmarks)
            if entry is None or not _is_sampled(index, options):
                continue
            reference = mls_warp(entry.crop, entry.landmarks, aligned.crop_landmarks, mode=options.warp_mode)
            rows[COMPRESSED].append(aligned.crop)
            rows[REFERENCE].append(reference)
            rows[TARGET].append(align_face(hq.image, landmarks).crop)
            rows[CROP_LANDMARKS].append(np.asarray(aligned.crop_landmarks, dtype=np.int16))
            rows[FRAME_LANDMARKS].append(np.asarray(landmarks, dtype=np.float32))
            rows[MATRIX].append(np.asarray(aligned.matrix, dtype=np.float64))
            rows[FRAME_INDEX].append(index)
            rows[KEY_INDEX].append(entry.key_id)
    arrays = _stack(rows)
    return VideoSamples(arrays, frames, keyframes, with_face, fps, width, height)


def _is_sampled(index: int, options: BuildOptions) -> bool:
    return index >= options.sample_offset and (index - options.sample_offset) % options.sample_every == 0


def _stack(rows: dict[str, list]) -> dict[str, np.ndarray]:
    shapes = {
        COMPRESSED: ((0, 256, 256, 3), np.uint8),
        REFERENCE: ((0, 256, 256, 3), np.uint8),
        TARGET: ((0, 256, 256, 3), np.uint8),
        CROP_LANDMARKS: ((0, 68, 2), np.int16),
        FRAME_LANDMARKS: ((0, 68, 2), np.float32),
        MATRIX: ((0, 2, 3), np.float64),
        FRAME_INDEX: ((0,), np.int32),
        KEY_INDEX: ((0,), np.int32),
    }
    out = {}
    for name, (empty_shape, dtype) in shapes.items():
        values = rows[name]
        out[name] = np.stack(values).astype(dtype) if values else np.zeros(empty_shape, dtype=dtype)
    return out


def sample_file_name(video: str, crf: int, reference_mode: str) -> str:
    return f"{video}_crf{crf}_{reference_mode}.npz"


def build_dataset(
    videos_dir: Path,
    out_dir: Path,
    crfs: Iterable[int] = (42,),
    keyint_seconds: float = 1.0,
    reference_mode: ReferenceMode = "hq",
    validation: Sequence[str] | None = None,
    validation_fraction: float = 0.2,
    sample_every: int = 5,
    sample_offset: int = 5,
    warp_mode: str = "fast",
    detector: str = "hog",
    preset: str = "medium",
    max_frames: int | None = None,
    progress: bool = True,
) -> DatasetManifest:
    """Build training samples from every video in ``videos_dir`` into ``out_dir``.

    Writes one ``<video>_crf<CRF>_<mode>.npz`` per video and CRF, then ``manifest.json``.
    Files already listed in an existing manifest with the same options are kept, so an
    interrupted build resumes where it stopped.
    """
    options = BuildOptions(
        crfs=tuple(int(c) for c in crfs),
        keyint_seconds=keyint_seconds,
        reference_mode=reference_mode,
        sample_every=sample_every,
        sample_offset=sample_offset,
        validation=tuple(validation) if validation is not None else None,
        validation_fraction=validation_fraction,
        warp_mode=warp_mode,
        detector=detector,
        preset=preset,
        max_frames=max_frames,
    )
    options.check()
    videos = find_videos(Path(videos_dir))
    train, held = split_videos(list(videos), options.validation, options.validation_fraction, options.split_seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Through JSON once, so that it compares equal to what a previous manifest holds.
    option_dict = json.loads(json.dumps(asdict(options)))
    manifest = DatasetManifest(options=option_dict, train=train, validation=held)
    previous = _previous_files(out_dir, option_dict)
    jobs = [(video, crf) for video in videos for crf in options.crfs]
    bar = _progress(len(jobs), progress)
    for video, crf in jobs:
        name = sample_file_name(video, crf, options.reference_mode)
        split = "validation" if video in held else "train"
        if name in previous and (out_dir / name).is_file():
            manifest.files[name] = {**previous[name], "split": split}
        else:
            manifest.files[name] = _build_one(videos[video], video, crf, split, out_dir / name, options)
        manifest.write(out_dir)
        bar.update(1)
        bar.set_postfix_str(f"{video} crf{crf}: {manifest.files[name]['samples']} samples")
    bar.close()
    manifest.write(out_dir)
    return manifest


def _build_one(path: Path, video: str, crf: int, split: str, target: Path, options: BuildOptions) -> dict:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kfgan-dataset-") as tmp:
        encoded = Path(tmp) / f"{video}_crf{crf}.mp4"
        _encode(path, encoded, crf, options.keyint_seconds, options.preset, options.max_frames)
        samples = collect_samples(path, encoded, options)
    partial = target.with_suffix(".partial.npz")
    np.savez(partial, **samples.arrays)
    partial.replace(target)
    info = {
        "video": video,
        "source": path.name,
        "crf": crf,
        "split": split,
        "reference_mode": options.reference_mode,
        "samples": samples.count,
        "frames": samples.frames,
        "keyframes": samples.keyframes,
        "frames_with_face": samples.frames_with_face,
        "fps": samples.fps,
        "width": samples.width,
        "height": samples.height,
        "seconds": round(time.monotonic() - started, 1),
    }
    log.info("dataset: %s crf %d -> %d samples (%s)", video, crf, samples.count, split)
    return info


def _previous_files(out_dir: Path, option_dict: dict) -> dict[str, dict]:
    try:
        previous = DatasetManifest.read(out_dir)
    except InputError:
        return {}
    return previous.files if previous.options == option_dict else {}


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="dataset", unit="video", disable=not enabled)
