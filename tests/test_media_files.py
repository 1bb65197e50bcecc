"""FileSource, FileSink, encode_h264_file: I-frame tagging, timing, audio, temp files, damaged inputs."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from kfgan_daemon.errors import InputError, NoVideoStreamError, OutputError
from kfgan_daemon.media import DecodedFrame, FileSink, FileSource, encode_h264_file
from kfgan_daemon.media.colour import ColourSpace

WIDTH, HEIGHT = 96, 64


def rgb_frame(image: np.ndarray, pts: int | None, time_base: Fraction | None, is_keyframe: bool, index: int) -> DecodedFrame:
    return DecodedFrame.from_rgb(
        image, ColourSpace("bt601"), pts=pts, time_base=time_base, is_keyframe=is_keyframe, index=index
    )


def picture(index: int, width: int = WIDTH, height: int = HEIGHT, scene: int = 0) -> np.ndarray:
    """Moving texture with grain (so every frame costs bits); ``scene`` switches to an unrelated picture."""
    y, x = np.mgrid[0:height, 0:width]
    if scene == 0:
        image = np.stack([(x * 2 + index * 3) % 200, (y * 3) % 200, np.full_like(x, 80)], axis=-1)
    else:
        image = np.stack([np.full_like(x, 200), (x * y + 7 * index) % 200, (y * 9) % 200], axis=-1)
    grain = np.random.default_rng(index).integers(0, 32, image.shape)
    return (image + grain).astype(np.uint8)


def write_clip(
    path: Path,
    frames: int = 30,
    fps: int = 25,
    options: dict[str, str] | None = None,
    audio: str | None = None,
    scene_cut_at: int | None = None,
    container_options: dict[str, str] | None = None,
) -> Path:
    """A libx264 clip made with PyAV alone (independent of the code under test)."""
    with av.open(str(path), "w", options=container_options or {}) as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        video.options = options or {}
        sound = None
        if audio is not None:
            sound = container.add_stream(audio, rate=48000)
            sound.layout = "mono"
        for i in range(frames):
            scene = int(scene_cut_at is not None and i >= scene_cut_at)
            frame = DecodedFrame.from_rgb(picture(i, scene=scene), ColourSpace("bt601")).to_av()
            frame.pts, frame.time_base = i, Fraction(1, fps)
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if sound is not None:
            chunk = 1024
            total = 48000 * frames // fps
            tone = (8000 * np.sin(np.arange(total) * 2 * np.pi * 440 / 48000)).astype(np.int16)
            for start in range(0, total - chunk + 1, chunk):
                samples = tone[start : start + chunk][None, :]
                aframe = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
                aframe.sample_rate, aframe.pts = 48000, start
                container.mux(sound.encode(aframe))
            container.mux(sound.encode(None))
    return path


FIXED_GOP = {"g": "10", "keyint_min": "10", "sc_threshold": "0", "bf": "2"}


def decoder_view(path: Path) -> list[tuple[int, bool]]:
    """(picture type, key_frame) of every frame, read by plain PyAV."""
    with av.open(str(path)) as container:
        return [(int(f.pict_type), bool(f.key_frame)) for f in container.decode(video=0)]


# -- I-frame tagging ------------------------------------------------------------------


def test_iframes_follow_the_encoders_gop(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "gop.mp4", frames=35, options=FIXED_GOP)
    with FileSource(clip) as source:
        frames = list(source)
    assert [f.index for f in frames] == list(range(35))
    assert [f.index for f in frames if f.is_keyframe] == [0, 10, 20, 30]
    assert all(f.y.shape == (HEIGHT, WIDTH) and f.u.shape == f.v.shape == (HEIGHT // 2, WIDTH // 2) for f in frames)
    assert all(f.y.dtype == np.uint8 and f.colour == ColourSpace("bt601") for f in frames)


def test_scene_cut_makes_a_non_idr_iframe_that_is_tagged(tmp_path: Path) -> None:
    # A scene cut within min-keyint of the last IDR makes x264 emit a plain I picture.
    clip = write_clip(
        tmp_path / "cut.mp4",
        frames=40,
        options={"x264-params": "keyint=250:min-keyint=100:scenecut=40", "bf": "0"},
        scene_cut_at=17,
    )
    view = decoder_view(clip)
    non_idr_intra = [i for i, (kind, key) in enumerate(view) if kind == int(av.video.frame.PictureType.I) and not key]
    assert non_idr_intra, f"x264 made no non-IDR I frame: {view}"
    with FileSource(clip) as source:
        tagged = [f.index for f in source if f.is_keyframe]
    assert tagged == [0, *non_idr_intra]


def test_source_properties(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "p.mp4", frames=20, fps=30, audio="aac")
    with FileSource(clip) as source:
        assert (source.width, source.height) == (WIDTH, HEIGHT)
        assert source.frame_rate == Fraction(30)
        assert source.frame_count == 20
        assert source.has_audio
        assert source.duration == pytest.approx(20 / 30, abs=0.05)
        assert isinstance(source.time_base, Fraction)
        first = next(iter(source))
        assert first.time_base == source.time_base and first.pts == 0 and first.is_keyframe


# -- FileSink -------------------------------------------------------------------------


def audio_packets(path: Path) -> list[tuple[int, bytes]]:
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        return [(float(p.pts * p.time_base), bytes(p)) for p in container.demux(stream) if p.size]


def test_sink_keeps_count_size_rate_timestamps_and_copies_audio(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "in.mp4", frames=30, fps=30, audio="aac")
    out = tmp_path / "out.mp4"
    with FileSource(clip) as source:
        times_in = []
        with FileSink.like(source, out, crf=23, preset="ultrafast") as sink:
            for frame in source:
                times_in.append(frame.time)
                sink.write(frame)
    with FileSource(out) as result:
        assert (result.width, result.height, result.frame_rate) == (WIDTH, HEIGHT, Fraction(30))
        assert result.frame_count == 30
        times_out = [f.time for f in result]
    assert times_out == pytest.approx(times_in, abs=1e-6)
    assert audio_packets(out) == audio_packets(clip)
    with av.open(str(out)) as container:
        order = [p.stream.type for p in container.demux() if p.size]
    first_audio, last_video = order.index("audio"), len(order) - 1 - order[::-1].index("video")
    assert first_audio < last_video, "audio is interleaved with the video, not appended"
    assert list(tmp_path.glob(".*partial*")) == []


def test_sink_copies_pcm_audio_into_matroska(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "in.mkv", frames=15, audio="pcm_s16le")
    out = tmp_path / "out.mkv"
    with FileSource(clip) as source, FileSink.like(source, out, preset="ultrafast") as sink:
        for frame in source:
            sink.write(frame)
    with av.open(str(out)) as container:
        assert container.streams.audio[0].codec_context.name == "pcm_s16le"
    assert audio_packets(out) == audio_packets(clip)


def test_sink_bitrate_gop_and_untimed_frames(tmp_path: Path) -> None:
    out = tmp_path / "rate.mp4"
    with FileSink(out, WIDTH, HEIGHT, Fraction(25), bitrate=200_000, gop=5, preset="ultrafast",
                  x264_options={"keyint_min": "5", "sc_threshold": "0"}) as sink:
        for i in range(12):
            sink.write(rgb_frame(picture(i), pts=None, time_base=None, is_keyframe=False, index=i))
    with FileSource(out) as source:
        frames = list(source)
    assert [f.index for f in frames if f.is_keyframe] == [0, 5, 10]
    assert [f.time for f in frames] == pytest.approx([i / 25 for i in range(12)])


def test_sink_failure_in_caller_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "never.mp4"
    with pytest.raises(RuntimeError):
        with FileSink(out, WIDTH, HEIGHT, 25, preset="ultrafast") as sink:
            sink.write(rgb_frame(picture(0), 0, Fraction(1, 25), True, 0))
            raise RuntimeError("restoration crashed")
    assert list(tmp_path.iterdir()) == []


def test_sink_own_failure_raises_output_error_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "bad.mp4"
    with pytest.raises(OutputError, match="frame is 32x32"):
        with FileSink(out, WIDTH, HEIGHT, 25, preset="ultrafast") as sink:
            sink.write(rgb_frame(picture(0), 0, Fraction(1, 25), True, 0))
            sink.write(rgb_frame(np.zeros((32, 32, 3), np.uint8), 1, Fraction(1, 25), False, 1))
    assert list(tmp_path.iterdir()) == []


def test_sink_replaces_an_existing_file_only_on_success(tmp_path: Path) -> None:
    out = tmp_path / "keep.mp4"
    out.write_bytes(b"previous result")
    with pytest.raises(RuntimeError):
        with FileSink(out, WIDTH, HEIGHT, 25, preset="ultrafast"):
            raise RuntimeError("stop")
    assert out.read_bytes() == b"previous result"


@pytest.mark.parametrize(
    ("path_name", "size", "message"),
    [
        ("missing/out.mp4", (WIDTH, HEIGHT), "does not exist"),
        ("out.unknownext", (WIDTH, HEIGHT), "cannot create"),
        ("odd.mp4", (WIDTH + 1, HEIGHT), "even"),
    ],
)
def test_sink_open_errors(tmp_path: Path, path_name: str, size: tuple[int, int], message: str) -> None:
    with pytest.raises(OutputError, match=message):
        FileSink(tmp_path / path_name, *size, 25)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("full_range", [False, True])
def test_sink_keeps_the_planes_and_every_colour_tag(tmp_path: Path, full_range: bool) -> None:
    clip = tmp_path / "709.mp4"
    with av.open(str(clip), "w") as container:
        video = container.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        video.codec_context.colorspace = 1
        video.codec_context.color_primaries = 1
        video.codec_context.color_trc = 1
        video.codec_context.color_range = 2 if full_range else 1
        video.options = {"crf": "10"}
        space = ColourSpace("bt709", full_range)
        for i in range(3):
            frame = DecodedFrame.from_rgb(picture(i), space, pts=i).to_av()
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
    out = tmp_path / "out.mp4"
    with FileSource(clip) as source:
        assert source.colour == space
        originals = []
        with FileSink.like(source, out, qp=0, preset="ultrafast") as sink:
            for frame in source:
                originals.append(frame)
                sink.write(frame)
    with FileSource(out) as result:
        assert result.colour == space
        tags = result._stream.codec_context
        assert (tags.colorspace, tags.color_primaries, tags.color_trc) == (1, 1, 1)
        # Lossless output of untouched frames: the decoded planes come back bit for bit.
        assert all(f.same_pixels(o) for f, o in zip(result, originals))


# -- encode_h264_file -------------------------------------------------------------------


def test_encode_h264_file_gop_crf_and_max_frames(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "hq.mp4", frames=30, audio="aac", options={"crf": "12"})
    low = tmp_path / "low.mp4"
    written = encode_h264_file(clip, low, crf=42, gop=8, keyint_min=8, scenecut=False, preset="ultrafast", max_frames=20)
    assert written == 20
    with FileSource(low) as source:
        assert source.frame_count == 20 and source.has_audio
        frames = list(source)
    assert [f.index for f in frames if f.is_keyframe] == [0, 8, 16]
    assert audio_packets(low)[-1][0] <= frames[-1].time + 0.1
    assert low.stat().st_size < clip.stat().st_size


# -- damaged and unsuitable inputs ----------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        FileSource(tmp_path / "nothing.mp4")


def test_not_a_media_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\n" * 50)
    with pytest.raises(InputError, match="notes.mp4: not a readable media file"):
        FileSource(path)


def test_no_video_stream(tmp_path: Path) -> None:
    path = tmp_path / "voice.m4a"
    with av.open(str(path), "w") as container:
        sound = container.add_stream("aac", rate=48000)
        sound.layout = "mono"
        for start in range(0, 48000, 1024):
            aframe = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.int16), format="s16", layout="mono")
            aframe.sample_rate, aframe.pts = 48000, start
            container.mux(sound.encode(aframe))
        container.mux(sound.encode(None))
    with pytest.raises(NoVideoStreamError, match="no video stream"):
        FileSource(path)


def test_cover_art_is_not_a_video_stream(tmp_path: Path) -> None:
    path = tmp_path / "song.mp4"
    with av.open(str(path), "w") as container:
        sound = container.add_stream("aac", rate=48000)
        sound.layout = "mono"
        cover = container.add_stream("mjpeg", rate=1)
        cover.width, cover.height, cover.pix_fmt = 64, 64, "yuvj420p"
        cover.disposition = av.stream.Disposition.attached_pic
        art = DecodedFrame.from_rgb(np.zeros((64, 64, 3), np.uint8), ColourSpace("bt601")).to_av().reformat(format="yuvj420p")
        art.pts = 0
        container.mux(cover.encode(art))
        container.mux(cover.encode(None))
        for start in range(0, 48000, 1024):
            aframe = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.int16), format="s16", layout="mono")
            aframe.sample_rate, aframe.pts = 48000, start
            container.mux(sound.encode(aframe))
        container.mux(sound.encode(None))
    with pytest.raises(NoVideoStreamError, match="cover picture"):
        FileSource(path)


def truncate(path: Path, fraction: float) -> Path:
    data = path.read_bytes()
    cut = path.with_name("cut-" + path.name)
    cut.write_bytes(data[: int(len(data) * fraction)])
    return cut


def test_truncated_mp4_without_index(tmp_path: Path) -> None:
    # A plain MP4 keeps its index at the end: cut short, it cannot be opened at all.
    cut = truncate(write_clip(tmp_path / "plain.mp4", frames=30), 0.6)
    with pytest.raises(InputError, match="cut-plain.mp4"):
        FileSource(cut)


@pytest.mark.parametrize(("name", "container_options"), [("fast.mp4", {"movflags": "+faststart"}), ("clip.mkv", {})])
def test_truncated_file_yields_good_frames_then_raises(tmp_path: Path, name: str, container_options: dict) -> None:
    cut = truncate(write_clip(tmp_path / name, frames=40, options=FIXED_GOP, container_options=container_options), 0.55)
    yielded = []
    with FileSource(cut) as source, pytest.raises(InputError, match="truncated") as caught:
        for frame in source:
            yielded.append(frame.index)
    assert 0 < len(yielded) < 40
    assert str(cut) in str(caught.value) and "\n" not in str(caught.value)


def test_truncated_file_tolerated_when_not_strict(tmp_path: Path) -> None:
    cut = truncate(write_clip(tmp_path / "t.mkv", frames=40), 0.55)
    with FileSource(cut, strict=False) as source:
        count = sum(1 for _ in source)
        assert source.truncated and not source.complete
        assert any("truncated" in error for error in source.errors)
    assert 0 < count < 40


@pytest.mark.parametrize("name", ["c.mkv", "c.mp4"])
def test_corrupt_file_raises_after_the_good_frames(tmp_path: Path, name: str) -> None:
    clip = write_clip(tmp_path / name, frames=40, options=FIXED_GOP)
    with av.open(str(clip)) as container:
        damaged = [packet for packet in container.demux(video=0) if packet.size][20]
        position, size = damaged.pos, damaged.size
    data = bytearray(clip.read_bytes())
    data[position + 8 : position + size - 8] = np.random.default_rng(3).integers(0, 256, size - 16, np.uint8).tobytes()
    clip.write_bytes(bytes(data))
    yielded = 0
    with FileSource(clip) as source, pytest.raises(InputError, match="corrupt"):
        for _ in source:
            yielded += 1
    assert 0 < yielded < 40
    with FileSource(clip, strict=False) as source:
        assert sum(1 for _ in source) > yielded
        assert source.errors and not source.complete


def test_complete_file_reports_complete(tmp_path: Path) -> None:
    with FileSource(write_clip(tmp_path / "ok.mkv", frames=12)) as source:
        assert sum(1 for _ in source) == 12
        assert source.complete and source.errors == [] and not source.truncated


def test_source_is_iterated_once(tmp_path: Path) -> None:
    with FileSource(write_clip(tmp_path / "once.mp4", frames=3)) as source:
        list(source)
        with pytest.raises(RuntimeError, match="iterated once"):
            list(source)


@pytest.mark.shared
def test_real_clip_compressed_to_crf42_keeps_timing_colour_and_audio(media_dir: Path, tmp_path: Path) -> None:
    clip = media_dir / "d10.mp4"  # 512x512, 30 fps, BT.709, with audio
    low = tmp_path / "d10-crf42.mp4"
    written = encode_h264_file(clip, low, crf=42, gop=30, keyint_min=30, scenecut=False, preset="veryfast", max_frames=90)
    with FileSource(clip) as original, FileSource(low) as degraded:
        assert written == 90 == degraded.frame_count
        assert (degraded.width, degraded.height, degraded.frame_rate) == (original.width, original.height, original.frame_rate)
        assert degraded.colour == original.colour == ColourSpace("bt709")
        assert degraded.has_audio
        pairs = list(zip(original, degraded))
    assert [d.index for _, d in pairs if d.is_keyframe] == [0, 30, 60]
    assert all(o.time == pytest.approx(d.time, abs=1e-6) for o, d in pairs)
    error = np.mean([np.abs(o.y.astype(int) - d.y).mean() for o, d in pairs])
    assert 1 < error < 12  # visibly degraded, still the same pictures
