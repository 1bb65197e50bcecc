"""Which generator a command uses when the user names none, and how it is opened."""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kfgan_daemon.errors import ModelError
from kfgan_daemon.restore.face_pipeline import cut_differently
from kfgan_daemon.restore.generator import CropGenerator
from kfgan_daemon.restore.settings import RestoreSettings

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "kfgan-guided.safetensors"
MODEL_ENV = "KFGAN_MODEL"


def default_model_candidates() -> list[Path]:
    """Where the shipped default model may live: a source checkout, then an installed data directory."""
    package_root = Path(__file__).resolve().parents[2]
    return [
        package_root / "models" / DEFAULT_MODEL_NAME,
        Path(sys.prefix) / "share" / "kfgan-daemon" / "models" / DEFAULT_MODEL_NAME,
    ]


def resolve_model_path(checkpoint: str | Path | None) -> Path:
    """The explicit checkpoint, else $KFGAN_MODEL, else the shipped default model (guided)."""
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise ModelError(
                f"checkpoint {path} does not exist; pass the published net_g_55000.pth (see models/README.md) "
                f"or one of ours (.safetensors)"
            )
        return path
    from_env = os.environ.get(MODEL_ENV)
    if from_env:
        return resolve_model_path(from_env)
    for candidate in default_model_candidates():
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(p) for p in default_model_candidates())
    raise ModelError(
        f"no model found (looked for {searched}); pass --checkpoint PATH (the published net_g_55000.pth "
        f"or a model trained with `kfgan-daemon train`), or reinstall the project so that models/{DEFAULT_MODEL_NAME} ships with it"
    )


def open_generator(
    checkpoint: str | Path | None = None,
    variant: str | None = None,
    device: str = "cpu",
    half: bool = False,
    runtime: str = "torch",
    threads: int = 1,
    settings: RestoreSettings | None = None,
) -> CropGenerator:
    """The generator of ``checkpoint`` (default: see :func:`resolve_model_path`), ready for batches of jobs.

    ``runtime="onnxruntime"`` (CPU only) runs it under ONNX Runtime on ``threads``
    threads (see :mod:`kfgan_daemon.restore.onnx_generator`). With ``settings`` (those the
    faces will be cut with), a model whose training faces were cut otherwise is warned about.
    """
    from kfgan_daemon.model import load_generator, read_checkpoint
    from kfgan_daemon.restore.onnx_generator import RUNTIMES, OnnxCropGenerator

    if runtime not in RUNTIMES:
        raise ModelError(f"runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    if runtime == "onnxruntime" and (device != "cpu" or half):
        raise ModelError("runtime 'onnxruntime' runs on the CPU in float32; use --runtime torch for cuda or --half")
    path = resolve_model_path(checkpoint)
    read = read_checkpoint(path)
    if settings is not None:
        warn_if_cut_differently(read.face_settings, settings, path)
    module = load_generator(read, variant=variant, device=device)
    if runtime == "onnxruntime":
        return OnnxCropGenerator(  # type: ignore[return-value]
            module, threads=threads, source=path.resolve(), native_detail=read.native_detail,
            reference_flow=read.reference_flow, quantiser_strength=read.quantiser_strength,
        )
    return CropGenerator(
        module, device=device, half=half, source=path.resolve(), native_detail=read.native_detail,
        reference_flow=read.reference_flow, quantiser_strength=read.quantiser_strength,
    )


def warn_if_cut_differently(record: Mapping[str, Any] | None, settings: RestoreSettings, model: Path) -> list[str]:
    """One warning naming where ``settings`` cut faces unlike the model's training faces (``record``,
    from its file; None: not recorded, nothing to judge); returns the differences."""
    differences = [] if record is None else cut_differently(record, settings)
    if differences:
        log.warning(
            "%s was trained on faces cut with other settings (trained -> now: %s); it restores less well than "
            "it measured", model.name, "; ".join(differences),
        )
    return differences
