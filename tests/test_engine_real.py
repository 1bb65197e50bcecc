"""The engine on the real StreamRestorer and a real generator module: real faces when ../shared is present."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from clips import write_synthetic_clip
from engine_support import collect
from kfgan_daemon.engine import EngineSettings, Outcome, StreamEngine
from kfgan_daemon.media import FileSource, encode_h264_file
from kfgan_daemon.restore import CropGenerator, RestoreSettings, StreamRestorer

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_MODEL = ROOT / "models" / "kfgan-lite.safetensors"


def lite_generator() -> CropGenerator:
    """The shipped lite model when it and the model loader are present, else a seeded random LiteGenerator.

    A fresh LiteGenerator starts as the identity (zero residual); its tail gets
    small random weights so that restored crops visibly differ from the input.
    """
    import kfgan_daemon.model

    if SHIPPED_MODEL.is_file() and hasattr(kfgan_daemon.model, "load_generator"):
        from kfgan_daemon.restore.model_choice import open_generator

        return open_generator(SHIPPED_MODEL)
    from kfgan_daemon.model.lite import LiteGenerator

    torch.manual_seed(0)
    module = LiteGenerator()
    nn.init.normal_(module.tail.weight, std=0.02)
    return CropGenerator(module)


class SlowModule(nn.Module):
    """A generator module that takes ``seconds`` per call: the overload the engine must survive."""

    def __init__(self, inner: nn.Module, seconds: float) -> None:
        super().__init__()
        self.inner = inner
        self.seconds = seconds

    def forward(self, compressed: torch.Tensor, reference: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return self.inner(compressed, reference, landmarks)


@pytest.fixture(scope="module")
def degraded_face_clip(media_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real talking head at CRF 42 with an I-frame every 10 frames."""
    path = tmp_path_factory.mktemp("engine-real") / "d12_crf42.mp4"
    encode_h264_file(media_dir / "d12.mp4", path, crf=42, gop=10, preset="veryfast", max_frames=40, scenecut=False, audio=False)
    return path


def read_frames(path: Path) -> list:
    with FileSource(path) as source:
        return list(source)


async def run_stream(engine: StreamEngine, restorer: StreamRestorer, frames: list, realtime: bool, fps: float | None):
    stream = engine.open_stream("real", realtime=realtime, restorer=restorer)

    async def produce() -> None:
        start = time.monotonic()
        for n, frame in enumerate(frames):
            if fps is not None:
                await asyncio.sleep(max(0.0, start + n / fps - time.monotonic()))
            await stream.submit(frame)
        await stream.close()

    outputs, _ = await asyncio.gather(collect(stream), produce())
    return stream, outputs


@pytest.mark.shared
@pytest.mark.slow
async def test_file_stream_restores_the_real_face_and_leaves_the_background(degraded_face_clip: Path) -> None:
    frames = read_frames(degraded_face_clip)
    restorer = StreamRestorer(RestoreSettings())
    async with StreamEngine(lite_generator()) as engine:
        stream, outputs = await run_stream(engine, restorer, frames, realtime=False, fps=None)
    assert [out.frame.index for out in outputs] == [frame.index for frame in frames]
    assert [frame.index for frame in frames if frame.is_keyframe][:4] == [0, 10, 20, 30]
    restored = [(frame, out) for frame, out in zip(frames, outputs) if out.outcome is Outcome.RESTORED]
    assert len(restored) >= 0.8 * len(frames), stream.stats
    assert len(restorer.store) >= 1
    for frame, out in restored:
        assert out.frame.pts == frame.pts and out.frame.is_keyframe == frame.is_keyframe
        changed = out.frame.y != frame.y
        border = np.concatenate([changed[:4].ravel(), changed[-4:].ravel(), changed[:, :4].ravel(), changed[:, -4:].ravel()])
        # the face is changed, the rest of a close-up is not: well under the whole frame, little of its border
        assert 0.05 < changed.mean() < 0.85, changed.mean()
        assert border.mean() < 0.5, border.mean()


@pytest.mark.shared
@pytest.mark.slow
async def test_slow_real_generator_keeps_latency_bounded_and_stores_keyframes(degraded_face_clip: Path) -> None:
    frames = read_frames(degraded_face_clip)
    restorer = StreamRestorer(RestoreSettings())
    slow = CropGenerator(SlowModule(lite_generator().module, seconds=0.3))
    settings = EngineSettings(max_latency=0.12)
    async with StreamEngine(slow, settings) as engine:
        stream, outputs = await run_stream(engine, restorer, frames, realtime=True, fps=25)
    worst = max(out.latency for out in outputs)
    print(f"\nreal restorer, 300 ms generator: worst added latency {1000 * worst:.1f} ms, {stream.stats}")
    assert worst < settings.max_latency + 0.2  # generous: the machine is shared
    assert [out.frame.index for out in outputs] == [frame.index for frame in frames]
    assert stream.stats.keyframes == 4
    assert restorer.stats.keyframes_stored >= 3 and len(restorer.store) >= 3
    # nothing was ever restored in time, so there was no correction to carry: late frames went out as they came
    assert stream.stats.shed > 0 and stream.stats.deadline_misses > 0 and stream.stats.carried_forward == 0


async def test_real_restorer_passes_a_faceless_clip_through_in_order(tmp_path: Path) -> None:
    clip = write_synthetic_clip(tmp_path / "noface.mp4", frames=20, gop=5)
    frames = read_frames(clip)
    restorer = StreamRestorer(RestoreSettings())
    async with StreamEngine(lite_generator()) as engine:
        stream, outputs = await run_stream(engine, restorer, frames, realtime=False, fps=None)
    assert [out.frame.index for out in outputs] == list(range(20))
    assert all(out.outcome is Outcome.NO_FACE for out in outputs)
    assert all(out.frame.same_pixels(frame) for out, frame in zip(outputs, frames))
    assert stream.stats.keyframes == 4 and restorer.stats.no_face == 20


@pytest.mark.shared
@pytest.mark.slow
async def test_two_real_streams_both_get_restored_frames_and_a_fair_plan(degraded_face_clip: Path) -> None:
    """Two live streams of a real face through one engine, at 25 FPS each for the clip's 40 frames:
    the plan shares the machine between them, and neither is left without restored frames."""
    frames = read_frames(degraded_face_clip)
    async with StreamEngine(lite_generator(), EngineSettings(max_latency=0.1)) as engine:
        await engine.warm_up(RestoreSettings())
        streams = [engine.open_stream(f"cam{n}", restore_settings=RestoreSettings()) for n in (1, 2)]

        async def produce(stream) -> None:
            start = time.monotonic()
            for n, frame in enumerate(frames):
                await asyncio.sleep(max(0.0, start + n / 25 - time.monotonic()))
                await stream.submit(frame)
            await stream.close()

        results = await asyncio.gather(*(collect(s) for s in streams), *(produce(s) for s in streams))
        plans = [stream.info().plan for stream in streams]
    for stream, outputs, plan in zip(streams, results[:2], plans):
        print(f"\n{stream.id}: {stream.stats}, plan {plan}")
        assert [out.frame.index for out in outputs] == [frame.index for frame in frames]
        assert stream.stats.restored >= 1, stream.stats
        assert stream.stats.errors == 0
        assert plan is not None and 0 < plan.restored_share <= 1
    assert plans[0].restored_share == pytest.approx(plans[1].restored_share, abs=0.05)  # equal frame rates, equal shares
