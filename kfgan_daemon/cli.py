"""The `kfgan-daemon` command line."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from kfgan_daemon.errors import KfganError

app = typer.Typer(
    name="kfgan-daemon",
    help="Keyframe-guided GAN face restoration for videoconference video.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

CheckpointOpt = Annotated[
    Optional[Path],
    typer.Option("--checkpoint", "-c", help="Generator checkpoint (.safetensors or the published .pth); default: the shipped lite model."),
]
VariantOpt = Annotated[Optional[str], typer.Option(help="Architecture of the checkpoint: full or lite (default: from the file).")]
DeviceOpt = Annotated[str, typer.Option(help="Torch device: cpu, cuda, cuda:1 ...")]
HalfOpt = Annotated[bool, typer.Option("--half", help="Half precision (CUDA only).")]
DetectorOpt = Annotated[str, typer.Option(help="Face detector: hog (fast) or cnn (dlib mmod, slow on CPU).")]


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


@app.callback()
def _root(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False) -> None:
    _configure_logging(verbose)


@app.command()
def restore(
    input: Annotated[Path, typer.Argument(help="Recorded call (any container/codec FFmpeg reads).")],
    output: Annotated[Path, typer.Argument(help="Restored video (H.264, audio copied).")],
    checkpoint: CheckpointOpt = None,
    variant: VariantOpt = None,
    device: DeviceOpt = "cpu",
    half: HalfOpt = False,
    crf: Annotated[int, typer.Option(min=0, max=51, help="libx264 CRF of the output (18: visually lossless).")] = 18,
    bitrate: Annotated[Optional[int], typer.Option(min=1, help="Target bitrate in bit/s instead of CRF.")] = None,
    preset: Annotated[str, typer.Option(help="libx264 preset.")] = "medium",
    side_by_side: Annotated[bool, typer.Option("--side-by-side", help="Write input | restored next to each other.")] = False,
    detector: DetectorOpt = "hog",
    keyframes: Annotated[int, typer.Option(min=1, help="Keyframe store size.")] = 10,
    policy: Annotated[str, typer.Option(help="Keyframe policy: lfu or max_distance.")] = "lfu",
    warp: Annotated[str, typer.Option(help="MLS warp: fast or published.")] = "fast",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Restore the speaker's face in a recorded call."""
    from kfgan_daemon.restore.file_job import EncodeOptions, restore_file
    from kfgan_daemon.restore.model_choice import open_generator
    from kfgan_daemon.restore.settings import RestoreSettings

    settings = RestoreSettings(detector=detector, keyframe_store_size=keyframes, keyframe_policy=policy, warp_mode=warp)
    generator = open_generator(checkpoint, variant=variant, device=device, half=half)
    summary = restore_file(
        input,
        output,
        generator,
        settings=settings,
        encode=EncodeOptions(crf=crf, bitrate=bitrate, preset=preset),
        compare=side_by_side,
        progress=not quiet,
    )
    typer.echo(f"{output}: {summary.describe()}")


@app.command()
def bench(
    clip: Annotated[Path, typer.Argument(help="Clip to time (a real talking head gives meaningful numbers).")],
    checkpoint: CheckpointOpt = None,
    variant: VariantOpt = None,
    device: DeviceOpt = "cpu",
    half: HalfOpt = False,
    frames: Annotated[int, typer.Option(min=1, help="Frames to time.")] = 100,
    threads: Annotated[Optional[int], typer.Option(min=1, help="Torch CPU threads (default: torch's).")] = None,
    detector: DetectorOpt = "hog",
) -> None:
    """Per-stage milliseconds and FPS of the restoration path on a clip."""
    from kfgan_daemon.bench import run_offline_bench
    from kfgan_daemon.restore.model_choice import open_generator

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    generator = open_generator(checkpoint, variant=variant, device=device, half=half)
    report = run_offline_bench(clip, generator, max_frames=frames, detector=detector)
    typer.echo(report.render())


@app.command()
def doctor(
    checkpoint: CheckpointOpt = None,
    variant: VariantOpt = None,
) -> None:
    """Check models, face models, devices and codecs; exit non-zero if something needed is missing."""
    from kfgan_daemon.doctor import run_checks

    results = run_checks(checkpoint, variant)
    for result in results:
        typer.echo(result.render())
    if any(not r.ok and r.required for r in results):
        raise typer.Exit(1)


def main() -> None:
    try:
        app()
    except KfganError as exc:
        typer.echo(f"kfgan-daemon: error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("kfgan-daemon: interrupted", err=True)
        sys.exit(130)
