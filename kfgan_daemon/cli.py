"""The `kfgan-daemon` command line.

Paths are checked before anything heavy is imported (torch alone takes seconds to
load), so a mistyped file name is reported at once; each command imports what it
needs inside its body.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from kfgan_daemon.errors import ConfigError, InputError, KfganError, OutputError

app = typer.Typer(
    name="kfgan-daemon",
    help="Keyframe-guided GAN face restoration for videoconference video.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Plain click help: typer's rich panels print "<bool>" after every flag, which reads as if it took a value.
    rich_markup_mode=None,
)

# Choices are typed, so a value not among them exits 2 at once, naming the option, before anything
# heavy loads. Spelled out here rather than imported: the modules that define them import torch or dlib.
X264Preset = Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo"]
OverloadPolicyChoice = Literal["passthrough", "drop"]

CheckpointOpt = Annotated[
    Optional[Path],
    typer.Option("--checkpoint", "-c", help="Generator checkpoint (.safetensors or the published .pth); default: the shipped guided model (models/kfgan-guided.safetensors)."),
]
VariantOpt = Annotated[Optional[Literal["full", "guided", "lite"]], typer.Option(help="Architecture of the checkpoint: full, guided or lite (default: from the file).")]
DeviceOpt = Annotated[str, typer.Option(help="Torch device: cpu, cuda, cuda:1 ...")]
HalfOpt = Annotated[bool, typer.Option("--half", help="Half precision (CUDA only).")]
DetectorOpt = Annotated[Literal["hog", "cnn"], typer.Option(help="Face detector: hog (fast) or cnn (dlib mmod, slow on CPU).")]
RuntimeOpt = Annotated[
    Literal["torch", "onnxruntime"], typer.Option(help="Generator runtime: torch, or onnxruntime (CPU; needs the [onnx] extra).")
]
VideoArg = Annotated[
    Path,
    typer.Argument(exists=True, dir_okay=False, readable=True, help="Recorded call (any container/codec FFmpeg reads)."),
]


def _require_video(path: Path) -> None:
    """Fail before torch and dlib load when FFmpeg cannot read a video stream from ``path``."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"{path}: no video stream in this file")
    except av.error.FFmpegError as exc:
        raise InputError(f"{path}: not a video FFmpeg can read ({exc.strerror or exc})") from exc


def _require_output_folder(path: Path) -> None:
    if not path.parent.is_dir():
        raise OutputError(f"{path}: the folder {path.parent} does not exist")


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
    input: VideoArg,
    output: Annotated[Path, typer.Argument(dir_okay=False, help="Restored video (H.264, audio copied).")],
    checkpoint: CheckpointOpt = None,
    variant: VariantOpt = None,
    device: DeviceOpt = "cpu",
    half: HalfOpt = False,
    crf: Annotated[
        Optional[int],
        typer.Option(
            min=0,
            max=51,
            help="libx264 CRF of the output. Default: 26 quantiser steps finer than the input's effective quantiser (at most 18), "
            "so that re-encoding costs the call about 0.1 dB at most; a good call makes a large file.",
        ),
    ] = None,
    bitrate: Annotated[Optional[int], typer.Option(min=1, help="Target bitrate in bit/s instead of CRF.")] = None,
    lossless: Annotated[
        bool,
        typer.Option(
            "--lossless",
            help="Encode the output losslessly (libx264 qp 0, yuv420p; large files): every pixel the "
            "restoration did not touch decodes bit-identical to the input.",
        ),
    ] = False,
    preset: Annotated[X264Preset, typer.Option(help="libx264 preset.")] = "medium",
    paste_mode: Annotated[
        Literal["correction", "replace"],
        typer.Option(
            help="correction: add the generator's change to the frame's own pixels (keeps a large face's detail); "
            "replace: paste the restored 256x256 crop itself, as the published code does."
        ),
    ] = "correction",
    side_by_side: Annotated[
        bool,
        typer.Option(
            "--side-by-side/--no-side-by-side",
            help="Write labelled panels next to each other: with --degrade-crf the original, the call as received and "
            "the restored call, each beside the original with its face PSNR (decoded luma, as eval --end-to-end "
            "measures it); without, input | restored.",
        ),
    ] = False,
    compare: Annotated[
        Optional[str],
        typer.Option(
            help="The side-by-side panels, left to right, comma-separated: original, received, restored "
            "(original needs --degrade-crf); implies --side-by-side.",
        ),
    ] = None,
    snapshot: Annotated[
        Optional[int],
        typer.Option(
            min=0,
            help="Write OUT (a .png) as one picture of this frame (from 0) in the side-by-side layout, with each panel "
            "magnified around the face below it; implies --side-by-side.",
        ),
    ] = None,
    snapshot_width: Annotated[
        Optional[int],
        typer.Option(
            min=64,
            help="Each panel's width in the snapshot (default: the video's): the upper row is scaled to it, the "
            "magnified row keeps the video's own pixels.",
        ),
    ] = None,
    degrade_crf: Annotated[
        Optional[int],
        typer.Option(
            min=0,
            max=51,
            help="First compress the input with libx264 at this CRF (one I-frame a second), as a call delivers it, "
            "and restore that; the demo: --degrade-crf 42 --side-by-side.",
        ),
    ] = None,
    detector: DetectorOpt = "hog",
    keyframes: Annotated[int, typer.Option(min=1, help="Keyframe store size.")] = 10,
    policy: Annotated[Literal["lfu", "max_distance"], typer.Option(help="Keyframe policy: lfu or max_distance.")] = "lfu",
    warp: Annotated[Literal["fast", "published"], typer.Option(help="MLS warp: fast or published.")] = "fast",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Restore the speaker's face in a recorded call."""
    _require_video(input)
    _require_output_folder(output)
    panels = _parse_panels(compare, with_original=degrade_crf is not None)
    if snapshot is not None and output.suffix.lower() != ".png":
        raise typer.BadParameter(f"{output}: a snapshot is written as a .png", param_hint="OUTPUT")
    if snapshot_width is not None and snapshot is None:
        raise typer.BadParameter("only a snapshot has a width of its own; add --snapshot N", param_hint="--snapshot-width")
    from kfgan_daemon.media.x264 import EncodeOptions
    from kfgan_daemon.restore.file_job import restore_file
    from kfgan_daemon.restore.model_choice import open_generator
    from kfgan_daemon.restore.settings import RestoreSettings

    settings = RestoreSettings(
        detector=detector, keyframe_store_size=keyframes, keyframe_policy=policy, warp_mode=warp, paste_mode=paste_mode
    )
    generator = open_generator(checkpoint, variant=variant, device=device, half=half, settings=settings)
    encode = EncodeOptions(crf=crf, bitrate=bitrate, preset=preset, lossless=lossless)
    if side_by_side or panels is not None or snapshot is not None:
        from kfgan_daemon.eval.comparison import write_comparison

        compared = write_comparison(
            input, output, generator, panels=panels, degrade_crf=degrade_crf, settings=settings, encode=encode,
            snapshot=snapshot, snapshot_width=snapshot_width, progress=not quiet,
        )
        typer.echo(f"{output}: {compared.describe()}")
        return
    summary = restore_file(
        input, output, generator, settings=settings, encode=encode, progress=not quiet, degrade_crf=degrade_crf
    )
    typer.echo(f"{output}: {summary.describe()}")


def _parse_panels(text: str | None, with_original: bool) -> tuple[str, ...] | None:
    """``--compare``'s panel names, checked before anything heavy loads."""
    if text is None:
        return None
    from kfgan_daemon.eval.comparison import check_panels

    try:
        return check_panels([name.strip() for name in text.split(",") if name.strip()], with_original)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--compare") from None


@app.command()
def bench(
    clip: Annotated[
        Path,
        typer.Argument(exists=True, dir_okay=False, readable=True, help="Clip to time (a real talking head gives meaningful numbers)."),
    ],
    checkpoint: CheckpointOpt = None,
    variant: VariantOpt = None,
    device: DeviceOpt = "cpu",
    half: HalfOpt = False,
    frames: Annotated[int, typer.Option(min=1, help="Frames to time.")] = 100,
    threads: Annotated[Optional[int], typer.Option(min=1, help="Torch CPU threads (default: torch's).")] = None,
    detector: DetectorOpt = "hog",
    live: Annotated[bool, typer.Option("--live", help="Send the clip through `pipe` over RTP on loopback in real time.")] = False,
    seconds: Annotated[float, typer.Option(min=1.0, help="Live mode: seconds measured after a 2 s warm-up.")] = 10.0,
    fps: Annotated[Optional[float], typer.Option(min=1.0, help="Live mode: sending rate (default: the clip's).")] = None,
    size: Annotated[Optional[str], typer.Option(help="Live mode: WIDTHxHEIGHT to scale the clip to, e.g. 1280x720.")] = None,
    policy: Annotated[OverloadPolicyChoice, typer.Option(help="Live mode: overload policy, passthrough or drop.")] = "passthrough",
    runtime: RuntimeOpt = "torch",
    preset: Annotated[X264Preset, typer.Option(help="Live mode: libx264 preset of the pipe's output.")] = "superfast",
    streams: Annotated[int, typer.Option(min=1, help="Live mode: cameras sending at once, through one engine.")] = 1,
    carry_forward: Annotated[
        bool,
        typer.Option("--carry-forward", help="Face PSNR and flicker with every 1st to 5th frame restored (the live planner's cadences at its default min_restored_share) and the correction carried in between (--frames frames, CRF 42)."),
    ] = False,
) -> None:
    """Per-stage milliseconds and FPS of the restoration path on a clip; with --live, added latency through `pipe`."""
    _require_video(clip)
    from kfgan_daemon.restore.model_choice import open_generator
    from kfgan_daemon.restore.settings import RestoreSettings

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    settings = RestoreSettings(detector=detector)
    generator = open_generator(checkpoint, variant=variant, device=device, half=half, runtime=runtime, settings=settings)
    if live:
        from dataclasses import replace

        from kfgan_daemon.engine import run_async
        from kfgan_daemon.rtpapps.livebench import live_bench
        from kfgan_daemon.rtpapps.pipe import PIPE_ENCODE

        result = run_async(
            live_bench(
                clip,
                generator,
                seconds,
                fps,
                size=_parse_size(size),
                policy=policy,
                restore_settings=settings,
                output_encoder=replace(PIPE_ENCODE, preset=preset),
                streams=streams,
            )
        )
        typer.echo(result.describe())
        return
    if carry_forward:
        from kfgan_daemon.eval.carry_forward import measure_carry_forward, render_rows

        rows = measure_carry_forward(clip, generator, max_frames=frames, settings=settings)
        typer.echo(render_rows(rows, crf=42))
        return
    from kfgan_daemon.bench import run_offline_bench

    report = run_offline_bench(clip, generator, max_frames=frames, detector=detector)
    typer.echo(report.render())


def _parse_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise typer.BadParameter(f"{text!r} is not WIDTHxHEIGHT", param_hint="--size")
    return int(width), int(height)


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


@app.command()
def serve(
    config: Annotated[
        Optional[Path],
        typer.Option("--config", exists=True, dir_okay=False, readable=True, help="TOML settings file (see systemd/kfgan-daemon.toml)."),
    ] = None,
    host: Annotated[Optional[str], typer.Option(help="Address to bind (overrides the file and KFGAN_HOST).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port to bind (overrides the file and KFGAN_PORT).")] = None,
) -> None:
    """Run the daemon: WebRTC /offer, health, readiness, metrics and stream admin over HTTP."""
    from kfgan_daemon.service.config import Settings
    from kfgan_daemon.service.server import serve as run_service

    run_service(Settings.load(config, host=host, port=port))


@app.command()
def janus(
    config: Annotated[
        Optional[Path],
        typer.Option("--config", exists=True, dir_okay=False, readable=True,
                     help="TOML settings file with a [janus] table (see systemd/kfgan-janus.toml)."),
    ] = None,
    url: Annotated[Optional[str], typer.Option(help="Janus's HTTP API, e.g. http://127.0.0.1:8088/janus (overrides [janus] url).")] = None,
    room: Annotated[Optional[list[int]], typer.Option(help="A VideoRoom to restore; repeat for several (overrides [janus] rooms).")] = None,
) -> None:
    """Restore every video publisher of Janus VideoRooms: each comes back into its room as "NAME (restored)"."""
    from kfgan_daemon.engine import run_async
    from kfgan_daemon.janus.attachment import run_janus
    from kfgan_daemon.service.config import Settings
    from kfgan_daemon.service.logs import configure_logging

    given = {key: value for key, value in (("url", url), ("rooms", room)) if value}
    settings = Settings.load(config, janus=given or None)
    configure_logging(settings.log_level, settings.log_format)
    run_async(run_janus(settings))


@app.command()
def pipe(
    input: Annotated[
        Path, typer.Option("--input", "-i", exists=True, dir_okay=False, readable=True, help="SDP file of the incoming H.264 RTP stream.")
    ],
    output: Annotated[str, typer.Option("--output", "-o", help="rtp://HOST:PORT, or - for y4m on stdout.")],
    output_sdp: Annotated[Optional[Path], typer.Option(help="Where to write the output's SDP (for ffmpeg/GStreamer/VLC).")] = None,
    checkpoint: CheckpointOpt = None,
    variant: VariantOpt = None,
    device: DeviceOpt = "cpu",
    half: HalfOpt = False,
    crf: Annotated[int, typer.Option(min=0, max=51, help="libx264 CRF of the RTP output.")] = 23,
    bitrate: Annotated[Optional[int], typer.Option(min=1, help="Output bitrate in bit/s instead of CRF.")] = None,
    gop: Annotated[Optional[int], typer.Option(min=1, help="Output keyframe interval in frames.")] = None,
    policy: Annotated[OverloadPolicyChoice, typer.Option(help="When restoration falls behind: passthrough or drop.")] = "passthrough",
    loss_policy: Annotated[Literal["conceal", "wait_keyframe"], typer.Option(help="On packet loss: conceal, or wait_keyframe.")] = "conceal",
    silence_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds without packets before the sender counts as silent.")] = 2.0,
    max_latency_ms: Annotated[Optional[float], typer.Option(min=1.0, help="Latency restoration may add before a frame goes out unrestored (default 120).")] = None,
    metrics_port: Annotated[Optional[int], typer.Option(min=1, max=65535, help="Serve Prometheus metrics on 127.0.0.1:PORT.")] = None,
    detector: DetectorOpt = "hog",
    runtime: RuntimeOpt = "torch",
    preset: Annotated[X264Preset, typer.Option(help="libx264 preset of the RTP output.")] = "superfast",
) -> None:
    """Restore an H.264 RTP stream: SDP in, RTP (with its SDP) or y4m on stdout out."""
    from kfgan_daemon.engine import EngineSettings, run_async
    from kfgan_daemon.media.x264 import EncodeOptions
    from kfgan_daemon.rtpapps.pipe import PipeOptions, run_pipe
    from kfgan_daemon.restore.model_choice import open_generator
    from kfgan_daemon.restore.settings import RestoreSettings

    restore_settings = RestoreSettings(detector=detector)
    generator = open_generator(
        checkpoint, variant=variant, device=device, half=half, runtime=runtime, settings=restore_settings
    )
    engine_settings = None if max_latency_ms is None else EngineSettings(max_latency=max_latency_ms / 1000.0)
    options = PipeOptions(
        output_sdp=output_sdp,
        encoder=EncodeOptions(crf=crf, bitrate=bitrate, gop=gop, preset=preset),
        policy=policy,
        loss_policy=loss_policy,
        silence_timeout=silence_timeout,
    )
    summary = run_async(
        run_pipe(
            input,
            output,
            generator,
            options,
            restore_settings=restore_settings,
            engine_settings=engine_settings,
            metrics_port=metrics_port,
        )
    )
    typer.echo(summary.describe(), err=True)


@app.command()
def train(
    config: Annotated[
        Path, typer.Option("--config", exists=True, dir_okay=False, readable=True, help="Training configuration (TOML), e.g. configs/lite.toml.")
    ],
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore the run's last checkpoint and start over.")] = False,
    max_steps: Annotated[Optional[int], typer.Option(min=1, help="Stop after this many steps in total.")] = None,
) -> None:
    """Train a generator; resumes from the run's last checkpoint unless --fresh."""
    from kfgan_daemon.train import train as run_training

    result = run_training(config, resume=not fresh, max_steps=max_steps)
    best = "no validation yet" if result.best_psnr is None else f"best validation PSNR {result.best_psnr:.2f} dB at step {result.best_step}"
    state = "interrupted, resumable" if result.interrupted else "done"
    typer.echo(f"{result.run_dir}: {result.steps} steps, {result.train_seconds:.0f} s of training, {best} ({state})")


dataset_app = typer.Typer(help="Training data from real videos.", no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")


@dataset_app.command("build")
def dataset_build(
    config: Annotated[Path, typer.Option("--config", exists=True, dir_okay=False, help="Training configuration whose [dataset] and data.dir say what to build, e.g. configs/guided.toml.")],
    keep_encoded: Annotated[bool, typer.Option("--keep-encoded", help="Keep the degraded streams in <data.dir>/encoded.")] = False,
    tracks: Annotated[Optional[Path], typer.Option("--tracks", file_okay=False, help="Keep every encoded video's face tracks in this folder, and replay those made under the same settings instead of tracking (no dlib for them).")] = None,
) -> None:
    """Encode each video at the CRF(s), track and align faces, and write training samples split by person."""
    from kfgan_daemon.train import build_dataset, load_config
    from kfgan_daemon.train.dataset import BuildOptions

    settings = load_config(config)
    spec = settings.dataset
    if not spec.validation or not spec.test:
        raise ConfigError(
            f"{config}: dataset.validation and dataset.test must name persons (who chooses the checkpoint, "
            "who is held out); see configs/guided.toml"
        )
    options = BuildOptions(
        crfs=tuple(spec.crfs),
        senders=tuple(spec.senders),
        keyint_seconds=spec.keyint_seconds,
        sample_every=spec.sample_every,
        sample_offset=spec.sample_offset,
        persons={person: list(videos) for person, videos in spec.persons.items()},
        validation=tuple(spec.validation),
        test=tuple(spec.test),
        preset=spec.preset,
        max_frames=spec.max_frames,
    )
    manifest = build_dataset(
        spec.videos, settings.data.dir, options, keep_encoded=keep_encoded, workers=spec.workers, tracks_dir=tracks
    )
    samples = sum(info.get("samples", 0) for info in manifest.files.values())
    typer.echo(
        f"{settings.data.dir}: {len(manifest.files)} sample files, {samples} samples; "
        + "; ".join(f"{split}: {', '.join(manifest.videos_of(split))}" for split in ("train", "validation", "test"))
    )


@app.command("fit-detail")
def fit_detail(
    config: Annotated[Path, typer.Option("--config", exists=True, dir_okay=False, readable=True, help="Training configuration whose [dataset] names the videos, CRFs, senders and persons, e.g. configs/guided.toml.")],
    model: Annotated[Path, typer.Option("--model", exists=True, dir_okay=False, writable=True, help="Our .safetensors model to store the filter in (its generator weights stay as they are).")],
    max_frames: Annotated[int, typer.Option(min=1, help="Frames per video and CRF/sender at most.")] = 90,
    strength: Annotated[float, typer.Option(min=0.0, max=1.0, help="How far the filtered band goes from the band as received: 1 is the least-squares fit (best PSNR), lower keeps more detail for VMAF; choose it on the validation persons (see models/kfgan-guided.md).")] = 1.0,
) -> None:
    """Fit the model's native detail filter on the training persons' close-ups and store it in the model."""
    from kfgan_daemon.model import attach_native_detail
    from kfgan_daemon.train import load_config
    from kfgan_daemon.train.dataset import find_videos, split_by_person
    from kfgan_daemon.train.native_detail import fit_native_detail

    spec = load_config(config).dataset
    found = find_videos(spec.videos)
    split = split_by_person(found, spec.persons, spec.validation, spec.test)
    training = {name: path for name, path in found.items() if split[name] == "train"}
    fitted, report = fit_native_detail(
        training, spec.crfs, spec.senders, keyint_seconds=spec.keyint_seconds, max_frames=max_frames, preset=spec.preset,
        on_video=lambda name, frames: typer.echo(f"{name}: {frames} close-up frames" if frames else f"{name}: no face larger than the crop", err=True),
    )
    attach_native_detail(model, fitted.with_strength(strength), report.as_metadata())
    typer.echo(
        f"{model}: native detail filter at strength {strength:g} from {len(report.videos)} videos, {report.frames} frames, {report.samples} samples "
        f"(per activity class: {', '.join(map(str, report.per_class))})"
    )


@app.command("fit-strength")
def fit_strength(
    config: Annotated[Path, typer.Option("--config", exists=True, dir_okay=False, readable=True, help="Training configuration whose [data] dir holds the built dataset, e.g. configs/guided-flow.toml.")],
    model: Annotated[Path, typer.Option("--model", exists=True, dir_okay=False, writable=True, help="Our .safetensors model to fit and store the strength in (its generator weights stay as they are).")],
    split: Annotated[Literal["validation", "train"], typer.Option(help="Dataset split to fit on: validation (persons the generator never trained on, like the callers it restores) or train (its corrections are better there than on anyone new). Never test: those persons are held out from every fit.")] = "validation",
) -> None:
    """Fit the model's gain on its correction by the frame's quantiser and store it in the model."""
    from kfgan_daemon.model import attach_quantiser_strength
    from kfgan_daemon.restore.model_choice import open_generator
    from kfgan_daemon.train import load_config
    from kfgan_daemon.train.quantiser_strength import fit_quantiser_strength

    data_dir = load_config(config).data.dir
    generator = open_generator(model)
    fitted, report = fit_quantiser_strength(
        data_dir, generator, split, on_file=lambda name, crops: typer.echo(f"{name}: {crops} crops", err=True)
    )
    attach_quantiser_strength(model, fitted, report.as_metadata())
    typer.echo(f"{model}: quantiser strength from {report.files} {report.split} files: {report.summary()}")


@app.command("eval")
def evaluate(
    clips: Annotated[Path, typer.Option("--clips", exists=True, help="A clip or a folder of high-quality clips.")],
    out: Annotated[Path, typer.Option("--out", help="Where eval.json, eval.md and grid.png go.")] = Path("eval-report"),
    crf: Annotated[int, typer.Option(min=0, max=51, help="CRF of the degraded stream.")] = 42,
    model: Annotated[Optional[list[str]], typer.Option("--model", help="PATH or NAME=PATH; repeat. Default: the shipped model.")] = None,
    reference_mode: Annotated[Literal["hq", "stream"], typer.Option(help="hq (keyframes from the original) or stream (decoded I-frames).")] = "hq",
    max_frames: Annotated[Optional[int], typer.Option(min=1, help="Frames per clip at most.")] = None,
    device: DeviceOpt = "cpu",
    vmaf: Annotated[bool, typer.Option("--vmaf", help="Add VMAF and VMAF-NEG (needs the optional vmaf-torch); "
                                                      "with --end-to-end, over whole decoded Y planes.")] = False,
    end_to_end: Annotated[bool, typer.Option(
        "--end-to-end",
        help="Restore each compressed clip as `restore` does (hq and plain senders, with and without keyframes) "
             "and compare the decoded Y planes with the original's; also prices every row in bits: the bitrate a "
             "plain sender needs for its face PSNR (the clip at CRFs from 10 below to 2 above --crf) and the saving "
             "at equal face quality; writes end_to_end.json/.md.",
    )] = False,
) -> None:
    """Compress clips, restore them, and report PSNR/SSIM per clip and on average, with an example grid."""
    from kfgan_daemon.eval.evaluate import evaluate as run_eval
    from kfgan_daemon.eval.report import render_markdown
    from kfgan_daemon.restore.model_choice import resolve_model_path

    if end_to_end:
        from kfgan_daemon.eval import end_to_end as e2e
        from kfgan_daemon.eval.evaluate import list_clips
        from kfgan_daemon.restore.model_choice import open_generator

        if model is not None and len(model) != 1:
            raise typer.BadParameter("--end-to-end measures one model at a time", param_hint="--model")
        generator = open_generator(model[0] if model else None, device=device)
        results = e2e.evaluate_end_to_end(list_clips(clips), generator, crf=crf, max_frames=max_frames, vmaf=vmaf)
        e2e.write_reports(results, crf, out)
        typer.echo(e2e.render_markdown(results, crf))
        return
    models = model or [str(resolve_model_path(None))]
    report = run_eval(
        clips,
        crf,
        models,
        out,
        reference_mode=reference_mode,
        max_frames=max_frames,
        device=device,
        vmaf=vmaf,
        progress=True,
    )
    typer.echo(render_markdown(report))


def main() -> None:
    try:
        app()
    except ConfigError as exc:
        typer.echo(f"kfgan-daemon: invalid configuration: {exc}", err=True)
        sys.exit(2)
    except KfganError as exc:
        typer.echo(f"kfgan-daemon: error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("kfgan-daemon: interrupted", err=True)
        sys.exit(130)
