"""Labelled panels side by side in YUV planes, and the snapshot with the face magnified."""
from __future__ import annotations

import numpy as np
import pytest

from kfgan_daemon.eval.panels import Panel, caption_height, join_panels, magnification, magnified, snapshot_picture
from kfgan_daemon.media.colour import ColourSpace
from kfgan_daemon.media.frame import DecodedFrame

W, H = 96, 64


def _frame(seed: int, full_range: bool = False) -> DecodedFrame:
    rng = np.random.default_rng(seed)
    planes = [rng.integers(40, 200, shape, dtype=np.uint8) for shape in ((H, W), (H // 2, W // 2), (H // 2, W // 2))]
    return DecodedFrame(*planes, colour=ColourSpace("bt601", full_range=full_range), pts=7 + seed)


def test_panels_sit_under_a_caption_bar_with_their_pixels_untouched() -> None:
    frames = [_frame(i) for i in range(3)]
    joined = join_panels([Panel(f, f"panel {i}", "face PSNR 31.00 dB") for i, f in enumerate(frames)], timing=frames[2])
    bar = caption_height(H)
    assert (joined.width, joined.height) == (3 * W, H + bar) and bar % 2 == 0
    assert joined.pts == frames[2].pts
    for index, frame in enumerate(frames):
        columns = slice(index * W, (index + 1) * W)
        np.testing.assert_array_equal(joined.y[bar:, columns], frame.y)
        np.testing.assert_array_equal(joined.u[bar // 2 :, index * W // 2 : (index + 1) * W // 2], frame.u)
        # Limited-range black with white text on both lines, grey (neutral) chroma under it.
        caption = joined.y[:bar, columns]
        assert np.median(caption) == 16 and caption[: bar // 2].max() > 200 and caption[bar // 2 :].max() > 200
    assert np.all(joined.u[: bar // 2] == 128) and np.all(joined.v[: bar // 2] == 128)


def test_a_panel_without_figures_has_an_empty_second_line() -> None:
    joined = join_panels([Panel(_frame(0, full_range=True), "restored")], timing=_frame(0, full_range=True))
    bar = caption_height(H)
    assert joined.y[: bar // 2].max() > 200 and joined.y[bar // 2 : bar].max() == 0


def test_panels_of_different_sizes_are_refused() -> None:
    small = DecodedFrame(np.zeros((32, 32), np.uint8), np.zeros((16, 16), np.uint8), np.zeros((16, 16), np.uint8),
                         colour=ColourSpace("bt601"))
    with pytest.raises(ValueError, match="different sizes"):
        join_panels([Panel(_frame(0), "a"), Panel(small, "b")], timing=small)


def test_magnified_repeats_each_pixel_around_the_face() -> None:
    frame = _frame(3)
    box = (40, 20, 56, 36)  # 16 x 16 around (48, 28)
    zoom = magnification(box, W, H)
    assert zoom == 4  # the box fits 4 times in the panel's height
    closer = magnified(frame, box, zoom, (W, H))
    assert (closer.width, closer.height) == (W, H)
    # A 24 x 16 region centred on the box, every pixel a 4 x 4 block.
    region = frame.y[20:36, 36:60]
    np.testing.assert_array_equal(closer.y, np.repeat(np.repeat(region, 4, axis=0), 4, axis=1))
    np.testing.assert_array_equal(closer.u, np.repeat(np.repeat(frame.u[10:18, 18:30], 4, axis=0), 4, axis=1))


def test_a_face_at_the_edge_keeps_the_region_inside_the_frame() -> None:
    frame = _frame(4)
    closer = magnified(frame, (0, 0, 8, 8), 2, (W, H))
    np.testing.assert_array_equal(closer.y, np.repeat(np.repeat(frame.y[:32, :48], 2, axis=0), 2, axis=1))


def test_snapshot_has_a_magnified_row_only_with_a_face() -> None:
    panels = [Panel(_frame(i), name) for i, name in enumerate(("received", "restored"))]
    bar = caption_height(H)
    assert snapshot_picture(panels, None).shape == (H + bar, 2 * W, 3)
    picture = snapshot_picture(panels, (40, 20, 56, 36))
    assert picture.shape == (2 * (H + bar), 2 * W, 3) and picture.dtype == np.uint8
    # Half as wide: the upper row is scaled, the magnified one is cut at the smaller size.
    half = snapshot_picture(panels, (40, 20, 56, 36), width=W // 2)
    assert half.shape == (2 * (H // 2 + caption_height(H // 2)), W, 3)


def test_a_scaled_snapshot_shows_a_large_face_in_its_own_pixels() -> None:
    frame = _frame(5)
    # A face too large to fit the half-size panel even once: shown at its own size, twice the row above.
    picture = snapshot_picture([Panel(frame, "restored")], (8, 8, 88, 56), width=W // 2)
    bar = caption_height(H // 2)
    lower = picture[2 * bar + H // 2 :]
    # The 48 x 32 region centred on the face (48, 32), pixel for pixel.
    np.testing.assert_array_equal(lower, frame.rgb()[16:48, 24:72])
