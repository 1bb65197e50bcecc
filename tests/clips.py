"""Small synthetic and real clips made by the tests themselves (nothing from ../shared is committed)."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from kfgan_daemon.media import FileSource
from kfgan_daemon.media.colour import ColourSpace
from kfgan_daemon.media.frame import DecodedFrame


def synthetic_picture(index: int, width: int, height: int) -> np.ndarray:
    """A moving gradient with a bright square: texture for the encoder, no face for the detector."""
    y, x = np.mgrid[0:height, 0:width]
    base = ((x + 3 * index) % 256).astype(np.uint8)
    image = np.stack([base, ((y + index) % 256).astype(np.uint8), np.full_like(base, 96)], axis=-1)
    top = (5 * index) % max(1, height - 32)
    image[top : top + 32, 16:48] = 240
    return image


def write_synthetic_clip(
    path: Path,
    frames: int = 30,
    width: int = 160,
    height: int = 128,
    fps: int = 25,
    gop: int = 10,
    audio: bool = False,
) -> Path:
    """H.264 clip with I-frames exactly every ``gop`` frames (scene-cut detection off), optional AAC audio."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "bf": "0", "crf": "20"}
        sound = None
        if audio:
            sound = container.add_stream("aac", rate=48000)
            sound.layout = "mono"
        for i in range(frames):
            frame = DecodedFrame.from_rgb(synthetic_picture(i, width, height), ColourSpace("bt601")).to_av()
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if sound is not None:
            samples_per_frame = 1024
            total = int(48000 * frames / fps)
            t = np.arange(total) / 48000.0
            tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            for start in range(0, total, samples_per_frame):
                chunk = tone[start : start + samples_per_frame]
                if len(chunk) < samples_per_frame:
                    break
                aframe = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
                aframe.sample_rate = 48000
                aframe.pts = start
                container.mux(sound.encode(aframe))
            container.mux(sound.encode(None))
    return path


def read_all_frames(path: Path) -> list[np.ndarray]:
    """The decoded luma (Y) planes of every frame."""
    with FileSource(path) as source:
        return [frame.luma for frame in source]
