"""Dataset builder: split by person, and real samples cut from real clips through the faithful path."""
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


def test_a_person_goes_to_one_split_with_all_their_videos() -> None:
    videos = ["obama1", "obama2", "d0", "d3", "s18", "s32"]
    persons = {"obama": ["obama1", "obama2"], "wide": ["s18", "s32"]}
    splits = ds.split_by_person(videos, persons, validation=["obama"], test=["wide", "d3"])
    assert splits == {
        "obama1": "validation", "obama2": "validation", "d0": "train", "d3": "test", "s18": "test", "s32": "test",
    }
    assert ds.person_of(videos, persons)["obama2"] == "obama"
    with pytest.raises(ConfigError, match="both validation and test"):
        ds.split_by_person(videos, persons, validation=["d0"], test=["d0"])
    with pytest.raises(ConfigError, match="persons not found"):
        ds.split_by_person(videos, persons, validation=["s18"], test=[])  # s18 belongs to "wide"
    with pytest.raises(ConfigError, match="listed for both"):
        ds.person_of(videos, {"a": ["d0"], "b": ["d0"]})
    with pytest.raises(ConfigError, match="not found among the inputs"):
        ds.person_of(videos, {"a": ["d99"]})


def test_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="crf"):
        ds.BuildOptions(crfs=(60,)).check()
    with pytest.raises(ConfigError, match="keyint"):
        ds.BuildOptions(keyint_seconds=0).check()
    with pytest.raises(ConfigError, match="dataset.senders: unknown sender 'fast'"):
        ds.BuildOptions(senders=("fast",)).check()
    with pytest.raises(ConfigError, match="reference mode"):
        ds.reference_key("best")


def test_missing_inputs_are_named(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        ds.find_videos(tmp_path / "nope")
    with pytest.raises(InputError, match="no videos"):
        ds.find_videos(tmp_path)
    with pytest.raises(InputError, match="build the dataset first"):
        ds.DatasetManifest.read(tmp_path)


def test_the_shipped_split_holds_out_persons_never_trained_on() -> None:
    from kfgan_daemon.train.config import load_config

    config = load_config(Path(__file__).resolve().parent.parent / "configs" / "guided.toml")
    spec = config.dataset
    assert len(spec.test) >= 6 and not set(spec.test) & set(spec.validation)
    held = {v for p in spec.test for v in spec.persons.get(p, [p])}
    assert {"s18", "s32"} <= held and any(v.startswith("d") and v[1:].isdigit() for v in held)


# -- real clips ------------------------------------------------------------------------------

FRAMES = 40  # I-frames at 0 and 25 (25 fps, one a second); samples 5, 10, ..., 35
# Two videos of one person (MEAD) train, a third person validates, a fourth is held out.
CLIPS = ("eamm_MEAD_fear", "eamm_MEAD_surprised", "dpe_s", "styletalk_style_nice_clip1")
OPTIONS = ds.BuildOptions(
    crfs=(42,),
    persons={"mead": ["eamm_MEAD_fear", "eamm_MEAD_surprised"]},
    validation=("dpe_s",),
    test=("styletalk_style_nice_clip1",),
    preset="veryfast",
    max_frames=FRAMES,
)


@pytest.fixture(scope="module")
def clips(media_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("clips")
    for name in CLIPS:
        if not (media_dir / f"{name}.mp4").is_file():
            pytest.skip(f"{name}.mp4 not in {media_dir}")
        shutil.copy(media_dir / f"{name}.mp4", folder)
    return folder


@pytest.fixture(scope="module")
def built(clips: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("built")
    ds.build_dataset(clips, out, OPTIONS, keep_encoded=True, progress=False)
    return out


def _samples(built: Path, video: str) -> dict[str, np.ndarray]:
    with np.load(built / ds.sample_file_name(video, 42)) as arrays:
        return {k: arrays[k] for k in arrays.files}


@pytest.mark.slow
def test_split_by_person_in_the_manifest(built: Path) -> None:
    manifest = ds.DatasetManifest.read(built)
    assert manifest.videos_of("train") == ["eamm_MEAD_fear", "eamm_MEAD_surprised"]
    assert manifest.videos_of("validation") == ["dpe_s"]
    assert manifest.videos_of("test") == ["styletalk_style_nice_clip1"]
    assert manifest.persons["eamm_MEAD_surprised"] == "mead" and manifest.persons["dpe_s"] == "dpe_s"
    # Held-out persons get no samples at all: they are measured end to end by eval.
    assert sorted(manifest.files) == ["dpe_s_crf42.npz", "eamm_MEAD_fear_crf42.npz", "eamm_MEAD_surprised_crf42.npz"]
    info = manifest.files["eamm_MEAD_fear_crf42.npz"]
    assert info["frames"] == FRAMES and info["keyframes"] >= 2 and info["samples"] == 7


@pytest.mark.slow
def test_the_degraded_stream_is_encoded_from_the_originals_own_planes(clips: Path, tmp_path: Path) -> None:
    from kfgan_daemon.media import FileSource

    # Lossless x264 returns exactly the planes it was given: any colour round trip on
    # the way in would show up as changed levels.
    lossless = tmp_path / "lossless.mp4"
    ds.encode_degraded(clips / "dpe_s.mp4", lossless, crf=0, keyint_seconds=1.0, preset="ultrafast", max_frames=10)
    with FileSource(clips / "dpe_s.mp4") as original, FileSource(lossless) as encoded:
        pairs = list(zip(original, encoded, strict=False))[:10]
    assert len(pairs) == 10 and all(a.same_pixels(b) for a, b in pairs)


@pytest.mark.slow
def test_crops_are_the_colour_modules_conversion_of_the_decoded_planes(clips: Path, built: Path) -> None:
    import cv2

    from kfgan_daemon.face import align_frame
    from kfgan_daemon.media import FileSource
    from kfgan_daemon.media.colour import yuv_to_rgb

    samples = _samples(built, "eamm_MEAD_fear")
    assert list(samples[ds.FRAME_INDEX]) == ds.sample_indices(FRAMES)
    wanted = {int(i): n for n, i in enumerate(samples[ds.FRAME_INDEX])}
    encoded = built / "encoded" / ds.encoded_file_name("eamm_MEAD_fear", 42)
    with FileSource(clips / "eamm_MEAD_fear.mp4") as original, FileSource(encoded) as degraded:
        for index, (hq, lq) in enumerate(zip(original, degraded, strict=False)):
            if index not in wanted:
                continue
            n = wanted[index]
            landmarks = samples[ds.FRAME_LANDMARKS][n]
            # The restorer's crop of the decoded frame, bit for bit ...
            received = align_frame(lq, landmarks)
            assert np.array_equal(samples[ds.COMPRESSED][n], received.crop)
            assert np.array_equal(samples[ds.TARGET][n], align_frame(hq, landmarks).crop)
            assert np.array_equal(samples[ds.MATRIX][n], received.matrix)
            assert np.array_equal(samples[ds.CROP_LANDMARKS][n], received.crop_landmarks)
            # ... which is the colour module's RGB of the decoded planes, warped (converting
            # only the crop's footprint changes at most a rounding step).
            for frame, stored in ((lq, samples[ds.COMPRESSED][n]), (hq, samples[ds.TARGET][n])):
                whole = yuv_to_rgb(frame.y, frame.u, frame.v, frame.colour)
                crop = cv2.warpAffine(whole, received.matrix, (256, 256), flags=cv2.INTER_CUBIC)
                assert np.abs(crop.astype(int) - stored).max() <= 1
    assert len(wanted) == 7


@pytest.mark.slow
def test_both_reference_modes_come_from_the_same_keyframe(built: Path) -> None:
    samples = _samples(built, "eamm_MEAD_fear")
    frame, key = samples[ds.FRAME_INDEX], samples[ds.KEY_INDEX]
    hq, stream = samples[ds.REFERENCE_HQ], samples[ds.REFERENCE_STREAM]
    target, compressed = samples[ds.TARGET], samples[ds.COMPRESSED]
    assert set(key) <= {0, 25} and (key <= frame).all()
    on_key = np.flatnonzero(frame == key)
    assert list(frame[on_key]) == [25]
    i = int(on_key[0])
    # The keyframe warped onto its own landmarks is its own crop: the original's for hq,
    # the decoded one for stream.
    assert np.array_equal(hq[i], target[i]) and np.array_equal(stream[i], compressed[i])
    assert np.abs(compressed[i].astype(float) - target[i]).mean() > 1.0
    others = frame != key
    stream_error = np.abs(stream[others].astype(float) - target[others]).mean()
    hq_error = np.abs(hq[others].astype(float) - target[others]).mean()
    assert stream_error > hq_error


@pytest.mark.slow
def test_each_sample_records_its_frames_quantiser_and_the_strength_fits_on_them(built: Path) -> None:
    from kfgan_daemon.media.quantiser import probe_quantiser
    from kfgan_daemon.model.quantiser_strength import StrengthFit
    from kfgan_daemon.restore import CropGenerator
    from kfgan_daemon.train.quantiser_strength import fit_quantiser_strength
    from tests.test_quantiser_strength import STRENGTH, AddsOne

    expected = StrengthFit()
    for video in ("eamm_MEAD_fear", "eamm_MEAD_surprised"):
        samples = _samples(built, video)
        profile = probe_quantiser(built / "encoded" / ds.encoded_file_name(video, 42), max_frames=FRAMES)
        assert profile is not None
        recorded = samples[ds.QUANTISER]
        assert np.allclose(recorded, np.float32(profile.frame_qps)[samples[ds.FRAME_INDEX]])
        for quantiser, compressed, target in zip(recorded, samples[ds.COMPRESSED], samples[ds.TARGET]):
            expected.add(float(quantiser), np.ones(compressed.shape), target - compressed.astype(np.float32))
    # A generator that adds one level everywhere: its gain in a bin is the bin's mean error.
    fitted, report = fit_quantiser_strength(built, CropGenerator(AddsOne()), "train")
    want, crops = expected.result()
    assert report.crops == crops and report.files == 2 and report.split == "train"
    assert np.allclose(fitted.quantisers, want.quantisers) and np.allclose(fitted.gains, want.gains, atol=1e-3)
    # A model that already carries a strength is fitted at its full correction all the same.
    refitted, _ = fit_quantiser_strength(built, CropGenerator(AddsOne(), quantiser_strength=STRENGTH), "train")
    assert np.allclose(refitted.gains, fitted.gains)


@pytest.mark.slow
def test_fit_strength_stores_the_fit_in_the_model_file(built: Path, tmp_path: Path) -> None:
    import torch
    from typer.testing import CliRunner

    from kfgan_daemon.cli import app
    from kfgan_daemon.model import LiteGenerator, read_checkpoint, save_safetensors

    config = tmp_path / "fit.toml"
    config.write_text(f'[data]\ndir = "{built}"\n')
    untrained = save_safetensors(LiteGenerator(), tmp_path / "untrained.safetensors", "lite")
    idle = CliRunner().invoke(app, ["fit-strength", "--config", str(config), "--model", str(untrained)])
    assert idle.exit_code != 0 and "corrected none of the crops" in str(idle.exception)
    generator = LiteGenerator()
    torch.nn.init.normal_(generator.tail.weight, std=0.01)
    model = save_safetensors(generator, tmp_path / "model.safetensors", "lite")
    result = CliRunner().invoke(app, ["fit-strength", "--config", str(config), "--model", str(model)])
    assert result.exit_code == 0, result.output
    assert "from 1 validation files" in result.output
    strength = read_checkpoint(model).quantiser_strength
    assert strength is not None and len(strength.gains) >= 1 and np.all(np.diff(strength.gains) >= 0)
    refused = CliRunner().invoke(app, ["fit-strength", "--config", str(config), "--model", str(model), "--split", "test"])
    # the held-out persons are not a choice: refused before anything loads
    assert refused.exit_code == 2 and "Invalid value for '--split'" in refused.output


@pytest.mark.slow
def test_sample_set_draws_each_mode_and_clean_keyframes(built: Path) -> None:
    from kfgan_daemon.train.samples import SampleSet

    both = SampleSet(built, "train", ("hq", "stream"), exclude_self_reference=True, clean_keyframes=True)
    rows = 14  # two videos, 7 samples each, one of them on an I-frame
    assert both.modes.count("stream") == rows and both.modes.count("hq") == rows - 2 and both.modes.count("clean") == 2
    assert set(both.videos) == {"eamm_MEAD_fear", "eamm_MEAD_surprised"}
    clean = both.modes.index("clean")
    compressed, reference, _, target = both.images(clean)
    assert np.array_equal(compressed, target) and np.array_equal(reference, target)
    stream_only = SampleSet(built, "validation", ("stream",))
    assert set(stream_only.modes) == {"stream"} and set(stream_only.videos) == {"dpe_s"}


@pytest.mark.slow
def test_an_interrupted_build_keeps_finished_files(clips: Path, built: Path, tmp_path: Path) -> None:
    out = tmp_path / "again"
    shutil.copytree(built, out)
    before = (out / "dpe_s_crf42.npz").stat().st_mtime_ns
    ds.build_dataset(clips, out, OPTIONS, progress=False)
    assert (out / "dpe_s_crf42.npz").stat().st_mtime_ns == before


@pytest.mark.slow
def test_adding_the_hq_sender_keeps_the_plain_files_and_adds_fine_keyframes(
    clips: Path, built: Path, tmp_path: Path
) -> None:
    from dataclasses import replace

    out = tmp_path / "senders"
    shutil.copytree(built, out)
    before = (out / "dpe_s_crf42.npz").stat().st_mtime_ns
    manifest = ds.build_dataset(clips, out, replace(OPTIONS, senders=("stream", "hq")), progress=False)
    assert (out / "dpe_s_crf42.npz").stat().st_mtime_ns == before
    assert manifest.files["dpe_s_crf42.npz"]["sender"] == "stream"
    assert manifest.files["dpe_s_crf42_hq.npz"]["sender"] == "hq"
    assert len(manifest.files) == 6

    def keyframe_error(name: str) -> float:
        with np.load(out / name) as arrays:
            on_key = arrays[ds.FRAME_INDEX] == arrays[ds.KEY_INDEX]
            stream, target = arrays[ds.REFERENCE_STREAM][on_key], arrays[ds.TARGET][on_key]
        assert len(stream) == 1
        return float(np.abs(stream.astype(float) - target).mean())

    # The hq sender's decoded I-frame is far closer to the original than the plain sender's.
    plain, fine = keyframe_error("eamm_MEAD_fear_crf42.npz"), keyframe_error("eamm_MEAD_fear_crf42_hq.npz")
    assert fine < 0.6 * plain


@pytest.mark.slow
def test_kept_face_tracks_are_replayed_without_a_tracker(
    clips: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    from kfgan_daemon.restore import face_pipeline

    tracks = tmp_path / "tracks"
    first = ds.build_dataset(clips, tmp_path / "first", OPTIONS, progress=False, tracks_dir=tracks)
    assert sorted(p.name for p in tracks.iterdir()) == sorted(
        name.replace(".npz", ds.TRACKS_SUFFIX) for name in first.files
    )
    assert {info["tracks"] for info in first.files.values()} == {"tracked"}

    class NoTracker:
        def __init__(self, *args, **kwargs) -> None:
            raise AssertionError("a face was tracked although its tracks were kept")

    class NoDescriber:
        def __init__(self, *args, **kwargs) -> None:
            raise AssertionError("a face was described although its descriptors were kept")

    monkeypatch.setattr(face_pipeline, "FaceTracker", NoTracker)
    monkeypatch.setattr(ds, "FaceDescriber", NoDescriber)
    second = ds.build_dataset(clips, tmp_path / "second", OPTIONS, progress=False, tracks_dir=tracks)
    assert {info["tracks"] for info in second.files.values()} == {"replayed"}
    # What follows from the tracks comes out as the tracking build made it; the compressed
    # crops are each build's own encode, which x264 does not always repeat bit for bit.
    tracked = (ds.TARGET, ds.REFERENCE_HQ, ds.CROP_LANDMARKS, ds.FRAME_LANDMARKS, ds.MATRIX, ds.FRAME_INDEX, ds.KEY_INDEX)
    for name in first.files:
        with np.load(tmp_path / "first" / name) as made, np.load(tmp_path / "second" / name) as replayed:
            for key in tracked:
                assert np.array_equal(made[key], replayed[key]), (name, key)
    # Tracks of another encode are not replayed: this build must track, and cannot.
    with pytest.raises(AssertionError, match="tracked although"):
        ds.build_dataset(clips, tmp_path / "third", replace(OPTIONS, preset="fast"), progress=False, tracks_dir=tracks)


def test_the_build_command_refuses_a_config_without_held_out_persons(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from kfgan_daemon.cli import app

    config = tmp_path / "no-split.toml"
    config.write_text(f'[dataset]\nvideos = "{tmp_path}"\nvalidation = ["a"]\n\n[data]\ndir = "{tmp_path / "out"}"\n')
    result = CliRunner().invoke(app, ["dataset", "build", "--config", str(config)])
    assert isinstance(result.exception, ConfigError) and "dataset.test" in str(result.exception)
    assert not (tmp_path / "out").exists()
