"""Pixels the codec repeated from the previous frame keep their restoration (restore.repeats)."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kfgan_daemon.eval.flicker import FlickerMeter
from kfgan_daemon.face import FaceTracker
from kfgan_daemon.media import FileSource
from kfgan_daemon.media.colour import ColourSpace
from kfgan_daemon.media.encode import degrade_like_a_call
from kfgan_daemon.media.frame import DecodedFrame
from kfgan_daemon.restore.generator import CropGenerator
from kfgan_daemon.restore.repeats import EmittedFrame, settle_repeated_pixels
from kfgan_daemon.restore.settings import RestoreSettings
from kfgan_daemon.restore.stream import StreamRestorer

BOX = (16, 8, 48, 40)


def _planes(seed: int, index: int) -> DecodedFrame:
    rng = np.random.default_rng(seed)
    return DecodedFrame(
        y=rng.integers(40, 200, (48, 64), dtype=np.uint8),
        u=rng.integers(40, 200, (24, 32), dtype=np.uint8),
        v=rng.integers(40, 200, (24, 32), dtype=np.uint8),
        colour=ColourSpace("bt601"),
        index=index,
    )


def _brighter(frame: DecodedFrame, by: int) -> DecodedFrame:
    """``frame`` with ``by`` levels added inside BOX on every plane (what a paste would do)."""
    out = frame.copy()
    x0, y0, x1, y1 = BOX
    out.y[y0:y1, x0:x1] += by
    out.u[y0 // 2:y1 // 2, x0 // 2:x1 // 2] += by
    out.v[y0 // 2:y1 // 2, x0 // 2:x1 // 2] += by
    return out


def test_a_repeated_pixel_moves_a_quarter_of_the_way_and_nothing_else_changes() -> None:
    before = _planes(1, index=4)
    # luma repeated everywhere, chroma coded afresh
    now = replace(before, y=before.y.copy(), u=before.u + 1, v=before.v + 1, index=5)
    now.y[:, 32:] = 255 - now.y[:, 32:]  # ... except the right half
    previous = EmittedFrame(before, _brighter(before, 20))
    fresh = _brighter(now, 4)
    settled = settle_repeated_pixels(now, fresh.copy(), previous, BOX, update=0.25)
    x0, y0, x1, y1 = BOX
    # repeated and pasted: 20 + 0.25 * (4 - 20) = 16 levels above the input
    assert np.all(settled.y[y0:y1, x0:32].astype(int) - now.y[y0:y1, x0:32] == 16)
    # coded afresh: the fresh restoration as it came
    assert np.array_equal(settled.y[y0:y1, 32:x1], fresh.y[y0:y1, 32:x1])
    assert np.array_equal(settled.u, fresh.u) and np.array_equal(settled.v, fresh.v)
    # outside the box (where the paste changed nothing) bit for bit the input, repeated or not
    outside = np.ones(now.y.shape, bool)
    outside[y0:y1, x0:x1] = False
    assert np.array_equal(settled.y[outside], now.y[outside])


def test_it_applies_only_to_the_frame_right_after_and_can_be_switched_off() -> None:
    before = _planes(1, index=4)
    previous = EmittedFrame(before, _brighter(before, 20))
    for frame, update in ((replace(before, index=6), 0.25), (replace(before, index=5), 1.0)):
        fresh = _brighter(frame, 4)
        assert np.array_equal(settle_repeated_pixels(frame, fresh.copy(), previous, BOX, update).y, fresh.y)
    frame = replace(before, index=5)
    fresh = _brighter(frame, 4)
    assert np.array_equal(settle_repeated_pixels(frame, fresh.copy(), None, BOX, 0.25).y, fresh.y)


def test_a_pixel_the_paste_left_alone_stays_the_input_even_if_repeated() -> None:
    before = _planes(1, index=4)
    now = replace(before, index=5)
    previous = EmittedFrame(before, _brighter(before, 20))
    # The paste changed nothing this time: nothing may move, whatever was sent before.
    settled = settle_repeated_pixels(now, now.copy(), previous, BOX, update=0.25)
    assert settled.same_pixels(now)


class Jittery(nn.Module):
    """Restores nothing, plus fresh noise on every call: a generator at its noisiest."""

    def forward(self, compressed: torch.Tensor, reference: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        return compressed + torch.randn_like(compressed) * (2.0 / 255.0)


@pytest.mark.shared
@pytest.mark.slow
def test_repeated_pixels_take_the_shimmer_out_of_a_real_call(media_dir: Path, tmp_path: Path) -> None:
    clip = media_dir / "eamm_MEAD_fear.mp4"  # a studio talking head: much of the face is still
    received = tmp_path / "received.mp4"
    degrade_like_a_call(clip, received, 42, max_frames=30, audio=False)
    torch.manual_seed(0)
    generator = CropGenerator(Jittery())
    restorers = {update: StreamRestorer(RestoreSettings(repeat_update=update)) for update in (1.0, 0.25)}
    flicker, squared, repeated, faces = FlickerMeter(), dict.fromkeys(restorers, 0.0), [], 0
    tracker, previous = FaceTracker(), None
    with FileSource(clip) as originals, FileSource(received) as frames:
        for original, frame in zip(originals, frames):
            outputs = {update: restorer.restore(frame, generator) for update, restorer in restorers.items()}
            landmarks = tracker.update(original.luma)
            face = None
            if landmarks is not None:
                (x0, y0), (x1, y1) = landmarks.min(axis=0).astype(int), landmarks.max(axis=0).astype(int)
                face = np.zeros(frame.y.shape, bool)
                face[y0:y1, x0:x1] = True
                faces += 1
                if previous is not None:
                    repeated.append(float((frame.y == previous.y)[face].mean()))
                for update, out in outputs.items():
                    squared[update] += float(np.mean((out.y[face].astype(float) - original.y[face]) ** 2))
            previous = frame
            flicker.add(original.luma, {str(update): out.luma for update, out in outputs.items()}, face)
    # At CRF 42 the codec repeats much of a still face, which is what the settling works on.
    assert np.mean(repeated) > 0.5
    steady, fresh = flicker.flicker("0.25"), flicker.flicker("1.0")
    assert steady is not None and fresh is not None and steady < 0.9 * fresh
    # Averaging the noise over repeated frames also brings the face nearer the original.
    psnr = {update: 10 * math.log10(255**2 / (total / faces)) for update, total in squared.items()}
    assert psnr[0.25] > psnr[1.0]
