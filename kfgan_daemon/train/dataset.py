"""Training samples from real talking-head videos, made the way the daemon sees a call.

For each high-quality video, CRF and sender (:data:`kfgan_daemon.media.encode.SENDERS`:
a plain x264 sender, and one whose I-frames are quantised much finer): encode it with
libx264 (fixed keyframe interval) from the video's own decoded YUV planes, decode
original and compressed in lockstep, cut the faces of the compressed frames through the
restorer's own face pipeline (:class:`~kfgan_daemon.restore.face_pipeline.FacePipeline`,
built from the options' :class:`RestoreSettings`: same tracking, smoothing, identity
check, alignment, keyframe store and warp), and for every sampled frame write the
degraded crop, the chosen keyframe MLS-warped onto the frame's landmarks in both
reference modes, and the ground truth aligned with the same matrix.

Both reference modes come from one pass: ``hq`` is the keyframe cut from the original
video at the I-frame (the paper's high-quality keyframes), ``stream`` the same I-frame as
decoded (what the sender gave: with the ``hq`` sender it is close to the original, and
the P-frames predicted from it are better too, which a model must learn to leave alone).
Both are cut with the same matrix and stored under the same landmarks, so the store
picks the same keyframe for either.

The only colour conversion is :func:`kfgan_daemon.media.colour.yuv_to_rgb`, applied to
the decoded planes of both videos: the degraded crop is exactly what a receiver
converts, never an RGB round trip of the original.

One ``.npz`` of uint8 arrays per (video, CRF, sender); crops are RGB. ``manifest.json`` records
the options (the face settings as :func:`~kfgan_daemon.restore.face_pipeline.face_record`
gives them; the trainer writes them into the model file), who is who (persons) and where
each video went: splits are by person, never by frame or clip, so validation and test
faces are faces training never saw.
Test videos get no sample files: they are measured end to end by ``kfgan-daemon eval``.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from kfgan_daemon.errors import ConfigError, InputError
from kfgan_daemon.face.identity import FaceDescriber
from kfgan_daemon.keyframes import KeyframeEntry
from kfgan_daemon.media.encode import SENDERS
from kfgan_daemon.restore.face_pipeline import REFERENCE_MODES, Face, FacePipeline, face_record, face_tracker
from kfgan_daemon.restore.identity import CHECK_RULE
from kfgan_daemon.restore.settings import RestoreSettings
from kfgan_daemon.train.face_tracks import SUFFIX as TRACKS_SUFFIX
from kfgan_daemon.train.face_tracks import FaceTracks, RecordingDescriber, RecordingTracker, Replay
from kfgan_daemon.train.npz import open_npz

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".y4m")
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 3

# Keys of each sample file; the loader (train/samples.py) reads the same names.
COMPRESSED = "compressed"  # N x 256 x 256 x 3 uint8 RGB, aligned crop of the decoded compressed frame
TARGET = "target"  # N x 256 x 256 x 3 uint8 RGB, original frame aligned with the same matrix
REFERENCE_HQ = "reference_hq"  # N x 256 x 256 x 3 uint8 RGB, original I-frame crop warped onto the landmarks
REFERENCE_STREAM = "reference_stream"  # the same I-frame as decoded, warped the same way
CROP_LANDMARKS = "crop_landmarks"  # N x 68 x 2 int16, crop coordinates (the landmark image is drawn from them)
FRAME_LANDMARKS = "frame_landmarks"  # N x 68 x 2 float64, frame coordinates (smoothed, as the restorer uses them)
MATRIX = "matrix"  # N x 2 x 3 float64, frame -> crop
FRAME_INDEX = "frame_index"  # N int32, decode order index of the sample
KEY_INDEX = "key_index"  # N int32, frame index of the keyframe used as reference
QUANTISER = "quantiser"  # N float32, the compressed frame's mean block quantiser as decoded (NaN: not reported)
SAMPLE_ARRAYS = (
    COMPRESSED, TARGET, REFERENCE_HQ, REFERENCE_STREAM, CROP_LANDMARKS, FRAME_LANDMARKS, MATRIX, FRAME_INDEX, KEY_INDEX,
    QUANTISER,
)
_REFERENCE_KEYS = {"hq": REFERENCE_HQ, "stream": REFERENCE_STREAM}
# The face settings a video's kept tracks depend on: the tracker's, and those the identity
# check's crops are cut with (its descriptors are kept with the tracks).
TRACKED_FIELDS = (
    "detector", "redetect_interval", "identity_check", "identity_distance", "identity_lost_seconds", "alignment",
    "smooth_landmarks", "smoothing_min_cutoff", "smoothing_beta",
)


def reference_key(mode: str) -> str:
    """The sample array holding the references of ``mode`` ("hq" or "stream")."""
    try:
        return _REFERENCE_KEYS[mode]
    except KeyError:
        raise ConfigError(f"reference mode must be one of {REFERENCE_MODES}, got {mode!r}") from None


def sample_indices(frame_count: int, every: int = 5, offset: int = 5) -> list[int]:
    """Frame indices the paper samples: every ``every``-th frame starting at ``offset``."""
    if every < 1 or offset < 0:
        raise ConfigError(f"sampling needs every >= 1 and offset >= 0 (got every={every}, offset={offset})")
    return list(range(offset, max(frame_count, 0), every))


def person_of(videos: Iterable[str], persons: Mapping[str, Iterable[str]]) -> dict[str, str]:
    """video -> person; ``persons`` names who appears in several videos, anyone else is their video's own person."""
    names = sorted(set(videos))
    owner: dict[str, str] = {}
    for person, clips in persons.items():
        for clip in clips:
            if clip in owner:
                raise ConfigError(f"dataset.persons: video {clip!r} is listed for both {owner[clip]!r} and {person!r}")
            owner[clip] = person
    unknown = sorted(set(owner) - set(names))
    if unknown:
        raise ConfigError(f"dataset.persons: videos not found among the inputs: {unknown}")
    return {name: owner.get(name, name) for name in names}


def split_by_person(
    videos: Iterable[str],
    persons: Mapping[str, Iterable[str]],
    validation: Iterable[str],
    test: Iterable[str],
) -> dict[str, str]:
    """video -> "train", "validation" or "test", whole persons at a time.

    ``validation`` and ``test`` name persons (a video's name is its person's unless
    ``persons`` says otherwise); everyone else trains.
    """
    owner = person_of(videos, persons)
    everyone = set(owner.values())
    validation, test = set(validation), set(test)
    for label, chosen in (("validation", validation), ("test", test)):
        unknown = sorted(chosen - everyone)
        if unknown:
            raise ConfigError(f"dataset.{label}: persons not found among the inputs: {unknown} (persons: {sorted(everyone)})")
    both = sorted(validation & test)
    if both:
        raise ConfigError(f"dataset: persons {both} are in both validation and test")
    return {
        video: "test" if person in test else "validation" if person in validation else "train"
        for video, person in owner.items()
    }


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
    tracks: FaceTracks

    @property
    def count(self) -> int:
        return int(self.arrays[FRAME_INDEX].shape[0])


@dataclass
class BuildOptions:
    """How samples are made; ``persons``/``validation``/``test`` say who goes where (see :func:`split_by_person`)."""

    crfs: tuple[int, ...] = (42,)
    senders: tuple[str, ...] = ("stream",)
    keyint_seconds: float = 1.0
    sample_every: int = 5
    sample_offset: int = 5
    persons: dict[str, list[str]] = field(default_factory=dict)
    validation: tuple[str, ...] = ()
    test: tuple[str, ...] = ()
    # How faces are cut: the restorer's own settings, so that the model trains on faces cut as served.
    faces: RestoreSettings = field(default_factory=RestoreSettings)
    preset: str = "medium"
    max_frames: int | None = None

    def record(self) -> dict[str, Any]:
        """The options as the manifest keeps them (JSON values; the face settings as :func:`face_record` gives them)."""
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "faces"}
        return json.loads(json.dumps({**own, "faces": face_record(self.faces)}))

    def check(self) -> None:
        if not self.crfs:
            raise ConfigError("dataset.crfs: at least one CRF is needed")
        for crf in self.crfs:
            if not 0 <= crf <= 51:
                raise ConfigError(f"dataset.crfs: crf must be in [0, 51] for libx264, got {crf}")
        if not self.senders:
            raise ConfigError("dataset.senders: at least one sender is needed")
        for sender in self.senders:
            if sender not in SENDERS:
                raise ConfigError(f"dataset.senders: unknown sender {sender!r}; expected one of {', '.join(SENDERS)}")
        if self.keyint_seconds <= 0:
            raise ConfigError(f"dataset.keyint_seconds must be > 0, got {self.keyint_seconds}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ConfigError(f"dataset.max_frames must be >= 1, got {self.max_frames}")
        sample_indices(0, self.sample_every, self.sample_offset)


@dataclass
class DatasetManifest:
    """Contents of ``manifest.json``: the options used, who is who, and where each video went."""

    options: dict
    splits: dict[str, str]  # video -> train / validation / test
    persons: dict[str, str] = field(default_factory=dict)  # video -> person
    files: dict[str, dict] = field(default_factory=dict)  # file name -> {video, crf, split, samples, ...}
    skipped: dict[str, str] = field(default_factory=dict)  # file name -> why the video gave no samples
    version: int = MANIFEST_VERSION

    @property
    def face_settings(self) -> dict[str, Any] | None:
        """The face settings the samples were cut with (None: a dataset built before they were recorded)."""
        return self.options.get("faces")

    def videos_of(self, split: str) -> list[str]:
        return sorted(video for video, where in self.splits.items() if where == split)

    def files_of(self, split: str) -> list[str]:
        return [name for name, info in sorted(self.files.items()) if info["split"] == split]

    def write(self, out_dir: Path) -> Path:
        path = out_dir / MANIFEST_NAME
        partial = path.with_name(f".{MANIFEST_NAME}.partial")
        partial.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        partial.replace(path)
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


def encode_degraded(
    source: Path, target: Path, crf: int, keyint_seconds: float, preset: str, max_frames: int | None,
    sender: str = "stream",
) -> int:
    """libx264 at ``crf`` as ``sender`` sets it up, from the source's decoded planes, an I-frame
    every ``keyint_seconds``, no audio."""
    from kfgan_daemon.media.encode import degrade_like_a_call

    return degrade_like_a_call(
        source, target, crf, gop_seconds=keyint_seconds, max_frames=max_frames, audio=False,
        x264_options=SENDERS[sender], preset=preset,
    )


def collect_samples(
    original: Path, compressed: Path, options: BuildOptions, replay: Replay | None = None,
    settings: dict | None = None,
) -> VideoSamples:
    """Walk original and compressed frames in lockstep and cut the samples of one encoded video.

    ``replay`` hands out recorded face tracks and descriptors in place of dlib; the tracks
    this pass used are returned with the samples either way, under ``settings``."""
    from kfgan_daemon.media import FileSource

    tracks = FaceTracks(settings or {})
    faces = _face_pipeline(options.faces, tracks, replay)
    rows: dict[str, list] = {name: [] for name in SAMPLE_ARRAYS}
    frames = keyframes = with_face = 0
    with FileSource(original) as hq_source, FileSource(compressed) as lq_source:
        fps = float(lq_source.frame_rate)
        width, height = lq_source.width, lq_source.height
        if (hq_source.width, hq_source.height) != (width, height):
            raise InputError(
                f"{original} is {hq_source.width}x{hq_source.height} but its encode is {width}x{height}: "
                "odd-sized videos cannot be paired pixel for pixel; crop them to even sizes first"
            )
        for index, (hq, lq) in enumerate(zip(hq_source, lq_source, strict=False)):
            if options.max_frames is not None and index >= options.max_frames:
                break
            frames += 1
            keyframes += int(lq.is_keyframe)
            face = faces.follow(lq, hq)
            if face is None:
                continue
            with_face += 1
            # Every followed frame selects, sampled or not, so that LFU usage counts follow the stream.
            entry = faces.select(face)
            if entry is not None and _is_sampled(index, options):
                _add_sample(rows, faces, face, entry)
    if replay is not None:
        replay.tracker.finish()
    return VideoSamples(_stack(rows), frames, keyframes, with_face, fps, width, height, tracks)


def both_crops(face: Face) -> np.ndarray:
    """The dataset's keyframe entry: the original's crop (``hq``) and the decoded one (``stream``) of
    one I-frame, cut with one matrix and stored under one set of landmarks, so that the store
    picks the same keyframe for either reference mode."""
    return np.stack([face.truth, face.aligned.crop])


def _face_pipeline(settings: RestoreSettings, tracks: FaceTracks, replay: Replay | None) -> FacePipeline[np.ndarray]:
    """The restorer's face pipeline with the dataset's keyframe entries, on dlib whose answers are
    kept in ``tracks``, or on ``replay``'s."""
    if replay is not None:
        return FacePipeline(settings, both_crops, tracker=replay.tracker, describer=replay.describer)
    tracker = RecordingTracker(face_tracker(settings), tracks)
    describer = RecordingDescriber(FaceDescriber(settings.descriptor_path), tracks) if settings.identity_check else None
    return FacePipeline(settings, both_crops, tracker=tracker, describer=describer)


def _add_sample(rows: dict[str, list], faces: FacePipeline[np.ndarray], face: Face, entry: KeyframeEntry) -> None:
    """One sampled frame's arrays: the face, its truth, and the keyframe warped onto it in both modes."""
    aligned = face.aligned
    for key, crop in zip((REFERENCE_HQ, REFERENCE_STREAM), entry.crop):
        rows[key].append(faces.warp(entry, face, crop))
    rows[COMPRESSED].append(aligned.crop)
    rows[TARGET].append(face.truth)
    rows[CROP_LANDMARKS].append(np.asarray(aligned.crop_landmarks, dtype=np.int16))
    rows[FRAME_LANDMARKS].append(np.asarray(face.landmarks, dtype=np.float64))
    rows[MATRIX].append(np.asarray(aligned.matrix, dtype=np.float64))
    rows[FRAME_INDEX].append(face.frame.index)
    rows[KEY_INDEX].append(entry.key_id)
    rows[QUANTISER].append(np.nan if face.frame.quantiser is None else face.frame.quantiser)


def _is_sampled(index: int, options: BuildOptions) -> bool:
    return index >= options.sample_offset and (index - options.sample_offset) % options.sample_every == 0


def _stack(rows: dict[str, list]) -> dict[str, np.ndarray]:
    crop = ((0, 256, 256, 3), np.uint8)
    shapes = {
        COMPRESSED: crop,
        TARGET: crop,
        REFERENCE_HQ: crop,
        REFERENCE_STREAM: crop,
        CROP_LANDMARKS: ((0, 68, 2), np.int16),
        FRAME_LANDMARKS: ((0, 68, 2), np.float64),
        MATRIX: ((0, 2, 3), np.float64),
        FRAME_INDEX: ((0,), np.int32),
        KEY_INDEX: ((0,), np.int32),
        QUANTISER: ((0,), np.float32),
    }
    out = {}
    for name, (empty_shape, dtype) in shapes.items():
        values = rows[name]
        out[name] = np.stack(values).astype(dtype) if values else np.zeros(empty_shape, dtype=dtype)
    return out


def _stem(video: str, crf: int, sender: str) -> str:
    # The plain sender's files keep the names they had before senders existed.
    return f"{video}_crf{crf}" if sender == "stream" else f"{video}_crf{crf}_{sender}"


def open_sample_file(path: Path) -> AbstractContextManager[np.lib.npyio.NpzFile]:
    """One sample file, its arrays read as they are asked for; any failure names the file."""
    return open_npz(path, "sample file", "rebuild the dataset")


def sample_file_name(video: str, crf: int, sender: str = "stream") -> str:
    return f"{_stem(video, crf, sender)}.npz"


def encoded_file_name(video: str, crf: int, sender: str = "stream") -> str:
    return f"{_stem(video, crf, sender)}.mp4"


def build_dataset(
    videos_dir: Path,
    out_dir: Path,
    options: BuildOptions,
    keep_encoded: bool = False,
    workers: int = 1,
    progress: bool = True,
    tracks_dir: Path | None = None,
) -> DatasetManifest:
    """Build training samples from every video in ``videos_dir`` into ``out_dir``.

    Writes one ``<video>_crf<CRF>[_<sender>].npz`` per train or validation video, CRF and
    sender, then ``manifest.json``; test videos are only listed. Files already listed in
    an existing manifest made with the same options (the lists of CRFs and senders aside)
    are kept, so an interrupted or extended build only makes what is missing.
    ``keep_encoded`` keeps the degraded streams in ``out_dir/encoded``; ``workers`` builds
    that many videos at once, in separate processes. ``tracks_dir`` keeps every encoded
    video's face tracks and replays those made under the same settings
    (:mod:`kfgan_daemon.train.face_tracks`): no dlib for them.
    """
    options.check()
    videos = find_videos(Path(videos_dir))
    splits = split_by_person(videos, options.persons, options.validation, options.test)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    option_dict = options.record()
    manifest = DatasetManifest(options=option_dict, splits=splits, persons=person_of(videos, options.persons))
    previous = _previous_files(out_dir, option_dict)
    encoded_dir = out_dir / "encoded" if keep_encoded else None
    todo = []
    for video in videos:
        if splits[video] == "test":
            continue
        for crf in options.crfs:
            for sender in options.senders:
                name = sample_file_name(video, crf, sender)
                if name in previous and (out_dir / name).is_file():
                    manifest.files[name] = {"sender": "stream", **previous[name], "split": splits[video]}
                else:
                    todo.append(
                        (videos[video], video, crf, sender, splits[video], out_dir / name, options, encoded_dir,
                         tracks_dir)
                    )
    manifest.write(out_dir)
    bar = _progress(len(todo), progress)
    # Videos are independent: a process each (encoding, tracking and warping hold the GIL).
    with ProcessPoolExecutor(max_workers=workers) if workers > 1 else _InProcess() as pool:
        for info in pool.map(_build_one_job, todo):
            name = sample_file_name(info["video"], info["crf"], info["sender"])
            if "skipped" in info:
                manifest.skipped[name] = info["skipped"]
                log.warning("dataset: %s skipped: %s", name, info["skipped"])
            else:
                manifest.files[name] = info
            manifest.write(out_dir)
            bar.update(1)
            bar.set_postfix_str(
                f"{info['video']} crf{info['crf']} {info['sender']}: {info.get('samples', 0)} samples"
            )
    bar.close()
    return manifest


class _InProcess:
    """The ``map`` of an executor, run in this process (one worker: no pickling, plain tracebacks)."""

    def map(self, function, items):
        return map(function, items)

    def __enter__(self) -> "_InProcess":
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None


def _build_one_job(job: tuple) -> dict:
    try:
        return _build_one(*job)
    except InputError as exc:
        # A damaged or unpairable video costs its own samples, not the whole build.
        _, video, crf, sender, split, *_ = job
        return {"video": video, "crf": crf, "sender": sender, "split": split, "skipped": str(exc)}


def _build_one(
    path: Path, video: str, crf: int, sender: str, split: str, target: Path, options: BuildOptions,
    encoded_dir: Path | None, tracks_dir: Path | None,
) -> dict:
    started = time.monotonic()
    settings = tracks_settings(crf, sender, options)
    tracks_file = None if tracks_dir is None else Path(tracks_dir) / f"{_stem(video, crf, sender)}{TRACKS_SUFFIX}"
    replay = _replay(tracks_file, settings)
    with tempfile.TemporaryDirectory(prefix="kfgan-dataset-") as tmp:
        folder = encoded_dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        encoded = folder / encoded_file_name(video, crf, sender)
        encode_degraded(path, encoded, crf, options.keyint_seconds, options.preset, options.max_frames, sender)
        samples = collect_samples(path, encoded, options, replay, settings)
    if tracks_file is not None and replay is None:
        tracks_file.parent.mkdir(parents=True, exist_ok=True)
        samples.tracks.save(tracks_file)
    partial = target.with_suffix(".partial.npz")
    np.savez(partial, **samples.arrays)
    partial.replace(target)
    info = {
        "video": video,
        "source": path.name,
        "crf": crf,
        "sender": sender,
        "split": split,
        "samples": samples.count,
        "keyframe_samples": int((samples.arrays[FRAME_INDEX] == samples.arrays[KEY_INDEX]).sum()),
        "frames": samples.frames,
        "keyframes": samples.keyframes,
        "frames_with_face": samples.frames_with_face,
        "fps": samples.fps,
        "width": samples.width,
        "height": samples.height,
        "seconds": round(time.monotonic() - started, 1),
        "tracks": "replayed" if replay is not None else "tracked",
    }
    log.info("dataset: %s crf %d %s sender -> %d samples (%s)", video, crf, sender, samples.count, split)
    return info


def tracks_settings(crf: int, sender: str, options: BuildOptions) -> dict:
    """What a video's face tracks depend on: its encode and the face settings in :data:`TRACKED_FIELDS`."""
    return {
        "crf": crf,
        "sender": sender,
        "keyint_seconds": options.keyint_seconds,
        "preset": options.preset,
        "max_frames": options.max_frames,
        **{name: getattr(options.faces, name) for name in TRACKED_FIELDS},
        "identity_checks": CHECK_RULE,
    }


def _replay(path: Path | None, settings: dict) -> Replay | None:
    if path is None or not path.is_file():
        return None
    try:
        tracks = FaceTracks.load(path)
    except InputError as exc:
        log.warning("dataset: %s; tracking afresh", exc)
        return None
    if tracks.settings != settings:
        log.info("dataset: %s was tracked under other settings (%s); tracking afresh", path, tracks.settings)
        return None
    return Replay.of(tracks, path)


def _previous_files(out_dir: Path, option_dict: dict) -> dict[str, dict]:
    try:
        previous = DatasetManifest.read(out_dir)
    except InputError:
        return {}
    return previous.files if _per_file(previous.options) == _per_file(option_dict) else {}


def _per_file(options: dict) -> dict:
    """The options every sample file depends on: CRF and sender are each file's own."""
    return {key: value for key, value in options.items() if key not in ("crfs", "senders")}


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="dataset", unit="video", disable=not enabled)
