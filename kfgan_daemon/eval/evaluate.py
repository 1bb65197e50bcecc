"""The evaluation pipeline: compress clips, restore them, measure against the originals.

For each clip: encode it with libx264 at the CRF (keyframe interval ``gop_seconds``),
decode the compressed and the original video in lockstep, track the face on the
compressed frames, and measure PSNR and SSIM on the aligned 256x256 face crops
(the original aligned with the compressed frame's matrix is the ground truth)
and on whole frames (model rows paste the restored crop back into the
compressed frame). Rows: the compressed input; each model with its keyframe
reference; each model with the reference replaced by the degraded crop (the
ablation that shows what keyframes add).

Reference sources: ``hq`` cuts the keyframe crop from the ORIGINAL frame at
each I-frame position (the paper's assumption that I-frames are high quality);
``stream`` cuts it from the decoded compressed I-frame (what a plain encoder sends).
"""
from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn
from tqdm import tqdm

from kfgan_daemon.errors import ConfigError, InputError, MetricUnavailableError
from kfgan_daemon.eval import image_quality
from kfgan_daemon.eval.flicker import FlickerMeter, face_region_mask
from kfgan_daemon.eval.lpips import Lpips, LpipsWeights
from kfgan_daemon.eval.report import ClipResult, EvalReport, Example, RowResult, average_rows, write_grid, write_json, write_markdown
from kfgan_daemon.eval.vmaf import VmafMeter, vmaf_unavailable_reason
from kfgan_daemon.face import CROP_SIZE
from kfgan_daemon.face.paste import native_detail_delta
from kfgan_daemon.media import FileSource
from kfgan_daemon.media.encode import degrade_like_a_call
from kfgan_daemon.media.frame import DecodedFrame
from kfgan_daemon.restore.generator import CropGenerator, as_picture
from kfgan_daemon.restore.job import FaceJob
from kfgan_daemon.restore.face_pipeline import REFERENCE_MODES, Face, FacePipeline, ReferenceMode, decoded_crop
from kfgan_daemon.restore.repeats import EmittedFrame
from kfgan_daemon.restore.settings import RestoreSettings
from kfgan_daemon.restore.stream import paste_restored

log = logging.getLogger(__name__)

CLIP_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".y4m")
INPUT_KEY = "input"
NO_REFERENCE_SUFFIX = ":no_reference"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model to evaluate: a checkpoint path (loaded with ``load_generator``) or an already built module."""

    name: str
    source: Path | nn.Module
    variant: str | None = None

    @classmethod
    def default(cls) -> "ModelSpec":
        """The model ``restore`` uses when none is named ($KFGAN_MODEL, else the shipped guided model)."""
        from kfgan_daemon.restore.model_choice import resolve_model_path

        path = resolve_model_path(None)
        return cls(name=path.stem, source=path)

    @classmethod
    def of(cls, value: "ModelSpec | Path | str") -> "ModelSpec":
        if isinstance(value, ModelSpec):
            return value
        return parse_model_option(str(value))


def parse_model_option(text: str) -> ModelSpec:
    """``PATH`` or ``NAME=PATH`` (the CLI's ``--model`` value); the name defaults to the file's stem."""
    name, sep, path = text.partition("=")
    if not sep:
        name, path = "", text
    checkpoint = Path(path).expanduser()
    if not checkpoint.is_file():
        raise InputError(f"model checkpoint {checkpoint} does not exist")
    return ModelSpec(name=name or checkpoint.stem, source=checkpoint)


def list_clips(clips: Sequence[Path] | Path) -> list[Path]:
    """A folder means every video in it (sorted); a list is taken as given."""
    if isinstance(clips, (str, Path)):
        folder = Path(clips)
        if folder.is_file():
            return [folder]
        if not folder.is_dir():
            raise InputError(f"clip folder {folder} does not exist")
        found = sorted(p for p in folder.iterdir() if p.suffix.lower() in CLIP_SUFFIXES and p.is_file())
        if not found:
            raise InputError(f"no video clips ({', '.join(CLIP_SUFFIXES)}) in {folder}")
        return found
    paths = [Path(p) for p in clips]
    if not paths:
        raise ConfigError("clips: no clips to evaluate")
    for path in paths:
        if not path.is_file():
            raise InputError(f"clip {path} does not exist")
    return paths


@dataclass(slots=True)
class _LoadedModel:
    name: str
    generator: CropGenerator


def _open(spec: ModelSpec, device: str, settings: RestoreSettings) -> CropGenerator:
    if isinstance(spec.source, nn.Module):
        return CropGenerator(spec.source.eval(), device=device)
    from kfgan_daemon.restore.model_choice import open_generator

    return open_generator(spec.source, variant=spec.variant, device=device, settings=settings)


def _load_models(
    models: Iterable[ModelSpec | Path | str], device: str, settings: RestoreSettings
) -> list[_LoadedModel]:
    loaded: list[_LoadedModel] = []
    for spec in map(ModelSpec.of, models):
        if spec.name == INPUT_KEY or any(m.name == spec.name for m in loaded):
            raise ConfigError(f"model: {spec.name!r} is named twice or like a built-in row; name it with NAME=PATH")
        loaded.append(_LoadedModel(spec.name, _open(spec, device, settings)))
    return loaded


@dataclass(slots=True)
class _Sample:
    """One frame's face, ready for the generators, with its ground truth."""

    matrix: np.ndarray
    compressed: np.ndarray
    truth: np.ndarray
    job: FaceJob | None  # None until a keyframe is stored: the daemon passes the face through
    ablation: FaceJob  # the same inputs with the degraded crop as reference


def original_crop(face: Face) -> np.ndarray:
    """The ``hq`` keyframe entry: the original frame at the I-frame, cut with the decoded face's matrix."""
    return face.truth


_KEYFRAME_ENTRIES = {"hq": original_crop, "stream": decoded_crop}


def reference_pipeline(settings: RestoreSettings, reference_mode: ReferenceMode) -> FacePipeline[np.ndarray]:
    """The restorer's face pipeline, with the keyframe entries ``reference_mode`` names."""
    return FacePipeline(settings, _KEYFRAME_ENTRIES[reference_mode])


def prepare_sample(faces: FacePipeline[np.ndarray], compressed: DecodedFrame, original: DecodedFrame) -> _Sample | None:
    """One frame through the face pipeline as the restorer runs it (None: no face), with its ground truth."""
    face = faces.follow(compressed, original)
    if face is None:
        return None
    entry = faces.select(face)
    job = None if entry is None else faces.job(face, entry)
    return _Sample(face.aligned.matrix, face.aligned.crop, face.truth, job, faces.job(face, None))


@dataclass(slots=True)
class _RowAccumulator:
    key: str
    label: str
    model: str | None
    crop_psnr: list[float] = field(default_factory=list)
    crop_ssim: list[float] = field(default_factory=list)
    crop_lpips: list[float] = field(default_factory=list)
    crop_luma_bias: list[float] = field(default_factory=list)
    frame_psnr: list[float] = field(default_factory=list)
    frame_ssim: list[float] = field(default_factory=list)
    restored_frames: int = 0

    def add_face(self, crop: np.ndarray, truth: np.ndarray, channel: image_quality.SsimChannel) -> None:
        self.crop_psnr.append(image_quality.psnr(crop, truth))
        self.crop_ssim.append(image_quality.ssim(crop, truth, channel))
        self.crop_luma_bias.append(image_quality.luma_bias(crop, truth))

    def add_frame(self, frame: DecodedFrame, truth: DecodedFrame) -> None:
        # Whole frames are compared on their decoded luma planes: no colour conversion in the way.
        self.frame_psnr.append(image_quality.psnr(frame.luma, truth.luma))
        self.frame_ssim.append(image_quality.ssim(frame.luma, truth.luma))

    def result(self, frames: int, face_frames: int, note: str | None) -> RowResult:
        def mean(values: list[float]) -> float | None:
            return float(np.mean(values)) if values else None

        return RowResult(
            key=self.key,
            label=self.label,
            model=self.model,
            crop_psnr=mean(self.crop_psnr),
            crop_ssim=mean(self.crop_ssim),
            crop_lpips=mean(self.crop_lpips),
            crop_luma_bias=mean(self.crop_luma_bias),
            frame_psnr=mean(self.frame_psnr),
            frame_ssim=mean(self.frame_ssim),
            frames=frames,
            face_frames=face_frames,
            restored_frames=self.restored_frames,
            note=note,
        )


class _ClipMeasurement:
    """Accumulates every row's metrics over one clip's frames, and picks the example for the grid."""

    def __init__(
        self,
        clip: str,
        models: list[_LoadedModel],
        reference_mode: str,
        crf: int,
        channel: image_quality.SsimChannel,
        example_at: int,
        vmaf: bool = False,
        device: str = "cpu",
        lpips: Lpips | None = None,
        settings: RestoreSettings | None = None,
    ) -> None:
        self.clip = clip
        self.settings = settings or RestoreSettings()
        self.models = models
        self.channel = channel
        self.example_at = example_at
        self.rows = {INPUT_KEY: _RowAccumulator(INPUT_KEY, f"compressed input (CRF {crf})", None)}
        for model in models:
            self.rows[model.name] = _RowAccumulator(model.name, f"{model.name} + {reference_mode} keyframes", model.name)
            key = model.name + NO_REFERENCE_SUFFIX
            self.rows[key] = _RowAccumulator(key, f"{model.name}, no reference (degraded crop)", model.name)
        self.frames = self.face_frames = self.keyframes = 0
        self.example: Example | None = None
        self._early_example: Example | None = None
        self.vmaf = VmafMeter(device) if vmaf else None
        self.lpips = lpips
        self.flicker = FlickerMeter()
        # Each row's last output, for the restorer's settling of repeated pixels.
        self._emitted: dict[str, EmittedFrame] = {}

    def add(self, original: DecodedFrame, compressed: DecodedFrame, sample: _Sample | None) -> None:
        self.frames += 1
        self.keyframes += compressed.is_keyframe
        if sample is None:
            # No face: the daemon passes the frame through, so every row sees the compressed frame.
            self._measure_frames(original, {key: compressed for key in self.rows})
            self.flicker.add(original.luma, {}, None)
            self._emitted = {key: EmittedFrame(compressed, compressed) for key in self.rows}
            return
        self.face_frames += 1
        crops = {INPUT_KEY: sample.compressed}
        details: dict[str, np.ndarray | None] = {}
        candidate = None
        if sample.job is not None:
            candidate = Example(self.clip, compressed.index, sample.compressed, sample.job.reference, sample.truth)
        for model in self.models:
            jobs = [sample.ablation] if sample.job is None else [sample.job, sample.ablation]
            outputs = model.generator(jobs)
            native_detail = model.generator.native_detail if self.settings.paste_mode == "correction" else None
            details[model.name] = details[model.name + NO_REFERENCE_SUFFIX] = native_detail_delta(
                compressed, sample.matrix, (CROP_SIZE, CROP_SIZE), native_detail
            )
            if sample.job is not None:
                crops[model.name] = outputs[0]
                self.rows[model.name].restored_frames += 1
            self.rows[model.name + NO_REFERENCE_SUFFIX].restored_frames += 1
            crops[model.name + NO_REFERENCE_SUFFIX] = outputs[-1]
            if candidate is not None:
                candidate.restored[model.name] = as_picture(outputs[0])
                candidate.restored_without_reference[model.name] = as_picture(outputs[-1])
        faces, images = {}, {}
        for key in self.rows:
            # A model row without a stored keyframe yet passes the face through, as the daemon does.
            crop = crops.get(key)
            faces[key] = sample.compressed if crop is None else as_picture(crop)
            if crop is None or key == INPUT_KEY:
                images[key] = compressed
            else:
                images[key] = paste_restored(
                    compressed, crop, sample.matrix, sample.compressed, self.settings, self._emitted.get(key),
                    luma_detail=details[key],
                )
            self._emitted[key] = EmittedFrame(compressed, images[key])
        self._measure_faces(sample.truth, faces)
        self._measure_frames(original, images)
        region = face_region_mask(sample.matrix, compressed.height, compressed.width)
        self.flicker.add(original.luma, {key: image.luma for key, image in images.items()}, region)
        if candidate is not None:
            if compressed.index < self.example_at:
                self._early_example = candidate
            elif self.example is None:
                self.example = candidate

    def _measure_faces(self, truth: np.ndarray, faces: dict[str, np.ndarray]) -> None:
        for key, crop in faces.items():
            self.rows[key].add_face(crop, truth, self.channel)
        if self.lpips is not None:
            distances = self.lpips.distance(list(faces.values()), [truth] * len(faces))
            for key, distance in zip(faces, distances):
                self.rows[key].crop_lpips.append(distance)

    def _measure_frames(self, original: DecodedFrame, images: dict[str, DecodedFrame]) -> None:
        for key, image in images.items():
            self.rows[key].add_frame(image, original)
        if self.vmaf is not None:
            self.vmaf.add(original.luma, {key: image.luma for key, image in images.items()})

    def picked_example(self) -> Example | None:
        """The first restored face at or after the middle of the clip, else the last one before it."""
        return self.example or self._early_example

    def row_results(self) -> list[RowResult]:
        face_note = None
        if self.face_frames == 0:
            face_note = f"no face found in any of the {self.frames} frames: face metrics not reported"
        results = []
        for key, row in self.rows.items():
            note = face_note
            if note is None and row.model is not None and not key.endswith(NO_REFERENCE_SUFFIX):
                passed = self.face_frames - row.restored_frames
                if passed:
                    note = f"{passed} face frame(s) with no stored keyframe yet passed through unrestored"
            result = row.result(self.frames, self.face_frames, note)
            result.face_flicker = self.flicker.flicker(key)
            results.append(result)
        if self.vmaf is not None:
            scores = self.vmaf.scores()
            for result in results:
                result.vmaf = scores.get(result.key, {}).get("vmaf")
                result.vmaf_neg = scores.get(result.key, {}).get("vmaf_neg")
        return results


def _frame_limit(frame_count: int | None, max_frames: int | None) -> int | None:
    limits = [n for n in (frame_count, max_frames) if n]
    return min(limits) if limits else None


def evaluate_clip(
    original_path: Path,
    compressed_path: Path,
    models: list[_LoadedModel],
    crf: int,
    reference_mode: ReferenceMode = "hq",
    max_frames: int | None = None,
    settings: RestoreSettings | None = None,
    ssim_channel: image_quality.SsimChannel = "y",
    progress: bool = False,
    vmaf: bool = False,
    device: str = "cpu",
    lpips: Lpips | None = None,
) -> tuple[ClipResult, Example | None]:
    """Measure one already compressed clip against its original; returns the clip's rows and an example."""
    settings = settings or RestoreSettings()
    faces = reference_pipeline(settings, reference_mode)
    started = time.perf_counter()
    length_note = None
    with FileSource(original_path) as original_source, FileSource(compressed_path) as compressed_source:
        size = (original_source.width, original_source.height)
        if size != (compressed_source.width, compressed_source.height):
            raise InputError(f"{compressed_path} is not the same size as {original_path}")
        limit = _frame_limit(original_source.frame_count, max_frames)
        measurement = _ClipMeasurement(
            original_path.stem,
            models,
            reference_mode,
            crf,
            ssim_channel,
            (limit or 0) // 2,
            vmaf=vmaf,
            device=device,
            lpips=lpips,
            settings=settings,
        )
        originals, compresseds = iter(original_source), iter(compressed_source)
        with tqdm(total=limit, unit="frame", desc=original_path.stem, disable=not progress) as bar:
            while max_frames is None or measurement.frames < max_frames:
                original, compressed = next(originals, None), next(compresseds, None)
                if original is None or compressed is None:
                    if original is not compressed:
                        length_note = "the compressed and original videos differ in length; compared the common frames only"
                    break
                measurement.add(original, compressed, prepare_sample(faces, compressed, original))
                bar.update(1)
    rows = measurement.row_results()
    notes = [rows[0].note if measurement.face_frames == 0 else None, length_note]
    result = ClipResult(
        clip=original_path.stem,
        width=size[0],
        height=size[1],
        frames=measurement.frames,
        face_frames=measurement.face_frames,
        keyframes=measurement.keyframes,
        seconds=round(time.perf_counter() - started, 3),
        rows=rows,
        note="; ".join(n for n in notes if n) or None,
    )
    return result, measurement.picked_example()


def compress_clip(clip: Path, destination: Path, crf: int, gop_seconds: float, max_frames: int | None) -> int:
    """libx264 at ``crf`` with an I-frame at least every ``gop_seconds`` (x264's scene cuts may add more)."""
    return degrade_like_a_call(clip, destination, crf, gop_seconds, max_frames, audio=False)


def evaluate(
    clips: Sequence[Path] | Path,
    crf: int,
    models: Sequence[ModelSpec | Path | str],
    out_dir: Path,
    reference_mode: ReferenceMode = "hq",
    max_frames: int | None = None,
    *,
    gop_seconds: float = 1.0,
    settings: RestoreSettings | None = None,
    device: str = "cpu",
    ssim_channel: image_quality.SsimChannel = "y",
    vmaf: bool = False,
    lpips: LpipsWeights | None = None,
    keep_compressed: bool = False,
    progress: bool = False,
    write: bool = True,
) -> EvalReport:
    """Evaluate ``models`` on ``clips`` compressed at ``crf``; writes eval.json, eval.md and grid.png to ``out_dir``.

    ``vmaf`` adds VMAF and VMAF-NEG on whole frames (needs the optional vmaf-torch;
    slow on a CPU, about half a second per 512x512 frame and row). ``lpips`` adds LPIPS on
    the face crops from the user's weight files (see ``eval.lpips``). ``keep_compressed``
    keeps the re-encoded clips in ``out_dir/compressed``; ``write=False`` only returns the report.
    """
    if reference_mode not in REFERENCE_MODES:
        raise ConfigError(f"reference mode: {reference_mode!r} is not one of {', '.join(REFERENCE_MODES)}")
    if not 0 <= crf <= 51:
        raise ConfigError(f"crf: CRF {crf} is outside libx264's range 0..51")
    if max_frames is not None and max_frames < 1:
        raise ConfigError("max_frames: must be at least 1")
    unavailable = vmaf_unavailable_reason()
    if vmaf and unavailable:
        raise MetricUnavailableError(unavailable)
    vmaf_note = None if vmaf else unavailable or "VMAF not measured: not requested (vmaf=True, --vmaf)"
    lpips_model = Lpips.from_files(lpips).to(device) if lpips is not None else None
    lpips_note = (
        f"LPIPS-{lpips.net} on the aligned face crops (RGB scaled to [-1, 1]), weights {Path(lpips.backbone).name} "
        f"+ {Path(lpips.heads).name}"
        if lpips
        else "LPIPS not measured: give the backbone and LPIPS head weight files (no download)"
    )
    settings = settings or RestoreSettings()
    clip_paths = list_clips(clips)
    loaded = _load_models(models, device, settings)
    out_dir = Path(out_dir)
    results: list[ClipResult] = []
    examples: list[Example] = []
    with tempfile.TemporaryDirectory(prefix="kfgan-eval-") as scratch:
        compressed_dir = out_dir / "compressed" if keep_compressed else Path(scratch)
        compressed_dir.mkdir(parents=True, exist_ok=True)
        for clip in clip_paths:
            compressed_path = compressed_dir / f"{clip.stem}-crf{crf}.mp4"
            log.info("compressing %s at CRF %d", clip, crf)
            compress_clip(clip, compressed_path, crf, gop_seconds, max_frames)
            result, example = evaluate_clip(
                clip,
                compressed_path,
                loaded,
                crf,
                reference_mode=reference_mode,
                max_frames=max_frames,
                settings=settings,
                ssim_channel=ssim_channel,
                progress=progress,
                vmaf=vmaf,
                device=device,
                lpips=lpips_model,
            )
            results.append(result)
            if example is not None:
                examples.append(example)
    report = EvalReport(
        crf=crf,
        reference_mode=reference_mode,
        gop_seconds=gop_seconds,
        max_frames=max_frames,
        models=[m.name for m in loaded],
        conventions=image_quality.conventions(ssim_channel),
        clips=results,
        average=average_rows(results),
        vmaf_note=vmaf_note,
        lpips_note=lpips_note,
        examples=examples,
    )
    if write:
        write_report(report, out_dir)
    return report


def write_report(report: EvalReport, out_dir: Path) -> dict[str, Path]:
    """eval.json, eval.md and (when a model restored a face) grid.png in ``out_dir``."""
    written = {
        "json": write_json(report, out_dir / "eval.json"),
        "markdown": write_markdown(report, out_dir / "eval.md"),
    }
    grid = write_grid(report.examples, report.models, out_dir / "grid.png")
    if grid is not None:
        written["grid"] = grid
    return written
