"""Colour conversions: exact to within rounding, both ways, for BT.601/BT.709, limited and full range."""
from __future__ import annotations

import itertools
from pathlib import Path

import cv2
import numpy as np
import pytest

from kfgan_daemon.media import FileSource
from kfgan_daemon.media.colour import (
    ColourSpace,
    blend_region,
    chroma_box,
    convert_planes,
    even_box,
    region_to_rgb,
    rgb_to_yuv,
    yuv_to_rgb,
)
from kfgan_daemon.media.frame import DecodedFrame

SPACES = [ColourSpace(matrix, full) for matrix, full in itertools.product(("bt601", "bt709"), (False, True))]
IDS = [f"{s.matrix}-{'full' if s.full_range else 'limited'}" for s in SPACES]


def reference_rgb(y: np.ndarray, u: np.ndarray, v: np.ndarray, space: ColourSpace) -> np.ndarray:
    """Unrounded, unclipped RGB from the standards' equations, written independently of the module."""
    kr, kb = {"bt601": (0.299, 0.114), "bt709": (0.2126, 0.0722)}[space.matrix]
    kg = 1 - kr - kb
    up = lambda plane: np.repeat(np.repeat(plane, 2, 0), 2, 1)[: y.shape[0], : y.shape[1]].astype(float)  # noqa: E731
    if space.full_range:
        luma, pb, pr = y / 255.0, (up(u) - 128) / 255.0, (up(v) - 128) / 255.0
    else:
        luma, pb, pr = (y - 16.0) / 219.0, (up(u) - 128) / 224.0, (up(v) - 128) / 224.0
    r = luma + 2 * (1 - kr) * pr
    b = luma + 2 * (1 - kb) * pb
    g = (luma - kr * r - kb * b) / kg
    return np.stack([r, g, b], axis=-1) * 255.0


def smooth_rgb(height: int, width: int, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return cv2.GaussianBlur(noise, (0, 0), 2.0)


def assert_exact_to_rounding(before: tuple[np.ndarray, ...], after: tuple[np.ndarray, ...], where=None) -> None:
    for name, a, b in zip("YUV", before, after):
        difference = b.astype(np.int16) - a
        if where is not None:
            difference = difference[where[name]]
        assert abs(difference.mean()) <= 0.05, f"{name}: signed mean {difference.mean():.4f}"
        assert np.abs(difference).max() <= 1, f"{name}: max {np.abs(difference).max()}"


@pytest.mark.parametrize("space", SPACES, ids=IDS)
def test_yuv_to_rgb_follows_the_standard_equations(space: ColourSpace) -> None:
    y, u, v = rgb_to_yuv(smooth_rgb(64, 96, 1), space)
    expected = np.clip(reference_rgb(y, u, v, space), 0, 255)
    difference = yuv_to_rgb(y, u, v, space).astype(float) - expected
    # Rounding to nearest: never more than half a level from the exact value.
    assert np.abs(difference).max() <= 0.5 + 1e-3


@pytest.mark.parametrize("space", SPACES, ids=IDS)
@pytest.mark.parametrize("size", [(96, 128), (45, 63)], ids=["even", "odd"])
def test_yuv_rgb_yuv_round_trip_is_exact_to_rounding(space: ColourSpace, size: tuple[int, int]) -> None:
    planes = rgb_to_yuv(smooth_rgb(*size, seed=2), space)  # in gamut by construction
    assert_exact_to_rounding(planes, rgb_to_yuv(yuv_to_rgb(*planes, space), space))


@pytest.mark.parametrize("space", SPACES, ids=IDS)
def test_rgb_yuv_rgb_round_trip_has_no_bias(space: ColourSpace) -> None:
    # Flat 2x2 blocks: chroma subsampling loses nothing, so only rounding remains.
    blocks = smooth_rgb(32, 48, seed=3)
    rgb = np.repeat(np.repeat(blocks, 2, 0), 2, 1)
    back = yuv_to_rgb(*rgb_to_yuv(rgb, space), space).astype(np.int16) - rgb
    assert abs(back.mean()) <= 0.05
    assert np.abs(back).max() <= (3 if space.full_range else 2)


def test_the_old_swscale_bias_is_gone() -> None:
    """The issue's symptom: a decode/encode round trip that darkened every pixel by 1.6 levels."""
    space = ColourSpace("bt601")
    planes = rgb_to_yuv(smooth_rgb(120, 160, seed=4), space)
    for _ in range(5):
        planes = rgb_to_yuv(yuv_to_rgb(*planes, space), space)
    assert_exact_to_rounding(rgb_to_yuv(smooth_rgb(120, 160, seed=4), space), planes)


@pytest.mark.shared
@pytest.mark.parametrize("clip", ["d12.mp4", "s18.mp4"])
def test_real_clip_round_trip_is_exact_to_rounding(media_dir: Path, clip: str) -> None:
    with FileSource(media_dir / clip) as source:
        frame = next(iter(source))
    space = frame.colour
    # Real decoded pictures hold a few samples outside the RGB cube; judge the in-gamut 2x2 blocks.
    exact = reference_rgb(*frame.planes, space)
    inside = ((exact >= 0) & (exact <= 255)).all(axis=2)
    chroma_inside = inside.reshape(frame.height // 2, 2, frame.width // 2, 2).all(axis=(1, 3))
    luma_inside = np.repeat(np.repeat(chroma_inside, 2, 0), 2, 1)[: frame.height, : frame.width]
    assert luma_inside.mean() > 0.9
    after = rgb_to_yuv(frame.rgb(), space)
    assert_exact_to_rounding(frame.planes, after, where={"Y": luma_inside, "U": chroma_inside, "V": chroma_inside})


def test_colour_space_of_tags_and_untagged_conventions() -> None:
    import av

    picture = av.VideoFrame(64, 48, "yuv420p")
    assert ColourSpace.of(picture) == ColourSpace("bt601", False)
    hd = av.VideoFrame(1280, 720, "yuv420p")
    assert ColourSpace.of(hd) == ColourSpace("bt709", False)
    assert ColourSpace.of(av.VideoFrame(64, 48, "yuvj420p")).full_range
    tagged = av.VideoFrame(64, 48, "yuv420p")
    ColourSpace("bt709", True, primaries=9, transfer=14).tag(tagged)
    space = ColourSpace.of(tagged)
    assert space == ColourSpace("bt709", True) and (space.primaries, space.transfer) == (9, 14)
    # A picture without its own tags takes the stream's.
    assert ColourSpace.of(av.VideoFrame(1280, 720, "yuv420p"), fallback=ColourSpace("bt601", True)) == ColourSpace(
        "bt601", True
    )
    with pytest.raises(ValueError, match="bt601"):
        ColourSpace("bt2020")  # type: ignore[arg-type]


def test_frame_to_av_and_back_is_bit_identical() -> None:
    for space in SPACES:
        frame = DecodedFrame.from_rgb(smooth_rgb(48, 64, seed=5), space, pts=7)
        again = DecodedFrame.from_av(frame.to_av())
        assert again.same_pixels(frame) and again.colour == space and again.pts == 7


def test_regions_convert_only_what_they_cover() -> None:
    space = ColourSpace("bt709")
    frame = DecodedFrame.from_rgb(smooth_rgb(100, 140, seed=6), space)
    box = even_box(13.4, 21.0, 77.2, 60.9, frame.width, frame.height)
    assert box == (12, 20, 78, 62) and chroma_box(box) == (6, 10, 39, 31)
    np.testing.assert_array_equal(region_to_rgb(*frame.planes, box, space), frame.rgb()[20:62, 12:78])
    assert even_box(-5, -5, 500, 500, 139, 99) == (0, 0, 139, 99)


def test_blend_with_zero_weight_is_bit_identical_and_full_weight_is_the_face() -> None:
    space = ColourSpace("bt601")
    frame = DecodedFrame.from_rgb(smooth_rgb(64, 64, seed=7), space)
    box = (8, 8, 40, 40)
    face = smooth_rgb(32, 32, seed=8)
    weight = np.zeros((32, 32), np.float32)
    weight[8:24, 8:24] = 1.0
    out = frame.copy()
    blend_region(*out.planes, box, face, weight, space)
    untouched = np.ones((64, 64), bool)
    untouched[16:32, 16:32] = False
    np.testing.assert_array_equal(out.y[untouched], frame.y[untouched])
    np.testing.assert_array_equal(out.u[untouched[::2, ::2]], frame.u[untouched[::2, ::2]])
    face_y, face_u, _ = rgb_to_yuv(face, space)
    np.testing.assert_array_equal(out.y[16:32, 16:32], face_y[8:24, 8:24])
    np.testing.assert_array_equal(out.u[8:16, 8:16], face_u[4:12, 4:12])


def test_convert_planes_between_spaces_keeps_the_picture() -> None:
    source, target = ColourSpace("bt601"), ColourSpace("bt709", True)
    rgb = smooth_rgb(48, 64, seed=9)
    converted = convert_planes(*rgb_to_yuv(rgb, source), source, target)
    difference = yuv_to_rgb(*converted, target).astype(np.int16) - yuv_to_rgb(*rgb_to_yuv(rgb, source), source)
    assert abs(difference.mean()) < 0.05 and np.abs(difference).max() <= 2
